"""The router as a standalone public gRPC server process (no Ray).

    python -m cluster.routing.grpc_server --target 127.0.0.1:7002 --draft 127.0.0.1:7001 \\
        --target-model PATH --port 0

prints the bound port on stdout when ready (logs go to stderr). With SPECDEC_API_KEY set, every
call needs `authorization: Bearer <key>` (cluster/api/auth.py). At start-up it checks the workers
(`Router.check_workers`) and refuses to start, with the reason, when a worker's tokenizer, role or
model does not match the target model.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import replace

from cluster.api.auth import APIKeys
from cluster.api.grpc_service import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.routing.grpc_server", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--target", action="append", required=True, help="target worker address")
    parser.add_argument("--draft", action="append", default=[], help="draft worker address")
    parser.add_argument("--target-model", required=True, help="target checkpoint (tokenizer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port (printed)")
    parser.add_argument("--tls-ca", help="mutual TLS to the workers: the cluster's CA (PEM)")
    parser.add_argument("--tls-cert", help="mutual TLS: this router's certificate (PEM)")
    parser.add_argument("--tls-key", help="mutual TLS: this router's private key (PEM)")
    parser.add_argument(
        "--lease-renew-s",
        type=float,
        default=5.0,
        help="renew this router's leases on the workers this often (well under their timeout)",
    )
    from cluster.routing.config import RouterConfig  # its defaults are the cluster config's
    from cluster.scheduling.lookup import LookupConfig
    from cluster.scheduling.policy import Drafter, PolicyConfig

    d = {f: RouterConfig.__dataclass_fields__[f].default for f in RouterConfig.__slots__}
    parser.add_argument("--max-draft-tokens", type=int, default=d["max_draft_tokens"])
    parser.add_argument("--max-in-flight", type=int, default=d["max_in_flight"])
    parser.add_argument(
        "--pipelined",
        choices=("true", "false", "auto"),
        default=str(d["pipelined"]).lower(),
        help="draft the next block while verifying; auto: time both ways, run the faster",
    )
    parser.add_argument(
        "--drafter",
        choices=("auto", "model", "lookup"),
        default="auto",
        help="who drafts a request that does not choose (speculation.drafter)",
    )
    parser.add_argument(
        "--lookup-recent-tokens",
        type=int,
        default=LookupConfig().recent_tokens,
        help="finished outputs indexed for lookup (0: only each request's own text)",
    )
    parser.add_argument("--draft-timeout", type=float, default=d["draft_timeout_s"])
    parser.add_argument("--target-timeout", type=float, default=d["target_timeout_s"])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s ingress %(message)s"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from cluster.routing.router import Router, WorkerMismatchError
    from cluster.transport.grpc_workers import LeaseRenewal, configure_tls
    from workers.tls import TLSFiles

    LeaseRenewal.set_period(args.lease_renew_s)
    if args.tls_ca or args.tls_cert or args.tls_key:
        if not (args.tls_ca and args.tls_cert and args.tls_key):
            parser.error("--tls-ca, --tls-cert and --tls-key go together")
        configure_tls(TLSFiles(args.tls_ca, args.tls_cert, args.tls_key))

    lookup = replace(LookupConfig(), recent_tokens=args.lookup_recent_tokens)
    config = RouterConfig(
        target_model_path=args.target_model,
        policy=PolicyConfig(drafter=Drafter(args.drafter), lookup=lookup),
        max_draft_tokens=args.max_draft_tokens,
        max_in_flight=args.max_in_flight,
        pipelined={"true": True, "false": False}.get(args.pipelined, args.pipelined),
        draft_timeout_s=args.draft_timeout,
        target_timeout_s=args.target_timeout,
    )
    router = Router(config, drafts=args.draft, targets=args.target)
    try:
        status = router.check_workers()
    except WorkerMismatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        router.close()
        return 2
    for role, workers in status.items():
        for w in workers:
            logging.info("%s %s: %s %s", role, w["address"], w["state"], w["error"])

    async def run() -> None:
        server, port = await serve(router, args.host, args.port, APIKeys.from_env())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(port, flush=True)
        await stop.wait()
        await server.stop(grace=2.0)

    try:
        asyncio.run(run())
    finally:
        router.close()
    return 0


if __name__ == "__main__":
    from workers.server import exit_now

    exit_now(main())
