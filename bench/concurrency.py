"""Concurrency sweep through the cluster: plain vs AUTO vs fixed k under 1..64 concurrent streams.

    specdec bench --concurrency 1,4,16,64 [--requests-per-stream 2] [--plot sweep.png]

Draft and target run as separate gRPC worker processes, the router (one step scheduler per target)
in this process, exactly as behind the Serve ingress. For each mode and concurrency c, c streams
each decode held-out prompts greedily, one after another; the outputs must equal plain decoding's
token for token. Figures per cell: aggregate tokens/s, per-request tokens/s p50, time to first
token p50/p95, inter-token latency p50/p95 (a step's gap spread over the tokens it brought),
mean rows per target pass, tokens per target pass (tau) and the share of plain rows in the passes.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from protos import specdec_pb2 as pb

MIN_REQUESTS = 8  # per cell: one stream alone runs this many requests one after another

MODES = {
    "plain": (pb.SPECULATION_MODE_OFF, 0),
    "auto": (pb.SPECULATION_MODE_AUTO, 0),
    "k=4": (pb.SPECULATION_MODE_ON, 4),
}


@dataclass
class Cell:
    mode: str
    streams: int
    seconds: float = 0.0
    tokens: int = 0
    per_request: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    outputs: dict[int, list[int]] = field(default_factory=dict)
    passes: int = 0
    row_steps: int = 0
    plain_row_steps: int = 0
    steps: int = 0
    target_rss_mb: float = 0.0  # peak resident memory of the target worker during the cell
    phases: dict[str, float] = field(default_factory=dict)  # scheduler seconds by phase

    def profile(self) -> str:
        """Where the scheduler's time went, in shares of the cell's wall time, and what a
        target pass cost and brought on average (the economics of wider passes)."""
        if not self.seconds:
            return ""
        parts = [f"{k} {v / self.seconds:.0%}" for k, v in sorted(self.phases.items())]
        text = ", ".join(parts)
        if self.steps and "verify" in self.phases:
            ms = 1000 * self.phases["verify"] / self.steps
            text += f"; a target pass {ms:.0f} ms, {self.tokens / self.steps:.1f} tokens"
        return text

    @property
    def throughput(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def row(self) -> dict[str, float | int | str]:
        return {
            "mode": self.mode,
            "streams": self.streams,
            "tok/s": round(self.throughput, 1),
            "req tok/s p50": round(_q(self.per_request, 0.5), 1),
            "ttft p50 ms": round(1e3 * _q(self.ttft, 0.5), 1),
            "ttft p95 ms": round(1e3 * _q(self.ttft, 0.95), 1),
            "itl p50 ms": round(1e3 * _q(self.itl, 0.5), 2),
            "itl p95 ms": round(1e3 * _q(self.itl, 0.95), 2),
            "rows/pass": round(self.row_steps / self.steps, 2) if self.steps else 0.0,
            "tau": round(self.tokens / self.passes, 2) if self.passes else 0.0,
            "plain share": round(self.plain_row_steps / self.row_steps, 2)
            if self.row_steps
            else 0.0,
            "target RSS MB": round(self.target_rss_mb),
        }


def _q(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _one(router, ids: list[int], mode: int, k: int, max_new: int, cell: Cell) -> list[int]:
    req = pb.GenerateRequest(
        prompt_token_ids=ids,
        max_new_tokens=max_new,
        speculation=pb.SpeculationOptions(mode=mode, num_draft_tokens=k),
    )
    t0 = last = time.perf_counter()
    out: list[int] = []
    first = None
    async for msg in router.generate_stream(req):
        now = time.perf_counter()
        if msg.token_ids:
            if first is None:
                first = now - t0
            else:
                cell.itl.extend([(now - last) / len(msg.token_ids)] * len(msg.token_ids))
            last = now
            out.extend(msg.token_ids)
        if msg.finish_reason:
            s = msg.stats
            cell.passes += s.rounds + s.plain_steps
    cell.ttft.append(first or 0.0)
    cell.per_request.append(len(out) / max(1e-9, time.perf_counter() - t0))
    return out


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def _watch_rss(pid: int, cell: Cell) -> None:
    while True:
        cell.target_rss_mb = max(cell.target_rss_mb, _rss_mb(pid))
        await asyncio.sleep(0.2)


async def _cell(router, prompts, mode_name, streams, per_stream, max_new, pid=0) -> Cell:
    mode, k = MODES[mode_name]
    cell = Cell(mode_name, streams)
    before = _batch_totals(router)
    phases_before = _phases(router)
    watch = asyncio.ensure_future(_watch_rss(pid, cell)) if pid else None

    async def stream(s: int) -> None:
        for j in range(per_stream):
            n = s * per_stream + j
            cell.outputs[n] = await _one(router, prompts[n % len(prompts)], mode, k, max_new, cell)

    t0 = time.perf_counter()
    await asyncio.gather(*(stream(s) for s in range(streams)))
    cell.seconds = time.perf_counter() - t0
    if watch is not None:
        watch.cancel()
    cell.tokens = sum(len(o) for o in cell.outputs.values())
    after = _batch_totals(router)
    deltas = [a - b for a, b in zip(after, before, strict=True)]
    cell.steps, cell.row_steps, cell.plain_row_steps = deltas
    after_phases = _phases(router)
    cell.phases = {k: v - phases_before.get(k, 0.0) for k, v in after_phases.items()}
    return cell


def _phases(router) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in router.batch_status().values():
        for k, v in s["phase_seconds"].items():
            out[k] = out.get(k, 0.0) + v
    return out


def _batch_totals(router) -> tuple[int, int, int]:
    st = router.batch_status().values()
    return (
        sum(s["steps"] for s in st),
        sum(s["row_steps"] for s in st),
        sum(s["plain_row_steps"] for s in st),
    )


def sweep(
    target_path: str,
    draft_path: str,
    prompts: list[list[int]],
    *,
    concurrency: list[int],
    per_stream: int,
    max_new: int,
    threads: int,
    modes: list[str] | None = None,
    repeats: int = 1,
    confidence_stop: float = 0.0,
    dtype: str = "float32",
) -> list[Cell]:
    from bench.policies import bench_policy
    from cluster.routing.config import RouterConfig
    from cluster.routing.router import Router
    from cluster.routing.worker_processes import start_all, stop_all, worker_process
    from workers.checkpoints.feature_head import is_feature_head

    stop = ["--confidence-stop", str(confidence_stop)]
    as_served = ["--dtype", dtype]  # auto: bfloat16 where the CPU has it, as `models.dtype`
    procs = start_all(
        worker_process("target", target_path, threads=threads, extra=as_served),
        worker_process("draft", draft_path, threads=1, extra=[*stop, *as_served]),
    )
    cells: list[Cell] = []
    loop = asyncio.new_event_loop()
    routers = {}
    try:
        for mode_name in modes or list(MODES):
            # A router per mode, kept across the sweep: each learns its step costs from nothing
            # and follows the load as it rises. Modes take turns at each concurrency, so the
            # ratios compare cells run next to each other (this box's speed drifts by minutes).
            router = Router(
                RouterConfig(
                    target_model_path=target_path,
                    max_in_flight=256,
                    policy=bench_policy(),
                    draft_features=is_feature_head(Path(draft_path)),  # a head: features flow
                )
            )
            router.set_workers(drafts=[procs[1].address], targets=[procs[0].address])
            loop.run_until_complete(_cell(router, prompts, mode_name, 1, 1, max_new))  # warm-up
            routers[mode_name] = router
        for rep in range(repeats):
            for c in concurrency:
                n = max(per_stream, -(-MIN_REQUESTS // c))  # requests per stream
                for mode_name, router in routers.items():
                    cell = loop.run_until_complete(
                        _cell(router, prompts, mode_name, c, n, max_new, procs[0].popen.pid)
                    )
                    r = cell.row()
                    print(
                        f"  [{rep + 1}/{repeats}] {mode_name:6s} streams={c:3d}  "
                        f"{r['tok/s']:8.1f} tok/s  rows/pass {r['rows/pass']:5.2f}  "
                        f"tau {r['tau']:.2f}  plain share {r['plain share']:.2f}  "
                        f"target RSS {r['target RSS MB']} MB",
                        flush=True,
                    )
                    print(f"           scheduler time: {cell.profile()}", flush=True)
                    cells.append(cell)
    finally:
        for router in routers.values():
            router.close()
        loop.close()
        stop_all(procs)
    return cells


def check_outputs(cells: list[Cell]) -> list[str]:
    """Greedy outputs of every cell must equal plain decoding's for the same request."""
    plain = {c.streams: c.outputs for c in cells if c.mode == "plain"}
    bad = []
    for c in cells:
        ref = plain.get(c.streams)
        if ref is not None and any(ref.get(i) != o for i, o in c.outputs.items()):
            bad.append(f"{c.mode}@{c.streams}")
    return bad


