"""End to end over Serve's gRPC proxy with the SmolLM2-135M-Instruct pair (the real pretrained
target, converted from its wheel, and the distilled reduced-vocabulary draft): greedy output equals
transformers' `generate` on the converted target token for token, for raw and chat-templated
prompts, and seeded sampling repeats the in-process engine exactly.

One Serve application for the module (the target loads in ~2 s from its converted checkpoint)."""

from __future__ import annotations

import time

import pytest

from cluster.cli.client import build_request, call_generate, stream_generate
from cluster.cli.up import sample_request
from cluster.serve.app import APP_NAME, GRPC_SERVICERS, build_app
from protos import specdec_pb2 as pb
from tests.deploy.helpers import free_port, hf_greedy, init_ray
from workers.checkpoints import registry, smollm2

PAIR = registry.PAIRS[registry.SMOLLM2]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PAIR.available(), reason=f"the {PAIR.name} pair is not available here"),
]

RAW = "def fibonacci(n):\n"
CHAT = "Write a Python function that checks whether a number is prime."


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve

    from cluster.config import ClusterConfig

    smollm2.ensure_target()  # convert once here, not in three replicas at a time
    args = {
        # float32: greedy equals HF generate token for token (the default auto may be bf16)
        "models": {"target": PAIR.name, "dtype": "float32"},
        "workers": {"host": "127.0.0.1"},
        "ingress": {"num_cpus": 0},
    }
    init_ray()
    try:
        port = free_port()
        t0 = time.monotonic()
        serve.start(
            http_options={"host": "127.0.0.1", "port": free_port()},
            grpc_options={"port": port, "grpc_servicer_functions": GRPC_SERVICERS},
        )
        serve.run(build_app(args), name=APP_NAME, route_prefix="/specdec")
        handle = serve.get_app_handle(APP_NAME)
        while not handle.status.remote().result()["ready"]:
            assert time.monotonic() - t0 < 300
            time.sleep(0.5)
        print(f"\n{PAIR.name}: Serve app up in {time.monotonic() - t0:.1f}s")
        yield f"127.0.0.1:{port}", ClusterConfig.load(args)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_raw_prompt_greedy_equals_hf_generate(cluster):
    address, _ = cluster
    from workers.model_runner import load_tokenizer

    n = 40
    ids = load_tokenizer(PAIR.target()).encode(RAW, add_special_tokens=False)
    want = hf_greedy(PAIR.target(), ids, n)
    resp, seconds = call_generate(address, build_request(RAW, max_new_tokens=n))
    assert list(resp.token_ids) == want
    print(f"\nraw: {seconds * 1000:.0f} ms, acceptance {resp.stats.acceptance_rate:.2f}")


def test_chat_prompt_greedy_equals_hf_generate(cluster):
    address, cfg = cluster
    n = 48
    req, chat = sample_request(cfg, CHAT, n)  # what `specdec up` sends
    assert chat and len(req.prompt_token_ids) > 0
    want = hf_greedy(PAIR.target(), list(req.prompt_token_ids), n)
    resp, seconds = call_generate(address, req)
    assert list(resp.token_ids) == want
    print(f"\nchat: {seconds * 1000:.0f} ms, {resp.text!r}")
    # Forced speculation, streamed: the same tokens, and the draft's tokens get accepted.
    req.speculation.mode, req.speculation.num_draft_tokens = pb.SPECULATION_MODE_ON, 4
    msgs = list(stream_generate(address, req))
    assert [t for m in msgs for t in m.token_ids] == want
    assert msgs[-1].stats.rounds > 0 and msgs[-1].stats.accepted_tokens > 0


def test_seeded_sampling_through_serve_repeats_the_in_process_engine(cluster):
    from cluster.engine import SpecEngine
    from cluster.scheduling.policy import SpecMode
    from workers.types import SamplingParams

    address, cfg = cluster
    req, _ = sample_request(cfg, CHAT, 24)
    ids = list(req.prompt_token_ids)
    # The same draft settings as the Serve app's (the pair's confidence stop).
    stop = cfg.confidence_stop()
    assert stop == PAIR.confidence_stop > 0
    engine = SpecEngine.from_paths(PAIR.target(), PAIR.draft(), confidence_stop=stop)
    try:
        local = engine.generate(
            ids,
            max_new_tokens=24,
            sampling=SamplingParams(temperature=0.8, top_p=0.95, seed=3),
            mode=SpecMode.ON,
            k=3,
        )
    finally:
        engine.close()
    req = build_request("", max_new_tokens=24, k=3, temperature=0.8, top_p=0.95, seed=3)
    req.prompt_token_ids.extend(ids)
    req.speculation.mode = pb.SPECULATION_MODE_ON
    first, _ = call_generate(address, req)
    assert list(first.token_ids) == local.token_ids
    assert first.stats.rounds > 0
