"""What users do, as the README's "Deploying" section shows it: `ray start --head` with the
pools, `specdec deploy deploy/cluster.yaml`, a gRPC request with `specdec generate`, then stop.

In the order shown, in two states of the machine: fresh (no Ray token anywhere: no
authentication), and after `specdec up` (whose local `ray.init()` wrote ~/.ray/auth_token, so Ray
2.60's `ray start` turns token authentication on by itself; a bare `serve deploy` then fails with
"Missing authentication token", `specdec deploy` does not). Neither state sets RAY_AUTH_MODE: the
commands must work as written. Each run has its own HOME, so ~/.ray is the test's own.

Differences from the README, for a shared CI box: every port is a free one, the Serve config is a
temporary copy of deploy/cluster.yaml with tiny models, loopback worker addresses, those ports and
`models.dtype: float32` (where greedy output equals HF `generate` token for token; the shipped
file itself is checked in test_manifests.py), and the cluster is stopped by ending *its own*
`ray start --block` process (`ray stop` would stop every Ray cluster on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from cluster.cli.client import build_request, call_generate
from cluster.serve.app import APP_NAME
from tests.deploy.helpers import free_port, hf_greedy, noisy_copy, tmpdir
from tests.tiny_models import make_model, make_tokenizer
from workers.checkpoints import shipped_draft_path, shipped_target_path
from workers.model_runner import load_tokenizer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PROMPT = "def add(a, b):"


def _kill_leftovers(marker: str) -> None:
    """SIGKILL processes of *this* test's cluster only (their command line names its temp dir)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass


