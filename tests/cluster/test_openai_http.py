"""The OpenAI-compatible HTTP API of the Serve application, with the real `openai` client.

One local Ray + Serve for the module, two applications: `specdec` (route "/", a tiny target whose
tokenizer has a chat template, a partly agreeing draft) and `notemplate` (route "/notemplate", a
target whose tokenizer has none, no draft). Oracles: transformers' greedy decoding of the target
(on the prompt, and on the rendered chat template), and the gRPC API of the same application.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import openai
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray import serve
from tokenizers import decoders

from cluster.cli.client import build_request, call_generate
from cluster.serve.app import APP_NAME, GRPC_SERVICERS, build_app
from protos import specdec_pb2 as pb
from tests.deploy.helpers import free_port, hf_greedy, init_ray, noisy_copy, tmpdir
from tests.fuzzing import FUZZ_EXAMPLES
from tests.tiny_models import VOCAB, make_model, make_tokenizer

pytestmark = pytest.mark.slow

MODEL = "tiny-chat"
CONTEXT = 8192  # long enough for a stream that would run for many seconds
LONG = 8000
PROMPT = "def add(a, b):"
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPEC_ON = {"speculation": {"mode": "on", "num_draft_tokens": 3}}


def chat_tokenizer(template: str | None):
    tok = make_tokenizer()
    tok.backend_tokenizer.decoder = decoders.Fuse()  # decode = the characters, no spaces between
    if template:
        tok.chat_template = template
    return tok


def never_eos(path):
    """Zero the EOS row of the LM head: greedy decoding then runs to max_tokens (a random model
    otherwise picks EOS now and then), so a request stays in flight as long as the test needs."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    with torch.no_grad():
        model.lm_head.weight[0].zero_()
    model.save_pretrained(path)
    return path


class Cluster:
    def __init__(self, grpc_address: str, http: str, target, tok) -> None:
        self.grpc = grpc_address
        self.http = http
        self.target = target
        self.tok = tok
        self.handle = serve.get_app_handle(APP_NAME)
        self.client = openai.OpenAI(base_url=f"{http}/v1", api_key="none", max_retries=0)

    def ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def status(self) -> dict:
        return self.handle.status.remote().result()

    def live(self) -> list[int]:
        return [
            self.handle.worker_info.remote(kind).result()["live_sequences"]
            for kind in ("draft", "target")
        ]

    def wait_released(self, timeout: float = 15.0) -> float:
        t0 = time.monotonic()
        while True:
            live, in_flight = self.live(), self.status()["in_flight"]
            if live == [0, 0] and in_flight == 0:
                return time.monotonic() - t0
            assert time.monotonic() - t0 < timeout, (live, in_flight)
            time.sleep(0.2)

    def conn(self) -> http.client.HTTPConnection:
        u = urlsplit(self.http)
        return http.client.HTTPConnection(u.hostname, u.port, timeout=60)

    def request(self, method: str, path: str, body: bytes | None = None) -> Resp:
        conn = self.conn()
        try:
            conn.request(method, path, body=body, headers={"content-type": "application/json"})
            r = conn.getresponse()
            return Resp(r.status, dict(r.getheaders()), r.read().decode())
        finally:
            conn.close()

    def post(self, path: str, body, *, raw: bool = False) -> Resp:
        return self.request("POST", path, body if raw else json.dumps(body).encode())

    def get(self, path: str) -> dict:
        resp = self.request("GET", path)
        assert resp.status_code == 200, resp.text
        return resp.json()


@dataclass
class Resp:
    status_code: int
    headers: dict
    text: str

    def json(self):
        return json.loads(self.text)


