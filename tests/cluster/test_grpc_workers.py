"""The internal worker API (protos/worker.proto) against real worker server processes.

One target and one draft process per module. Oracles: the in-process TargetWorker / DraftWorker on
the same checkpoint (same verdicts, same drafts, same sampled tokens: q travels exactly), and fresh
sequences (a refused stale call leaves the sequence as if it never came). A target's prefill
answers the first token (committed length n + 1), which must equal what a plain step at the
prompt's length gives (tests/workers/plain_oracle.py); a draft's answers none (committed length n).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import pytest
import torch

from cluster.routing.worker_processes import worker_process
from cluster.scheduling.worker_api import WorkerUnavailable
from cluster.transport.grpc_workers import GrpcDraft, GrpcTarget, open_channel
from cluster.transport.pools import EndpointState, WorkerPool
from protos import worker_pb2 as wpb
from protos import worker_pb2_grpc
from tests.cluster.grpc_procs import make_checkpoints, start_all, stats, stop_all, worker
from tests.workers.one_row import plain_step, prefill, propose, verify
from tests.workers.plain_oracle import plain_step_token
from workers.batch import PrefillRow, ProposeRow, VerifyRow
from workers.draft import DraftWorker
from workers.errors import KVBudgetExceeded, StaleSequenceError, UnknownSequenceError
from workers.model_runner import load_tokenizer
from workers.target import TargetWorker
from workers.types import SamplingParams, SparseQ
from workers.wire import (
    pack_q,
    sampling_from_proto,
    sampling_to_proto,
    tokenizer_fingerprint,
    unpack_q,
)

PROMPT = [70, 71, 72, 2, 67, 70, 70, 10, 67, 14, 2, 68, 11, 28]  # "def add(a, b):"
SAMPLED = SamplingParams(temperature=0.8, seed=1)
GREEDY = wpb.SamplingParams()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("grpc_workers"))


@pytest.fixture(scope="module")
def servers(ckpts):
    procs = start_all(worker("target", ckpts["target"]), worker("draft", ckpts["near"]))
    yield {"target": procs[0].address, "draft": procs[1].address}
    stop_all(procs)


@pytest.fixture(scope="module")
def stubs(servers):
    t_ch, d_ch = open_channel(servers["target"]), open_channel(servers["draft"])
    yield worker_pb2_grpc.TargetWorkerStub(t_ch), worker_pb2_grpc.DraftWorkerStub(d_ch)
    t_ch.close()
    d_ch.close()


@pytest.fixture(scope="module")
def local(ckpts):
    """The in-process workers on the same checkpoints: the oracle."""
    return TargetWorker.from_path(ckpts["target"]), DraftWorker.from_path(ckpts["near"])


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def first_token(local, token_ids, params: SamplingParams = SamplingParams()) -> int:
    """The oracle of a target's prefill token: a plain step at the prompt's length."""
    return plain_step_token(local[0].runner.model, token_ids, params)


def prefilled(result, n: int, token: int | None) -> None:
    """A PrefillBatch's one row: OK, with the target's first token (committed n + 1) or, from a
    draft (token None), none (committed n)."""
    (row,) = result.rows
    assert row.status.code == 0, row.status.message
    if token is None:
        assert not row.result.HasField("token") and row.result.committed_len == n
    else:
        assert row.result.HasField("token") and row.result.token == token
        assert row.result.committed_len == n + 1


def _row(result) -> tuple[grpc.StatusCode, str]:
    """The status of the one row of a batched answer."""
    (row,) = result.rows
    code = next(c for c in grpc.StatusCode if c.value[0] == row.status.code)
    return code, row.status.message


def prefill_rows(stub, *rows: wpb.PrefillRequest):
    return stub.PrefillBatch(wpb.PrefillBatchRequest(rows=rows))


def propose_rows(stub, *rows: wpb.ProposeRequest):
    return stub.ProposeBatch(wpb.ProposeBatchRequest(rows=rows))


def verify_rows(stub, *rows: wpb.VerifyRequest):
    return stub.VerifyBatch(wpb.VerifyBatchRequest(rows=rows))


# -- wire --------------------------------------------------------------------------------------


def test_q_packing_is_exact_and_rejects_garbage():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 5, generator=g)
    q = SparseQ(torch.randint(0, 96, (3, 5), generator=g), probs / probs.sum(1, keepdim=True))
    back = unpack_q(pack_q(q))
    assert torch.equal(back.indices, q.indices) and back.indices.dtype == torch.int64
    assert torch.equal(back.probs, q.probs.float())
    assert pack_q(None) == b"" and unpack_q(b"") is None
    for bad in (b"\x01\x02", pack_q(q)[:-3]):
        with pytest.raises(ValueError, match="^q: "):
            unpack_q(bad)


def test_sampling_params_round_trip_and_top_p_zero_means_unset():
    p = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=3)
    assert sampling_from_proto(sampling_to_proto(p)) == p
    assert sampling_from_proto(wpb.SamplingParams(temperature=1.0)).top_p == 1.0
    assert sampling_from_proto(wpb.SamplingParams()).seed is None


# -- Stats ---------------------------------------------------------------------------------------


def test_stats_reports_live_sequences_and_model(servers, ckpts):
    fp = tokenizer_fingerprint(load_tokenizer(ckpts["target"]))
    for role, addr, path in (
        ("target", servers["target"], ckpts["target"]),
        ("draft", servers["draft"], ckpts["near"]),
    ):
        s = stats(addr, role)
        assert s.live_sequences == 0
        assert s.model.role == (wpb.ROLE_TARGET if role == "target" else wpb.ROLE_DRAFT)
        assert (s.model.vocab_size, s.model.max_context) == (96, 256)
        assert list(s.model.eos_token_ids) == [0]
        assert s.model.tokenizer_fingerprint == fp
        assert s.model.model_path == str(path)


# -- same answers as the in-process workers ------------------------------------------------------


def test_remote_target_and_draft_answer_like_in_process_workers(servers, local):
    target, draft = local
    gt, gd = GrpcTarget(servers["target"]), GrpcDraft(servers["draft"])
    params = SamplingParams(temperature=0.9, top_k=20, seed=11)
    try:
        for p in (SamplingParams(), params):
            sid = f"same-{p.greedy}"
            first = prefill(target, sid, PROMPT, p)
            assert first == first_token(local, PROMPT, p)
            assert prefill(gt, sid, PROMPT, p) == first
            assert prefill(draft, sid, PROMPT, p) is None and prefill(gd, sid, PROMPT, p) is None
            # n: the draft's committed length; it hears of the first token as its first commit.
            n, commit = len(PROMPT), [first]
            for _ in range(6):
                want = propose(draft, sid, n, 3, commit)
                got = propose(gd, sid, n, 3, commit)
                assert (got.start, got.tokens) == (want.start, want.tokens)
                if p.greedy:
                    assert got.q is None
                else:
                    assert torch.equal(got.q.indices, want.q.indices)
                    assert torch.equal(got.q.probs, want.q.probs)
                n += len(commit)
                v_want = verify(target, sid, n, want.tokens, want.q)
                v_got = verify(gt, sid, n, got.tokens, got.q)
                assert v_got == v_want
                commit = v_want.committed(want.tokens)
            n += len(commit)
            assert plain_step(gt, sid, n) == plain_step(target, sid, n)
            for w in (target, draft, gt, gd):
                w.release(sid)
    finally:
        gt.close()
        gd.close()


# -- status codes --------------------------------------------------------------------------------


def test_stale_committed_length_is_refused_and_changes_nothing(stubs, local):
    t, d = stubs
    n = len(PROMPT)  # the draft's committed length; the target's is n + 1 (its first token)
    first = first_token(local, PROMPT)
    for sid in ("stale", "fresh"):
        req = wpb.PrefillRequest(seq_id=sid, token_ids=PROMPT, sampling=GREEDY)
        prefilled(prefill_rows(t, req), n, first)
        prefilled(prefill_rows(d, req), n, None)
    # Refused rows: every one names the lengths and leaves the sequence alone.
    answers = [
        verify_rows(t, wpb.VerifyRequest(seq_id="stale", committed_len=n + 2, draft_tokens=[5])),
        verify_rows(t, wpb.VerifyRequest(seq_id="stale", committed_len=n, draft_tokens=[5])),
        verify_rows(t, wpb.VerifyRequest(seq_id="stale", committed_len=n + 3)),
        propose_rows(d, wpb.ProposeRequest(seq_id="stale", committed_len=n + 1, k=3)),
        propose_rows(
            d, wpb.ProposeRequest(seq_id="stale", committed_len=n - 1, k=3, commit=[7, 8])
        ),
        propose_rows(d, wpb.ProposeRequest(seq_id="stale", committed_len=n + 3, k=1, commit=[9])),
    ]
    for answer in answers:
        code, details = _row(answer)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "committed length" in details
    # The refused sequence answers exactly like the untouched one.
    sids = ("stale", "fresh")
    got = [
        propose_rows(d, wpb.ProposeRequest(seq_id=s, committed_len=n, k=4, commit=[first]))
        .rows[0]
        .result.tokens
        for s in sids
    ]
    assert list(got[0]) == list(got[1]) and len(got[0]) == 4
    steps = [
        verify_rows(t, wpb.VerifyRequest(seq_id=s, committed_len=n + 1)).rows[0].result.token
        for s in sids
    ]
    assert steps[0] == steps[1]
    for sid in ("stale", "fresh"):
        assert t.Release(wpb.ReleaseRequest(seq_id=sid)).released
        assert d.Release(wpb.ReleaseRequest(seq_id=sid)).released


def test_unknown_sequence_is_not_found(stubs):
    t, d = stubs
    for answer in (
        verify_rows(t, wpb.VerifyRequest(seq_id="nope", committed_len=3, draft_tokens=[5])),
        verify_rows(t, wpb.VerifyRequest(seq_id="nope", committed_len=3)),
        propose_rows(d, wpb.ProposeRequest(seq_id="nope", committed_len=3, k=2)),
        propose_rows(d, wpb.ProposeRequest(seq_id="nope", committed_len=3, k=2, commit=[1])),
    ):
        code, details = _row(answer)
        assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
    assert not t.Release(wpb.ReleaseRequest(seq_id="nope")).released  # release is always OK
    code, details = _code(lambda: t.Release(wpb.ReleaseRequest(seq_id="")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "seq_id" in details


def test_bad_arguments_are_invalid_argument_naming_the_field(stubs, local):
    """A buggy client's rows (ids outside the vocabulary among them) are refused one by one,
    naming the field; the worker changes nothing and goes on serving."""
    t, d = stubs
    n = len(PROMPT) + 1  # the target's committed length: the prompt and its first token
    sampled = wpb.SamplingParams(temperature=1.0, seed=1)
    req = wpb.PrefillRequest(seq_id="bad", token_ids=PROMPT, sampling=sampled)
    first = first_token(local, PROMPT, sampling_from_proto(sampled))
    prefilled(prefill_rows(t, req), n - 1, first)
    prefilled(prefill_rows(d, req), n - 1, None)
    answers = {
        "token_ids": prefill_rows(t, wpb.PrefillRequest(seq_id="x", token_ids=[1, 96])),
        "token_ids ": prefill_rows(d, wpb.PrefillRequest(seq_id="x", token_ids=[-1, 2])),
        "prompt": prefill_rows(t, wpb.PrefillRequest(seq_id="x", token_ids=[])),
        "prompt ": prefill_rows(t, wpb.PrefillRequest(seq_id="x", token_ids=[1] * 257)),
        # A full context leaves no room for the token a target's prefill decodes.
        "prompt  ": prefill_rows(t, wpb.PrefillRequest(seq_id="x", token_ids=[1] * 256)),
        "seq_id": prefill_rows(t, wpb.PrefillRequest(seq_id="", token_ids=[1])),
        "temperature": prefill_rows(
            d,
            wpb.PrefillRequest(
                seq_id="x", token_ids=[1], sampling=wpb.SamplingParams(temperature=-1)
            ),
        ),
        "q": verify_rows(
            t, wpb.VerifyRequest(seq_id="bad", committed_len=n, draft_tokens=[5], q=b"junk")
        ),
        "q:": verify_rows(t, wpb.VerifyRequest(seq_id="bad", committed_len=n, draft_tokens=[5])),
        "draft_tokens": verify_rows(
            t, wpb.VerifyRequest(seq_id="bad", committed_len=n, draft_tokens=[-1])
        ),
        "commit": propose_rows(
            d, wpb.ProposeRequest(seq_id="bad", committed_len=n - 1, k=1, commit=[96])
        ),
        "k ": propose_rows(d, wpb.ProposeRequest(seq_id="bad", committed_len=n - 1, k=0)),
        "start": propose_rows(
            d, wpb.ProposeRequest(seq_id="bad", committed_len=n - 1, k=1, start=n + 4)
        ),
    }
    for field, answer in answers.items():
        code, details = _row(answer)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, details)
        assert field.strip().rstrip(":") in details, (field, details)
    assert stats_live(t) == 1 and stats_live(d) == 1  # nothing half-made by the refusals
    # The refused sequence goes on: a plain step still answers.
    step = verify_rows(t, wpb.VerifyRequest(seq_id="bad", committed_len=n)).rows[0]
    assert step.status.code == 0 and step.result.committed_len == n + 1
    t.Release(wpb.ReleaseRequest(seq_id="bad"))
    d.Release(wpb.ReleaseRequest(seq_id="bad"))


def stats_live(stub) -> int:
    return stub.Stats(wpb.StatsRequest()).live_sequences


def test_retries_are_safe(stubs, local):
    """A verify row or a propose row's commit sent twice is applied once."""
    t, d = stubs
    n = len(PROMPT)
    first = first_token(local, PROMPT)
    req = wpb.PrefillRequest(seq_id="retry", token_ids=PROMPT, sampling=GREEDY)
    prefilled(prefill_rows(t, req), n, first)
    prefilled(prefill_rows(d, req), n, None)
    # The draft's first proposal commits the target's first token and drafts from the committed
    # end: sent twice, the commit is applied once and the block drafted again alike.
    req = wpb.ProposeRequest(seq_id="retry", committed_len=n, k=3, commit=[first], start=n + 1)
    block, again_b = propose_rows(d, req).rows[0], propose_rows(d, req).rows[0]
    assert block == again_b and block.status.code == 0
    n += 1
    assert block.result.committed_len == n
    req = wpb.VerifyRequest(seq_id="retry", committed_len=n, draft_tokens=block.result.tokens)
    first, again = verify_rows(t, req).rows[0], verify_rows(t, req).rows[0]
    assert first == again and first.status.code == 0
    commit = list(block.result.tokens[: first.result.accepted]) + [first.result.token]
    # The commit row, sent twice, asks for the next block from the committed end each time.
    req = wpb.ProposeRequest(
        seq_id="retry", committed_len=n, k=1, commit=commit, start=n + len(commit)
    )
    first_p, again_p = propose_rows(d, req).rows[0], propose_rows(d, req).rows[0]
    assert first_p == again_p and first_p.status.code == 0
    assert first_p.result.committed_len == first.result.committed_len
    t.Release(wpb.ReleaseRequest(seq_id="retry"))
    d.Release(wpb.ReleaseRequest(seq_id="retry"))


