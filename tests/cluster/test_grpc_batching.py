"""Continuous batching over real gRPC worker processes: the router's step scheduler puts many
concurrent requests into one batched verify per step (and one batched propose per draft), and each
row's output is still exactly the target's own greedy decoding (HF `generate` is the oracle).
Faults are real: a draft process killed under 8 running streams, a row whose target state vanishes
under it, 200 streams cancelled at random points."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from cluster.routing.config import RouterConfig
from cluster.routing.router import Router
from protos import specdec_pb2 as pb
from protos import worker_pb2, worker_pb2_grpc
from tests.cluster.grpc_procs import hf_greedy, make_checkpoints, start_all, stop_all, worker
from tests.cluster.grpc_procs import stats as worker_stats
from workers.model_runner import load_tokenizer

pytestmark = pytest.mark.slow

PROMPTS = [
    "a",
    "def add(a, b):",
    "import os\n",
    "x = [1, 2",
    "class Node:\n    def __init__(self, value):\n        self.value = value\n",
    "for i in range(10):",
]
AUTO, ON, OFF = pb.SPECULATION_MODE_AUTO, pb.SPECULATION_MODE_ON, pb.SPECULATION_MODE_OFF
MODES = [(ON, 2), (ON, 0), (AUTO, 0), (OFF, 0)]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("grpc_batching"))


@pytest.fixture(scope="module")
def procs(ckpts):
    started = start_all(
        worker("target", ckpts["target"]),
        worker("draft", ckpts["near"]),
        worker("draft", ckpts["near"]),  # killed by the fault test
    )
    yield {"target": started[0], "near": started[1], "doomed": started[2]}
    stop_all(started)


@pytest.fixture(scope="module")
def tok(ckpts):
    return load_tokenizer(ckpts["target"])


def request(
    ids: list[int], mode=AUTO, k: int = 0, max_new: int = 32, drafter: int = 0
) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt_token_ids=ids,
        max_new_tokens=max_new,
        speculation=pb.SpeculationOptions(mode=mode, num_draft_tokens=k, drafter=drafter),
    )


async def collect(router: Router, req: pb.GenerateRequest, delay: float = 0.0) -> list[int]:
    return (await collect_all(router, req, delay))[0]


async def collect_all(
    router: Router, req: pb.GenerateRequest, delay: float = 0.0
) -> tuple[list[int], pb.SpeculationStats]:
    """The tokens of a stream and its final message's stats."""
    await asyncio.sleep(delay)
    out: list[int] = []
    stats = pb.SpeculationStats()
    async for msg in router.generate_stream(req):
        out.extend(msg.token_ids)
        if msg.finish_reason:
            stats = msg.stats
    return out, stats


def by_drafter(stats: pb.SpeculationStats) -> dict[str, pb.DrafterStats]:
    return {d.drafter: d for d in stats.drafters}


def live(addresses: dict[str, str]) -> dict[str, int]:
    return {a: worker_stats(a, role).live_sequences for a, role in addresses.items()}


def wait_no_live(addresses: dict[str, str], timeout: float = 30.0) -> dict[str, int]:
    import time

    deadline = time.monotonic() + timeout
    while True:
        counts = live(addresses)
        if not any(counts.values()) or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


def test_sixteen_mixed_concurrent_requests_equal_hf_generate(ckpts, procs, tok):
    target, draft = procs["target"].address, procs["near"].address
    router = Router(RouterConfig(str(ckpts["target"])), drafts=[draft], targets=[target])
    rng = random.Random(3)
    reqs, want, delays = [], [], []
    for i in range(16):
        ids = tok.encode(PROMPTS[i % len(PROMPTS)], add_special_tokens=False)
        mode, k = MODES[i % len(MODES)]
        max_new = rng.choice([4, 16, 40])  # rows leave at different steps
        reqs.append(request(ids, mode, k, max_new))
        want.append(hf_greedy(ckpts["target"], ids, max_new))
        delays.append(rng.random() * 0.2)  # and join at different steps

    async def run():
        return await asyncio.gather(
            *(collect(router, r, d) for r, d in zip(reqs, delays, strict=True))
        )

    try:
        got = asyncio.run(run())
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g == w, (i, MODES[i % len(MODES)])
        batch = router.batch_status()[target]
        assert batch["max_batch"] > 4, batch  # they shared target passes
        assert batch["row_steps"] > batch["steps"]
        assert wait_no_live({target: "target", draft: "draft"}) == {target: 0, draft: 0}
    finally:
        router.close()


def test_a_row_that_fails_alone_recovers_and_its_neighbours_go_on(ckpts, procs, tok):
    """The target forgets one row behind the router's back (as after a worker-side release):
    that row's verify fails alone (NOT_FOUND), it is re-prefilled from its committed tokens and
    finishes exactly; the rows beside it never notice."""
    target, draft = procs["target"].address, procs["near"].address
    router = Router(RouterConfig(str(ckpts["target"])), drafts=[draft], targets=[target])
    ids = [tok.encode(p, add_special_tokens=False) for p in PROMPTS[:4]]
    want = [hf_greedy(ckpts["target"], x, 120) for x in ids]

    async def run():
        tasks = [asyncio.create_task(collect(router, request(x, ON, 2, 120))) for x in ids]
        sched = None
        while sched is None or len(sched.running) < 4:
            await asyncio.sleep(0.01)
            sched = next(iter(router._schedulers.values()), None)
        victim = sched.running[1].seq_id
        with grpc.insecure_channel(target) as ch:
            worker_pb2_grpc.TargetWorkerStub(ch).Release(
                worker_pb2.ReleaseRequest(seq_id=victim), timeout=5
            )
        return await asyncio.gather(*tasks)

    try:
        assert asyncio.run(run()) == want
    finally:
        router.close()