@pytest.fixture(scope="module")
def cluster():
    root = tmpdir("sd-http-")
    tok = chat_tokenizer(TEMPLATE)
    target = never_eos(make_model(root / "target", seed=1, max_positions=CONTEXT, tokenizer=tok))
    draft = noisy_copy(target, root / "draft", std=0.15)  # agrees with the target ~40% of the time
    plain = never_eos(
        make_model(root / "plain", seed=3, max_positions=1024, tokenizer=chat_tokenizer(None))
    )
    init_ray()
    try:
        grpc_port, http_port = free_port(), free_port()
        t0 = time.monotonic()
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port},
            grpc_options={"port": grpc_port, "grpc_servicer_functions": GRPC_SERVICERS},
        )
        common = {"ingress": {"num_cpus": 0}, "workers": {"host": "127.0.0.1"}}
        # float32: greedy equals HF generate token for token (the default auto may be bf16)
        args = {
            "models": {
                "target": str(target),
                "draft": str(draft),
                "served_model_name": MODEL,
                "dtype": "float32",
            },
            "limits": {"max_new_tokens": LONG},
            **common,
        }
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        other = {
            "models": {"target": str(plain), "dtype": "float32"},
            "draft": {"replicas": 0},
            "limits": {"max_in_flight": 1, "max_queued": 1, "max_new_tokens": 1000},  # overload
            **common,
        }
        serve.run(build_app(other), name="notemplate", route_prefix="/notemplate")
        c = Cluster(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", target, tok)
        t1 = time.monotonic()
        while not c.status()["ready"]:
            assert time.monotonic() - t1 < 90, c.status()
            time.sleep(0.5)
        print(f"\nServe, two apps up in {time.monotonic() - t0:.1f}s")
        yield c
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def grpc_request(prompt: str, n: int, **kw) -> pb.GenerateRequest:
    req = build_request(prompt, max_new_tokens=n, **kw)
    req.speculation.mode = pb.SPECULATION_MODE_ON
    req.speculation.num_draft_tokens = 3
    return req


def spec(obj) -> dict:
    """The speculation extension (`metrics.speculative_decoding`) of an openai response object."""
    return obj.model_extra["metrics"]["speculative_decoding"]


def check_spec(m: dict, completion_tokens: int) -> None:
    assert m["num_spec_steps"] > 0
    assert 0 <= m["num_accepted_draft_tokens"] <= m["num_draft_tokens"]
    hist = m["acceptance_histogram"]
    assert sum(hist) == m["num_spec_steps"] and len(hist) == m["num_spec_tokens"] + 1
    assert sum(j * h for j, h in enumerate(hist)) == m["num_accepted_draft_tokens"]
    assert m["mean_acceptance_length"] == pytest.approx(
        1 + m["num_accepted_draft_tokens"] / m["num_spec_steps"]
    )
    # Every committed token came from a speculative round or a plain step (a block may overshoot
    # max_tokens: its tail is not committed), so tau is the completion over the target passes.
    passes = m["num_spec_steps"] + m["plain_steps"]
    assert passes + m["num_accepted_draft_tokens"] >= completion_tokens
    assert m["tokens_per_target_pass"] == pytest.approx(completion_tokens / passes)
    # A pipeline hit or miss is counted once, after a speculative round that left the sequence
    # open; a hit only where that round accepted its whole (non-empty) block.
    assert m["pipeline_hits"] + m["pipeline_misses"] <= m["num_spec_steps"]
    assert m["pipeline_hits"] <= m["num_spec_steps"] - hist[0]
    assert m["draft_failures"] == 0 and m["target_failovers"] == 0


# -- 1. greedy: unary, streaming, == gRPC, == HF ------------------------------------------------


def test_models_and_status(cluster):
    assert [m.id for m in cluster.client.models.list().data] == [MODEL]
    status = cluster.get("/specdec")
    assert status["ready"] and status["targets"] == cluster.status()["targets"]


def test_greedy_completion_unary_and_stream_equal_grpc_and_hf(cluster):
    n = 48
    want_ids = hf_greedy(cluster.target, cluster.ids(PROMPT), n)
    grpc_resp, _ = call_generate(cluster.grpc, grpc_request(PROMPT, n), app=APP_NAME)
    assert list(grpc_resp.token_ids) == want_ids
    want_text = cluster.tok.decode(want_ids, skip_special_tokens=True)
    assert grpc_resp.text == want_text

    unary = cluster.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=n, temperature=0, extra_body=SPEC_ON
    )
    assert unary.object == "text_completion" and unary.model == MODEL and unary.id
    assert unary.choices[0].text == want_text
    assert unary.choices[0].finish_reason == ("length" if len(want_ids) == n else "stop")
    u = unary.usage
    assert (u.prompt_tokens, u.completion_tokens) == (len(cluster.ids(PROMPT)), len(want_ids))
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    check_spec(spec(unary), u.completion_tokens)

    chunks = list(
        cluster.client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=n,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=SPEC_ON,
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == want_text and len(texts) > 2  # several rounds, streamed
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == unary.choices[0].finish_reason
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == len(want_ids)
    assert last.usage.prompt_tokens == u.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    check_spec(spec(last), len(want_ids))

    # Token ids as the prompt, speculation off: the same text.
    off = cluster.client.completions.create(
        model=MODEL,
        prompt=cluster.ids(PROMPT),
        max_tokens=n,
        temperature=0,
        extra_body={"speculation": {"mode": "off"}},
    )
    assert off.choices[0].text == want_text and spec(off)["num_spec_steps"] == 0
    assert spec(off)["plain_steps"] > 0


def test_stop_strings_and_vllm_top_k(cluster):
    full = (
        cluster.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0)
        .choices[0]
        .text
    )
    stop = full[10:12]
    cut = cluster.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "@@@"]
    )
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # top_k = -1 means "no top-k" in vLLM's API (0 in ours); greedy either way.
    same = cluster.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, extra_body={"top_k": -1}
    )
    assert same.choices[0].text == full


