"""Sequences in the runner's batched KV cache (workers/batch_kv.py), one at a time: rollback is
exact, release frees, the context is enforced."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import make_model
from workers.model_runner import ModelRunner

CONTEXT = 48
TOKENS = [
    int(t) for t in torch.randint(2, 96, (CONTEXT,), generator=torch.Generator().manual_seed(0))
]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = make_model(tmp_path_factory.mktemp("kv") / "m", seed=3, max_positions=CONTEXT)
    return ModelRunner(path)


def fresh(runner: ModelRunner, tokens: list[int]) -> torch.Tensor:
    """Logits of a one-shot prefill of tokens in a new sequence (released afterwards)."""
    logits = runner.extend("fresh", tokens)
    runner.release("fresh")
    return logits


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keep", [0, 1, 7, 19, 20])
def test_rollback_then_extend_equals_fresh_prefill(runner, keep):
    runner.extend("s", TOKENS[:20])
    runner.rollback("s", keep)
    assert runner.length("s") == keep
    new = TOKENS[30:36]
    got = runner.extend("s", new)
    assert runner.length("s") == keep + len(new)
    want = fresh(runner, TOKENS[:keep] + new)[keep:]
    close(got, want)
    runner.release("s")


def test_repeated_speculative_rounds_stay_exact(runner):
    # The target's pattern: feed a block, keep a prefix, roll back, feed the next block, ...
    committed = TOKENS[:5]
    runner.extend("s", committed[:-1])
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):
        block = [int(t) for t in torch.randint(2, 96, (4,), generator=gen)]
        got = runner.extend("s", [committed[-1], *block])
        close(got, fresh(runner, committed + block)[len(committed) - 1 :])
        keep = int(torch.randint(0, 5, (1,), generator=gen))  # accepted draft tokens
        committed = committed + block[:keep] + [TOKENS[40 + keep]]
        runner.rollback("s", len(committed) - 1)
    close(runner.extend("s", committed[-1:]), fresh(runner, committed)[-1:])
    runner.release("s")


def test_one_token_steps_after_rollback(runner):
    # The draft's pattern: one token at a time, then a rollback into the middle.
    for t in TOKENS[:10]:
        runner.extend("d", [t])
    runner.rollback("d", 6)
    steps = torch.cat([runner.extend("d", [t]) for t in TOKENS[20:24]])
    close(steps, fresh(runner, TOKENS[:6] + TOKENS[20:24])[6:])
    runner.release("d")


def test_sequences_do_not_share_caches(runner):
    a = runner.extend("a", TOKENS[:8])
    runner.extend("b", TOKENS[10:30])
    runner.rollback("b", 3)
    close(runner.extend("a", TOKENS[8:12]), fresh(runner, TOKENS[:12])[8:])
    close(a, fresh(runner, TOKENS[:8]))
    runner.release("a")
    runner.release("b")


def test_rollback_forward_raises(runner):
    runner.extend("s", TOKENS[:5])
    for bad in (6, 100, -1):
        with pytest.raises(ValueError, match="roll back"):
            runner.rollback("s", bad)
    assert runner.length("s") == 5
    runner.rollback("s", 5)  # to the current length: a no-op
    assert runner.length("s") == 5
    close(runner.extend("s", TOKENS[5:7]), fresh(runner, TOKENS[:7])[5:])
    runner.release("s")


def test_release_frees(runner):
    before = runner.live_sequences
    runner.extend("x", TOKENS[:4])
    runner.extend("y", TOKENS[:4])
    assert runner.live_sequences == before + 2
    assert runner.release("x") is True
    assert runner.live_sequences == before + 1
    assert runner.release("x") is False  # twice: nothing left to free
    with pytest.raises(KeyError, match="x"):
        runner.length("x")
    with pytest.raises(KeyError):
        runner.rollback("x", 0)
    assert runner.release("never") is False
    runner.release("y")
    assert runner.live_sequences == before
    # A released id starts from scratch.
    close(runner.extend("x", TOKENS[:3]), fresh(runner, TOKENS[:3]))
    assert runner.length("x") == 3
    runner.release("x")


def test_empty_extend_creates_an_empty_sequence(runner):
    out = runner.extend("e", [])
    assert out.shape == (0, runner.vocab_size) and runner.length("e") == 0
    close(runner.extend("e", TOKENS[:3]), fresh(runner, TOKENS[:3]))
    runner.release("e")


def test_context_limit(runner):
    assert runner.max_context == CONTEXT
    runner.extend("c", TOKENS[: CONTEXT - 2])
    with pytest.raises(ValueError, match="context") as info:
        runner.extend("c", TOKENS[:3])
    assert str(CONTEXT) in str(info.value)
    assert runner.length("c") == CONTEXT - 2  # nothing was applied
    runner.extend("c", TOKENS[:2])  # exactly full is fine
    assert runner.length("c") == CONTEXT
    runner.release("c")


def test_context_limit_on_a_new_sequence_leaves_nothing_behind(runner):
    before = runner.live_sequences
    with pytest.raises(ValueError, match="context"):
        runner.extend("big", TOKENS + TOKENS[:1])
    assert runner.live_sequences == before and "big" not in runner.kv