def test_killing_the_draft_under_eight_streams(ckpts, procs, tok):
    target, doomed = procs["target"].address, procs["doomed"]
    ids = [tok.encode(PROMPTS[i % len(PROMPTS)], add_special_tokens=False) for i in range(8)]
    want = [hf_greedy(ckpts["target"], x, 150) for x in ids]
    router = Router(
        RouterConfig(str(ckpts["target"]), draft_timeout_s=2.0),
        drafts=[doomed.address],
        targets=[target],
    )

    async def run():
        tasks = [asyncio.create_task(collect_all(router, request(x, ON, 3, 150))) for x in ids]
        while True:  # every row speculating in one batch, then the draft dies
            await asyncio.sleep(0.02)
            sched = next(iter(router._schedulers.values()), None)
            if sched is not None and len(sched.running) == 8 and sched.steps > 3:
                break
        doomed.kill()
        return await asyncio.gather(*tasks)

    try:
        results = asyncio.run(run())
        assert [got for got, _ in results] == want  # all 8 finish, no token lost or changed
        assert wait_no_live({target: "target"}) == {target: 0}
        # The fallback chain: the rows lost their draft model and went on drafting by lookup
        # where their text repeats (this target's greedy output does), plain elsewhere.
        stats = [st for _, st in results]
        assert all(st.draft_failures >= 1 for st in stats)
        lookup = [by_drafter(st).get("lookup") for st in stats]
        assert sum(d.accepted_tokens for d in lookup if d is not None) > 0, stats
    finally:
        router.close()


@pytest.mark.parametrize("drafter", [pb.DRAFTER_LOOKUP, pb.DRAFTER_AUTO])
def test_lookup_drafting_equals_hf_generate_with_blocks_past_the_models_cap(
    ckpts, procs, tok, drafter
):
    """Drafting by lookup (alone, or chosen per step beside the model) commits exactly the
    target's greedy tokens, with blocks longer than the model draft's cap (max_draft_tokens 3,
    lookup blocks up to 16) where the text repeats."""
    target, draft = procs["target"].address, procs["near"].address
    router = Router(
        RouterConfig(str(ckpts["target"]), max_draft_tokens=3), drafts=[draft], targets=[target]
    )
    ids = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    want = [hf_greedy(ckpts["target"], x, 80) for x in ids]

    async def run():
        return await asyncio.gather(
            *(collect_all(router, request(x, AUTO, 0, 80, drafter)) for x in ids)
        )

    try:
        results = asyncio.run(run())
        assert [got for got, _ in results] == want
        stats = [st for _, st in results]
        lookup = [by_drafter(st).get("lookup") for st in stats]
        assert sum(d.rounds for d in lookup if d is not None) > 0
        assert max(len(st.acceptance_histogram) for st in stats) > 3 + 1  # a block longer than 3
        if drafter == pb.DRAFTER_LOOKUP:  # the draft model was never asked
            assert all("model" not in by_drafter(st) for st in stats)
        assert wait_no_live({target: "target", draft: "draft"}) == {target: 0, draft: 0}
    finally:
        router.close()


def test_two_hundred_cancelled_streams_leave_no_sequence_anywhere(ckpts, procs, tok):
    target, draft = procs["target"].address, procs["near"].address
    router = Router(RouterConfig(str(ckpts["target"])), drafts=[draft], targets=[target])
    keep_ids = tok.encode(PROMPTS[1], add_special_tokens=False)
    keep_want = hf_greedy(ckpts["target"], keep_ids, 60)
    rng = random.Random(11)

    async def cancelled(i: int) -> None:
        ids = tok.encode(PROMPTS[i % len(PROMPTS)], add_special_tokens=False)
        mode, k = MODES[i % len(MODES)]
        stream = router.generate_stream(request(ids, mode, k, 200))
        stop_after = rng.randint(0, 3)
        n = 0
        async for _ in stream:
            n += 1
            if n > stop_after:
                break
        await stream.aclose()

    async def deadline(i: int) -> None:
        ids = tok.encode(PROMPTS[i % len(PROMPTS)], add_special_tokens=False)
        try:
            await asyncio.wait_for(collect(router, request(ids, ON, 2, 200)), rng.random() * 0.3)
        except TimeoutError:
            pass

    async def run():
        kept = []
        for wave in range(0, 200, 16):
            jobs = [(cancelled if i % 2 else deadline)(i) for i in range(wave, min(200, wave + 16))]
            jobs.append(collect(router, request(keep_ids, AUTO, 0, 60)))
            results = await asyncio.gather(*jobs)
            kept.append(results[-1])
        return kept

    try:
        for got in asyncio.run(run()):
            assert got == keep_want
        assert router.in_flight == 0  # every admission slot is free again
        assert wait_no_live({target: "target", draft: "draft"}) == {target: 0, draft: 0}
        for a, role in ((target, "target"), (draft, "draft")):
            assert worker_stats(a, role).kv_tokens == 0  # no KV held for anyone
    finally:
        router.close()
