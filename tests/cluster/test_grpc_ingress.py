"""The public SpecDecode API end to end: `python -m cluster.routing.grpc_server` in front of real
worker processes, called by a gRPC client. Bad requests, cancellation, deadlines, start-up
checks."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.routing.worker_processes import worker_process
from protos import specdec_pb2 as pb
from protos import specdec_pb2_grpc, worker_pb2_grpc
from protos import worker_pb2 as wpb
from tests.cluster.grpc_procs import (
    ROOT,
    Proc,
    hf_greedy,
    make_checkpoints,
    server_env,
    start_all,
    stats,
    stop_all,
    wait_live_zero,
    worker,
)
from tests.fuzzing import FUZZ_EXAMPLES
from tests.tiny_models import make_model, make_tokenizer
from workers.draft import DraftWorker
from workers.model_runner import load_tokenizer
from workers.service import serve_draft

PROMPT = "def add(a, b):"
ON = pb.SPECULATION_MODE_ON


def ingress(target: str, draft: str, model, *extra: str) -> Proc:
    args = ["-m", "cluster.routing.grpc_server", "--target", target, "--draft", draft]
    return Proc([*args, "--target-model", str(model), "--port", "0", *extra], "ingress")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("grpc_ingress"))


@pytest.fixture(scope="module")
def cluster(ckpts):
    workers = start_all(worker("target", ckpts["target"]), worker("draft", ckpts["near"]))
    try:
        front = start_all(
            ingress(workers[0].address, workers[1].address, ckpts["target"], "--pipelined", "auto")
        )[0]
    except BaseException:
        stop_all(workers)
        raise
    channel = grpc.insecure_channel(front.address, options=[("grpc.enable_http_proxy", 0)])
    yield {
        "stub": specdec_pb2_grpc.SpecDecodeStub(channel),
        "health": health_pb2_grpc.HealthStub(channel),
        "channel": channel,
        "workers": [(workers[0].address, "target"), (workers[1].address, "draft")],
        "target": workers[0].address,
    }
    channel.close()
    stop_all([front, *workers])


def good(**kw) -> pb.GenerateRequest:
    kw.setdefault("max_new_tokens", 24)
    return pb.GenerateRequest(prompt=PROMPT, **kw)


def test_generate_and_stream_over_grpc(cluster, ckpts):
    stub = cluster["stub"]
    tok = load_tokenizer(ckpts["target"])
    want = hf_greedy(ckpts["target"], tok.encode(PROMPT, add_special_tokens=False), 40)
    # The draft model's blocks: lookup drafting would find the first answer in the scheduler's
    # recent outputs and draft the second one from it in fewer rounds.
    spec = pb.SpeculationOptions(mode=ON, num_draft_tokens=3, drafter=pb.DRAFTER_MODEL)
    req = good(max_new_tokens=40, speculation=spec)
    whole = stub.Generate(req, timeout=60)
    assert list(whole.token_ids) == want
    assert whole.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
    assert whole.usage.completion_tokens == len(want) and whole.stats.rounds > 0
    chunks = list(stub.GenerateStream(req, timeout=60))
    assert len(chunks) > 1 and [t for c in chunks for t in c.token_ids] == want
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == whole.finish_reason
    assert chunks[-1].stats.rounds == whole.stats.rounds


def test_stop_token_ids_and_stop_strings_kept_in_the_output(cluster, ckpts):
    """vLLM's stop_token_ids (the id is returned, finish STOP) and include_stop_str_in_output
    (the matched stop string stays at the end of the text), under speculation."""
    stub = cluster["stub"]
    tok = load_tokenizer(ckpts["target"])
    want = hf_greedy(ckpts["target"], tok.encode(PROMPT, add_special_tokens=False), 40)
    spec = pb.SpeculationOptions(mode=ON, num_draft_tokens=3, drafter=pb.DRAFTER_MODEL)
    t = want[12]
    resp = stub.Generate(good(max_new_tokens=40, speculation=spec, stop_token_ids=[t]), timeout=60)
    assert list(resp.token_ids) == want[: want.index(t) + 1]
    assert resp.finish_reason == pb.FINISH_REASON_STOP
    full = stub.Generate(good(max_new_tokens=40, speculation=spec), timeout=60).text
    stop = full[8:11]
    at = full.index(stop)
    cut = stub.Generate(good(max_new_tokens=40, speculation=spec, stop=[stop]), timeout=60)
    kept = stub.Generate(
        good(max_new_tokens=40, speculation=spec, stop=[stop], include_stop_str_in_output=True),
        timeout=60,
    )
    assert cut.text == full[:at] and kept.text == full[: at + len(stop)]
    assert cut.finish_reason == kept.finish_reason == pb.FINISH_REASON_STOP
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(good(stop_token_ids=[96]), timeout=30)  # outside the vocabulary
    assert err.value.details().startswith("stop_token_ids:")


def test_the_standard_health_service_answers_serving(cluster):
    for service in ("", "specdec.v1.SpecDecode"):
        resp = cluster["health"].Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        cluster["health"].Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# -- bytes that are no GenerateRequest: the client's mistake (never UNKNOWN or INTERNAL) --------

GOOD_BYTES = pb.GenerateRequest(
    prompt=PROMPT, max_new_tokens=4, speculation=pb.SpeculationOptions(mode=ON)
).SerializeToString()
UNPARSABLE = [b"\xff\xff\xff\xff", b"\x0a\x7fab", GOOD_BYTES[:-3], b"\x12\x05\x80\x80\x80\x80\x80"]


def raw_call(cluster, method: str, data: bytes, timeout: float = 30):
    channel = cluster["channel"]
    call = (channel.unary_unary if method == "Generate" else channel.unary_stream)(
        f"/specdec.v1.SpecDecode/{method}",
        request_serializer=lambda b: b,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    out = call(data, timeout=timeout)
    return out if method == "Generate" else list(out)


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
@pytest.mark.parametrize("data", UNPARSABLE, ids=["tag", "length", "cut", "varint"])
def test_bytes_that_are_no_request_are_invalid_argument_naming_it(cluster, method, data):
    with pytest.raises(grpc.RpcError) as err:
        raw_call(cluster, method, data)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request: "), err.value.details()


def _mutations():
    """Bytes of a valid request flipped, cut or grown, and plain noise (as a fuzzer sends)."""
    flip = st.tuples(st.integers(0, len(GOOD_BYTES) - 1), st.integers(1, 255)).map(
        lambda f: GOOD_BYTES[: f[0]] + bytes([GOOD_BYTES[f[0]] ^ f[1]]) + GOOD_BYTES[f[0] + 1 :]
    )
    cut = st.integers(0, len(GOOD_BYTES) - 1).map(lambda n: GOOD_BYTES[:n])
    grow = st.tuples(st.integers(0, len(GOOD_BYTES)), st.binary(min_size=1, max_size=8)).map(
        lambda g: GOOD_BYTES[: g[0]] + g[1] + GOOD_BYTES[g[0] :]
    )
    return st.one_of(flip, cut, grow, st.binary(max_size=64))


@settings(
    max_examples=FUZZ_EXAMPLES or 150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=_mutations())
def test_fuzzed_bytes_get_ok_or_a_client_error_never_unknown_or_internal(cluster, data):
    try:
        raw_call(cluster, "Generate", data, timeout=60)
    except grpc.RpcError as exc:
        assert exc.code() in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ), (exc.code(), exc.details(), data)


def test_the_server_still_serves_after_the_fuzzing(cluster):
    resp = cluster["stub"].Generate(good(max_new_tokens=8), timeout=60)
    assert len(resp.token_ids) == 8


BAD = {
    "prompt": [
        pb.GenerateRequest(max_new_tokens=4),  # no prompt at all
        pb.GenerateRequest(prompt="x", prompt_token_ids=[5], max_new_tokens=4),  # both forms
        pb.GenerateRequest(prompt_token_ids=[5] * 300, max_new_tokens=4),  # context is 256
        pb.GenerateRequest(prompt="def f():\n" * 200, max_new_tokens=4),  # text past the context
        pb.GenerateRequest(prompt="x" * ((1 << 20) + 1), max_new_tokens=4),  # over max chars
    ],
    "prompt_token_ids": [
        pb.GenerateRequest(prompt_token_ids=[5, 96], max_new_tokens=4),  # the vocabulary is 96
        pb.GenerateRequest(prompt_token_ids=[5, -1], max_new_tokens=4),
        pb.GenerateRequest(prompt_token_ids=[2**31 - 1], max_new_tokens=4),
    ],
    "max_new_tokens": [
        good(max_new_tokens=0),
        good(max_new_tokens=-3),
        good(max_new_tokens=2**31 - 1),  # over the limit
    ],
    "temperature": [
        good(temperature=-0.5),
        good(temperature=float("nan")),
        good(temperature=float("inf")),
    ],
    "top_p": [
        good(top_p=1.5),
        good(top_p=-0.1),
        good(top_p=0.0),  # optional: an explicit 0 is refused, not read as unset
        good(top_p=float("nan")),
    ],
    "stop": [
        good(stop=["ok", ""]),
        good(stop=["x" * 300]),  # a stop string over max_stop_chars
        good(stop=[f"s{i}" for i in range(17)]),  # more than max_stop_strings
    ],
    "top_k": [good(top_k=-1), good(top_k=-(2**31))],
    "seed": [good(seed=-1), good(seed=-(2**63))],
    "logprobs": [good(logprobs=-1), good(logprobs=21)],
    "prompt_logprobs": [good(prompt_logprobs=-1), good(prompt_logprobs=21)],
    "n": [good(n=-1), good(n=17)],
    "structured_output.json_schema": [
        good(structured_output=pb.StructuredOutput(json_schema="{oops")),
        good(structured_output=pb.StructuredOutput(json_schema='{"type": "nonsense"}')),
    ],
    "structured_output.regex": [good(structured_output=pb.StructuredOutput(regex="a(b"))],
    "resumed_tokens": [good(resumed_tokens=1000)],
    "presence_penalty": [good(presence_penalty=2.5), good(presence_penalty=float("nan"))],
    "frequency_penalty": [good(frequency_penalty=-3)],
    "repetition_penalty": [good(repetition_penalty=0), good(repetition_penalty=2.5)],
    "min_p": [good(min_p=-0.1), good(min_p=1.01)],
    "logit_bias": [good(logit_bias={96: 1.0}), good(logit_bias={5: 101.0})],
    "min_tokens": [good(min_tokens=-1), good(min_tokens=25)],  # good() asks for 24 tokens
    "speculation.num_draft_tokens": [
        good(speculation=pb.SpeculationOptions(num_draft_tokens=-1)),
        good(speculation=pb.SpeculationOptions(num_draft_tokens=9)),  # the ingress allows 8
    ],
    "speculation.mode": [good(speculation=pb.SpeculationOptions(mode=7))],
    "speculation.drafter": [good(speculation=pb.SpeculationOptions(drafter=9))],
}


def test_the_malformed_matrix_has_at_least_25_cases():
    assert sum(len(v) for v in BAD.values()) + len(UNPARSABLE) >= 25


@pytest.mark.parametrize("field", list(BAD))
def test_bad_requests_are_invalid_argument_naming_the_field(cluster, field):
    stub = cluster["stub"]
    for req in BAD[field]:
        for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
            with pytest.raises(grpc.RpcError) as info:
                call(req, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert info.value.details().startswith(field + ":"), info.value.details()
    # Nothing was started on the workers, and the server keeps serving.
    assert all(stats(a, r).live_sequences == 0 for a, r in cluster["workers"])
    assert len(stub.Generate(good(max_new_tokens=5), timeout=60).token_ids) == 5


def test_top_p_unset_is_one_and_a_tiny_temperature_is_greedy(cluster):
    stub = cluster["stub"]
    off = pb.SpeculationOptions(mode=pb.SPECULATION_MODE_OFF)  # plain steps: draws fixed by seed
    runs = [
        stub.Generate(good(temperature=0.8, seed=5, top_p=p, speculation=off), timeout=60)
        for p in (None, 1.0, 0.5)
    ]
    assert runs[0].token_ids == runs[1].token_ids != runs[2].token_ids
    # A positive temperature too small to divide logits by is greedy (not NaN, not INTERNAL).
    greedy = stub.Generate(good(speculation=off), timeout=60)
    tiny = stub.Generate(good(temperature=1e-30, seed=5, speculation=off), timeout=60)
    assert tiny.token_ids == greedy.token_ids


def test_cancelling_fifty_streams_frees_every_sequence(cluster):
    stub = cluster["stub"]
    req = good(max_new_tokens=200, speculation=pb.SpeculationOptions(mode=ON, num_draft_tokens=2))
    calls = [stub.GenerateStream(req, timeout=120) for _ in range(50)]
    for call in calls:
        first = next(call)  # every stream is running and has committed tokens
        assert first.token_ids
    for call in calls:
        call.cancel()
    live = wait_live_zero(cluster["workers"], timeout=60)
    assert set(live.values()) == {0}, live
    assert len(stub.Generate(good(max_new_tokens=5), timeout=60).token_ids) == 5


def test_a_deadline_frees_the_sequence(cluster):
    stub = cluster["stub"]
    req = good(max_new_tokens=240, speculation=pb.SpeculationOptions(mode=ON, num_draft_tokens=1))
    # Deadlines that end mid-generation: the lean forward runs these 240 tiny-model tokens in
    # under 50 ms once warm.
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GenerateStream(req, timeout=0.02))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(req, timeout=0.02)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    live = wait_live_zero(cluster["workers"], timeout=60)
    assert set(live.values()) == {0}, live


def test_a_killed_router_leaves_no_sequence_on_the_workers_after_its_lease(ckpts):
    """Workers with a 3 s lease, a router renewing every 0.5 s: generations run as ever (their
    output is HF's greedy one); SIGKILL the router mid-stream, and within the lease both workers
    hold nothing of it."""
    lease = ("--lease-timeout-s", "3")
    workers = start_all(
        worker_process("target", ckpts["target"], extra=lease),
        worker_process("draft", ckpts["near"], extra=lease),
    )
    procs = list(workers)
    try:
        renew = ("--lease-renew-s", "0.5")
        front = start_all(ingress(workers[0].address, workers[1].address, ckpts["target"], *renew))
        procs += front
        roles = [(workers[0].address, "target"), (workers[1].address, "draft")]
        spec = pb.SpeculationOptions(mode=ON, num_draft_tokens=2, drafter=pb.DRAFTER_MODEL)
        tok = load_tokenizer(ckpts["target"])
        want = hf_greedy(ckpts["target"], tok.encode(PROMPT, add_special_tokens=False), 40)
        with grpc.insecure_channel(front[0].address, options=[("grpc.enable_http_proxy", 0)]) as ch:
            stub = specdec_pb2_grpc.SpecDecodeStub(ch)
            whole = stub.Generate(good(max_new_tokens=40, speculation=spec), timeout=60)
            assert list(whole.token_ids) == want
            stream = stub.GenerateStream(good(max_new_tokens=240, speculation=spec), timeout=120)
            next(stream)
            held = {a: stats(a, r).live_sequences for a, r in roles}
            assert all(held.values()), held  # both workers hold the running sequence
            front[0].kill()  # a crash: nothing releases it
            t_kill = time.monotonic()
            live = wait_live_zero(roles, timeout=15)
            assert set(live.values()) == {0}, live
            print(f"\nfreed {time.monotonic() - t_kill:.1f}s after the router died (lease 3 s)")
    finally:
        stop_all(procs)


def test_workers_with_mutual_tls_refuse_callers_without_a_certificate(ckpts, tmp_path):
    """Workers and router with certificates from one CA: the cluster generates HF's greedy
    output; a plaintext caller, a TLS caller without a certificate and one whose certificate
    another CA signed are all refused."""
    pytest.importorskip("cryptography")
    from tests.cluster.certs import make_certs
    from workers.tls import TLSFiles

    certs = make_certs(tmp_path / "pki")
    w, c = certs["worker"], certs["client"]
    flags = ("--tls-ca", w.ca_file, "--tls-cert", w.cert_file, "--tls-key", w.key_file)
    workers = start_all(
        worker_process("target", ckpts["target"], extra=flags),
        worker_process("draft", ckpts["near"], extra=flags),
    )
    procs = list(workers)
    try:
        client_flags = ("--tls-ca", c.ca_file, "--tls-cert", c.cert_file, "--tls-key", c.key_file)
        front = start_all(
            ingress(workers[0].address, workers[1].address, ckpts["target"], *client_flags)
        )
        procs += front
        tok = load_tokenizer(ckpts["target"])
        want = hf_greedy(ckpts["target"], tok.encode(PROMPT, add_special_tokens=False), 24)
        spec = pb.SpeculationOptions(mode=ON, num_draft_tokens=2, drafter=pb.DRAFTER_MODEL)
        with grpc.insecure_channel(front[0].address, options=[("grpc.enable_http_proxy", 0)]) as ch:
            resp = specdec_pb2_grpc.SpecDecodeStub(ch).Generate(good(speculation=spec), timeout=60)
        assert list(resp.token_ids) == want and resp.stats.rounds > 0

        def probe(channel: grpc.Channel) -> grpc.StatusCode:
            try:
                worker_pb2_grpc.TargetWorkerStub(channel).Stats(wpb.StatsRequest(), timeout=5)
            except grpc.RpcError as exc:
                return exc.code()
            finally:
                channel.close()
            return grpc.StatusCode.OK

        target = workers[0].address
        name = [("grpc.ssl_target_name_override", "specdec-worker")]
        assert probe(grpc.insecure_channel(target)) == grpc.StatusCode.UNAVAILABLE
        ca_only = grpc.ssl_channel_credentials(root_certificates=open(c.ca_file, "rb").read())
        assert probe(grpc.secure_channel(target, ca_only, name)) == grpc.StatusCode.UNAVAILABLE
        other = make_certs(tmp_path / "other", ca_name="another-ca")["client"]
        stranger = TLSFiles(c.ca_file, other.cert_file, other.key_file)
        creds = stranger.channel_credentials()
        assert probe(grpc.secure_channel(target, creds, name)) == grpc.StatusCode.UNAVAILABLE
        assert (
            probe(grpc.secure_channel(target, c.channel_credentials(), name)) == grpc.StatusCode.OK
        )
    finally:
        stop_all(procs)


def test_ingress_refuses_to_start_with_a_draft_of_another_tokenizer(cluster, ckpts, tmp_path):
    other = make_model(tmp_path / "other", seed=3, tokenizer=make_tokenizer(80))
    server, port = serve_draft(DraftWorker.from_path(other), "127.0.0.1", 0)
    try:
        t0 = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "cluster.routing.grpc_server", "--target", cluster["target"]]
            + ["--draft", f"127.0.0.1:{port}", "--target-model", str(ckpts["target"])],
            cwd=ROOT,
            env=server_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr[-2000:]
        assert "tokenizer" in done.stderr and f"127.0.0.1:{port}" in done.stderr
        assert done.stdout == ""  # never announced a port
        assert time.monotonic() - t0 < 120
    finally:
        server.stop(0)
