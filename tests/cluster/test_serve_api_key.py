"""An API key on the deployed cluster (real Ray + Serve, tiny models, plain decoding): with the
key's variable set on the nodes, gRPC and HTTP refuse calls without it (UNAUTHENTICATED / 401 in
OpenAI's shape) and serve calls with it, the `openai` client and `specdec generate` included;
health and readiness stay open; the key appears in no log file."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve

from cluster.cli.client import build_request, call_generate
from cluster.serve.app import APP_NAME, GRPC_SERVICERS, build_app
from protos import specdec_pb2 as pb
from protos import specdec_pb2_grpc
from tests.deploy.helpers import free_port, init_ray, tmpdir, wait_registered
from tests.tiny_models import make_model, make_tokenizer

pytestmark = pytest.mark.slow

KEY_ENV = "SPECDEC_TEST_API_KEY"


@pytest.fixture(scope="module")
def cluster():
    root = tmpdir("sd-key-")
    target = make_model(root / "target", seed=1, tokenizer=make_tokenizer())
    key, second = secrets.token_hex(16), secrets.token_hex(16)
    # The nodes' environment (the local Ray's processes inherit it): two keys, as in a rotation.
    os.environ[KEY_ENV] = f"{key}, {second}"
    init_ray()
    try:
        grpc_port, http_port = free_port(), free_port()
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port},
            grpc_options={"port": grpc_port, "grpc_servicer_functions": GRPC_SERVICERS},
        )
        args = {
            "models": {"target": str(target), "draft": str(target), "dtype": "float32"},
            "draft": {"replicas": 0},
            "ingress": {"num_cpus": 0},
            "workers": {"host": "127.0.0.1"},
            "security": {"api_key_env": KEY_ENV},
        }
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        wait_registered(APP_NAME)
        yield {
            "grpc": f"127.0.0.1:{grpc_port}",
            "http": f"http://127.0.0.1:{http_port}",
            "key": key,
            "second": second,
            "logs": Path(ray._private.worker._global_node.get_session_dir_path()) / "logs",
        }
    finally:
        os.environ.pop(KEY_ENV, None)
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def request() -> pb.GenerateRequest:
    req = build_request("", max_new_tokens=4)
    req.prompt_token_ids.extend([5, 17, 33, 2])
    return req


def generate(address: str, metadata=()):
    with grpc.insecure_channel(address) as channel:
        stub = specdec_pb2_grpc.SpecDecodeStub(channel)
        return stub.Generate(request(), timeout=60, metadata=metadata)


def http(url: str, key: str | None = None, body: dict | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            text = resp.read()
            return resp.status, json.loads(text) if text else {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_grpc_needs_the_key_and_serves_with_it(cluster):
    for metadata in (
        (),
        (("authorization", "Bearer wrong"),),
        (("authorization", cluster["key"]),),
    ):
        with pytest.raises(grpc.RpcError) as err:
            generate(cluster["grpc"], metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert cluster["key"] not in err.value.details()
    for key in (cluster["key"], cluster["second"]):  # either key of the list
        resp = generate(cluster["grpc"], (("authorization", f"Bearer {key}"),))
        assert len(resp.token_ids) == 4
    # `specdec generate` and the bench's client send the key from SPECDEC_API_KEY.
    os.environ["SPECDEC_API_KEY"] = cluster["key"]
    try:
        resp, _ = call_generate(cluster["grpc"], request())
    finally:
        os.environ.pop("SPECDEC_API_KEY")
    assert len(resp.token_ids) == 4
    with grpc.insecure_channel(cluster["grpc"]) as channel:  # the probe stays open
        check = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_http_needs_the_key_and_serves_with_it(cluster):
    base, key = cluster["http"], cluster["key"]
    for given in (None, "wrong"):
        status, body = http(f"{base}/v1/models", given)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", body
        status, _ = http(f"{base}/specdec", given)
        assert status == 401
    status, body = http(f"{base}/v1/models", key)
    assert status == 200
    model = body["data"][0]["id"]
    for path in ("/health", "/ready", "/version"):
        assert http(f"{base}{path}")[0] == 200, path
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key)
    out = client.completions.create(model=model, prompt="x", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong").models.list()


def test_a_key_past_its_limit_in_flight_is_refused_and_others_are_not():
    from cluster.api.auth import APIKeys, authorized
    from cluster.api.validation import RequestError

    keys = APIKeys(["a", "b"], max_in_flight_per_key=1)
    assert authorized("Bearer b", keys) == 1 and authorized("Bearer c", keys) is None
    assert authorized("b", keys) is None and authorized("Bearer a", None) == -1
    with keys.in_flight(0):
        with pytest.raises(RequestError) as err:
            with keys.in_flight(0):
                pass
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        with keys.in_flight(1):  # another key is not held back
            pass
    with keys.in_flight(0):  # freed when the first left
        pass


def test_the_key_is_in_no_log_file(cluster):
    time.sleep(1.0)  # let the replicas flush their logs
    leaks = [
        str(p)
        for p in cluster["logs"].rglob("*")
        if p.is_file()
        and any(k.encode() in p.read_bytes() for k in (cluster["key"], cluster["second"]))
    ]
    assert leaks == []