# -- the transport adaptors ----------------------------------------------------------------------


def test_grpc_sides_map_errors_to_worker_exceptions(servers):
    gt = GrpcTarget(servers["target"], timeout_s=10)
    try:
        prefill(gt, "m", PROMPT)
        with pytest.raises(StaleSequenceError):
            plain_step(gt, "m", 3)
        with pytest.raises(UnknownSequenceError):
            plain_step(gt, "other", 3)
        with pytest.raises(ValueError, match="draft_tokens"):
            verify(gt, "m", len(PROMPT) + 1, [999])
        gt.release("m")
    finally:
        gt.close()
    down: list[str] = []
    dead = GrpcTarget("127.0.0.1:1", timeout_s=5, on_unavailable=lambda a, e: down.append(a))
    with pytest.raises(WorkerUnavailable):
        plain_step(dead, "m", 3)
    assert down == ["127.0.0.1:1"]
    dead.close()


def test_a_release_never_blocks_and_never_overtakes_the_next_prefill(servers, stubs):
    """Release is sent without waiting (a dead worker costs the scheduler's thread nothing;
    the worker's lease frees what a lost release left), and a prefill of the same id right
    after it waits for it on a call thread, so the new sequence is not the one released."""
    gt = GrpcTarget(servers["target"], timeout_s=10)
    try:
        for _ in range(3):
            prefill(gt, "again", PROMPT)
            gt.release("again")  # returns at once: its call runs on a call thread
            assert prefill(gt, "again", PROMPT) > 0  # the release went first
            assert plain_step(gt, "again", len(PROMPT) + 1) >= 0  # and left this one alone
            gt.release("again")
    finally:
        gt.close()  # waits for its releases in flight
    assert stubs[0].Stats(wpb.StatsRequest()).live_sequences == 0
    dead = GrpcTarget("127.0.0.1:1", timeout_s=5)
    t0 = time.monotonic()
    for i in range(5):
        dead.release(f"gone{i}")
    assert time.monotonic() - t0 < 0.5
    dead.close()


