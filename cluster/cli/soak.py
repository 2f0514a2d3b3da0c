"""`specdec soak`: mixed traffic against a cluster on this machine for a bounded time, then a
report: requests and gRPC codes by kind, the codes nobody should see, and how much each of the
cluster's processes grew.

    specdec soak --address 127.0.0.1:9000 --minutes 30 --streams 4

Kinds, round robin per client thread: speculative, plain and streaming generations, a stream the
client cancels after its first message, a call past its deadline, bytes that are no request, a
request over a limit. Each kind has the codes it may end with (a generation: OK, or
RESOURCE_EXHAUSTED under overload); anything else is unexpected and makes the exit status 1.
Resident memory of the cluster's processes (Serve replicas, worker servers) is read after a
warm-up (a tenth of the run, at least 10 s), then every tenth of the run, and at the end: growth
over the whole run tells a leak from nothing only when caches are full, so the report also gives
the growth over the second half (a bounded cache levels off; a leak keeps its slope) and each
process's samples. Loopback only: it is a test tool.
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import json
import threading
import time
from dataclasses import dataclass, field

OK, INVALID, DEADLINE, CANCELLED, OVERLOAD = (
    "OK",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "CANCELLED",
    "RESOURCE_EXHAUSTED",
)
# kind -> the codes it may end with
EXPECTED: dict[str, frozenset[str]] = {
    "spec": frozenset({OK, OVERLOAD}),
    "plain": frozenset({OK, OVERLOAD}),
    "stream": frozenset({OK, OVERLOAD}),
    "cancelled": frozenset({CANCELLED, OK, OVERLOAD}),
    "past_deadline": frozenset({DEADLINE, OK}),
    "malformed": frozenset({INVALID}),
    "over_limit": frozenset({INVALID}),
}
KINDS = tuple(EXPECTED)
PROCESS_MARKS = ("SpecDecode", "workers.server", "cluster.routing.grpc_server")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("soak", help="mixed traffic for N minutes against a local cluster, a report")
    p.add_argument("--address", default="127.0.0.1:9000", help="the cluster's gRPC (loopback)")
    p.add_argument("--minutes", type=float, default=1.0, help="how long (bounded: at most 24 h)")
    p.add_argument("--streams", type=int, default=4, help="client threads sending at once")
    p.add_argument("--max-new-tokens", type=int, default=48, help="per generation")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=run)


@dataclass
class Tally:
    codes: collections.Counter = field(default_factory=collections.Counter)  # (kind, code)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, code: str) -> None:
        with self.lock:
            self.codes[(kind, code)] += 1

    def unexpected(self) -> dict[str, int]:
        return {f"{k}:{c}": n for (k, c), n in self.codes.items() if c not in EXPECTED[k]}


def _request(kind: str, i: int, max_new: int):
    from cluster.cli.client import build_request
    from protos import specdec_pb2 as pb

    req = build_request(f"def f{i}(x):", max_new_tokens=max_new)
    if kind == "spec":
        req.speculation.mode = pb.SPECULATION_MODE_ON
    elif kind == "plain":
        req.speculation.mode = pb.SPECULATION_MODE_OFF
    elif kind == "over_limit":
        req.max_new_tokens = 10**9
    if i % 3 == 0 and kind in ("spec", "stream"):
        req.temperature, req.seed = 0.8, i  # some seeded sampling too
    return req


def _one(stub, channel, kind: str, i: int, max_new: int) -> str:
    """Send one request of `kind`; its final gRPC code's name."""
    import grpc

    from cluster.cli.client import _metadata
    from protos import specdec_pb2 as pb

    meta = _metadata(None)
    try:
        if kind == "malformed":
            raw = channel.unary_unary(
                "/specdec.v1.SpecDecode/Generate",
                request_serializer=lambda b: b,
                response_deserializer=pb.GenerateResponse.FromString,
            )
            raw(bytes([0xFF, i % 256, 0xFF, 0xFF]), timeout=30, metadata=meta)
        elif kind in ("stream", "cancelled"):
            call = stub.GenerateStream(_request(kind, i, max_new), timeout=120, metadata=meta)
            for _ in call:
                if kind == "cancelled":
                    call.cancel()
                    return CANCELLED
        elif kind == "past_deadline":
            stub.Generate(_request(kind, i, max_new * 4), timeout=0.05, metadata=meta)
        else:
            stub.Generate(_request(kind, i, max_new), timeout=120, metadata=meta)
    except grpc.RpcError as exc:
        return exc.code().name
    return OK


def _client(address: str, deadline: float, offset: int, max_new: int, tally: Tally) -> None:
    import grpc

    from protos import specdec_pb2_grpc

    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = specdec_pb2_grpc.SpecDecodeStub(channel)
        i = offset
        while time.monotonic() < deadline:
            kind = KINDS[i % len(KINDS)]
            tally.add(kind, _one(stub, channel, kind, i, max_new))
            i += 1


