"""A feature draft over real worker processes: the target hands out its features with every
prefill and verify, the router carries them to a feature-draft server (a head over the target's
last layer), and greedy output stays the target's own; a feature draft killed mid-stream leaves
the output unchanged (the row goes plain), and no sequence is left on any worker."""

from __future__ import annotations

import asyncio

import pytest

from cluster.routing.config import RouterConfig
from cluster.routing.router import Router
from protos import specdec_pb2 as pb
from tests.cluster.grpc_procs import hf_greedy, start_all, stop_all, wait_live_zero, worker
from tests.feature_heads import trained_head
from tests.tiny_models import make_model
from workers.model_runner import load_tokenizer

PROMPTS = ["def add(a, b):", "import os\n", "x = [1, 2"]
MAX_NEW = 40
ON, AUTO = pb.SPECULATION_MODE_ON, pb.SPECULATION_MODE_AUTO


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpc_feature")
    target = make_model(d / "target", seed=0)
    # trained for seconds on the target's text: accepted and rejected tokens both
    return {"target": target, "head": trained_head(target, d / "head")}


@pytest.fixture(scope="module")
def procs(ckpts):
    started = start_all(
        worker("target", ckpts["target"]),
        worker("draft", ckpts["head"]),
        worker("draft", ckpts["head"]),
    )
    yield dict(zip(("target", "head", "doomed"), started, strict=True))
    stop_all(started)


def router(ckpts, procs, draft: str) -> Router:
    config = RouterConfig(str(ckpts["target"]), draft_features=True)
    return Router(config, drafts=[procs[draft].address], targets=[procs["target"].address])


def request(prompt: str, mode, k: int = 0, max_new: int = MAX_NEW) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=prompt,
        max_new_tokens=max_new,
        speculation=pb.SpeculationOptions(mode=mode, num_draft_tokens=k, drafter=pb.DRAFTER_MODEL),
    )


def test_greedy_with_a_feature_draft_server_is_the_targets_own(ckpts, procs):
    tok = load_tokenizer(ckpts["target"])
    r = router(ckpts, procs, "head")
    try:
        accepted = 0
        for prompt in PROMPTS:
            want = hf_greedy(ckpts["target"], tok.encode(prompt, add_special_tokens=False), MAX_NEW)
            for mode, k in ((ON, 3), (ON, 1), (AUTO, 0)):
                resp = asyncio.run(r.generate(request(prompt, mode, k)))
                assert list(resp.token_ids) == want, (prompt, mode, k)
                if mode == ON:  # every round's features reached the draft in step
                    assert resp.stats.rounds > 0 and resp.stats.draft_failures == 0
                    assert resp.stats.pipeline_hits == resp.stats.pipeline_misses == 0
                    accepted += resp.stats.accepted_tokens
        assert 0 < accepted
    finally:
        r.close()
    live = wait_live_zero([(procs["head"].address, "draft"), (procs["target"].address, "target")])
    assert set(live.values()) == {0}


def test_a_feature_draft_killed_mid_stream_leaves_the_output_unchanged(ckpts, procs):
    tok = load_tokenizer(ckpts["target"])
    long_new = 120
    want = hf_greedy(ckpts["target"], tok.encode(PROMPTS[0], add_special_tokens=False), long_new)
    r = router(ckpts, procs, "doomed")
    try:

        async def killed_midway():
            chunks = []
            async for msg in r.generate_stream(request(PROMPTS[0], ON, 2, long_new)):
                chunks.append(msg)
                if len(chunks) == 2:  # the prefill's token, then the first round's
                    procs["doomed"].kill()
            return chunks

        chunks = asyncio.run(killed_midway())
        assert [t for c in chunks for t in c.token_ids] == want
        s = chunks[-1].stats
        assert s.rounds > 0 and s.plain_steps > 0 and s.draft_failures >= 1, s
    finally:
        r.close()
    assert wait_live_zero([(procs["target"].address, "target")]) == {procs["target"].address: 0}
