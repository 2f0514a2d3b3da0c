"""The Router over real worker processes on loopback: exactness, pipelining, faults, fallback.

Workers are subprocesses (`python -m workers.server`) on tiny random-weight checkpoints: the target;
"same" (a draft server on the target's own checkpoint: everything is accepted), "near" (the target
plus noise: partial acceptance) and "bad" (unrelated weights: nothing is accepted). The oracle for
greedy output is transformers' `generate(do_sample=False)` on the target.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.api.validation import RequestError
from cluster.engine import SpecEngine
from cluster.routing.config import RouterConfig
from cluster.routing.router import Router, WorkerMismatchError
from cluster.scheduling.policy import Drafter, PolicyConfig
from cluster.scheduling.target_faults import BUSY_PAUSES_S
from cluster.transport.grpc_workers import GrpcTarget
from cluster.transport.remote_errors import RemoteBusy
from cluster.transport.same_process import ServedTarget
from protos import specdec_pb2 as pb
from tests.cluster.grpc_procs import (
    hf_greedy,
    make_checkpoints,
    start_all,
    stop_all,
    wait_live_zero,
    worker,
)
from tests.tiny_models import make_model, make_tokenizer
from workers.draft import DraftWorker
from workers.model_runner import load_tokenizer
from workers.model_thread import SerialExecutor
from workers.service import serve_draft, serve_target
from workers.target import TargetWorker
from workers.types import SamplingParams

PROMPTS = ["def add(a, b):", "import os\n", "x = [1, 2"]
MAX_NEW = 48
AUTO, ON, OFF = pb.SPECULATION_MODE_AUTO, pb.SPECULATION_MODE_ON, pb.SPECULATION_MODE_OFF


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("grpc_router"))


# name -> (role, checkpoint); the last three are killed by the fault tests (started with the
# others so that they all load in parallel).
WORKERS = {
    "target": ("target", "target"),
    "same": ("draft", "target"),
    "near": ("draft", "near"),
    "bad": ("draft", "bad"),
    "doomed_draft": ("draft", "target"),
    "doomed_target": ("target", "target"),
    "last_target": ("target", "target"),
}


@pytest.fixture(scope="module")
def procs(ckpts):
    started = start_all(*(worker(role, ckpts[ck]) for role, ck in WORKERS.values()))
    yield dict(zip(WORKERS, started, strict=True))
    stop_all(started)


@pytest.fixture(scope="module")
def addr(procs):
    return {name: p.address for name, p in procs.items()}


@pytest.fixture(scope="module")
def tok(ckpts):
    return load_tokenizer(ckpts["target"])


@pytest.fixture(scope="module")
def oracle(ckpts, tok):
    """prompt -> the target's own greedy continuation (MAX_NEW tokens, or up to EOS)."""
    return {
        p: hf_greedy(ckpts["target"], tok.encode(p, add_special_tokens=False), MAX_NEW)
        for p in PROMPTS
    }


def make_router(ckpts, drafts, targets, **kw) -> Router:
    return Router(RouterConfig(str(ckpts["target"]), **kw), drafts=drafts, targets=targets)


def request(
    prompt: str, mode=AUTO, k: int = 0, max_new: int = MAX_NEW, drafter=pb.DRAFTER_MODEL, **kw
) -> pb.GenerateRequest:
    """The draft model's blocks only, by default: these tests pin what they do (drafting by
    lookup: test_grpc_batching, test_engine_greedy)."""
    return pb.GenerateRequest(
        prompt=prompt,
        max_new_tokens=max_new,
        speculation=pb.SpeculationOptions(mode=mode, num_draft_tokens=k, drafter=drafter),
        **kw,
    )


def generate(router: Router, req: pb.GenerateRequest) -> pb.GenerateResponse:
    return asyncio.run(router.generate(req))


