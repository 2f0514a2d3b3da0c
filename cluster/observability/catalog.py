"""Every metric the cluster exports: one list, read by the exporters (ray_sink), the Grafana
dashboard test and the operator's guide.

Names follow vLLM's where the concept is the same (its `vllm:` prefix becomes `specdec_`, since
Ray's export allows no colon), so dashboards and alerts written for vLLM carry over. Ray exports
each as `ray_<name>` and adds `_total` to counters (`specdec_prompt_tokens` is scraped as
`ray_specdec_prompt_tokens_total`). Ray Serve adds the labels `deployment`, `replica` and
`application` to every metric recorded in a replica; ours add `model` and the few below, each
from a small fixed set (no request ids: the label cardinality stays bounded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]
Where = Literal["ingress", "target", "worker"]  # worker: draft and target replicas alike

# Latency buckets (seconds) from 1 ms to 2 min, as vLLM's, with CPU-sized steps in between.
LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 120.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

FINISHED_REASONS = ("length", "stop", "eos", "cancelled", "abort")  # abort: the client left
FALLBACK_CAUSES = ("low_acceptance", "load", "draft_down", "draft_slow", "no_match")
DRAFTERS = ("model", "lookup")
MAX_POSITION = 32  # accepted-per-position is exported for positions 0..31 (a lookup block's cap)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str  # as recorded; scraped as ray_<name>, counters with _total
    kind: Kind
    description: str
    where: Where  # the deployment that records it
    tags: tuple[str, ...] = ()  # besides model (and Serve's deployment, replica, application)
    buckets: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The name a Prometheus scrape of Ray's metrics endpoint shows."""
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")


def _m(name: str, kind: Kind, where: Where, description: str, *tags: str, buckets=()) -> MetricSpec:
    return MetricSpec(f"specdec_{name}", kind, description, where, tags, tuple(buckets))


CATALOG: tuple[MetricSpec, ...] = (
    # -- requests, at the ingress (what the client saw) ----------------------------------------
    _m("num_requests_in_flight", "gauge", "ingress", "requests this ingress replica is serving"),
    _m(
        "request_success",
        "counter",
        "ingress",
        "requests finished, by finish reason (length, stop, eos, cancelled; abort: the client "
        "left first)",
        "finished_reason",
    ),
    _m(
        "requests_refused",
        "counter",
        "ingress",
        "requests ended with an error, by gRPC code (invalid_argument, resource_exhausted, ...)",
        "cause",
    ),
    _m("prompt_tokens", "counter", "ingress", "prompt tokens of finished requests"),
    _m("generation_tokens", "counter", "ingress", "tokens generated (streamed to clients)"),
    _m(
        "time_to_first_token_seconds",
        "histogram",
        "ingress",
        "arrival at the ingress to the first token sent",
        buckets=LATENCY_BUCKETS,
    ),
    _m(
        "inter_token_latency_seconds",
        "histogram",
        "ingress",
        "time between tokens sent (a message of n tokens counts n gaps of its wait / n)",
        buckets=LATENCY_BUCKETS,
    ),
    _m(
        "e2e_request_latency_seconds",
        "histogram",
        "ingress",
        "arrival at the ingress to the last message sent",
        buckets=LATENCY_BUCKETS,
    ),
    # -- the batch, in each target replica's scheduler ------------------------------------------
    _m("num_requests_running", "gauge", "target", "rows in the target replica's running batch"),
    _m("num_requests_waiting", "gauge", "target", "rows waiting for admission to the batch"),
    _m(
        "spec_decode_num_drafts",
        "counter",
        "target",
        "speculative rounds (drafts verified)",
        "drafter",
    ),
    _m("spec_decode_num_draft_tokens", "counter", "target", "draft tokens proposed", "drafter"),
    _m(
        "spec_decode_num_accepted_tokens",
        "counter",
        "target",
        "draft tokens the target kept",
        "drafter",
    ),
    _m(
        "spec_decode_num_accepted_tokens_per_pos",
        "counter",
        "target",
        "rounds whose draft token at this position (0-based) was accepted",
        "position",
    ),
    _m(
        "row_steps",
        "counter",
        "target",
        "rows in target passes, by kind (plain: one token, spec: a verified draft); the plain "
        "share is plain / all",
        "kind",
    ),
    _m(
        "fallbacks",
        "counter",
        "target",
        "rows switched from speculation to plain steps, by cause (low_acceptance: the row's own "
        "policy; load: the batch policy at a batch > 1; draft_down / draft_slow: its draft worker "
        "failed / timed out; no_match: a lookup-only row whose text offers no continuation)",
        "cause",
    ),
    _m("batch_rows", "histogram", "target", "rows per target pass", buckets=BATCH_BUCKETS),
    _m(
        "target_call_seconds",
        "histogram",
        "target",
        "one batched target call as the scheduler waits on it, by call (prefill, verify)",
        "call",
        buckets=LATENCY_BUCKETS,
    ),
    _m(
        "draft_call_seconds",
        "histogram",
        "target",
        "a step's batched propose calls to the draft pool, issue to last answer",
        buckets=LATENCY_BUCKETS,
    ),
    _m(
        "draft_wait_seconds",
        "histogram",
        "target",
        "per speculative step: the time the target waited on drafts (0 when every block was "
        "drafted ahead)",
        buckets=LATENCY_BUCKETS,
    ),
    _m(
        "pipeline",
        "counter",
        "target",
        "blocks drafted ahead, by outcome (hit: used as the next block; miss: thrown away)",
        "outcome",
    ),
    _m(
        "step_seconds",
        "histogram",
        "target",
        "one scheduler step: draft, verify, commit",
        buckets=LATENCY_BUCKETS,
    ),
    # -- every worker replica (draft and target: Serve's deployment label tells which) --------
    _m(
        "worker_sequences",
        "gauge",
        "worker",
        "sequences a worker replica holds KV for (the draft pool's autoscaling signal)",
    ),
    _m("kv_cache_tokens", "gauge", "worker", "tokens held in the worker replica's KV cache"),
    _m(
        "kv_cache_usage_perc",
        "gauge",
        "worker",
        "KV cache tokens held / the worker's budget (draft. / target.max_kv_tokens; 0 when unset)",
    ),
)

BY_NAME = {m.name: m for m in CATALOG}


def spec(name: str) -> MetricSpec:
    return BY_NAME[name]
