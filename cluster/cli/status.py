"""`specdec status`: the running cluster at a glance, from its own Prometheus metrics.

    specdec status                        every node of the Ray cluster (RAY_ADDRESS or local)
    specdec status --metrics http://10.0.0.5:8080/metrics --http http://10.0.0.5:8000

Pools and replicas (sequences and KV each holds, each target's running and waiting rows),
requests, latency, acceptance by drafter, the plain-step share and fallback causes, and recent
step times: two scrapes of every node's metrics endpoint `--interval` seconds apart
(cluster/observability/summary.py), plus the HTTP API's readiness (GET /ready).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import asdict

from cluster.observability.prometheus import Sample, Samples, scrape
from cluster.observability.summary import render, summarize


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status", help="pools, replicas, rows, KV, acceptance and step times of a running cluster"
    )
    p.add_argument(
        "--metrics",
        action="append",
        metavar="URL",
        help="a node's Ray metrics endpoint (http://host:port/metrics); repeat for each node. "
        "Default: every live node of the Ray cluster at RAY_ADDRESS (else the local one)",
    )
    p.add_argument(
        "--http",
        default="http://127.0.0.1:8000",
        help="the cluster's HTTP API, for its readiness (default: %(default)s)",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=10.0,
        help="seconds between the two scrapes (Ray reports metrics every 10 s by default)",
    )
    p.add_argument("--json", action="store_true", help="the numbers as JSON")
    p.set_defaults(func=run)


def discover_metrics_urls() -> list[str]:
    """Every live node's metrics endpoint, from Ray (connecting as `ray start` set it up)."""
    from cluster.cli.serve_cli import serve_cli_env

    env, _ = serve_cli_env(dict(os.environ))
    if "RAY_AUTH_MODE" in env:  # before ray is imported: it reads the mode once
        os.environ.setdefault("RAY_AUTH_MODE", env["RAY_AUTH_MODE"])
    import ray

    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS", "auto"),
            logging_level="ERROR",
            log_to_driver=False,
        )
    return [
        f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        for n in ray.nodes()
        if n.get("Alive") and n.get("MetricsExportPort")
    ]


def scrape_all(urls: list[str]) -> Samples:
    samples: list[Sample] = []
    for url in urls:
        samples.extend(scrape(url).samples)
    return Samples(samples)


def readiness(http: str) -> bool | None:
    """GET /ready: True (200), False (503), None (the API does not answer)."""
    try:
        with urllib.request.urlopen(f"{http.rstrip('/')}/ready", timeout=5) as resp:
            return resp.status == 200
    except urllib.error.HTTPError as exc:
        return False if exc.code == 503 else None
    except OSError:
        return None


def run(args: argparse.Namespace) -> int:
    urls = args.metrics or discover_metrics_urls()
    if not urls:
        print("specdec status: no metrics endpoint found (is a Ray cluster running?)")
        return 1
    try:
        before = scrape_all(urls)
        t0 = time.monotonic()
        time.sleep(max(0.0, args.interval))
        after = scrape_all(urls)
    except OSError as exc:  # refused, unreachable, timed out, an HTTP error
        print(f"specdec status: cannot read the metrics ({', '.join(urls)}): {exc}")
        return 1
    summary = summarize(before, after, time.monotonic() - t0)
    serving = readiness(args.http)
    if args.json:
        print(json.dumps({"serving": serving, **asdict(summary)}, indent=1))
    else:
        print(render(summary, serving))
    return 0