def stream(router: Router, req: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    async def collect():
        return [m async for m in router.generate_stream(req)]

    return asyncio.run(collect())


# -- 1. exactness --------------------------------------------------------------------------------


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "sequential"])
@pytest.mark.parametrize("draft", ["same", "near"])
def test_greedy_equals_the_targets_own_greedy_decoding(ckpts, addr, oracle, draft, pipelined):
    router = make_router(ckpts, [addr[draft]], [addr["target"]], pipelined=pipelined)
    try:
        for prompt in PROMPTS:
            for mode, k in ((ON, 0), (ON, 3), (AUTO, 0), (OFF, 0)):
                resp = generate(router, request(prompt, mode, k))
                assert list(resp.token_ids) == oracle[prompt], (prompt, mode, k)
                want = pb.FINISH_REASON_EOS if oracle[prompt][-1] == 0 else pb.FINISH_REASON_LENGTH
                assert resp.finish_reason == want
                assert resp.usage.completion_tokens == len(oracle[prompt])
                s = resp.stats
                if mode == OFF:
                    assert s.rounds == 0 and s.plain_steps == len(oracle[prompt])
                if mode == ON:
                    assert s.rounds > 0 and s.draft_failures == 0
                    assert 1 <= s.mean_accepted_length <= (k or 8) + 1
                    if draft == "same":
                        assert s.acceptance_rate == 1.0
                    if k:
                        assert s.draft_tokens <= k * s.rounds
        if draft == "near":  # rejections happened, and were exact
            resp = generate(router, request(PROMPTS[0], ON, 4))
            assert 0 < resp.stats.accepted_tokens < resp.stats.draft_tokens
    finally:
        router.close()


def test_stream_chunks_add_up_to_the_unary_response(ckpts, addr, tok, oracle):
    router = make_router(ckpts, [addr["near"]], [addr["target"]])
    try:
        req = request(PROMPTS[1], ON, 3)
        chunks = stream(router, req)
        whole = generate(router, req)
        assert len(chunks) > 1
        assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
        assert chunks[-1].finish_reason == whole.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        assert (
            [t for c in chunks for t in c.token_ids] == list(whole.token_ids) == oracle[PROMPTS[1]]
        )
        assert "".join(c.text for c in chunks) == whole.text
        # The text is the incremental decode of the output after the prompt.
        ids = tok.encode(PROMPTS[1], add_special_tokens=False)
        ctx = tok.decode(ids[-5:], skip_special_tokens=True)
        full = tok.decode(ids[-5:] + list(whole.token_ids), skip_special_tokens=True)
        assert whole.text == full[len(ctx) :]
        assert whole.usage.prompt_tokens == len(ids)
    finally:
        router.close()


def test_seeded_sampling_repeats(ckpts, addr):
    routers = [
        make_router(ckpts, [addr["near"]], [addr["target"]], pipelined=p) for p in (True, False)
    ]
    try:
        req = request(PROMPTS[0], ON, 3, temperature=0.9, top_k=40, top_p=0.95, seed=1234)
        first = generate(routers[0], req)
        assert first.stats.rounds > 0 and len(first.token_ids) > 0
        assert generate(routers[0], req).token_ids == first.token_ids
        # Positional randomness: pipelining does not change which draws are used.
        assert generate(routers[1], req).token_ids == first.token_ids
        other = request(PROMPTS[0], ON, 3, temperature=0.9, top_k=40, top_p=0.95, seed=99)
        assert generate(routers[0], other).token_ids != first.token_ids
        # AUTO mode with adaptive k too: a seeded request's policy does not look at timings.
        auto = request(PROMPTS[2], AUTO, 0, temperature=0.8, seed=7)
        runs = [generate(routers[0], auto) for _ in range(3)]
        assert runs[0].token_ids == runs[1].token_ids == runs[2].token_ids
        assert runs[0].stats.rounds > 0
        # One round logic, two transports: the in-process engine samples the very same tokens.
        # With lookup drafting too (a seeded row looks up its own text only): the same again.
        auto_lookup = request(PROMPTS[2], AUTO, 0, temperature=0.8, seed=7, drafter=pb.DRAFTER_AUTO)
        looked = [generate(routers[0], auto_lookup) for _ in range(2)]
        assert looked[0].token_ids == looked[1].token_ids
        engine = SpecEngine.from_paths(ckpts["target"], ckpts["near"])
        seeded = SamplingParams(temperature=0.8, seed=7)
        try:
            local = engine.generate(
                PROMPTS[2], max_new_tokens=MAX_NEW, sampling=seeded, drafter=Drafter.MODEL
            )
            local_lookup = engine.generate(PROMPTS[2], max_new_tokens=MAX_NEW, sampling=seeded)
        finally:
            engine.close()
        assert local.token_ids == list(runs[0].token_ids)
        assert local_lookup.token_ids == list(looked[0].token_ids)
        unseeded = generate(routers[0], request(PROMPTS[0], AUTO, temperature=1.0))
        assert unseeded.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    finally:
        for r in routers:
            r.close()


