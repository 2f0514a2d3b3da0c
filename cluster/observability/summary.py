"""What `specdec status` prints: the cluster's metrics, two scrapes apart, for a person at a
terminal. The same numbers as the Prometheus metrics (catalog.py): per pool and replica the
sequences and KV held, the batch's running and waiting rows; totals since start and rates over
the interval between the scrapes. Pure: the scrapes are handed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.observability.prometheus import Samples

DRAFT, TARGET, INGRESS = "SpecDecodeDraft", "SpecDecodeTarget", "SpecDecodeIngress"
POOL_NAMES = {DRAFT: "draft", TARGET: "target"}


@dataclass
class Replica:
    pool: str
    replica: str
    sequences: float = 0.0
    kv_tokens: float = 0.0
    kv_use: float = 0.0
    running: float | None = None  # target replicas: their scheduler's batch
    waiting: float | None = None


@dataclass
class Summary:
    seconds: float  # between the two scrapes
    replicas: list[Replica] = field(default_factory=list)
    in_flight: float = 0.0
    finished: dict[str, float] = field(default_factory=dict)  # since start, by finish reason
    refused: dict[str, float] = field(default_factory=dict)  # since start, by cause
    tokens_per_s: float = 0.0  # generated, over the interval
    # by drafter: (rounds, proposed, accepted) since start, and over the interval
    drafters: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    drafters_recent: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    plain_share: float | None = None  # of row steps, since start
    fallbacks: dict[str, float] = field(default_factory=dict)  # since start, by cause
    steps_recent: float = 0.0  # scheduler steps over the interval
    step_ms_recent: float | None = None  # mean step time over the interval
    rows_per_step_recent: float | None = None
    ttft_ms: float | None = None  # mean since start
    itl_ms: float | None = None


def _delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return after.total(name, **labels) - before.total(name, **labels)


def _mean_ms(s: Samples, name: str) -> float | None:
    count = s.total(f"{name}_count")
    return 1000 * s.total(f"{name}_sum") / count if count else None


def summarize(before: Samples, after: Samples, seconds: float) -> Summary:
    out = Summary(seconds=seconds)
    rows: dict[tuple[str, str], Replica] = {}
    for metric, attr in (
        ("ray_specdec_worker_sequences", "sequences"),
        ("ray_specdec_kv_cache_tokens", "kv_tokens"),
        ("ray_specdec_kv_cache_usage_perc", "kv_use"),
        ("ray_specdec_num_requests_running", "running"),
        ("ray_specdec_num_requests_waiting", "waiting"),
    ):
        for s in after.select(metric):
            dep = s.labels.get("deployment", "")
            if dep not in POOL_NAMES:
                continue
            key = (POOL_NAMES[dep], s.labels.get("replica", ""))
            rep = rows.setdefault(key, Replica(*key))
            setattr(rep, attr, s.value)
    out.replicas = [rows[k] for k in sorted(rows)]
    out.in_flight = after.total("ray_specdec_num_requests_in_flight")
    out.finished = after.by("ray_specdec_request_success_total", "finished_reason")
    out.refused = after.by("ray_specdec_requests_refused_total", "cause")
    if seconds > 0:
        out.tokens_per_s = _delta(after, before, "ray_specdec_generation_tokens_total") / seconds
    for d in after.by("ray_specdec_spec_decode_num_drafts_total", "drafter"):
        counts = []
        recent = []
        for name in ("drafts", "draft_tokens", "accepted_tokens"):
            metric = f"ray_specdec_spec_decode_num_{name}_total"
            counts.append(after.total(metric, drafter=d))
            recent.append(_delta(after, before, metric, drafter=d))
        out.drafters[d] = tuple(counts)
        out.drafters_recent[d] = tuple(recent)
    kinds = after.by("ray_specdec_row_steps_total", "kind")
    if sum(kinds.values()):
        out.plain_share = kinds.get("plain", 0.0) / sum(kinds.values())
    out.fallbacks = after.by("ray_specdec_fallbacks_total", "cause")
    steps = _delta(after, before, "ray_specdec_step_seconds_count")
    out.steps_recent = steps
    if steps:
        out.step_ms_recent = 1000 * _delta(after, before, "ray_specdec_step_seconds_sum") / steps
        rows_sum = _delta(after, before, "ray_specdec_batch_rows_sum")
        out.rows_per_step_recent = rows_sum / steps
    out.ttft_ms = _mean_ms(after, "ray_specdec_time_to_first_token_seconds")
    out.itl_ms = _mean_ms(after, "ray_specdec_inter_token_latency_seconds")
    return out


def _counts(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(d.items()) if v) or "none"


def _opt(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render(s: Summary, serving: bool | None = None) -> str:
    lines = []
    if serving is not None:
        lines.append(f"serving: {'yes' if serving else 'NO (a pool has no live replica)'}")
    lines.append(
        f"{'pool':<7} {'replica':<12} {'sequences':>9} {'kv tokens':>10} {'kv use':>7} "
        f"{'running':>8} {'waiting':>8}"
    )
    for r in s.replicas:
        use = f"{100 * r.kv_use:.0f}%" if r.kv_use else "-"
        lines.append(
            f"{r.pool:<7} {r.replica[-12:]:<12} {r.sequences:>9g} {r.kv_tokens:>10g} {use:>7} "
            f"{_opt(r.running, 'g'):>8} {_opt(r.waiting, 'g'):>8}"
        )
    if not s.replicas:
        lines.append("(no worker replica has reported metrics yet)")
    lines.append(
        f"requests: {s.in_flight:g} in flight; finished: {_counts(s.finished)}; "
        f"refused: {_counts(s.refused)}"
    )
    lines.append(
        f"latency (mean since start): first token {_opt(s.ttft_ms, '.0f')} ms, "
        f"between tokens {_opt(s.itl_ms, '.1f')} ms"
    )
    lines.append(f"last {s.seconds:.1f}s: {s.tokens_per_s:.1f} tokens/s generated, "
                 f"{s.steps_recent:g} steps of {_opt(s.step_ms_recent, '.1f')} ms, "
                 f"{_opt(s.rows_per_step_recent, '.1f')} rows per step")  # fmt: skip
    for d, (rounds, proposed, accepted) in sorted(s.drafters.items()):
        rate = accepted / proposed if proposed else 0.0
        r_rounds, r_prop, r_acc = s.drafters_recent.get(d, (0, 0, 0))
        recent = f"{r_acc / r_prop:.2f}" if r_prop else "-"
        per_round = 1 + accepted / rounds if rounds else 0.0
        lines.append(
            f"drafter {d}: {rounds:g} rounds, acceptance {rate:.2f} (last {s.seconds:.0f}s: "
            f"{recent}), {per_round:.2f} tokens per round"
        )
    if s.plain_share is not None:
        lines.append(
            f"plain steps: {100 * s.plain_share:.0f}% of row steps; "
            f"fallbacks: {_counts(s.fallbacks)}"
        )
    return "\n".join(lines)