def test_many_sequences_at_once(servers, local):
    """Concurrent sequences on one server: each gets what it would get alone; none leaks."""
    target, _ = local
    prompts = [PROMPT[i:] + [i + 3] for i in range(8)]
    want = []
    for i, p in enumerate(prompts):
        first = prefill(target, f"ref{i}", p)
        assert first == first_token(local, p)
        want.append([first, *(plain_step(target, f"ref{i}", len(p) + j) for j in range(1, 6))])
        target.release(f"ref{i}")
    got: dict[int, list[int]] = {}

    def run(i: int) -> None:
        gt = GrpcTarget(servers["target"])
        first = prefill(gt, f"c{i}", prompts[i])
        steps = [plain_step(gt, f"c{i}", len(prompts[i]) + j) for j in range(1, 6)]
        got[i] = [first, *steps]
        gt.release(f"c{i}")
        gt.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert [got[i] for i in range(8)] == want
    assert stats(servers["target"], "target").live_sequences == 0


def test_a_worker_slow_to_answer_its_first_check_never_blocks_a_caller_that_cannot_wait(servers):
    """A worker that is slow to answer (starting, wedged) holds its first check for the probe's
    whole timeout. That check runs on a thread of its own from the moment the address is set:
    `acquire(wait=False)` (the scheduler's thread, the event loop) passes it over at once, and a
    healthy address set beside it is in rotation long before the slow one times out."""

    def stall(request, context):
        time.sleep(3)
        return wpb.StatsResponse()

    handler = grpc.method_handlers_generic_handler(
        "specdec.worker.v1.TargetWorker",
        {
            "Stats": grpc.unary_unary_rpc_method_handler(
                stall,
                request_deserializer=wpb.StatsRequest.FromString,
                response_serializer=wpb.StatsResponse.SerializeToString,
            )
        },
    )
    slow = grpc.server(concurrent.futures.ThreadPoolExecutor(2), handlers=[handler])
    mute = f"127.0.0.1:{slow.add_insecure_port('127.0.0.1:0')}"
    slow.start()
    pool = WorkerPool("target", lambda info: None, timeout_s=5, probe_timeout_s=2)
    try:
        pool.set([mute])
        t0 = time.monotonic()
        assert pool.acquire(wait=False) is None and pool.checking()
        assert time.monotonic() - t0 < 0.1
        pool.set([mute, servers["target"]])
        while (ep := pool.acquire(wait=False)) is None:
            assert time.monotonic() - t0 < 1.5, "the healthy worker waited for the silent one"
            time.sleep(0.01)
        assert ep.address == servers["target"]
        pool.release(ep)
        assert pool.checking(exclude=[servers["target"]])  # the silent one: still out
        ep = pool.acquire(exclude=[servers["target"]])  # a caller that can wait: for its check
        assert ep is None and time.monotonic() - t0 >= 1.9 and not pool.checking()
        assert {w["address"]: w["state"] for w in pool.status()}[mute] == "down"
    finally:
        pool.close()
        slow.stop(0)