# -- 2. pipelining ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampling", [{}, {"temperature": 0.9, "seed": 5}], ids=["greedy", "sampled"]
)
def test_logprobs_under_speculation_are_the_targets_own(ckpts, addr, tok, sampling):
    """Each returned token's log-probability (and its top 4) is log_softmax of the target's own
    logits at that position, whether the token was accepted from a block, recovered, a bonus or
    a plain step's; streamed and unary alike. Model blocks and lookup blocks."""
    model = AutoModelForCausalLM.from_pretrained(ckpts["target"], dtype=torch.float32).eval()
    router = make_router(ckpts, [addr["near"]], [addr["target"]])
    try:
        prompt = tok.encode(PROMPTS[0], add_special_tokens=False)
        for drafter in (pb.DRAFTER_MODEL, pb.DRAFTER_AUTO):
            req = request(PROMPTS[0], ON, 3, drafter=drafter, logprobs=4, **sampling)
            whole = generate(router, req)
            assert whole.stats.rounds > 0 and whole.stats.accepted_tokens > 0
            chunks = stream(router, req)
            streamed = [t for c in chunks for t in c.token_ids]
            for tokens, logprobs in (
                (list(whole.token_ids), list(whole.logprobs)),
                (streamed, [e for c in chunks for e in c.logprobs]),
            ):
                with torch.inference_mode():
                    logits = model(torch.tensor([prompt + tokens])).logits[0]
                logp = torch.log_softmax(logits, -1)
                assert len(logprobs) == len(tokens)
                for j, e in enumerate(logprobs):
                    row = logp[len(prompt) + j - 1]
                    assert e.token_id == tokens[j]
                    assert e.logprob == pytest.approx(float(row[e.token_id]), abs=1e-4)
                    values, ids = torch.topk(row, 4)
                    assert [t.token_id for t in e.top] == ids.tolist()
                    assert [t.logprob for t in e.top] == pytest.approx(values.tolist(), abs=1e-4)
        assert not generate(router, request(PROMPTS[0], ON, 3)).logprobs  # not asked: none
    finally:
        router.close()


def test_pipelining_overlaps_draft_and_verify(ckpts, addr, oracle):
    """Draft == target: every block is accepted whole and the bonus guess is right, so the next
    block is ready when verification returns."""
    on = make_router(ckpts, [addr["same"]], [addr["target"]], pipelined=True)
    off = make_router(ckpts, [addr["same"]], [addr["target"]], pipelined=False)
    try:
        for k in (1, 4):
            s = generate(on, request(PROMPTS[0], ON, k)).stats
            assert s.pipeline_hits >= s.rounds // 2 > 0, s
            assert s.pipeline_hits + s.pipeline_misses <= s.rounds
            s = generate(off, request(PROMPTS[0], ON, k)).stats
            assert s.rounds > 0 and s.pipeline_hits == s.pipeline_misses == 0
    finally:
        on.close()
        off.close()


# -- 3. a draft dies mid-generation --------------------------------------------------------------


def test_draft_killed_mid_generation_then_replaced(ckpts, procs, addr, tok):
    doomed = procs["doomed_draft"]
    fresh = worker("draft", ckpts["target"])  # a new process, loading while the first one works
    router = make_router(ckpts, [doomed.address], [addr["target"]])
    long_new = 200
    ids = tok.encode(PROMPTS[0], add_special_tokens=False)
    want = hf_greedy(ckpts["target"], ids, long_new)
    try:
        req = request(PROMPTS[0], ON, 2, max_new=long_new)

        async def killed_midway():
            chunks = []
            async for msg in router.generate_stream(req):
                chunks.append(msg)
                if len(chunks) == 2:  # the prefill's token, then the first round's
                    doomed.kill()  # SIGKILL after the first committed round
            return chunks

        chunks = asyncio.run(killed_midway())
        assert [t for c in chunks for t in c.token_ids] == want  # no token lost or changed
        s = chunks[-1].stats
        assert s.rounds > 0 and s.plain_steps > 0 and s.draft_failures >= 1, s
        assert s.tokens_per_target_pass > 0
        # A new draft process comes up: later requests speculate again.
        start_all(fresh)
        router.set_workers(drafts=[fresh.address])
        again = generate(router, req)
        assert list(again.token_ids) == want
        # The draft is the target: every block of 2 is accepted. Plain steps: the prefill pass's
        # token, and a last token alone when blocks of 3 leave one over.
        assert again.stats.plain_steps == 1 + ((long_new - 1) % 3 == 1)
        assert again.stats.draft_failures == 0
        assert again.stats.rounds > 0
        assert wait_live_zero([(fresh.address, "draft"), (addr["target"], "target")]) == {
            fresh.address: 0,
            addr["target"]: 0,
        }
    finally:
        router.close()
        fresh.stop()


