"""Blocks drawn as a draft with a confidence stop makes them: the oracle of the pricing tests."""

from __future__ import annotations

import random


def draw_block(rng: random.Random, p: float, c: float, cap: int) -> tuple[int, int, bool]:
    """(drafted, accepted, unsure of the last) of one block of cap `cap`: the draft is sure of
    each token with chance c and ends the block after one it is unsure of; each drafted token
    is accepted with chance p, up to the first rejection."""
    length = 1
    sure = rng.random() < c
    while sure and length < cap:
        length += 1
        sure = rng.random() < c
    accepted = 0
    while accepted < length and rng.random() < p:
        accepted += 1
    return length, accepted, not sure
