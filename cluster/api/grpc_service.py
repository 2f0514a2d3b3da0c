"""The public SpecDecode gRPC service over a Router, as a standalone grpc.aio server (no Ray).

    python -m cluster.api.grpc_service --target 127.0.0.1:7002 --draft 127.0.0.1:7001 \\
        --target-model PATH --port 0

prints the bound port on stdout when ready (logs go to stderr). At start-up it checks the workers
(`Router.check_workers`) and refuses to start, with the reason, when a worker's tokenizer, role or
model does not match the target model. `SpecDecodeServicer` is also what any other grpc.aio server
can register (`specdec_pb2_grpc.add_SpecDecodeServicer_to_server(SpecDecodeServicer(router), srv)`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator

import grpc

from protos import specdec_pb2, specdec_pb2_grpc


class SpecDecodeServicer(specdec_pb2_grpc.SpecDecodeServicer):
    """Maps RequestError to its status code and details; a client that cancels or runs past its
    deadline cancels the handler task, which releases the sequence on the workers."""

    def __init__(self, router) -> None:  # cluster.routing.router.Router
        self.router = router

    async def Generate(
        self, request: specdec_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> specdec_pb2.GenerateResponse:
        from cluster.routing.router import RequestError

        try:
            return await self.router.generate(request)
        except RequestError as exc:
            await context.abort(exc.code, exc.details)

    async def GenerateStream(
        self, request: specdec_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[specdec_pb2.GenerateResponse]:
        from cluster.routing.router import RequestError

        stream = self.router.generate_stream(request)
        try:
            async for msg in stream:
                yield msg
        except RequestError as exc:
            await context.abort(exc.code, exc.details)
        finally:
            await stream.aclose()


async def serve(router, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    specdec_pb2_grpc.add_SpecDecodeServicer_to_server(SpecDecodeServicer(router), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"ingress: cannot bind {host}:{port}")
    await server.start()
    return server, bound


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.api.grpc_service", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--target", action="append", required=True, help="target worker address")
    parser.add_argument("--draft", action="append", default=[], help="draft worker address")
    parser.add_argument("--target-model", required=True, help="target checkpoint (tokenizer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port (printed)")
    from cluster.routing.router import RouterConfig  # its defaults are the cluster config's

    d = {f: RouterConfig.__dataclass_fields__[f].default for f in RouterConfig.__slots__}
    parser.add_argument("--max-draft-tokens", type=int, default=d["max_draft_tokens"])
    parser.add_argument("--max-in-flight", type=int, default=d["max_in_flight"])
    parser.add_argument(
        "--pipelined",
        choices=("true", "false", "auto"),
        default=str(d["pipelined"]).lower(),
        help="draft the next block while verifying; auto: time both ways, run the faster",
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

    config = RouterConfig(
        target_model_path=args.target_model,
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
        server, port = await serve(router, args.host, args.port)
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