# -- 4. a draft that never agrees ----------------------------------------------------------------


def test_auto_mode_falls_back_to_plain_when_the_draft_never_agrees(ckpts, addr, tok):
    router = make_router(ckpts, [addr["bad"]], [addr["target"]])
    try:
        ids = tok.encode(PROMPTS[2], add_special_tokens=False)
        want = hf_greedy(ckpts["target"], ids, 120)
        resp = generate(router, request(PROMPTS[2], AUTO, max_new=120))
        assert list(resp.token_ids) == want
        s = resp.stats
        assert s.plain_steps > s.rounds, s  # it went plain, probing now and then
        assert s.acceptance_rate < 0.3 and s.mode_switches >= 1
        assert s.draft_failures == 0
    finally:
        router.close()


# -- target faults -------------------------------------------------------------------------------


def test_target_failure_moves_the_sequence_or_ends_unavailable(ckpts, procs, addr, tok):
    doomed, last = procs["doomed_target"], procs["last_target"]
    ids = tok.encode(PROMPTS[0], add_special_tokens=False)
    want = hf_greedy(ckpts["target"], ids, 200)
    req = request(PROMPTS[0], ON, 2, max_new=200)
    router = make_router(ckpts, [addr["near"]], [doomed.address])
    try:

        async def kill_after_first(victim, on_first=None, req=req):
            chunks = []
            async for msg in router.generate_stream(req):
                chunks.append(msg)
                if len(chunks) == 1:
                    if on_first:
                        on_first()
                    victim.kill()
            return chunks

        # The sequence runs on `doomed`; once `last` is in the pool too, kill `doomed`.
        chunks = asyncio.run(
            kill_after_first(
                doomed, lambda: router.set_workers(targets=[doomed.address, last.address])
            )
        )
        assert [t for c in chunks for t in c.token_ids] == want
        assert chunks[-1].stats.target_failovers == 1
        # Only dead targets left: UNAVAILABLE at once, with the reason.
        router.set_workers(targets=[doomed.address])
        t0 = time.monotonic()
        with pytest.raises(RequestError) as info:
            generate(router, req)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert "no target worker is available" in info.value.details
        assert time.monotonic() - t0 < 10
        # The last target dies mid-stream: the stream ends UNAVAILABLE, never hangs.
        router.set_workers(targets=[last.address])
        with pytest.raises(RequestError) as info:
            asyncio.run(kill_after_first(last, req=request(PROMPTS[0], OFF, max_new=200)))
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert "no other target worker" in info.value.details
        assert router.in_flight == 0
    finally:
        router.close()


# -- a target replica's own worker, called in-process ------------------------------------------


class _RankLost(RuntimeError):
    """Plays a dead tensor-parallel rank: the worker is gone, not the row wrong."""


class _DyingTarget(TargetWorker):
    """A TargetWorker whose verify fails as a lost worker once `doom` is set."""

    doom = False

    def verify_batch(self, rows):
        if self.doom:
            raise _RankLost("rank 1 is gone")
        return super().verify_batch(rows)


def served_router(ckpts, worker, drafts, unavailable=()):
    """A router whose one target is `worker`, called in-process (as in a Serve target replica)
    and served over gRPC too: (router, server, executor)."""
    executor = SerialExecutor(worker)
    server, port = serve_target(worker, "127.0.0.1", 0, executor=executor)
    own = f"127.0.0.1:{port}"
    served = ServedTarget.factory(own, worker, executor, unavailable_errors=unavailable)
    router = Router(
        RouterConfig(str(ckpts["target"])),
        drafts=drafts,
        targets=[own],
        local_targets={own: served},
    )
    return router, server, executor


