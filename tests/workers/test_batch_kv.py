"""The batched ragged KV (workers/batch_kv.py) through ModelRunner.extend_batch: every row's logits
equal that sequence run alone, through ragged extends, rollbacks (holes), joins, leaves (free rows)
and both compactions; the budget refuses admission and changes nothing."""

from __future__ import annotations

import random

import pytest
import torch

from tests.tiny_models import make_model
from workers.errors import KVBudgetExceeded
from workers.model_runner import ModelRunner

CONTEXT = 128


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("bkv") / "m", seed=4, max_positions=CONTEXT)


@pytest.fixture(scope="module")
def runner(path):
    return ModelRunner(path)


@pytest.fixture(scope="module")
def oracle(path):
    """A second runner: each sequence alone, prefilled from scratch."""
    ref = ModelRunner(path)

    def run(tokens: list[int]) -> torch.Tensor:
        out = ref.extend("o", tokens)
        ref.release("o")
        return out

    return run


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def rand_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(2, 96) for _ in range(n)]


def test_a_prefill_without_logits_fills_the_same_cache(path, oracle):
    """Prefill asks for no logits (only the head of one position runs); what follows is the same."""
    rng = random.Random(7)
    prompts = {f"n{i}": rand_tokens(rng, n) for i, n in enumerate([9, 2, 30])}
    quiet = ModelRunner(path)
    outs = quiet.extend_batch(list(prompts.items()), logits=False)
    assert all(o.shape == (0, quiet.vocab_size) for o in outs)
    nxt = {sid: rand_tokens(rng, 2) for sid in prompts}
    for (sid, toks), got in zip(nxt.items(), quiet.extend_batch(list(nxt.items())), strict=True):
        assert quiet.length(sid) == len(prompts[sid]) + 2
        close(got, oracle(prompts[sid] + toks)[-2:])


def test_ragged_batch_equals_each_row_alone(runner, oracle):
    rng = random.Random(0)
    prompts = {f"r{i}": rand_tokens(rng, n) for i, n in enumerate([5, 1, 12, 7])}
    outs = runner.extend_batch(list(prompts.items()))  # a batched ragged prefill
    for (sid, toks), got in zip(prompts.items(), outs, strict=True):
        assert runner.length(sid) == len(toks)
        close(got, oracle(toks))
    new = {"r0": rand_tokens(rng, 3), "r2": rand_tokens(rng, 1), "r3": rand_tokens(rng, 5)}
    outs = runner.extend_batch(list(new.items()))  # r1 not named: padded alongside
    for (sid, toks), got in zip(new.items(), outs, strict=True):
        close(got, oracle(prompts[sid] + toks)[-len(toks) :])
    close(runner.extend("r1", [9]), oracle(prompts["r1"] + [9])[-1:])
    for sid in prompts:
        assert runner.release(sid)
    assert runner.live_sequences == 0 and runner.kv_tokens == 0


@pytest.mark.parametrize("seed", [1, 2])
def test_random_rounds_joins_leaves_and_compaction(path, oracle, seed):
    runner = ModelRunner(path)
    runner.kv.slack = 4  # compact often
    rng = random.Random(seed)
    seqs: dict[str, list[int]] = {}
    compactions = {"rows": 0, "cols": 0}
    for name in ("compact_rows", "compact_columns"):
        orig = getattr(runner.kv, name)

        def counted(orig=orig, key=name.split("_")[1]):
            compactions["rows" if key == "rows" else "cols"] += 1
            return orig()

        setattr(runner.kv, name, counted)
    next_id = 0
    for it in range(60):
        op = rng.random()
        join, leave = (0.3, 0.35) if it < 30 else (0.05, 0.35)  # grow, then mostly shrink
        if op < join or not seqs:  # joins (one or several at once)
            joins = {}
            for _ in range(rng.randint(1, 3)):
                joins[f"s{next_id}"] = rand_tokens(rng, rng.randint(1, 10))
                next_id += 1
            for (sid, toks), got in zip(
                joins.items(), runner.extend_batch(list(joins.items())), strict=True
            ):
                close(got, oracle(toks))
                seqs[sid] = toks
        elif op < leave:  # a leave
            sid = rng.choice(sorted(seqs))
            assert runner.release(sid)
            del seqs[sid]
        else:  # a round: a ragged extend of some rows, then rollbacks of some
            named = [s for s in sorted(seqs) if rng.random() < 0.8 and len(seqs[s]) < CONTEXT - 8]
            if not named:
                continue
            items = [(s, rand_tokens(rng, rng.randint(1, 5))) for s in named]
            for (sid, toks), got in zip(items, runner.extend_batch(items), strict=True):
                close(got, oracle(seqs[sid] + toks)[-len(toks) :])
                seqs[sid] = seqs[sid] + toks
            for sid in named:
                if rng.random() < 0.6:
                    keep = rng.randint(0, len(seqs[sid]))
                    runner.rollback(sid, keep)
                    seqs[sid] = seqs[sid][:keep]
        assert runner.kv_tokens == sum(len(t) for t in seqs.values())
        assert runner.live_sequences == len(seqs)
        for sid, toks in seqs.items():
            assert runner.length(sid) == len(toks)
    # Every survivor still continues exactly.
    items = [(s, [7]) for s in sorted(seqs)]
    for (sid, toks), got in zip(items, runner.extend_batch(items), strict=True):
        close(got, oracle(seqs[sid] + toks)[-1:])
    assert compactions["cols"] > 0
    for sid in list(seqs):
        runner.release(sid)
    assert runner.live_sequences == 0 and runner.kv_tokens == 0
    assert runner.kv.shape == (0, 0)


