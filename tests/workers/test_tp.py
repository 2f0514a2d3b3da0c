"""Tensor-parallel target over gloo: two rank actors in one placement group behave as TP = 1.

Its prefill answers the first token, as TP = 1's does: what a plain step at the prompt's length
gives (tests/workers/plain_oracle.py); the sequence's committed length is then n + 1.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from threading import Lock

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from tests.deploy.helpers import init_ray, tiny_pair, tmpdir
from tests.workers.one_row import plain_step, prefill, verify
from tests.workers.plain_oracle import plain_step_token
from workers.batch import PrefillRow, VerifyRow
from workers.errors import StaleSequenceError
from workers.target import TargetWorker
from workers.tp import RankSpec, TensorParallelError, TensorParallelTarget
from workers.types import SamplingParams

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 33, 2, 41, 9]


@pytest.fixture(scope="module")
def models():
    root = tmpdir("sd-tp-")
    yield tiny_pair(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tp2(models):
    init_ray(num_cpus=3, resources={"target_pool": 2})
    try:
        tp = TensorParallelTarget(models[0], 2, rank=RankSpec(1.0, 0.0, (("target_pool", 1.0),)))
        yield tp
        tp.close()
    finally:
        ray.shutdown()


def hf_greedy(path, prompt, n):
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[0, len(prompt) :].tolist()


def plain(worker, seq, n, params=SamplingParams()):
    """n tokens after PROMPT: the prefill's first token, then n - 1 plain steps."""
    first = prefill(worker, seq, PROMPT, params)
    return [first, *(plain_step(worker, seq, len(PROMPT) + i) for i in range(1, n))]


def per_rank_tokens(tp, seq_id: str) -> list[list[int]]:
    """Each rank's committed tokens of the sequence (they must all agree)."""
    return ray.get([r.call.remote("committed_tokens", (seq_id,), {}) for r in tp.ranks])


def test_ranks_sit_in_the_target_pool(tp2):
    res = tp2.assigned_resources()
    assert len(res) == 2
    assert all(r.get("target_pool") == 1.0 and r.get("CPU") == 1.0 for r in res)
    assert len({i["pid"] for i in tp2.rank_info}) == 2  # two processes, one rank each


def test_greedy_plain_steps_equal_tp1_and_hf(tp2, models):
    ref = TargetWorker.from_path(models[0])
    want = plain(ref, "a", 24)
    assert plain(tp2, "a", 24) == want
    assert want == hf_greedy(models[0], PROMPT, 24)
    assert want[0] == plain_step_token(ref.runner.model, PROMPT, SamplingParams())
    assert tp2.release("a") and tp2.live_sequences == 0


def test_verify_blocks_equal_tp1(tp2, models):
    ref = TargetWorker.from_path(models[0])
    cont = plain(ref, "r", 13)
    for w in (ref, tp2):
        assert prefill(w, "v", PROMPT) == cont[0]
    committed = len(PROMPT) + 1  # the prompt and the prefill's token
    # A right block, a block wrong at its 3rd token, then a single token.
    blocks = [cont[1:5], [*cont[5:7], (cont[7] + 1) % 90, 7], [3]]
    for block in blocks:
        v_ref = verify(ref, "v", committed, block)
        v_tp = verify(tp2, "v", committed, block)
        assert v_tp == v_ref
        committed += v_ref.accepted + 1
    assert per_rank_tokens(tp2, "v") == [ref.committed_tokens("v")] * 2
    # Worker refusals come back as themselves (not wrapped): a stale committed length.
    with pytest.raises(StaleSequenceError, match="committed length"):
        verify(tp2, "v", committed - 1, [1, 2])
    tp2.release("v")


def test_unseeded_sampling_keeps_ranks_in_lock_step(tp2):
    params = SamplingParams(temperature=1.0)  # no seed: the group draws one for all ranks
    plain(tp2, "s", 16, params)
    per_rank = per_rank_tokens(tp2, "s")
    assert per_rank[0] == per_rank[1]
    tp2.release("s")


