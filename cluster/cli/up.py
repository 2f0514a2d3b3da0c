"""`specdec up`: a local Ray, Serve with its gRPC proxy, the application deployed with progress
shown, one sample generation over gRPC, then serving until Ctrl-C (or exit: --once)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cluster.cli.client import build_request, call_generate, format_stats
from cluster.cli.up_options import choose_ports, up_config

DEFAULT_PROMPT = "def fibonacci(n):"
# An instruct pair's sample is a chat request (through the target's chat template).
DEFAULT_CHAT_PROMPT = "Write a Python function fibonacci(n) that returns the n-th Fibonacci number."


def add_parser(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="start a local Ray + Serve cluster, send one sample, serve")
    up.add_argument("--config", type=Path, help="Serve config (deploy/cluster.yaml) or args file")
    up.add_argument("--pair", help="a named pair for both sides (see `specdec models`)")
    up.add_argument("--target", help="target checkpoint directory or pair name")
    up.add_argument("--draft", help="draft checkpoint directory or pair name")
    up.add_argument("--tp", type=int, help="tensor-parallel size of each target replica")
    up.add_argument("--draft-replicas", type=int)
    up.add_argument("--target-replicas", type=int)
    up.add_argument("--port", type=int, help="gRPC port of the public API (default 9000)")
    up.add_argument("--http-port", type=int, help="Serve's HTTP port (default 8000)")
    up.add_argument("--num-cpus", type=int, help="logical CPUs for Ray (default: enough)")
    up.add_argument("--prompt", help="the sample prompt (a chat message for an instruct pair)")
    up.add_argument("--max-new-tokens", type=int, help="of the sample (48; 128 for a chat pair)")
    up.add_argument("--once", action="store_true", help="exit after the sample generation")
    up.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for start-up")
    up.add_argument("--dashboard", action="store_true", help="also start the Ray dashboard")
    up.add_argument("--verbose", action="store_true", help="show the replicas' logs")
    up.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key by its dotted path, e.g. speculation.lookup.recent_tokens=0 "
        "(repeatable; the value is read as YAML)",
    )
    up.set_defaults(func=cmd_up)


def _say(msg: str) -> None:
    print(msg, flush=True)


def sample_request(cfg, prompt: str | None, max_new_tokens: int | None):
    """The sample of `specdec up`: an instruct target gets the prompt as a chat message.
    Returns (request, whether it went through the chat template)."""
    from workers.checkpoints.registry import PAIRS

    name = cfg.models.pair_name("target")
    if name is None or not PAIRS[name].chat:
        return build_request(prompt or DEFAULT_PROMPT, max_new_tokens=max_new_tokens or 48), False
    prompt, max_new_tokens = prompt or DEFAULT_CHAT_PROMPT, max_new_tokens or 128
    from workers.model_runner import load_tokenizer

    tok = load_tokenizer(cfg.models.target_path())
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    return build_request(prompt, max_new_tokens=max_new_tokens, prompt_token_ids=list(ids)), True


def _deployment_lines(app_status) -> list[str]:
    lines = []
    for name, dep in sorted(app_status.deployments.items()):
        states = {
            str(k.value if hasattr(k, "value") else k): v for k, v in dep.replica_states.items()
        }
        running = states.get("RUNNING", 0)
        total = sum(states.values())
        status = dep.status.value if hasattr(dep.status, "value") else str(dep.status)
        lines.append(f"      {name:<20} {status:<10} {running}/{total} replicas running")
    return lines


def _deploy_with_progress(app, name: str, route_prefix: str, timeout_s: float) -> None:
    """`serve.run` in a thread while the deployments' states are printed as they change."""
    from ray import serve

    err: list[BaseException] = []

    def run() -> None:
        try:
            serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
        except BaseException as exc:  # noqa: BLE001 - reported below
            err.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    shown: list[str] = []
    while thread.is_alive():
        thread.join(timeout=1.0)
        try:
            st = serve.status().applications.get(name)
        except Exception:  # noqa: BLE001 - controller still starting
            st = None
        if st is not None:
            lines = _deployment_lines(st)
            if lines != shown:
                status = getattr(st.status, "value", st.status)
                _say(f"    [{time.monotonic() - t0:5.1f}s] {name}: {status}")
                for line in lines:
                    _say(line)
                shown = lines
            if str(st.status).endswith("DEPLOY_FAILED"):
                raise SystemExit(f"specdec up: deploy failed: {st.message}")
        if time.monotonic() - t0 > timeout_s:
            raise SystemExit(f"specdec up: not running after {timeout_s:.0f}s")
    if err:
        raise err[0]


