"""What `specdec up` starts with: the cluster config from its flags and an optional config file
(a Serve config or a bare args mapping), and the ports it listens on."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from cluster.serve.ports import pick_free_port, port_free


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
    """The `ClusterConfig` of `specdec up ARGS`: the file's, then the flags over it."""
    from cluster.config import ClusterConfig, ConfigError

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
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (a dotted config key)")
        import yaml

        overrides[key.strip()] = yaml.safe_load(value)
    port = args.port or file_port
    if port:
        overrides["ingress.grpc_port"] = port
    if cfg.workers.host is None:
        overrides["workers.host"] = "127.0.0.1"  # a local cluster: workers on loopback only
    if not _sets(base, "target", "pool", "num_cpus") and "target.pool.num_cpus" not in overrides:
        # One machine: draft and target take turns on the same cores (drafting ahead is only kept
        # where it measures faster), so the target's ranks get the cores for their torch threads.
        # One stream on 2 cores, SmolLM2, plain: 17.6 -> 20.5 tok/s against 1 thread.
        ranks = overrides.get("target.tp_size", cfg.target.tp_size) * overrides.get(
            "target.replicas", cfg.target.replicas
        )
        cores = os.cpu_count() or 1
        if getattr(args, "num_cpus", None):  # Ray gets this many: the rest must fit beside
            drafts = overrides.get("draft.replicas", cfg.draft.replicas)
            others = drafts * cfg.draft.pool.num_cpus
            others += cfg.ingress.replicas * cfg.ingress.num_cpus
            cores = min(cores, int(args.num_cpus - others))
        overrides["target.pool.num_cpus"] = max(1, cores // ranks)
    return cfg.with_overrides(overrides) if overrides else cfg


def _sets(config: dict[str, Any], *keys: str) -> bool:
    """Whether the (args of the) config file sets the dotted key."""
    for key in keys:
        if not isinstance(config, dict) or key not in config:
            return False
        config = config[key]
    return True


def _model_arg(value: str) -> str:
    """A pair name stays a name; anything else is a directory, made absolute."""
    from workers.checkpoints.registry import PAIRS

    return value if value in PAIRS else str(Path(value).resolve())


def choose_ports(args: argparse.Namespace, cfg):
    """(config, HTTP port) to start with. A default port that is taken is replaced by a free one
    (said on stdout); a port given on the command line that is taken is an error."""
    port = cfg.ingress.grpc_port
    if not port_free(port):
        if args.port:
            raise ValueError(f"port {port} is in use; pick another with --port")
        busy, port = port, pick_free_port()
        print(f"note: port {busy} is in use; the gRPC API goes on port {port} instead", flush=True)
        cfg = cfg.with_overrides({"ingress.grpc_port": port})
    http_port = args.http_port or 8000
    if not port_free(http_port):
        if args.http_port:
            raise ValueError(f"HTTP port {http_port} is in use (--http-port)")
        http_port = pick_free_port()
    return cfg, http_port