def test_a_served_target_called_in_process_equals_hf_and_fails_over_when_gone(ckpts, addr, oracle):
    """What a Serve target replica does: its scheduler calls the worker it also serves over gRPC
    on the worker's one model thread, no RPC; a lost worker moves the sequence elsewhere."""
    worker = _DyingTarget.from_path(ckpts["target"])
    router, server, executor = served_router(ckpts, worker, [addr["near"]], (_RankLost,))
    own = router.worker_status()["targets"][0]["address"]
    try:
        for prompt in PROMPTS:
            for mode, k in ((ON, 3), (AUTO, 0), (OFF, 0)):
                resp = generate(router, request(prompt, mode, k))
                assert list(resp.token_ids) == oracle[prompt], (prompt, mode, k)
        (status,) = router.worker_status()["targets"]
        assert status["state"] == "up" and worker.live_sequences == 0
        # The gRPC face of the same worker still answers, from the same model thread.
        assert GrpcTarget(own).stats(5.0).model.role == 2

        # The worker is lost mid-stream: the sequence moves to the other target, output unchanged.
        async def doom_after_first():
            chunks = []
            async for msg in router.generate_stream(request(PROMPTS[0], OFF)):
                chunks.append(msg)
                if not worker.doom:
                    router.set_workers(targets=[own, addr["target"]])
                    worker.doom = True
            return chunks

        chunks = asyncio.run(doom_after_first())
        assert [t for c in chunks for t in c.token_ids] == oracle[PROMPTS[0]]
        assert chunks[-1].stats.target_failovers == 1
        states = {w["address"]: w["state"] for w in router.worker_status()["targets"]}
        assert states[own] == "down"
    finally:
        router.close()
        server.stop(None)
        executor.shutdown()


class _Refusing:
    """A target side whose next `refusals` verify calls are refused whole, for now, as a worker
    over its limits answers (RESOURCE_EXHAUSTED for the whole call, no row run)."""

    def __init__(self, side, refusals: int) -> None:
        self.side, self.refusals, self.refused = side, refusals, 0

    def verify_batch(self, rows):
        if self.refusals <= 0:
            return self.side.verify_batch(rows)
        self.refusals -= 1
        self.refused += 1
        out: Future = Future()
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
        out.set_exception(RemoteBusy(self.side.address, code, "too many calls"))
        return out

    def __getattr__(self, name):
        return getattr(self.side, name)


def test_a_call_the_target_refuses_for_now_is_sent_again_and_the_rows_stay(ckpts, addr, oracle):
    """A whole call refused for now (RESOURCE_EXHAUSTED, ABORTED) is no lost worker: the step is
    sent again after a pause, the target stays in rotation and the output is the oracle's, with no
    failover. A target that keeps refusing past the pauses is as good as gone: its rows move."""
    worker = TargetWorker.from_path(ckpts["target"])
    executor = SerialExecutor(worker)
    own = "127.0.0.1:1"  # never dialled: the side is in-process
    sides: list[_Refusing] = []

    def side(on_unavailable):
        served = ServedTarget(own, worker, executor, on_unavailable=on_unavailable)
        sides.append(_Refusing(served, 3))
        return sides[-1]

    router = Router(
        RouterConfig(str(ckpts["target"])),
        drafts=[addr["near"]],
        targets=[own],
        local_targets={own: side},
    )
    try:
        for mode, k in ((ON, 3), (OFF, 0)):
            sides[0].refusals = 3
            resp = generate(router, request(PROMPTS[0], mode, k))
            assert list(resp.token_ids) == oracle[PROMPTS[0]], mode
            assert resp.stats.target_failovers == 0 and sides[0].refused % 3 == 0
        assert router._schedulers[own].busy_retries == 6
        assert router.worker_status()["targets"][0]["state"] == "up"
        assert worker.live_sequences == 0
        # Refusing past the pauses: the rows move to the other target, output unchanged.
        router.set_workers(targets=[own, addr["target"]])
        sides[0].refusals = 1000
        t0 = time.monotonic()
        resp = generate(router, request(PROMPTS[1], OFF))
        assert list(resp.token_ids) == oracle[PROMPTS[1]]
        assert resp.stats.target_failovers == 1 and time.monotonic() - t0 >= sum(BUSY_PAUSES_S)
    finally:
        router.close()
        executor.shutdown()


