"""End to end over Serve's gRPC proxy with the pair that ships with the project: greedy output
equals the target's own HF greedy decoding, token for token; and chat over the OpenAI API: with a
target whose tokenizer has a chat template (SmolLM2-Instruct), HF greedy on the rendered template,
without one (the stdlib pair) a 400."""

from __future__ import annotations

import time

import pytest

from cluster.cli.client import build_request, call_generate, stream_generate
from cluster.serve.app import APP_NAME, GRPC_SERVICERS, build_app
from protos import specdec_pb2 as pb
from tests.deploy.helpers import free_port, hf_greedy, init_ray
from workers.checkpoints import registry, shipped_target_path
from workers.model_runner import load_tokenizer

pytestmark = pytest.mark.slow

PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef list_files(path):\n"]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve

    init_ray()
    try:
        port, http_port = free_port(), free_port()
        t0 = time.monotonic()
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port},
            grpc_options={"port": port, "grpc_servicer_functions": GRPC_SERVICERS},
        )
        # The shipped config's defaults: the shipped pair, TP = 1, one draft replica; but float32,
        # where greedy equals HF generate token for token (the default auto may be bf16).
        args = {
            "models": {"dtype": "float32"},
            "workers": {"host": "127.0.0.1"},
            "ingress": {"num_cpus": 0},
        }
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        handle = serve.get_app_handle(APP_NAME)
        while not handle.status.remote().result()["ready"]:
            assert time.monotonic() - t0 < 300
            time.sleep(0.5)
        print(f"\nshipped pair: Serve app up in {time.monotonic() - t0:.1f}s")
        yield {"grpc": f"127.0.0.1:{port}", "http": f"http://127.0.0.1:{http_port}"}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def address(cluster):
    return cluster["grpc"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_shipped_pair_greedy_equals_hf_greedy(address, prompt):
    n = 48
    ids = load_tokenizer(shipped_target_path()).encode(prompt, add_special_tokens=False)
    want = hf_greedy(shipped_target_path(), ids, n)
    resp, seconds = call_generate(address, build_request(prompt, max_new_tokens=n))
    assert list(resp.token_ids) == want
    print(f"\n{prompt!r}: {seconds * 1000:.0f} ms, acceptance {resp.stats.acceptance_rate:.2f}")
    req = build_request(prompt, max_new_tokens=n, k=4)
    req.speculation.mode = pb.SPECULATION_MODE_ON
    msgs = list(stream_generate(address, req))
    assert [t for m in msgs for t in m.token_ids] == want
    assert msgs[-1].stats.rounds > 0 and msgs[-1].stats.accepted_tokens > 0


def test_workers_report_the_dtype_they_loaded(cluster):
    from ray import serve

    handle = serve.get_app_handle(APP_NAME)
    for kind in ("target", "draft"):
        assert handle.worker_info.remote(kind).result()["dtype"] == "float32"  # as pinned above


def test_shipped_pair_chat_over_the_openai_api(cluster):
    import openai

    client = openai.OpenAI(base_url=f"{cluster['http']}/v1", api_key="none", max_retries=0)
    (model,) = [m.id for m in client.models.list().data]
    assert model == registry.default_pair_name()  # a pair's target dir is only called "target"
    tok = load_tokenizer(shipped_target_path())
    messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    if not getattr(tok, "chat_template", None):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=model, messages=messages, max_tokens=8)
        assert info.value.body["code"] == "chat_template_missing"
        return
    n = 32
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want = tok.decode(
        hf_greedy(shipped_target_path(), ids, n),
        skip_special_tokens=True,
        clean_up_tokenization_spaces=False,  # as the router decodes
    )
    resp = client.chat.completions.create(model=model, messages=messages, max_tokens=n,
                                          temperature=0)  # fmt: skip
    assert resp.choices[0].message.content == want
    assert resp.usage.prompt_tokens == len(ids)