# -- 2. seeded sampling ---------------------------------------------------------------------------


def test_seeded_sampling_repeats_and_equals_grpc(cluster):
    kw = {"temperature": 1.0, "top_p": 0.9, "seed": 11}
    texts = [
        cluster.client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=40, extra_body={**SPEC_ON, "top_k": 30}, **kw
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    streamed = cluster.client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=40,
        stream=True,
        extra_body={**SPEC_ON, "top_k": 30},
        **kw,
    )
    grpc_resp, _ = call_generate(
        cluster.grpc, grpc_request(PROMPT, 40, top_k=30, **kw), app=APP_NAME
    )
    assert texts[0] == texts[1] == grpc_resp.text
    assert "".join(c.choices[0].text for c in streamed if c.choices) == grpc_resp.text
    other, _ = call_generate(
        cluster.grpc, grpc_request(PROMPT, 40, top_k=30, **{**kw, "seed": 12}), app=APP_NAME
    )
    greedy = cluster.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0
    )
    assert grpc_resp.text not in (other.text, greedy.choices[0].text)  # it did sample


# -- 3. a client that goes away mid-stream ------------------------------------------------------


def test_a_client_that_disconnects_mid_stream_frees_the_sequence(cluster):
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": LONG,
        "temperature": 0,
        "stream": True,
        **SPEC_ON,
    }
    conn = cluster.conn()
    conn.request(
        "POST",
        "/v1/completions",
        body=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("content-type").startswith("text/event-stream")
    line = b""
    while not line.startswith(b"data: "):
        line = resp.readline()
    assert json.loads(line[6:])["choices"][0]["text"]
    assert cluster.status()["in_flight"] == 1
    resp.close()  # the client goes away
    conn.close()
    # The connection is closed with ~8000 tokens still to go (tens of seconds of rounds here):
    # the sequence must be gone from every worker within a few seconds.
    took = cluster.wait_released(timeout=5.0)
    print(f"\nsequence released {took * 1000:.0f} ms after the client disconnected")
    # ... and the cluster goes on serving.
    again = cluster.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0
    )
    assert again.usage.completion_tokens >= 1