def test_n_samples_share_one_prefill_and_each_repeats(ckpts, addr, tok):
    """n = 4 seeded: four different samples, each repeating exactly on a second call, sample 0
    what n = 1 gives, the prompt prefilled once on the target; streamed messages carry their
    sample's index and add up to the unary choices."""
    worker = TargetWorker.from_path(ckpts["target"])
    router, server, executor = served_router(ckpts, worker, [addr["near"]])
    try:
        sampled = {"temperature": 0.9, "seed": 11, "max_new": 24}
        req = request(PROMPTS[0], ON, 3, n=4, **sampled)
        before = worker.prefilled_tokens
        first = generate(router, req)
        assert worker.prefilled_tokens - before == len(tok.encode(PROMPTS[0]))
        assert [c.index for c in first.choices] == [0, 1, 2, 3]
        samples = [list(c.token_ids) for c in first.choices]
        assert len({tuple(s) for s in samples}) == 4
        assert all(c.finish_reason and c.usage.completion_tokens == len(c.token_ids)
                   for c in first.choices)  # fmt: skip
        assert list(first.token_ids) == samples[0] and first.stats.rounds > 0
        assert [list(c.token_ids) for c in generate(router, req).choices] == samples
        assert (
            list(generate(router, request(PROMPTS[0], ON, 3, **sampled)).token_ids) == (samples[0])
        )
        chunks = stream(router, req)
        for i in range(4):
            assert [t for c in chunks if c.index == i for t in c.token_ids] == samples[i]
        assert sorted(c.index for c in chunks if c.finish_reason) == [0, 1, 2, 3]
        greedy = generate(router, request(PROMPTS[1], ON, 3, n=3))
        assert len({tuple(c.token_ids) for c in greedy.choices}) == 1  # greedy: one answer
        assert worker.live_sequences == 0
    finally:
        router.close()
        server.stop(None)
        executor.shutdown()


# -- admission, stop strings, cancellation, start-up checks ---------------------------------------


def test_overload_is_resource_exhausted_at_once(ckpts, addr):
    router = make_router(ckpts, [addr["near"]], [addr["target"]], max_in_flight=1)
    try:

        async def scenario():
            first = router.generate_stream(request(PROMPTS[0], OFF, max_new=200))
            await first.__anext__()  # one sequence in flight
            t0 = time.monotonic()
            with pytest.raises(RequestError) as info:
                await router.generate(request(PROMPTS[1]))
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() - t0 < 1.0
            await first.aclose()  # the consumer leaves: the slot frees
            for _ in range(100):
                if router.in_flight == 0:
                    break
                await asyncio.sleep(0.05)
            return await router.generate(request(PROMPTS[1], max_new=8))

        assert len(asyncio.run(scenario()).token_ids) == 8
    finally:
        router.close()


def test_stop_strings_trim_the_text_and_finish_with_stop(ckpts, addr):
    router = make_router(ckpts, [addr["near"]], [addr["target"]])
    try:
        full = generate(router, request(PROMPTS[0], OFF))
        text = full.text
        stop = text[12:15]
        cut = text.find(stop)
        assert cut > 0
        for mode in (OFF, ON):
            req = request(PROMPTS[0], mode, stop=["never-there", stop])
            resp = generate(router, req)
            assert resp.text == text[:cut]
            assert resp.finish_reason == pb.FINISH_REASON_STOP
            assert list(resp.token_ids) == list(full.token_ids[: len(resp.token_ids)])
            assert resp.usage.completion_tokens == len(resp.token_ids) < len(full.token_ids)
            chunks = stream(router, req)
            assert "".join(c.text for c in chunks) == resp.text
        # A stop string that never appears changes nothing.
        same = generate(router, request(PROMPTS[0], OFF, stop=["\x7f\x7f"]))
        assert same.text == text and same.finish_reason == full.finish_reason
    finally:
        router.close()