def test_pool_drops_a_failed_address_and_takes_it_back(servers):
    live, dead = servers["target"], "127.0.0.1:1"
    pool = WorkerPool("target", lambda info: None, timeout_s=5, probe_timeout_s=2)
    try:
        pool.set([dead, live])
        first = pool.acquire()
        assert first.address == live
        pool.release(first)
        pool.recheck([EndpointState.UNCHECKED, EndpointState.DOWN])
        states = {w["address"]: w["state"] for w in pool.status()}
        assert states == {live: "up", dead: "down"}
        pool.mark_down(live, "a call failed")  # as GrpcTarget does on UNAVAILABLE
        assert pool.acquire() is None
        pool.recheck()  # the periodic recheck: healthy again
        again = pool.acquire()
        assert again.address == live and again.in_flight == 1
        pool.release(again)
        pool.set([live])
        assert [w["address"] for w in pool.status()] == [live]
        pool.set([live, dead])  # set again: checked again at once, in the background
        deadline = time.monotonic() + 5
        while {w["address"]: w["state"] for w in pool.status()}[dead] != "down":
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        pool.close()
    picky = WorkerPool("target", lambda info: "not this one", timeout_s=5)
    try:
        picky.set([live])
        assert picky.acquire() is None
        assert picky.status()[0]["state"] == "rejected"
        assert picky.status()[0]["error"] == "not this one"
    finally:
        picky.close()