# -- 4. bad input: 400 naming the parameter, the same rules as gRPC -------------------------------


def long_ids(n: int) -> list[int]:
    return [(i * 7) % 90 + 2 for i in range(n)]


# Each case: (the `param` of the 400, what to change in a good request). The first block is
# tests/cluster/test_bad_input.py's CASES as JSON (k is speculation.num_draft_tokens; k = 0 is
# "adaptive" in the public APIs, so not malformed; top_k = -1 is vLLM's "off", so top_k < 0 is -2).
BAD = {
    "empty-text": ("prompt", {"prompt": ""}),
    "empty-ids": ("prompt", {"prompt": []}),
    "id-too-big": ("prompt", {"prompt": [5, VOCAB]}),
    "id-negative": ("prompt", {"prompt": [5, -1]}),
    "k=-2": ("speculation.num_draft_tokens", {"speculation": {"num_draft_tokens": -2}}),
    "k-too-big": ("speculation.num_draft_tokens", {"speculation": {"num_draft_tokens": 9}}),
    "k-float": ("speculation.num_draft_tokens", {"speculation": {"num_draft_tokens": 2.5}}),
    "temperature<0": ("temperature", {"temperature": -0.5}),
    "top_p=0": ("top_p", {"temperature": 1.0, "top_p": 0}),
    "top_p>1": ("top_p", {"temperature": 1.0, "top_p": 1.5}),
    "top_p<0": ("top_p", {"temperature": 1.0, "top_p": -0.2}),
    "top_k<0": ("top_k", {"temperature": 1.0, "top_k": -2}),
    "max_tokens=0": ("max_tokens", {"max_tokens": 0}),
    "max_tokens<0": ("max_tokens", {"max_tokens": -4}),
    "max_tokens>limit": ("max_tokens", {"max_tokens": LONG + 1}),
    "prompt>context": ("prompt", {"prompt": long_ids(CONTEXT + 44)}),
    "prompt=context": ("prompt", {"prompt": long_ids(CONTEXT)}),
    # the rest of the gRPC validation
    "seed<0": ("seed", {"seed": -1}),
    "empty-stop": ("stop", {"stop": ["x", ""]}),
    "too-many-stops": ("stop", {"stop": [f"s{i}" for i in range(17)]}),
    "spec-mode": ("speculation.mode", {"speculation": {"mode": "fast"}}),
    # JSON types and shapes
    "prompt-number": ("prompt", {"prompt": 5}),
    "prompt-mixed": ("prompt", {"prompt": [1, "a"]}),
    "prompt-missing": ("prompt", {"prompt": None}),
    "max_tokens-string": ("max_tokens", {"max_tokens": "10"}),
    "temperature-string": ("temperature", {"temperature": "hot"}),
    "seed-float": ("seed", {"seed": 1.5}),
    "stop-number": ("stop", {"stop": 5}),
    "stream-string": ("stream", {"stream": "yes"}),
    "stream_options-no-stream": ("stream_options", {"stream_options": {"include_usage": True}}),
    "speculation-list": ("speculation", {"speculation": [1]}),
    "unknown-param": ("foo", {"foo": 1}),
    "unknown-model": ("model", {"model": "gpt-4"}),
    "missing-model": ("model", {"model": None}),
    # refused OpenAI parameters
    "n=17": ("n", {"n": 17}),
    "logprobs-over-20": ("logprobs", {"logprobs": 21}),
    "echo-string": ("echo", {"echo": "yes"}),
    "best_of": ("best_of", {"best_of": 2}),
    "suffix": ("suffix", {"suffix": "x"}),
    "presence_penalty": ("presence_penalty", {"presence_penalty": 2.5}),
    "repetition_penalty": ("repetition_penalty", {"repetition_penalty": 0}),
    "min_p": ("min_p", {"min_p": 1.5}),
    "logit_bias-value": ("logit_bias", {"logit_bias": {"5": 101}}),
    "logit_bias-token": ("logit_bias", {"logit_bias": {"100000": 1}}),
    "min_tokens-over-max": ("min_tokens", {"min_tokens": 9, "max_tokens": 4}),
}


