"""warp_probs against transformers' own logits warpers; greedy; SamplingParams validation."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from workers.sampling import PositionalRng, next_token, warp_probs
from workers.types import SamplingParams


def hf_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """What HF `generate(do_sample=True)` samples from: temperature, top-k, top-p, softmax."""
    scores = logits.clone().float()
    ids = torch.zeros(scores.shape[0], 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(float(p.temperature))(ids, scores)
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    return scores.softmax(-1)


SETTINGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.5, top_k=5),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=0.3, top_k=40),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=0.8, top_p=0.5),
    SamplingParams(temperature=2.0, top_p=0.05),
    SamplingParams(temperature=0.9, top_k=10, top_p=0.8),
    SamplingParams(temperature=1.2, top_k=3, top_p=0.95),
    SamplingParams(temperature=1.0, top_k=200, top_p=0.99),  # top_k above the vocabulary
]


@pytest.mark.parametrize("params", SETTINGS, ids=repr)
@pytest.mark.parametrize("vocab", [7, 96, 1000])
def test_warp_probs_equals_hf_warpers(params, vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(32, vocab, generator=gen) * 3
    ours = warp_probs(logits, params)
    ref = hf_probs(logits, params)
    assert ours.dtype == torch.float32 and ours.shape == logits.shape
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    # Masked tokens are exactly zero in both, and on the same positions.
    assert torch.equal(ours == 0, ref == 0)
    torch.testing.assert_close(ours.sum(-1), torch.ones(32))


def test_warp_probs_keeps_batch_shape_and_dtype():
    logits = torch.randn(2, 3, 50, dtype=torch.float64)
    out = warp_probs(logits, SamplingParams(temperature=0.5, top_k=7, top_p=0.7))
    assert out.shape == (2, 3, 50) and out.dtype == torch.float32
    assert ((out > 0).sum(-1) <= 7).all() and ((out > 0).sum(-1) >= 1).all()
    ref = hf_probs(logits.reshape(6, 50), SamplingParams(temperature=0.5, top_k=7, top_p=0.7))
    torch.testing.assert_close(out.reshape(6, 50), ref, atol=1e-6, rtol=1e-5)


def test_top_p_always_keeps_the_most_likely_token():
    logits = torch.tensor([[10.0, 0.0, -1.0, -2.0]])
    for top_p in (1e-6, 0.01, 0.5):
        out = warp_probs(logits, SamplingParams(temperature=1.0, top_p=top_p))
        assert out[0, 0] == 1.0 and out[0, 1:].sum() == 0


def test_top_p_boundary_matches_hf():
    # Probabilities .5, .25, .125, .125: the nucleus for top_p = .75 is exactly the top two.
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    for top_p in (0.5, 0.75, 0.8, 0.875, 1.0):
        p = SamplingParams(temperature=1.0, top_p=top_p)
        torch.testing.assert_close(warp_probs(logits, p), hf_probs(logits, p))


def test_greedy_is_one_hot_argmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 33, generator=gen)
    out = warp_probs(logits, SamplingParams())
    assert torch.equal(out, torch.nn.functional.one_hot(logits.argmax(-1), 33).float())
    # top-k / top-p do not matter when greedy
    out2 = warp_probs(logits, SamplingParams(temperature=0.0, top_k=3, top_p=0.5))
    assert torch.equal(out, out2)
    rng = PositionalRng(0, 0)
    for row in logits:
        assert next_token(row, SamplingParams(), rng.at(0)) == int(row.argmax())


def test_next_token_samples_from_warp_probs():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    params = SamplingParams(temperature=0.8, top_k=4, top_p=0.9)
    probs = warp_probs(logits, params)
    rng = PositionalRng(123, 0)
    n = 5000
    counts = torch.bincount(
        torch.tensor([next_token(logits, params, rng.at(i)) for i in range(n)]), minlength=6
    )
    assert counts[probs == 0].sum() == 0
    tv = 0.5 * (counts / n - probs).abs().sum()
    # E[TV] <= 0.5 * sqrt(2 * 6 / (pi * n)) ~ 0.014; plus 2 / sqrt(n) of slack
    assert tv < 0.045


def test_positional_rng_is_keyed_by_seed_stream_position():
    def draw(seed, stream, pos):
        return torch.rand(4, generator=PositionalRng(seed, stream).at(pos)).tolist()

    assert draw(5, 0, 3) == draw(5, 0, 3)
    assert draw(5, 0, 3) != draw(5, 0, 4)
    assert draw(5, 0, 3) != draw(5, 1, 3)
    assert draw(5, 0, 3) != draw(6, 0, 3)
    # Unseeded requests get a fresh random base each.
    assert PositionalRng(None, 0).base != PositionalRng(None, 0).base


# -- validation ---------------------------------------------------------------------------------


def test_defaults_are_greedy():
    p = SamplingParams()
    assert p.greedy and p.top_k == 0 and p.top_p == 1.0 and p.seed is None
    assert not SamplingParams(temperature=0.5).greedy


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": "1.0"}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 0},
        {"temperature": 1e-3},
        {"temperature": 5},
        {"top_k": 0},
        {"top_k": 1},
        {"top_p": 1},
        {"top_p": 1e-9},
        {"seed": 0},
        {"seed": 2**62},
    ],
)
def test_valid_params(kw):
    SamplingParams(**kw)