def test_least_loaded_then_round_robin(servers):
    pool = WorkerPool("draft", lambda info: None, timeout_s=5)
    try:
        pool.set([servers["draft"], servers["draft"].replace("127.0.0.1", "localhost")])
        a, b = pool.acquire(), pool.acquire()
        assert a.address != b.address  # the second goes to the idle one
        pool.release(a)
        assert pool.acquire() is a  # a is idle now, b is busy
    finally:
        pool.close()


# -- batched RPCs --------------------------------------------------------------------------------


def test_batched_rpcs_answer_per_row_like_in_process_workers(servers, local):
    """PrefillBatch / ProposeBatch / VerifyBatch: good rows get what the in-process workers answer;
    a stale, unknown or malformed row fails alone with its own error; nothing leaks."""
    target, draft = local
    gt, gd = GrpcTarget(servers["target"]), GrpcDraft(servers["draft"])
    params = SamplingParams(temperature=0.9, top_k=20, seed=7)
    prompts = {
        "ba": (PROMPT, SamplingParams()),
        "bb": (PROMPT[3:], params),
        "bc": (PROMPT[:5], params),
    }
    try:
        rows = [PrefillRow(s, p, sp) for s, (p, sp) in prompts.items()]
        bad = PrefillRow("bx", [1, 999], SamplingParams())
        first = {s: prefill(target, s, p, sp) for s, (p, sp) in prompts.items()}
        for s, (p, sp) in prompts.items():
            assert first[s] == first_token(local, p, sp)
            assert prefill(draft, s, p, sp) is None
        got = gt.prefill_batch([*rows, bad]).result(10)
        assert got[:3] == [first[s] for s in prompts]
        assert isinstance(got[3], ValueError) and "token_ids" in str(got[3])
        got = gd.prefill_batch([bad, *rows]).result(10)
        assert isinstance(got[0], ValueError) and "token_ids" in str(got[0])
        assert got[1:] == [None] * 3
        # n: the drafts' committed lengths; the target's are n + 1 (the first token), which
        # each draft hears of as the commit of its first proposal.
        n = {s: len(p) for s, (p, _) in prompts.items()}
        prows = [
            ProposeRow("ba", n["ba"], 3, (first["ba"],)),
            ProposeRow("nope", 3, 2),
            ProposeRow("bb", n["bb"] + 1, 2, (first["bb"],)),  # stale
            ProposeRow("bc", n["bc"], 2, (first["bc"],)),
        ]
        got = gd.propose_batch(prows).result(10)
        assert isinstance(got[1], UnknownSequenceError) and isinstance(got[2], StaleSequenceError)
        want = {s: propose(draft, s, n[s], k, (first[s],)) for s, k in (("ba", 3), ("bc", 2))}
        for g, s in ((got[0], "ba"), (got[3], "bc")):
            assert (g.start, g.tokens) == (want[s].start, want[s].tokens)
        assert got[0].q is None and torch.equal(got[3].q.indices, want["bc"].q.indices)
        nt = {s: m + 1 for s, m in n.items()}
        vrows = [
            VerifyRow("ba", nt["ba"], got[0].tokens),
            VerifyRow("bb", nt["bb"]),  # a plain step
            VerifyRow("bc", nt["bc"], got[3].tokens, got[3].q),
            VerifyRow("bc", nt["bc"] + 5),  # the same sequence again, stale
            VerifyRow("ba", nt["ba"], [999]),  # malformed: fails alone, whatever the state
            VerifyRow("zz", 4),
        ]
        out = gt.verify_batch(vrows).result(10)
        assert out[0] == verify(target, "ba", nt["ba"], want["ba"].tokens)
        assert (out[1].accepted, out[1].token) == (0, plain_step(target, "bb", nt["bb"]))
        assert out[2] == verify(target, "bc", nt["bc"], want["bc"].tokens, want["bc"].q)
        assert isinstance(out[3], StaleSequenceError)
        assert isinstance(out[4], ValueError) and "draft_tokens" in str(out[4])
        assert isinstance(out[5], UnknownSequenceError)
        assert gt.verify_batch(vrows[:1]).result(10) == out[:1]  # a retry answers again
        assert gt.verify_batch([]).result(10) == []
    finally:
        for s in prompts:
            gt.release(s)
            gd.release(s)
            target.release(s)
            draft.release(s)
        gt.close()
        gd.close()
    for addr, role in ((servers["target"], "target"), (servers["draft"], "draft")):
        s = stats(addr, role)
        assert s.live_sequences == 0 and s.kv_tokens == 0
    dead = GrpcTarget("127.0.0.1:1", timeout_s=5)
    with pytest.raises(WorkerUnavailable):
        dead.verify_batch([VerifyRow("a", 3)]).result(10)
    dead.close()


