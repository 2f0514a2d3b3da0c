"""Blocks drawn as a draft with a confidence stop makes them: the oracle of the pricing tests."""

from __future__ import annotations

import random


def draw_block(rng: random.Random, p: float, c: float, cap: int) -> tuple[int, int]:
    """(drafted, accepted) of one block of cap `cap`: the draft goes on after each token with
    chance c; each drafted token is accepted with chance p, up to the first rejection."""
    length = 1
    while length < cap and rng.random() < c:
        length += 1
    accepted = 0
    while accepted < length and rng.random() < p:
        accepted += 1
    return length, accepted