def good(**changes) -> dict:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def assert_error(resp: Resp, status: int, param: str | None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    assert "Traceback" not in err["message"] and "\n" not in err["message"]
    return err


@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_get_400_naming_the_parameter(cluster, stream):
    for case, (param, change) in BAD.items():
        body = good(**change)
        if stream and case != "stream-string":
            body["stream"] = True
        if case == "stream_options-no-stream":
            body.pop("stream", None)
        err = assert_error(cluster.post("/v1/completions", body), 400, param)
        assert err["type"] == "invalid_request_error", case
    for raw in (b"{not json", b"[1, 2]", b"", "\udcff".encode(errors="surrogatepass")):
        assert_error(cluster.post("/v1/completions", raw, raw=True), 400, None)
    # The openai client sees a BadRequestError with the same param.
    with pytest.raises(openai.BadRequestError) as info:
        cluster.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    assert info.value.status_code == 400 and info.value.body["param"] == "max_tokens"
    # Nothing was left allocated, and the cluster goes on serving.
    cluster.wait_released()
    want = cluster.tok.decode(
        hf_greedy(cluster.target, cluster.ids(PROMPT), 12), skip_special_tokens=True
    )
    again = cluster.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=SPEC_ON
    )
    assert again.choices[0].text == want


def _json_value():
    leaf = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
    )
    return st.recursive(leaf, lambda inner: st.lists(inner, max_size=3), max_leaves=6)


PARAMS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "top_k", "seed", "stop", "stream", "stream_options", "n", "logprobs", "echo",
    "user", "presence_penalty", "speculation",
]  # fmt: skip


def _bodies():
    """JSON bodies as a careless or hostile client sends them: OpenAI's parameters with any
    values (the right types now and then), and bytes that are no JSON at all."""
    chosen = st.dictionaries(st.sampled_from(PARAMS), _json_value(), max_size=6)
    sane = st.fixed_dictionaries(
        {"model": st.just(MODEL), "prompt": st.just(PROMPT), "max_tokens": st.integers(1, 4)},
        optional={k: _json_value() for k in ("temperature", "top_p", "stop", "seed", "stream")},
    )
    return st.one_of(
        chosen.map(lambda d: json.dumps(d).encode()),
        sane.map(lambda d: json.dumps(d).encode()),
        st.binary(max_size=40),
    )


@settings(
    max_examples=FUZZ_EXAMPLES or 120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(body=_bodies(), chat=st.booleans())
def test_fuzzed_bodies_get_a_client_error_or_an_answer_never_a_500(cluster, body, chat):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    resp = cluster.post(path, body, raw=True)
    assert resp.status_code in (200, 400, 404, 413, 429), (resp.status_code, resp.text, body)
    if resp.status_code != 200:
        err = resp.json()["error"]
        assert "Traceback" not in err["message"] and "\n" not in err["message"]


def test_a_body_over_the_size_limit_is_413_unread(cluster):
    huge = json.dumps({"model": MODEL, "prompt": "x" * (5 << 20), "max_tokens": 1}).encode()
    resp = cluster.post("/v1/completions", huge, raw=True)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"


def test_the_same_request_over_grpc_names_the_same_field(cluster):
    """One validation: the proto field the gRPC API names is what the HTTP API maps to `param`."""
    import grpc

    bad = grpc_request(PROMPT, 8, top_p=1.5, temperature=1.0)
    with pytest.raises(grpc.RpcError) as err:
        call_generate(cluster.grpc, bad, app=APP_NAME)
    over_http = assert_error(
        cluster.post("/v1/completions", good(top_p=1.5, temperature=1.0)), 400, "top_p"
    )
    assert err.value.details() == over_http["message"]


# -- 5. chat ----------------------------------------------------------------------------------


MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Add two numbers."},
]


