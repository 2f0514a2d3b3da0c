"""The draft pool scales apart from the target pool, on the rows it holds (Serve's autoscaling with
our policy, cluster/serve/autoscaling.py), on a real local Ray + Serve with tiny models.

Under load a second draft replica starts, registers, and the schedulers lease it rows; when the
load stops it is removed (it leaves the registry, then drains); the target pool stays at one
replica throughout; no request fails and every greedy output is HF's greedy continuation, the
output of a run without scaling. Which replica holds rows is read from the exported metrics
(`specdec_worker_sequences` by replica), as an operator would.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request

import pytest
import ray
from ray import serve

from cluster.cli.client import build_request, call_generate
from cluster.observability.prometheus import Samples
from cluster.serve.app import APP_NAME, GRPC_SERVICERS, build_app
from protos import specdec_pb2 as pb
from tests.deploy.helpers import free_port, hf_greedy, init_ray, noisy_copy, tmpdir, wait_registered
from tests.tiny_models import make_model, make_tokenizer

pytestmark = pytest.mark.slow

N = 120  # tokens per request
PROMPTS = [[5 + i, 17, 33 + i, 2, 41, 9 + 2 * i] for i in range(8)]
DRAFT, TARGET = "SpecDecodeDraft", "SpecDecodeTarget"


@pytest.fixture(scope="module")
def cluster():
    root = tmpdir("sd-autoscale-")
    target = make_model(root / "target", seed=1, max_positions=1024, tokenizer=make_tokenizer())
    draft = noisy_copy(target, root / "draft", std=0.15)
    metrics_port = free_port()
    init_ray(metrics_port=metrics_port)
    try:
        grpc_port = free_port()
        serve.start(
            http_options={"host": "127.0.0.1", "port": free_port()},
            grpc_options={"port": grpc_port, "grpc_servicer_functions": GRPC_SERVICERS},
        )
        args = {
            "models": {"target": str(target), "draft": str(draft), "dtype": "float32"},
            "draft": {
                "replicas": 1,
                "autoscaling": {
                    "min_replicas": 1,
                    "max_replicas": 2,
                    "target_rows": 2,
                    "upscale_delay_s": 0,
                    "downscale_delay_s": 4,
                    "metrics_interval_s": 0.5,
                    "look_back_period_s": 2,
                },
            },
            # Targets scale on the requests they hold: 6 streams stay on one, 12 need two.
            "target": {
                "autoscaling": {
                    "min_replicas": 1,
                    "max_replicas": 2,
                    "target_rows": 8,
                    "upscale_delay_s": 0,
                    "downscale_delay_s": 4,
                    "metrics_interval_s": 0.5,
                    "look_back_period_s": 2,
                },
            },
            "ingress": {"num_cpus": 0},
            "workers": {"host": "127.0.0.1", "drain_s": 10},
        }
        serve.run(build_app(args), name=APP_NAME, route_prefix="/specdec")
        wait_registered(APP_NAME)
        oracle = {i: hf_greedy(target, p, N) for i, p in enumerate(PROMPTS)}
        yield {
            "address": f"127.0.0.1:{grpc_port}",
            "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
            "oracle": oracle,
        }
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def running(deployment: str) -> int:
    states = serve.status().applications[APP_NAME].deployments[deployment].replica_states
    return int(states.get("RUNNING", 0))


def rows_by_replica(url: str, deployment: str = DRAFT) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        m = Samples.parse(resp.read().decode())
    return m.by("ray_specdec_worker_sequences", "replica", deployment=deployment)


def busy_replicas(url: str, deployment: str) -> int:
    return sum(1 for v in rows_by_replica(url, deployment).values() if v > 0)


class Load:
    """`streams` clients, each sending the prompts' requests one after another (speculation on,
    the draft model), checking every output against the oracle."""

    def __init__(self, address: str, oracle: dict[int, list[int]], streams: int) -> None:
        self.address, self.oracle = address, oracle
        self.stop = threading.Event()
        self.done = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(s,)) for s in range(streams)]

    def _run(self, stream: int) -> None:
        i = stream
        while not self.stop.is_set():
            n = i % len(PROMPTS)
            req = build_request("", max_new_tokens=N, drafter="model")
            req.prompt_token_ids.extend(PROMPTS[n])
            req.speculation.mode = pb.SPECULATION_MODE_ON
            try:
                resp, _ = call_generate(self.address, req, timeout=120)
                ok = list(resp.token_ids) == self.oracle[n]
                err = None if ok else f"prompt {n}: output differs from HF greedy"
            except Exception as exc:  # noqa: BLE001 - every failure is the test's finding
                err = f"prompt {n}: {type(exc).__name__}: {exc}"
            with self._lock:
                self.done += 1
                if err:
                    self.errors.append(err)
            i += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=180)


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_the_draft_pool_scales_up_under_load_and_back_down_without_failing_a_request(cluster):
    assert running(DRAFT) == 1 and running(TARGET) == 1
    t0 = time.monotonic()
    with Load(cluster["address"], cluster["oracle"], streams=6) as load:
        wait_for(lambda: running(DRAFT) == 2, 90, "a second draft replica")
        up_s = time.monotonic() - t0
        # The new replica registers and the schedulers lease it rows (least loaded first).
        wait_for(
            lambda: busy_replicas(cluster["metrics"], DRAFT) >= 2, 60, "both drafts holding rows"
        )
        assert running(TARGET) == 1  # the pools scale apart
        under_load = load.done
    assert load.errors == [], load.errors[:5]
    assert under_load > 0
    # No load: back to one draft replica; a trickle of requests meanwhile still succeeds.
    t1 = time.monotonic()
    with Load(cluster["address"], cluster["oracle"], streams=1) as trickle:
        wait_for(lambda: running(DRAFT) == 1, 90, "the draft pool back to one replica")
        down_s = time.monotonic() - t1
    assert trickle.errors == [], trickle.errors[:5]
    assert running(TARGET) == 1
    print(
        f"\nscaled up in {up_s:.1f}s and down in {down_s:.1f}s; "
        f"{load.done + trickle.done} requests, all equal to HF greedy"
    )


def test_the_target_pool_scales_on_the_requests_it_holds(cluster):
    """12 streams: a second target replica starts, its scheduler takes new requests (its worker
    holds sequences), and it goes when the load does; every request succeeds and equals HF
    greedy."""
    wait_for(lambda: running(DRAFT) == 1 and running(TARGET) == 1, 90, "one replica of each")
    t0 = time.monotonic()
    with Load(cluster["address"], cluster["oracle"], streams=12) as load:
        wait_for(lambda: running(TARGET) == 2, 120, "a second target replica")
        up_s = time.monotonic() - t0
        wait_for(lambda: busy_replicas(cluster["metrics"], TARGET) >= 2, 60, "both targets serving")
    assert load.errors == [], load.errors[:5]
    t1 = time.monotonic()
    wait_for(lambda: running(TARGET) == 1, 120, "the target pool back to one replica")
    print(
        f"\ntarget pool: up in {up_s:.1f}s, down in {time.monotonic() - t1:.1f}s; "
        f"{load.done} requests, all equal to HF greedy"
    )


def test_a_one_minute_soak_sees_no_unexpected_code_and_bounded_growth(cluster, capsys):
    """`specdec soak`: mixed traffic (spec, plain, streams, cancels, past deadlines, malformed
    bytes, over-limit requests) for a minute: every request ends with a code its kind may have;
    the cluster (its draft pool scaling meanwhile) serves the oracle's output afterwards."""
    from cluster.cli import main

    argv = ["soak", "--address", cluster["address"], "--minutes", "1", "--streams", "3", "--json"]
    rc = main([*argv, "--max-new-tokens", "24"])
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{\n") :])  # the report, after the progress lines
    assert rc == 0 and report["unexpected"] == {}, report
    assert report["requests"] > 50 and set(report["codes"]) == {
        "spec", "plain", "stream", "cancelled", "past_deadline", "malformed", "over_limit"
    }  # fmt: skip
    assert set(report["codes"]["malformed"]) == {"INVALID_ARGUMENT"}
    growth, n = report["rss_growth_pct_max"], len(report["processes"])
    print(f"\nsoak: {report['requests']} requests, max RSS growth {growth:.1f}% of {n} processes")
    req = build_request("", max_new_tokens=N)
    req.prompt_token_ids.extend(PROMPTS[0])
    resp, _ = call_generate(cluster["address"], req)
    assert list(resp.token_ids) == cluster["oracle"][0]