def test_concurrent_callers_are_serialized(tp2, models):
    ref = TargetWorker.from_path(models[0])
    want = plain(ref, "c", 10)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: plain(tp2, f"c{i}", 10), range(4)))
    assert all(o == want for o in outs)
    for i in range(4):
        tp2.release(f"c{i}")
    tp2.check_health()


def test_batched_calls_equal_tp1_and_keep_ranks_in_lock_step(tp2, models):
    ref = TargetWorker.from_path(models[0])
    rows = [
        PrefillRow("ba", PROMPT, SamplingParams()),
        PrefillRow("bb", PROMPT[2:], SamplingParams(temperature=1.0)),  # unseeded
        PrefillRow("bc", PROMPT[:3], SamplingParams()),
    ]
    firsts = tp2.prefill_batch(rows)
    assert [firsts[0], firsts[2]] == ref.prefill_batch([rows[0], rows[2]])
    assert [firsts[0], firsts[2]] == [
        plain_step_token(ref.runner.model, r.token_ids, r.params) for r in (rows[0], rows[2])
    ]
    assert isinstance(firsts[1], int) and 0 <= firsts[1] < ref.runner.vocab_size
    cont = plain(ref, "r", 5)
    assert cont[0] == firsts[0]
    n = {r.seq_id: len(r.token_ids) + 1 for r in rows}  # the prompt and the prefill's token
    vrows = [
        VerifyRow("ba", n["ba"], [*cont[1:3], (cont[3] + 1) % 90]),
        VerifyRow("bb", n["bb"]),
        VerifyRow("bc", n["bc"]),
        VerifyRow("bc", n["bc"] + 3),  # stale: fails alone
    ]
    got = tp2.verify_batch(vrows)
    want = ref.verify_batch([vrows[0], vrows[2]])
    assert [got[0], got[2]] == want and got[1].accepted == 0
    assert isinstance(got[3], StaleSequenceError)
    for sid in ("ba", "bb", "bc"):
        per_rank = per_rank_tokens(tp2, sid)
        assert per_rank[0] == per_rank[1]
        tp2.release(sid)
    assert tp2.live_sequences == 0 and tp2.kv_tokens == 0


@ray.remote(num_cpus=0)
class _StuckRank:
    """A rank whose calls do not return: as a live rank waits in a collective for a dead peer
    until the backend's own timeout (gloo: minutes)."""

    def call(self, method: str, args: tuple, kwargs: dict) -> None:
        time.sleep(60)

    def ping(self) -> int:
        return 0


def test_a_call_ends_when_a_rank_dies_while_another_waits_for_it(tp2):
    """The dead rank's failure ends the call; it does not wait for the live rank first (a
    serving test once saw a request hang past its 60-second deadline after a rank was killed)."""
    stuck, dead = _StuckRank.remote(), _StuckRank.remote()
    ray.get([stuck.ping.remote(), dead.ping.remote()])
    ray.kill(dead)
    group = TensorParallelTarget.__new__(TensorParallelTarget)  # the fan-out alone, no models
    group.ranks, group.tp_size, group._broken, group._lock = [stuck, dead], 2, None, Lock()
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError, match="broken"):
        group._all("prefill_batch")
    assert time.monotonic() - t0 < 10  # the stuck rank is given 5 s after the failure, not 60
    with pytest.raises(TensorParallelError):
        group._all("prefill_batch")  # broken for good
    ray.kill(stuck)


def test_a_dead_rank_breaks_the_group_for_good(tp2):
    """(Last: it kills a rank.) Calls fail with TensorParallelError, not a hang or a bare gloo
    error; later calls and health checks fail at once, so Serve replaces the replica."""
    ray.kill(tp2.ranks[1])
    with pytest.raises(TensorParallelError, match="broken"):
        tp2.prefill_batch([PrefillRow("d", PROMPT, SamplingParams())])
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError):
        tp2.verify_batch([VerifyRow("d", len(PROMPT))])
    with pytest.raises(TensorParallelError):
        tp2.check_health()
    assert time.monotonic() - t0 < 1.0