def test_chat_greedy_equals_hf_on_the_rendered_template(cluster):
    n = 40
    ids = cluster.tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want = cluster.tok.decode(hf_greedy(cluster.target, ids, n), skip_special_tokens=True)
    resp = cluster.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=n, temperature=0, extra_body=SPEC_ON
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == want
    assert resp.usage.prompt_tokens == len(ids)
    check_spec(spec(resp), resp.usage.completion_tokens)
    chunks = list(
        cluster.client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_completion_tokens=n,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens
    # Bad chat input: the same rules, named in chat's terms.
    r = cluster.post(
        "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 0}
    )
    assert_error(r, 400, "max_completion_tokens")
    assert_error(
        cluster.post("/v1/chat/completions", {"model": MODEL, "messages": []}), 400, "messages"
    )
    r = cluster.post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]})
    assert_error(r, 400, "messages[0].content")
    r = cluster.post("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "tools": [1]})
    assert_error(r, 400, "tools")


def target_logp(cluster, ids: list[int]):
    """[len(ids), V] float32 log-probabilities of the target after each prefix of ids."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cluster.target, dtype=torch.float32).eval()
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)


def test_logprobs_through_the_openai_client_are_the_targets_own(cluster):
    """Completions' legacy shape (logprobs=N) and chat's (logprobs, top_logprobs), unary and
    streamed, with speculation on: each entry is the target's log_softmax at that position."""
    prompt = cluster.ids(PROMPT)
    unary = cluster.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=3, extra_body=SPEC_ON
    )
    assert spec(unary)["num_spec_steps"] > 0
    lp = unary.choices[0].logprobs
    ids = hf_greedy(cluster.target, prompt, 24)
    logp = target_logp(cluster, prompt + ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids)
    assert "".join(lp.tokens) == unary.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(len(ids))]
    for j, token in enumerate(ids):
        row = logp[len(prompt) + j - 1]
        assert lp.token_logprobs[j] == pytest.approx(float(row[token]), abs=1e-4)
        assert lp.tokens[j] == cluster.tok.decode([token])
        best = row.topk(3)
        assert sorted(lp.top_logprobs[j].values(), reverse=True)[:3] == pytest.approx(
            best.values.tolist(), abs=1e-4
        )

    echoed = cluster.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True
    )
    lp = echoed.choices[0].logprobs
    assert echoed.choices[0].text.startswith(PROMPT) and lp.token_logprobs[0] is None
    assert lp.tokens[: len(prompt)] == [cluster.tok.decode([t]) for t in prompt]
    for pos in range(1, len(prompt)):  # the prompt's own, from the prefill
        want = float(logp[pos - 1][prompt[pos]])
        assert lp.token_logprobs[pos] == pytest.approx(want, abs=1e-4)
    assert lp.token_logprobs[len(prompt) :] == pytest.approx(
        unary.choices[0].logprobs.token_logprobs[:4], abs=1e-4
    )

    chunks = list(
        cluster.client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=16,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            stream=True,
            extra_body=SPEC_ON,
        )
    )
    content = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "".join(e.token for e in content) == text and len(content) > 0
    chat_ids = cluster.tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
    out = hf_greedy(cluster.target, chat_ids, len(content))
    logp = target_logp(cluster, chat_ids + out)
    for j, e in enumerate(content):
        row = logp[len(chat_ids) + j - 1]
        assert e.logprob == pytest.approx(float(row[out[j]]), abs=1e-4)
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(
            row.topk(2).values.tolist(), abs=1e-4
        )
    r = cluster.post(
        "/v1/chat/completions",
        {"model": MODEL, "messages": MESSAGES, "logprobs": True, "top_logprobs": 21},
    )
    assert_error(r, 400, "top_logprobs")


