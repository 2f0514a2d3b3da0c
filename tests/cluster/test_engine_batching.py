"""Continuous batching through the in-process engine (the same StepScheduler the cluster runs).

Many concurrent requests with different prompt lengths and modes join and leave one batch; each
row's output is exactly what the target alone gives (HF `generate` is the oracle), seeded sampling
repeats whatever shares its batch, and cancelled rows leave nothing behind on any worker.
"""

from __future__ import annotations

import random
import threading

import pytest

from cluster.engine import SpecEngine
from cluster.scheduling.policy import SpecMode
from cluster.scheduling.rounds import FinishReason
from tests.cluster.test_engine_greedy import hf_greedy
from tests.tiny_models import make_model
from workers.types import SamplingParams

PROMPTS = [
    "a",
    "def f(x):",
    "class Node:\n    def __init__(self):",
    "hello world",
    "import os, sys\nprint(os.getcwd())",
    "x = [1, 2, 3]",
    "for i in range(10):\n    total += i * i\n",
    "q",
]
# (mode, k): greedy spec with a fixed k, adaptive spec, AUTO, plain.
MODES = [(SpecMode.ON, 2), (SpecMode.ON, None), (SpecMode.AUTO, None), (SpecMode.OFF, None)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine_batching")
    make_model(d / "target", seed=0)
    make_model(d / "near", seed=0)
    make_model(d / "bad", seed=1)
    return d


@pytest.fixture(scope="module")
def engines(model_dir):
    out = {
        "same": SpecEngine.from_paths(model_dir / "target", model_dir / "near"),
        "bad": SpecEngine.from_paths(model_dir / "target", model_dir / "bad"),
    }
    yield out
    for e in out.values():
        e.close()


@pytest.fixture(scope="module")
def hf_target(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir / "target", local_files_only=True).eval()


def assert_no_live(engine: SpecEngine) -> None:
    for w in (engine.target.worker, engine.draft.worker):
        assert w.live_sequences == 0 and w.runner.live_sequences == 0


def run_concurrently(jobs):
    """Run callables on their own threads at once; returns their results in order."""
    out: list = [None] * len(jobs)
    errors: list = []

    def run(i, job):
        try:
            out[i] = job()
        except Exception as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return out


@pytest.mark.parametrize("which", ["same", "bad"])
def test_sixteen_mixed_streams_in_one_batch_equal_hf_generate(engines, hf_target, which):
    engine = engines[which]
    rng = random.Random(0)
    jobs, expected = [], []
    for i in range(16):
        prompt = PROMPTS[i % len(PROMPTS)]
        mode, k = MODES[i % len(MODES)]
        max_new = rng.choice([5, 12, 30, 48])  # rows leave the batch at different steps
        ids = engine.encode(prompt)
        expected.append(hf_greedy(hf_target, ids, max_new))
        delay = rng.random() * 0.05  # and join it at different steps

        def job(prompt=prompt, mode=mode, k=k, max_new=max_new, delay=delay):
            threading.Event().wait(delay)
            return engine.generate(prompt, max_new_tokens=max_new, mode=mode, k=k)

        jobs.append(job)
    before = engine.scheduler.max_batch
    results = run_concurrently(jobs)
    for i, (res, ref) in enumerate(zip(results, expected, strict=True)):
        assert res.token_ids == ref, (i, MODES[i % len(MODES)])
        if MODES[i % len(MODES)][0] is SpecMode.OFF:
            assert res.stats.rounds == 0
    assert max(before, engine.scheduler.max_batch) > 4  # they really shared target passes
    assert_no_live(engine)


def test_seeded_sampling_repeats_whatever_shares_its_batch(engines):
    engine = engines["same"]
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=1234)
    alone = engine.generate("def f(x):", max_new_tokens=32, sampling=params)
    noise = [(lambda p=p: engine.generate(p, max_new_tokens=40, mode=SpecMode.ON)) for p in PROMPTS]
    seeded = [lambda: engine.generate("def f(x):", max_new_tokens=32, sampling=params)] * 3
    results = run_concurrently([*noise, *seeded])
    for res in results[len(noise) :]:
        assert res.token_ids == alone.token_ids
    assert_no_live(engine)


def test_cancelled_streams_leave_nothing_behind(engines, hf_target):
    engine = engines["same"]
    rng = random.Random(7)
    keep_prompt = PROMPTS[2]
    keep_ref = hf_greedy(hf_target, engine.encode(keep_prompt), 48)

    def cancelled(seed: int):
        r = random.Random(seed)
        stream = engine.stream(
            PROMPTS[seed % len(PROMPTS)],
            max_new_tokens=64,
            mode=MODES[seed % len(MODES)][0],
            k=MODES[seed % len(MODES)][1],
        )
        stop_after = r.randint(0, 4)
        for n, _ in enumerate(stream):
            if n >= stop_after:
                break
        stream.close()

    # 200 streams cancelled at random points, 16 at a time, while full-length streams run.
    for wave in range(0, 200, 16):
        jobs = [lambda s=s: cancelled(s) for s in range(wave, min(200, wave + 16))]
        jobs.append(lambda: engine.generate(keep_prompt, max_new_tokens=48).token_ids)
        results = run_concurrently(jobs)
        assert results[-1] == keep_ref
    assert_no_live(engine)
    assert engine.scheduler.load == 0
    res = engine.generate(keep_prompt, max_new_tokens=48, mode=SpecMode.ON, k=rng.randint(1, 8))
    assert res.token_ids == keep_ref
    assert res.finish_reason in (FinishReason.LENGTH, FinishReason.EOS)


def test_the_kv_budget_bounds_admission_never_the_running_rows(model_dir, hf_target):
    from cluster.scheduling.scheduler import SchedulerOptions
    from workers.draft import DraftWorker
    from workers.errors import KVBudgetExceeded
    from workers.target import TargetWorker

    budget = 160  # two rows of (prompt + 48 new + a block of 8) at a time
    engine = SpecEngine(
        TargetWorker.from_path(model_dir / "target", max_kv_tokens=budget),
        DraftWorker.from_path(model_dir / "near"),
        options=SchedulerOptions(kv_budget_tokens=budget),
    )
    try:
        with pytest.raises(KVBudgetExceeded):  # can never fit: refused at once, nothing held
            engine.generate(PROMPTS[0], max_new_tokens=200)
        peak = [0]
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                peak[0] = max(peak[0], engine.target.worker.runner.kv_tokens)
                stop.wait(0.001)

        watcher = threading.Thread(target=watch)
        watcher.start()
        prompts = [PROMPTS[i % 4] for i in range(6)]
        results = run_concurrently(
            [lambda p=p: engine.generate(p, max_new_tokens=48, mode=SpecMode.ON) for p in prompts]
        )
        stop.set()
        watcher.join()
        for p, res in zip(prompts, results, strict=True):
            assert res.token_ids == hf_greedy(hf_target, engine.encode(p), 48)
        assert 0 < peak[0] <= budget
        assert engine.scheduler.max_batch <= 2
        assert_no_live(engine)
    finally:
        engine.close()
