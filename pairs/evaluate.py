"""Evaluate a draft/target pair: `specdec eval-pair` (python -m pairs.evaluate).

A code pair, by directory or name, by default the shipped one (pairs.stdlib_eval):
    specdec eval-pair [--pair DIR] [--prompts 64] [--new-tokens 64] [--k 4]
An instruct (chat) pair, by name (pairs.instruct_eval):
    specdec eval-pair --pair smollm2-135m-instruct [--prompts 24] [--ks 2,4,6]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pairs.instruct_eval import eval_instruct
from pairs.stdlib_eval import eval_pair
from workers.checkpoints.registry import PAIRS


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--pair" in argv and argv.index("--pair") + 1 < len(argv):
        at = argv.index("--pair") + 1
        name = argv[at]
        if name in PAIRS and PAIRS[name].chat:
            return instruct_main(argv)
        if name in PAIRS:  # a named code pair: its directory
            argv[at] = str(PAIRS[name].target().parent)
    return code_main(argv)


def code_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="Quality and speed report of a code pair.")
    ap.add_argument("--pair", type=Path, default=None, help="dir with target/, draft/, split.json")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = ap.parse_args(argv)
    report = eval_pair(
        args.pair,
        n_prompts=args.prompts,
        new_tokens=args.new_tokens,
        k=args.k,
        threads=args.threads,
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def instruct_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="Quality and speed report of an instruct pair.")
    ap.add_argument("--pair", required=True, help="the pair's name (workers.checkpoints.registry)")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ks", default="2,4,6")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = ap.parse_args(argv)
    report = eval_instruct(
        args.pair,
        n_prompts=args.prompts,
        new_tokens=args.new_tokens,
        ks=tuple(int(k) for k in args.ks.split(",")),
        threads=args.threads,
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