def test_free_rows_are_reused_then_squeezed(runner, oracle):
    rng = random.Random(6)
    toks = {f"f{i}": rand_tokens(rng, 3 + i) for i in range(8)}
    runner.extend_batch(list(toks.items()))
    assert runner.kv.shape[0] == 8
    for sid in ("f0", "f2"):
        runner.release(sid)
        del toks[sid]
    toks["g"] = rand_tokens(rng, 4)
    close(runner.extend("g", toks["g"]), oracle(toks["g"]))
    assert runner.kv.row("g") == 0 and runner.kv.shape[0] == 8  # a free row is reused
    for sid in ("f1", "f3", "f4", "f5"):
        runner.release(sid)
        del toks[sid]
    items = [(s, [13]) for s in toks]
    for (sid, t), got in zip(items, runner.extend_batch(items), strict=True):
        close(got, oracle(toks[sid] + t)[-1:])
    assert runner.kv.shape[0] == 3  # half the rows were free: squeezed before the forward
    for sid in toks:
        runner.release(sid)


def test_explicit_compactions_keep_logits(runner, oracle):
    rng = random.Random(5)
    toks = {f"c{i}": rand_tokens(rng, 6 + i) for i in range(5)}
    runner.extend_batch(list(toks.items()))
    for i, sid in enumerate(toks):
        runner.rollback(sid, 2 + i)
        toks[sid] = toks[sid][: 2 + i]
    runner.release("c1")
    runner.release("c3")
    del toks["c1"], toks["c3"]
    runner.kv.compact_rows()
    runner.kv.compact_columns()
    assert runner.kv.shape == (3, max(len(t) for t in toks.values()))
    items = [(s, [11, 12]) for s in toks]
    for (sid, t), got in zip(items, runner.extend_batch(items), strict=True):
        close(got, oracle(toks[sid] + t)[-2:])
    for sid in toks:
        runner.release(sid)


def test_budget_refuses_admission_and_changes_nothing(path):
    runner = ModelRunner(path, max_kv_tokens=20)
    runner.extend("a", list(range(2, 14)))  # 12 held
    with pytest.raises(KVBudgetExceeded):
        runner.extend_batch([("a", [5]), ("b", list(range(2, 12)))])  # b: 10 more -> 23
    assert "b" not in runner.kv and runner.length("a") == 12 and runner.kv_tokens == 12
    runner.extend("b", list(range(2, 10)))  # exactly 20
    runner.extend("a", [5, 6])  # an admitted sequence grows past the budget: never refused
    assert runner.kv_tokens == 22
    runner.release("a")
    runner.release("b")
    assert runner.kv_tokens == 0


def test_duplicate_ids_and_context_are_refused_up_front(runner):
    with pytest.raises(ValueError, match="twice"):
        runner.extend_batch([("d", [3]), ("d", [4])])
    with pytest.raises(ValueError, match="context"):
        runner.extend_batch([("d", [3]), ("e", [4] * (CONTEXT + 1))])
    assert "d" not in runner.kv and "e" not in runner.kv


def test_scattered_rows_run_as_a_gathered_sub_batch(runner, oracle):
    """A few rows far apart in a wide batch run gathered (not the whole span padded); their new
    KV lands in their own rows, the others are untouched."""
    rng = random.Random(7)
    toks = {f"w{i}": rand_tokens(rng, 4 + i % 5) for i in range(12)}
    runner.extend_batch(list(toks.items()))
    steps = []
    orig = runner.kv.begin

    def spy(items):
        steps.append(orig(items))
        return steps[-1]

    runner.kv.begin = spy
    try:
        for round_ in range(3):
            picked = ["w0", "w6", "w11"] if round_ != 1 else ["w1", "w11"]
            items = [(s, rand_tokens(rng, 1 + round_)) for s in picked]
            for (sid, t), got in zip(items, runner.extend_batch(items), strict=True):
                close(got, oracle(toks[sid] + t)[-len(t) :])
                toks[sid] = toks[sid] + t
            runner.rollback("w6", len(toks["w6"]) - 1)
            toks["w6"] = toks["w6"][:-1]
        assert all(isinstance(st.sel, torch.Tensor) for st in steps)  # gathered each time
        items = [(s, [21]) for s in toks]  # then every row together, contiguous
        for (sid, t), got in zip(items, runner.extend_batch(items), strict=True):
            close(got, oracle(toks[sid] + t)[-1:])
        assert isinstance(steps[-1].sel, slice)
    finally:
        runner.kv.begin = orig
        for sid in toks:
            runner.release(sid)