def test_a_draft_server_with_a_confidence_stop_says_where_it_was_unsure(ckpts):
    """`--confidence-stop`: blocks end after a token the draft gave less, and the proposal says
    that the draft was unsure of its last token, as the in-process worker does."""
    stop = ["--confidence-stop", "0.999"]  # a tiny random model is never that sure
    (proc,) = start_all(worker_process("draft", ckpts["near"], threads=1, extra=stop))
    local = DraftWorker.from_path(ckpts["near"], confidence_stop=0.999)
    try:
        gd = GrpcDraft(proc.address)
        rows = [PrefillRow("c0", PROMPT, SamplingParams()), PrefillRow("c1", PROMPT[2:], SAMPLED)]
        assert gd.prefill_batch(rows).result(10) == [None, None]
        local.prefill_batch(rows)
        ask = [ProposeRow(r.seq_id, len(r.token_ids), 4) for r in rows]
        got, want = gd.propose_batch(ask).result(10), local.propose_batch(ask)
        for g, w in zip(got, want, strict=True):
            assert (g.start, g.tokens, g.unsure_last) == (w.start, w.tokens, True)
            assert len(g.tokens) == 1
    finally:
        stop_all([proc])


def test_kv_budget_over_grpc_is_resource_exhausted_per_row(ckpts):
    from workers.model_runner import ModelRunner
    from workers.service import serve_target

    worker = TargetWorker(ModelRunner(ckpts["target"], max_kv_tokens=20))
    server, port = serve_target(worker, "127.0.0.1", 0)
    gt = GrpcTarget(f"127.0.0.1:{port}")
    try:
        rows = [
            PrefillRow("k1", PROMPT, SamplingParams()),
            PrefillRow("k2", PROMPT, SamplingParams()),
        ]
        got = gt.prefill_batch(rows).result(10)
        want = plain_step_token(worker.runner.model, PROMPT, SamplingParams())
        assert got[0] == want and isinstance(got[1], KVBudgetExceeded)
        s = gt.stats()
        # A target's prefill holds all the prompt's tokens (its pass decodes the first token).
        assert (s.live_sequences, s.kv_tokens, s.max_kv_tokens) == (1, len(PROMPT), 20)
        row = wpb.PrefillRequest(seq_id="k3", token_ids=PROMPT, sampling=GREEDY)
        code, _ = _row(prefill_rows(gt.stub, row))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        gt.release("k1").result(5)  # sent without waiting; its future says when it is done
        assert gt.stats().kv_tokens == 0
    finally:
        gt.close()
        server.stop(0)