def test_penalties_bias_and_min_tokens_under_speculation_equal_a_plain_run(cluster):
    """OpenAI's penalties and logit_bias, vLLM's repetition_penalty, min_p and min_tokens, with
    the openai client: greedy with speculation on is exactly the plain run's output."""
    eos = cluster.tok.eos_token_id
    kw = {
        "presence_penalty": 0.8,
        "frequency_penalty": 0.4,
        "logit_bias": {str(eos): 8},  # EOS very likely: min_tokens has work to do
    }
    extra = {"repetition_penalty": 1.3, "min_p": 0.05, "min_tokens": 10}
    texts = []
    for mode in ("on", "off"):
        resp = cluster.client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=24,
            temperature=0,
            extra_body={**extra, "speculation": {"mode": mode, "num_draft_tokens": 3}},
            **kw,
        )
        texts.append((resp.choices[0].text, resp.usage.completion_tokens))
        assert resp.usage.completion_tokens >= 10  # EOS was held back for 10 tokens
    assert texts[0] == texts[1]
    sampled = cluster.client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0.8,
        seed=3,
        extra_body={**extra, "min_tokens": 8},
        **kw,
    )
    assert sampled.usage.completion_tokens == 8  # min_tokens = max_tokens: never EOS


def test_structured_outputs_through_the_openai_client(cluster):
    """response_format json_schema (chat and completions, speculation on and off: the same
    greedy text, and it validates), json_object, vLLM's guided_regex; a schema that does not
    compile is a 400 naming the parameter that carried it."""
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    texts = []
    for mode in ("on", "off"):
        resp = cluster.client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=64,
            temperature=0,
            response_format=fmt,
            extra_body={"speculation": {"mode": mode, "num_draft_tokens": 3}},
        )
        assert resp.choices[0].finish_reason == "stop"
        texts.append(resp.choices[0].message.content)
    assert texts[0] == texts[1]
    jsonschema.validate(json.loads(texts[0]), schema)
    for seed in range(3):
        sampled = cluster.client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=64,
            temperature=1.0,
            seed=seed,
            extra_body={"response_format": fmt, **SPEC_ON},
        )
        jsonschema.validate(json.loads(sampled.choices[0].text), schema)
    obj = cluster.client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=200,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}, **SPEC_ON},
    )
    if obj.choices[0].finish_reason == "stop":  # a random model may write a long object
        assert isinstance(json.loads(obj.choices[0].text), dict)
    regex = cluster.client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=16,
        temperature=0.9,
        seed=1,
        extra_body={"guided_regex": "(yes|no)-[0-9]{3}", **SPEC_ON},
    )
    assert re.fullmatch("(yes|no)-[0-9]{3}", regex.choices[0].text)
    bad = {"model": MODEL, "prompt": PROMPT, "guided_regex": "a(b"}
    assert_error(cluster.post("/v1/completions", bad), 400, "guided_regex")
    bad = {"model": MODEL, "prompt": PROMPT, "response_format": {"type": "json_schema",
           "json_schema": {"schema": {"type": "nonsense"}}}}  # fmt: skip
    assert_error(cluster.post("/v1/completions", bad), 400, "response_format")