def cluster_processes() -> dict[int, str]:
    """pid -> name of this machine's processes that belong to a cluster."""
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or ())
        mark = next((m for m in PROCESS_MARKS if m in cmd), None)
        if mark is not None:
            out[p.info["pid"]] = cmd.split(" ")[0][-60:] if mark != "SpecDecode" else cmd[:60]
    return out


def rss_mb(pids) -> dict[int, float]:
    import psutil

    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:  # gone (a restarted replica): not comparable
            pass
    return out


def rss_growth(
    procs: dict[int, str], samples: list[tuple[float, dict[int, float]]]
) -> dict[int, dict]:
    """Per process seen in every sample: RSS after warm-up and at the end, growth over the run
    and over its second half (from the sample nearest the midpoint), and the samples."""
    if not samples:
        return {}
    mid_t = (samples[0][0] + samples[-1][0]) / 2
    mid = min(samples, key=lambda s: abs(s[0] - mid_t))[1]
    out = {}
    for pid, name in procs.items():
        series = [s[pid] for _, s in samples if pid in s]
        if len(series) != len(samples) or series[0] <= 0 or mid.get(pid, 0) <= 0:
            continue  # gone or restarted meanwhile: not comparable
        out[pid] = {
            "name": name,
            "rss_mb_after_warmup": round(series[0], 1),
            "rss_mb_end": round(series[-1], 1),
            "growth_pct": round(100 * (series[-1] / series[0] - 1), 2),
            "second_half_pct": round(100 * (series[-1] / mid[pid] - 1), 2),
            "samples_mb": [round(v, 1) for v in series],
        }
    return out


def _check_loopback(address: str) -> None:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"specdec soak: {address} is not a loopback address (a test tool)")


def run(args: argparse.Namespace) -> int:
    _check_loopback(args.address)
    seconds = min(max(args.minutes, 0.0), 24 * 60) * 60
    t0 = time.monotonic()
    deadline = t0 + seconds
    tally = Tally()
    threads = [
        threading.Thread(
            target=_client,
            args=(args.address, deadline, s, args.max_new_tokens, tally),
            daemon=True,
        )
        for s in range(max(1, args.streams))
    ]
    for t in threads:
        t.start()
    warm = min(seconds, max(10.0, seconds / 10))
    procs = cluster_processes()
    samples: list[tuple[float, dict[int, float]]] = []  # (seconds since start, pid -> MB)
    next_sample, next_line = t0 + warm, t0 + 10
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        now = time.monotonic()
        if now >= next_sample and now < deadline:
            samples.append((now - t0, rss_mb(procs)))
            next_sample = now + max(5.0, seconds / 10)
        if now >= next_line:
            next_line = now + 10
            with tally.lock:
                done = sum(tally.codes.values())
            print(f"  [{now - t0:5.0f}s] {done} requests, unexpected: {tally.unexpected() or 0}")
    for t in threads:
        t.join(timeout=180)
    samples.append((time.monotonic() - t0, rss_mb(procs)))
    growth = rss_growth(procs, samples)
    by_kind: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (kind, code), n in sorted(tally.codes.items()):
        by_kind[kind][code] = n
    report = {
        "seconds": round(time.monotonic() - t0, 1),
        "requests": sum(tally.codes.values()),
        "codes": by_kind,
        "unexpected": tally.unexpected(),
        "rss_growth_pct_max": max((g["growth_pct"] for g in growth.values()), default=0.0),
        "rss_growth_second_half_pct_max": max(
            (g["second_half_pct"] for g in growth.values()), default=0.0
        ),
        "rss_sample_seconds": [round(t) for t, _ in samples],
        "processes": {str(pid): g for pid, g in growth.items()},
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"soak: {report['requests']} requests in {report['seconds']:.0f}s")
        for kind, codes in by_kind.items():
            print(f"  {kind:<14} " + ", ".join(f"{c} {n}" for c, n in codes.items()))
        print(f"  unexpected codes: {report['unexpected'] or 0}")
        for pid, g in sorted(growth.items(), key=lambda x: -x[1]["growth_pct"]):
            print(
                f"  rss {pid:>7} {g['rss_mb_after_warmup']:8.1f} -> {g['rss_mb_end']:8.1f} MB "
                f"({g['growth_pct']:+.1f}%, second half {g['second_half_pct']:+.1f}%)  {g['name']}"
            )
            print("       samples (MB): " + " ".join(f"{mb:.0f}" for mb in g["samples_mb"]))
    return 1 if report["unexpected"] else 0