# -- leases -----------------------------------------------------------------------------------


def test_a_renewed_lease_keeps_the_sequence_and_a_lapsed_one_frees_it(local):
    """A worker with a 1 s lease, in process: a side that renews (every 0.2 s, Stats only)
    keeps its sequence for 2.5 s of silence; once it stops (closed), the worker frees it; a
    sequence prefilled without an owner (a raw stub) is never reaped."""
    from cluster.transport.grpc_workers import LeaseRenewal
    from workers.service import serve_target

    server, port = serve_target(local[0], "127.0.0.1", 0, lease_timeout_s=1.0)
    period = LeaseRenewal.period_s
    LeaseRenewal.set_period(0.2)
    try:
        address = f"127.0.0.1:{port}"
        side = GrpcTarget(address)
        side.prefill_batch([PrefillRow("leased", PROMPT, SamplingParams())]).result(timeout=30)
        with grpc.insecure_channel(address) as raw:  # no owner metadata: not leased
            worker_pb2_grpc.TargetWorkerStub(raw).PrefillBatch(
                wpb.PrefillBatchRequest(
                    rows=[wpb.PrefillRequest(seq_id="unowned", token_ids=PROMPT, sampling=GREEDY)]
                ),
                timeout=30,
            )
        time.sleep(2.5)  # silence but for the renewals
        assert stats(address, "target").live_sequences == 2
        side.close()
        deadline = time.monotonic() + 10
        while stats(address, "target").live_sequences != 1:
            assert time.monotonic() < deadline, "the lapsed lease's sequence was never freed"
            time.sleep(0.1)
        time.sleep(1.5)
        assert stats(address, "target").live_sequences == 1  # the unowned one stays
    finally:
        LeaseRenewal.set_period(period)
        server.stop(grace=None)