def test_n_choices_through_the_openai_client(cluster):
    """n = 3 seeded: three choices by index, usage adding their completions up, each repeating
    on a second call; streamed, each chunk names its choice and every choice finishes."""
    kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 5}
    unary = cluster.client.completions.create(n=3, extra_body=SPEC_ON, **kw)
    assert [c.index for c in unary.choices] == [0, 1, 2]
    texts = [c.text for c in unary.choices]
    assert len(set(texts)) == 3
    assert unary.usage.completion_tokens == 36 and unary.usage.prompt_tokens == len(
        cluster.ids(PROMPT)
    )
    again = cluster.client.completions.create(n=3, extra_body=SPEC_ON, **kw)
    assert [c.text for c in again.choices] == texts
    chunks = list(
        cluster.client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=8,
            temperature=1.0,
            seed=2,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    finishes = sorted(
        c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason
    )
    assert finishes == [0, 1]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_chat_with_a_model_without_a_template_is_a_400(cluster):
    http = f"{cluster.http}/notemplate"
    (model,) = [m["id"] for m in cluster.get("/notemplate/v1/models")["data"]]
    assert model == "plain"  # default: the target checkpoint's directory name
    client = openai.OpenAI(base_url=f"{http}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
    assert "no chat template" in info.value.body["message"]
    assert info.value.body["code"] == "chat_template_missing"
    # Its completions work (plain decoding: no draft pool in that application).
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0)
    assert out.usage.completion_tokens >= 1 and spec(out)["num_spec_steps"] == 0


def test_overload_is_a_429(cluster):
    """`notemplate` runs 1 request and queues 1: of 6 sent at once, the excess is refused with
    429 (and Retry-After) at once, the rest are served."""
    body = json.dumps({"model": "plain", "prompt": PROMPT, "max_tokens": 1000, "temperature": 0,
                       "stream": True, "speculation": {"mode": "off"}}).encode()  # fmt: skip
    headers = {"content-type": "application/json"}
    conns = [cluster.conn() for _ in range(6)]
    try:
        for conn in conns:  # all sent before any answer is read
            conn.request("POST", "/notemplate/v1/completions", body=body, headers=headers)
        answers = [conn.getresponse() for conn in conns]
        statuses = sorted(a.status for a in answers)
        assert statuses.count(429) >= 1 and statuses.count(200) >= 1, statuses
        for a in answers:
            if a.status == 429:
                assert a.getheader("retry-after") == "1"
            a.read()
    finally:
        for conn in conns:
            conn.close()
    handle = serve.get_app_handle("notemplate")
    t0 = time.monotonic()
    while handle.status.remote().result()["in_flight"]:
        assert time.monotonic() - t0 < 30
        time.sleep(0.2)


def test_a_killed_target_replica_is_a_503_or_a_moved_request_never_a_hang(cluster):
    """Kill `notemplate`'s only target replica. The stateless ingress moves each request to a
    live replica (Serve starts a new one); while there is none it answers 503 in OpenAI's shape
    once its retries are spent. Either way no request hangs, and service comes back. Last in the
    module: the app is not waited for again."""
    (victim,) = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "notemplate" in a["name"] and "SpecDecodeTarget" in a["name"]
    ]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    body = {"model": "plain", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    t0 = time.monotonic()
    while True:
        t1 = time.monotonic()
        resp = cluster.post("/notemplate/v1/completions", body)
        assert time.monotonic() - t1 < 300  # bounded: retries x target_timeout_s at most
        if resp.status_code == 200:
            assert resp.json()["choices"][0]["text"]
            break
        err = assert_error(resp, 503, None)
        assert err["type"] == "service_unavailable_error" and "target" in err["message"]
        assert time.monotonic() - t0 < 300, "the target replica never came back"
        time.sleep(0.5)


def test_the_request_a_vllm_benchmark_client_sends_succeeds(cluster):
    """ignore_eos, min_tokens = max tokens, stop: null, max_completion_tokens and both
    stream_options flags, through the real openai client, chat and completions."""
    extra = {"ignore_eos": True, "min_tokens": 6, "speculation": {"mode": "on"}}
    chunks = list(
        cluster.client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_completion_tokens=6,
            stop=None,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            extra_body=extra,
        )
    )
    usages = [c.usage for c in chunks if c.usage is not None]
    assert usages and usages[-1].completion_tokens == 6  # usage on every chunk, the last full
    assert [u.completion_tokens for u in usages] == sorted(u.completion_tokens for u in usages)
    out = cluster.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, stop=None, temperature=0, extra_body=extra
    )
    assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length"