def pooled_throughput(cells: list[Cell]) -> dict[tuple[str, int], float]:
    """Tokens / seconds of each (mode, streams) over its repeats."""
    tok: dict[tuple[str, int], float] = {}
    sec: dict[tuple[str, int], float] = {}
    for c in cells:
        key = (c.mode, c.streams)
        tok[key] = tok.get(key, 0) + c.tokens
        sec[key] = sec.get(key, 0) + c.seconds
    return {k: tok[k] / sec[k] for k in tok if sec[k]}


def repeat_ratios(cells: list[Cell]) -> dict[int, list[float]]:
    """streams -> AUTO/plain of each repeat: the i-th AUTO cell over the i-th plain cell of that
    many streams (cells run modes in turn, repeat after repeat)."""
    runs: dict[tuple[str, int], list[float]] = {}
    for c in cells:
        runs.setdefault((c.mode, c.streams), []).append(c.throughput)
    out = {}
    for (mode, n), autos in runs.items():
        plains = runs.get(("plain", n), [])
        if mode == "auto" and plains:
            out[n] = [a / p for a, p in zip(autos, plains, strict=False) if p]
    return out


def markdown(cells: list[Cell]) -> str:
    rows = [c.row() for c in cells]
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    by = pooled_throughput(cells)
    modes = list(dict.fromkeys(c.mode for c in cells))
    counts = sorted({c.streams for c in cells})
    lines += ["", "Pooled over repeats (tok/s):", ""]
    lines.append("| streams | " + " | ".join(modes) + " |")
    lines.append("|" + "---|" * (len(modes) + 1))
    for n in counts:
        cells_n = [f"{by[(m, n)]:.1f}" if (m, n) in by else "" for m in modes]
        lines.append(f"| {n} | " + " | ".join(cells_n) + " |")
    ratios = []
    per_repeat = repeat_ratios(cells)
    for n in counts:
        plain = by.get(("plain", n))
        auto = by.get(("auto", n))
        if plain and auto:
            text = f"{n} streams: AUTO/plain {auto / plain:.2f}x"
            if len(per_repeat.get(n, ())) > 1:  # one slow cell weighs less in a median
                each = ", ".join(f"{r:.2f}" for r in per_repeat[n])
                text += f" (repeats {each}: median {statistics.median(per_repeat[n]):.2f}x)"
            ratios.append(text)
    one = by.get(("auto", 1))
    for n in (16, 64):
        if one and by.get(("auto", n)):
            ratios.append(f"AUTO {n} streams / AUTO 1 stream {by[('auto', n)] / one:.2f}x")
    return "\n".join(lines) + "\n\n" + "; ".join(ratios)


def plot(cells: list[Cell], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)")
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    pooled = pooled_throughput(cells)
    for mode in MODES:
        xs = sorted({c.streams for c in cells if c.mode == mode})
        if not xs:
            continue
        itl = {n: [t for c in cells if (c.mode, c.streams) == (mode, n) for t in c.itl] for n in xs}
        a.plot(xs, [pooled[(mode, n)] for n in xs], marker="o", label=mode)
        b.plot(xs, [1e3 * _q(itl[n], 0.5) for n in xs], marker="o", label=f"{mode} ITL p50")
    for ax, ylabel in ((a, "aggregate tokens/s"), (b, "inter-token latency p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True