def _run(cmd: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(params=["fresh-machine", "after-specdec-up"])
def ray_cluster(request):
    root = tmpdir("sd-deploy-")
    temp_dir = tmpdir("sdr-")  # short: Ray's socket paths live under it
    home = root / "home"
    home.mkdir()
    if request.param == "after-specdec-up":  # what `specdec up`'s ray.init() leaves behind
        (home / ".ray").mkdir()
        token_file = home / ".ray" / "auth_token"
        token_file.write_text(secrets.token_hex(32))
        token_file.chmod(0o600)
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    env.update(
        HOME=str(home),
        RAY_USAGE_STATS_ENABLED="0",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="2",  # stop in seconds, not the default 30
    )
    dash, gcs = free_port(), free_port()
    # The README's line, plus free ports and a private temp dir.
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--num-cpus",
        "4",
        "--resources",
        json.dumps({"draft_pool": 1, "target_pool": 1}),
        "--disable-usage-stats",
        "--block",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--ray-client-server-port",
        str(free_port()),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--dashboard-agent-grpc-port",
        str(free_port()),
        "--metrics-export-port",
        str(free_port()),
        "--runtime-env-agent-port",
        str(free_port()),
        "--temp-dir",
        str(temp_dir),
    ]
    head = subprocess.Popen(
        cmd,
        env=env,
        stdout=open(root / "ray_start.log", "w"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield {
            "env": env,
            "dashboard": f"http://127.0.0.1:{dash}",
            "gcs": f"127.0.0.1:{gcs}",
            "root": root,
            "head": head,
            "token": request.param == "after-specdec-up",
        }
    finally:
        # `ray stop` for this cluster only: SIGTERM to its `ray start --block` process makes it
        # shut its node down (raylet, GCS, dashboard, workers).
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        _kill_leftovers(str(temp_dir))
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_start_serve_deploy_grpc_request_stop(ray_cluster):
    env, root = ray_cluster["env"], ray_cluster["root"]
    shipped = (shipped_target_path() / "config.json").is_file() and (
        shipped_draft_path() / "config.json"
    ).is_file()
    if shipped:  # the shipped file's own models
        target = shipped_target_path()
        tok = load_tokenizer(target)
    else:  # until the pair ships: tiny random ones
        tok = make_tokenizer()
        target = make_model(root / "target", seed=1, max_positions=512, tokenizer=tok)
        draft = noisy_copy(target, root / "draft", std=0.15)

    # A copy of the shipped Serve config: loopback workers, free ports (and tiny models).
    config = yaml.safe_load((ROOT / "deploy" / "cluster.yaml").read_text())
    grpc_port = free_port()
    config["grpc_options"]["port"] = grpc_port
    http_port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    args = config["applications"][0]["args"]
    if not shipped:
        args["models"].update(target=str(target), draft=str(draft))
    args["models"]["dtype"] = "float32"  # greedy equals HF generate (auto may give bf16)
    args["workers"]["host"] = "127.0.0.1"
    args["ingress"]["grpc_port"] = grpc_port
    config_file = root / "cluster.yaml"
    config_file.write_text(yaml.safe_dump(config))

    specdec = [str(BIN / "specdec")]
    address = ["-a", ray_cluster["dashboard"]]
    t0 = time.monotonic()
    while True:  # the dashboard takes a few seconds to come up
        deploy = _run([*specdec, "deploy", str(config_file), *address], env)
        if deploy.returncode == 0:
            break
        assert "AuthenticationError" not in deploy.stdout + deploy.stderr, deploy.stderr
        assert ray_cluster["head"].poll() is None, (root / "ray_start.log").read_text()
        assert time.monotonic() - t0 < 90, deploy.stdout + deploy.stderr
        time.sleep(2)
    t_deployed = time.monotonic()

    # The bare serve CLI in the same shell: refused where `ray start` turned token auth on (the
    # failure `specdec deploy` exists for), fine on a fresh machine.
    bare = _run([str(BIN / "serve"), "status", *address], env)
    if ray_cluster["token"]:
        assert bare.returncode != 0
        assert "authentication token" in (bare.stdout + bare.stderr).lower()
        assert "token authentication on" in deploy.stderr
    else:
        assert bare.returncode == 0, bare.stderr

    t0 = time.monotonic()
    while True:
        status = _run([*specdec, "serve-status", *address], env)
        assert status.returncode == 0, status.stderr
        app = yaml.safe_load(status.stdout)["applications"].get(APP_NAME, {})
        if app.get("status") == "RUNNING":
            break
        assert app.get("status") != "DEPLOY_FAILED", status.stdout
        assert time.monotonic() - t0 < 180, status.stdout
        time.sleep(2)

    grpc_address = f"127.0.0.1:{grpc_port}"
    t0 = time.monotonic()
    while True:  # running, and the workers registered with the router
        try:
            resp, _ = call_generate(grpc_address, build_request(PROMPT, max_new_tokens=4))
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
            assert time.monotonic() - t0 < 60, exc.details()
            time.sleep(1)
    print(f"\nserve deploy -> first answer in {time.monotonic() - t_deployed:.1f}s")

    out = _run(
        [str(BIN / "specdec"), "generate", PROMPT, "--address", grpc_address]
        + ["--max-new-tokens", "40", "--json"],
        env,
    )
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    ids = tok.encode(PROMPT, add_special_tokens=False)
    assert [int(t) for t in body["token_ids"]] == hf_greedy(target, ids, 40)
    assert int(body["usage"]["prompt_tokens"]) == len(ids)

    # The same application answers the OpenAI-compatible API on Serve's HTTP port.
    http = f"http://127.0.0.1:{http_port}"
    with urllib.request.urlopen(f"{http}/v1/models", timeout=30) as resp:
        (model,) = [m["id"] for m in json.loads(resp.read())["data"]]
    req = urllib.request.Request(
        f"{http}/v1/completions",
        data=json.dumps(
            {"model": model, "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        completion = json.loads(resp.read())
    assert completion["choices"][0]["text"] == body["text"]
    assert completion["usage"]["completion_tokens"] == len(body["token_ids"])

    # `specdec status` finds every node's metrics through Ray (as `ray start` set up its auth)
    # and shows both pools and the requests just served (Ray reports metrics every 10 s).
    t0 = time.monotonic()
    while True:
        status = _run(
            [*specdec, "status", "--http", http, "--interval", "1"],
            {**env, "RAY_ADDRESS": ray_cluster["gcs"]},
        )
        assert status.returncode == 0, status.stderr
        out = status.stdout
        if "finished: length" in out:
            break
        assert time.monotonic() - t0 < 60, out
    assert "serving: yes" in out and "\ndraft " in out and "\ntarget " in out, out
