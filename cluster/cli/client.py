"""`specdec generate`: a gRPC client of a running cluster, and the request / stats helpers that
`specdec up` and the tests use too."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    gen.add_argument(
        "--drafter",
        choices=("auto", "model", "lookup"),
        help="who drafts (default: the deployment's speculation.drafter)",
    )
    gen.add_argument(
        "--logprobs",
        type=int,
        help="return each token's log-probability and N top alternatives (with --json)",
    )
    gen.add_argument("--stream", action="store_true", help="print tokens as they are committed")
    gen.add_argument("--json", action="store_true", help="print the whole response as JSON")
    gen.add_argument("--app", default=None, help="Serve application name (several apps only)")
    gen.add_argument("--timeout", type=float, default=300.0)
    gen.set_defaults(func=cmd_generate)


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
    drafter: str | None = None,
    logprobs: int | None = None,
):
    """A `specdec.v1.GenerateRequest`; token ids, when given, are sent instead of the text."""
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
            drafter=pb.Drafter.Value(f"DRAFTER_{drafter.upper()}") if drafter else 0,
        ),
    )
    if max_new_tokens is not None:
        req.max_new_tokens = max_new_tokens
    if seed is not None:
        req.seed = seed
    if logprobs is not None:
        req.logprobs = logprobs
    return req


def _metadata(app: str | None) -> tuple:
    """The call's metadata: the Serve application, and the API key when SPECDEC_API_KEY is set."""
    from cluster.api.auth import client_metadata

    return ((("application", app),) if app else ()) + client_metadata()


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
    """One line: finish reason, usage, speed and the speculation stats of a final response."""
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
        drafter=args.drafter,
        logprobs=args.logprobs,
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