def test_the_lease_book_expires_only_owners_not_heard_from():
    from workers.leases import LeaseBook

    now = [0.0]
    book = LeaseBook(5.0, clock=lambda: now[0])
    book.own("a", ["a1", "a2"])
    book.own("b", ["b1"])
    book.own(None, ["anon"])  # never reaped
    now[0] = 4.0
    book.seen("b")
    book.released("a2")
    now[0] = 6.0
    assert book.expired() == ["a1"]
    assert book.expired() == [] and book.owned == 1
    now[0] = 9.5
    assert book.expired() == ["b1"]


def test_the_targets_features_travel_with_prefill_verify_and_plain_rows(servers, ckpts, local):
    """Rows that ask get the features of the positions their call fed and committed (packed
    bfloat16), equal to a from-scratch forward's; rows that do not ask get none."""
    from transformers import AutoModelForCausalLM

    from pairs.feature_recipe import last_layer_features
    from workers.wire import unpack_features

    ref_model = AutoModelForCausalLM.from_pretrained(ckpts["target"], dtype=torch.float32).eval()
    hidden = ref_model.config.hidden_size

    def ref(tokens: list[int]) -> torch.Tensor:
        return last_layer_features(ref_model, torch.tensor([tokens]))[0]

    def close(packed: bytes, want: torch.Tensor) -> None:
        got = unpack_features(packed, hidden).float()
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)  # bfloat16 on the wire

    target = GrpcTarget(servers["target"])
    try:
        rows = [
            PrefillRow("feat-a", PROMPT, SamplingParams(), features=True),
            PrefillRow("feat-b", PROMPT[:9], SamplingParams()),
        ]
        a, b = target.prefill_batch(rows).result()
        assert a.features and not getattr(b, "features", b"")
        close(a.features, ref(PROMPT))
        tokens = [*PROMPT, int(a)]
        draft = local[1]
        draft.prefill_batch([PrefillRow("feat-a", tokens, SamplingParams())])
        for _ in range(3):
            block = draft.propose_batch([ProposeRow("feat-a", len(tokens), 3)])[0].tokens
            vrow = VerifyRow("feat-a", len(tokens), block, features=True)
            (verdict,) = target.verify_batch([vrow]).result()
            committed = verdict.committed(block)
            draft.propose_batch([ProposeRow("feat-a", len(tokens), 1, commit=committed)])
            full = tokens + committed
            # fed: the last committed token and the block; committed: it and the accepted
            close(verdict.features, ref(full)[len(tokens) - 1 : len(tokens) + verdict.accepted])
            tokens = full
        plain_row = VerifyRow("feat-a", len(tokens), [], features=True)
        (plain,) = target.verify_batch([plain_row]).result()
        close(plain.features, ref(tokens)[-1:])
    finally:
        target.release("feat-a")
        target.release("feat-b")
        local[1].release("feat-a")
        target.close()