def _wait_workers(name: str, timeout_s: float) -> dict[str, Any]:
    """The ingress's status once every worker replica has registered."""
    from ray import serve

    handle = serve.get_app_handle(name)
    t0 = time.monotonic()
    while True:
        status = handle.status.remote().result()
        if status["ready"]:
            return status
        if time.monotonic() - t0 > timeout_s:
            raise SystemExit(f"specdec up: workers did not register within {timeout_s:.0f}s")
        time.sleep(0.5)


def _worker_dtypes(name: str, cfg) -> str:
    """The dtype and forward each kind of worker loaded (`auto` is resolved on its device)."""
    from ray import serve

    from cluster.serve.registry import DRAFT, TARGET

    handle = serve.get_app_handle(name)
    kinds = [TARGET] + ([DRAFT] if cfg.draft.replicas else [])
    infos = {k: handle.worker_info.remote(k).result() for k in kinds}
    return ", ".join(f"{k} {i['dtype']} ({i['forward']} forward)" for k, i in infos.items())


def cmd_up(args: argparse.Namespace) -> int:
    from cluster.config import ConfigError
    from cluster.config_checks import check_models
    from cluster.serve.app import APP_NAME, GRPC_SERVICERS, build_app

    try:
        cfg = up_config(args)
        check_models(cfg)
    except ConfigError as exc:
        print(f"specdec up: {exc}", file=sys.stderr)
        return 2
    try:
        cfg, http_port = choose_ports(args, cfg)
    except ValueError as exc:
        print(f"specdec up: {exc}", file=sys.stderr)
        return 2
    port = cfg.ingress.grpc_port
    need = cfg.required_resources()
    num_cpus = args.num_cpus or max(os.cpu_count() or 1, int(need["CPU"] + 0.999))
    pools = {k: v for k, v in need.items() if k not in ("CPU", "GPU")}
    t_start = time.monotonic()

    import logging

    import ray
    from ray import serve

    if not args.verbose:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    # Inherited by every Ray worker process of this local cluster.
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    for key, value in (("TOKENIZERS_PARALLELISM", "false"),):
        os.environ.setdefault(key, value)
    _say(f"[1/4] starting a local Ray: {num_cpus} CPUs, pools {pools}")
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=int(need.get("GPU", 0)) or None,
        resources=pools,
        include_dashboard=args.dashboard,
        log_to_driver=args.verbose,
        logging_level="WARNING",
    )
    try:
        _say(f"[2/4] starting Serve with the gRPC proxy on port {port}")
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port},
            grpc_options={"port": port, "grpc_servicer_functions": GRPC_SERVICERS},
        )
        _say(
            f"[3/4] deploying '{APP_NAME}': target {cfg.models.target_path()} "
            f"(tp={cfg.target.tp_size} x{cfg.target.replicas}), draft {cfg.models.draft_path()} "
            f"(x{cfg.draft.replicas}); loading models ..."
        )
        _deploy_with_progress(build_app(cfg.to_args()), APP_NAME, "/", args.timeout)
        status = _wait_workers(APP_NAME, args.timeout)
        _say(
            f"    up in {time.monotonic() - t_start:.1f}s: targets {status['targets']}, "
            f"drafts {status['drafts']}"
        )
        _say(f"    dtype: {_worker_dtypes(APP_NAME, cfg)} (models.dtype: {cfg.models.dtype})")
        address = f"127.0.0.1:{port}"
        _say(f"[4/4] sample generation over gRPC {address}")
        request, chat = sample_request(cfg, args.prompt, args.max_new_tokens)
        resp, seconds = call_generate(address, request, timeout=args.timeout)
        prompt = args.prompt or (DEFAULT_CHAT_PROMPT if chat else DEFAULT_PROMPT)
        _say(
            f"    prompt: {prompt!r}"
            + (" (a chat message, through the chat template)" if chat else "")
        )
        if chat:  # an answer reads better as text than as a repr
            _say("    answer:\n" + "\n".join("      " + ln for ln in resp.text.splitlines()))
        else:
            _say(f"    output: {resp.text!r}")
        _say(f"    stats:  {format_stats(resp, seconds)}")
        http = f"http://127.0.0.1:{http_port}"
        model = status.get("model") or APP_NAME
        _say(f"    endpoints: gRPC {address}  HTTP {http}/v1 (OpenAI API), {http}/specdec (status)")
        if args.once:
            return 0
        _say(
            f"serving specdec.v1.SpecDecode (gRPC) on {address} and the OpenAI-compatible HTTP "
            f"API on {http}/v1 (model {model!r}); try:\n"
            f"    specdec generate {DEFAULT_PROMPT!r} --address {address} --stream\n"
            f"    curl {http}/v1/completions -H 'Content-Type: application/json' "
            f"""-d '{{"model": "{model}", "prompt": "def main():", "max_tokens": 32, """
            """"temperature": 0}'\n"""
            "Ctrl-C to stop."
        )
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        _say("stopping ...")
        return 0
    finally:
        ray.shutdown()  # our own local Ray: Serve and every replica go with it
