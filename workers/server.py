"""Run one draft or target worker as a gRPC server process.

    python -m workers.server --role target --model PATH --host 127.0.0.1 --port 0

When it is ready to serve it prints the bound port (one line, just the number) on stdout, so a
caller that asked for port 0 learns the port; logs go to stderr. SIGTERM / SIGINT stop it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import NoReturn

from workers.dtypes import DTYPE_NAMES, dtype_name
from workers.lean_forward import COMPILES, FORWARDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workers.server", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--role", choices=("draft", "target"), required=True)
    parser.add_argument("--model", required=True, help="local Hugging Face checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port (printed)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--top-m", type=int, default=64, help="draft: support size of sparse q")
    parser.add_argument(
        "--confidence-stop",
        type=float,
        default=0.0,
        help="draft: end a block after a token given less than this probability (0 = off)",
    )
    parser.add_argument("--max-workers", type=int, default=16, help="gRPC handler threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="float32",
        help="weights' dtype (auto: bfloat16 where the device does it natively); float32 by"
        " default, where greedy decoding equals HF generate token for token",
    )
    parser.add_argument(
        "--forward",
        choices=FORWARDS,
        default="auto",
        help="lean (plain torch calls; oneDNN bfloat16 matmuls on CPUs with AMX/avx512_bf16),"
        " hf (transformers' modules), or auto (lean where the model allows)",
    )
    parser.add_argument(
        "--compile",
        choices=COMPILES,
        default="off",
        help="torch.compile of the lean forward's steps, at load (auto: on for CUDA)",
    )
    parser.add_argument(
        "--max-kv-tokens", type=int, default=0, help="KV budget in held tokens (0 = none)"
    )
    parser.add_argument(
        "--lease-timeout-s",
        type=float,
        default=30.0,
        help="free the sequences of a caller not heard from this long (0 = never)",
    )
    parser.add_argument("--tls-ca", help="mutual TLS: the cluster's CA (PEM)")
    parser.add_argument("--tls-cert", help="mutual TLS: this worker's certificate (PEM)")
    parser.add_argument("--tls-key", help="mutual TLS: this worker's private key (PEM)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s {args.role} %(message)s"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from workers.model_thread import load_threads
    from workers.service import serve_draft, serve_target

    # The model runs on the servicer's model thread with --threads; loading here with one keeps
    # this thread from starting an OpenMP team of its own (workers/service.SerialExecutor).
    threads = args.threads if args.threads > 0 else torch.get_num_threads()
    load_threads()

    budget = args.max_kv_tokens or None
    lease = args.lease_timeout_s or None
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        from workers.tls import TLSFiles

        if not (args.tls_ca and args.tls_cert and args.tls_key):
            parser.error("--tls-ca, --tls-cert and --tls-key go together")
        tls = TLSFiles(args.tls_ca, args.tls_cert, args.tls_key)
    served = {
        "max_workers": args.max_workers,
        "lease_timeout_s": lease,
        "tls": tls,
        "threads": threads,
    }

    if args.role == "draft":
        from workers.draft_loading import load_draft

        worker = load_draft(
            args.model,
            top_m=args.top_m,
            confidence_stop=args.confidence_stop,
            dtype=args.dtype,
            forward=args.forward,
            compile=args.compile,
            device=args.device,
            max_kv_tokens=budget,
        )
        server, port = serve_draft(worker, args.host, args.port, **served)
    else:
        from workers.target import TargetWorker

        worker = TargetWorker.from_path(
            args.model,
            dtype=args.dtype,
            forward=args.forward,
            compile=args.compile,
            device=args.device,
            max_kv_tokens=budget,
        )
        server, port = serve_target(worker, args.host, args.port, **served)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(port, flush=True)
    logging.info(
        "serving %s on %s:%d in %s (%s forward)",
        args.model,
        args.host,
        port,
        dtype_name(worker.runner.dtype),
        worker.runner.forward,
    )
    stop.wait()
    logging.info("stopping")
    server.stop(grace=2.0).wait()
    logging.info("stopped")
    return 0


def exit_now(code: int) -> NoReturn:
    """Flush and leave without the interpreter teardown, which takes seconds once torch is
    imported (a restart or a test run would wait for it). Call it when everything is stopped."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