def test_cancelling_the_consumer_releases_the_sequence(ckpts, addr):
    router = make_router(ckpts, [addr["near"]], [addr["target"]])
    try:

        async def cancel_midway():
            got = asyncio.Event()

            async def consume():
                async for _ in router.generate_stream(request(PROMPTS[0], ON, 2, max_new=200)):
                    got.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(got.wait(), 30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancel_midway())
        live = wait_live_zero([(addr["near"], "draft"), (addr["target"], "target")])
        assert set(live.values()) == {0}
        for _ in range(100):
            if router.in_flight == 0:
                break
            time.sleep(0.05)
        assert router.in_flight == 0
    finally:
        router.close()


def test_closing_the_router_ends_live_streams_cancelled(ckpts, addr):
    router = make_router(ckpts, [addr["near"]], [addr["target"]])

    async def scenario():
        stream = router.generate_stream(request(PROMPTS[0], OFF, max_new=240))
        msgs = [await stream.__anext__()]
        closing = asyncio.create_task(asyncio.to_thread(router.close))
        msgs += [m async for m in stream]
        await closing
        return msgs

    msgs = asyncio.run(scenario())
    assert msgs[-1].finish_reason == pb.FINISH_REASON_CANCELLED
    assert msgs[-1].usage.completion_tokens == sum(len(m.token_ids) for m in msgs) < 240
    with pytest.raises(RequestError) as info:
        generate(router, request(PROMPTS[0]))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    live = wait_live_zero([(addr["near"], "draft"), (addr["target"], "target")])
    assert set(live.values()) == {0}


def test_router_refuses_a_draft_with_another_tokenizer(ckpts, addr, tmp_path):
    other = make_model(tmp_path / "other", seed=3, tokenizer=make_tokenizer(80))
    server, port = serve_draft(DraftWorker.from_path(other), "127.0.0.1", 0)
    try:
        router = make_router(ckpts, [f"127.0.0.1:{port}"], [addr["target"]])
        try:
            with pytest.raises(WorkerMismatchError, match="tokenizer"):
                router.check_workers()
            # Requests still work: the rejected draft is out of rotation (plain decoding).
            resp = generate(router, request(PROMPTS[0], ON, max_new=8))
            assert len(resp.token_ids) == 8 and resp.stats.rounds == 0
        finally:
            router.close()
        swapped = make_router(ckpts, [addr["target"]], [addr["near"]])  # roles swapped
        try:
            with pytest.raises(WorkerMismatchError, match="does not serve the draft worker API"):
                swapped.check_workers()
        finally:
            swapped.close()
    finally:
        server.stop(0)


def test_router_config_checks_and_policy_thresholds(ckpts):
    with pytest.raises(ValueError, match="max_in_flight"):
        RouterConfig(str(ckpts["target"]), max_in_flight=0)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        RouterConfig(
            str(ckpts["target"]), policy=PolicyConfig(num_draft_tokens=6), max_draft_tokens=4
        )
    cfg = RouterConfig(str(ckpts["target"]), max_draft_tokens=3, pipelined=False)
    assert cfg.policy_config().max_draft_tokens == 3 and cfg.scheduler_options().pipelined is False
    with pytest.raises(ValueError, match="pipelined"):
        RouterConfig(str(ckpts["target"]), pipelined="sometimes")


def test_no_sequence_is_left_on_any_worker(procs):
    alive = [(p.address, WORKERS[name][0]) for name, p in procs.items() if p.popen.poll() is None]
    assert len(alive) >= 4
    live = wait_live_zero(alive)
    assert set(live.values()) == {0}, live


def test_a_served_target_whose_model_thread_stopped_is_unavailable(ckpts):
    """The replica is stopping (its model thread shut down): calls fail as a lost worker, which
    the router moves elsewhere, never as an internal error of the row."""
    from cluster.transport.remote_errors import RemoteUnavailable

    worker = TargetWorker.from_path(ckpts["target"])
    executor = SerialExecutor(worker)
    lost: list[str] = []
    side = ServedTarget.factory("here:1", worker, executor)(lambda a, e: lost.append(a))
    executor.shutdown()
    with pytest.raises(RemoteUnavailable):
        side.verify_batch([]).result(5)
    assert lost == ["here:1"]
