"""`specdec models`: the named draft/target pairs and their local paths (workers.checkpoints),
and the dtype `models.dtype: auto` gives on this machine."""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_NOT_AVAILABLE = 2  # exit code: the default pair cannot be had on this machine


def add_parser(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="list the named pairs and their local paths")
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    """The pairs, once the default one is ready to serve (converted first if needed); when it
    cannot be had here, says which and why on stderr and exits DEFAULT_NOT_AVAILABLE."""
    from workers.checkpoints import registry

    default = registry.default_pair_name()
    try:
        registry.get_pair(default).target(convert=True)  # converts the default if needed
    except FileNotFoundError as exc:
        print(
            f"specdec models: the default pair {default!r} is not available here: {exc} "
            f"(another pair: SPECDEC_PAIR=NAME, one of {', '.join(registry.PAIRS)})",
            file=sys.stderr,
        )
        return DEFAULT_NOT_AVAILABLE
    pairs = {
        name: {
            "target": str(p.target(convert=False)),
            "draft": str(p.draft()),  # a model: HF users load it as an assistant model
            "feature_head": str(p.feature_head()) if p.feature_head() else None,
        }
        for name, p in registry.PAIRS.items()
    }
    device, dtype = auto_dtype()
    if args.json:
        auto = {"device": device, "dtype": dtype}
        print(json.dumps({"default": default, "pairs": pairs, "auto_dtype": auto}))
        return 0
    for name, p in registry.PAIRS.items():
        mark = " (default)" if name == default else ""
        state = "" if p.available() else "   [not available here]"
        print(f"{name}{mark}: {p.description}{state}")
        print(f"    target: {pairs[name]['target']}")
        print(f"    draft:  {pairs[name]['draft']}")
        if pairs[name]["feature_head"]:
            print(f"    feature head: {pairs[name]['feature_head']}")
    print(f"models.dtype auto on this machine: {dtype} ({device})")
    return 0


def auto_dtype() -> tuple[str, str]:
    """(device, dtype) that `models.dtype: auto` gives a worker on this machine: its GPU where
    it has one, else its CPU (a worker on another machine resolves it there)."""
    import torch

    from workers.dtypes import dtype_name, resolve_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, dtype_name(resolve_dtype("auto", device))
