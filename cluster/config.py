"""The one validated configuration of a specdec cluster (`cluster.serve.app:build_app`'s args).

Every section rejects unknown keys: Serve's own config schema silently ignores a misspelt key, so a
typo such as `tp_sise: 2` would otherwise deploy a cluster without tensor parallelism. Errors come
out as one `ConfigError` naming each wrong key by its dotted path:

    ClusterConfig.load({"target": {"tp_sise": 2}})
    ConfigError: invalid specdec config:
      target.tp_sise: unknown key (allowed: replicas, tp_size, pool, ...)

No Ray import here: the CLI, the Serve builder and the tests all validate the same way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from cluster.config_models import ModelsConfig
from cluster.config_sections import (
    AutoscalingSettings,
    SecurityConfig,
    WorkersNetConfig,
    _Strict,
)
from cluster.scheduling.lookup import LookupConfig
from cluster.scheduling.policy import Drafter, PolicyConfig


class ConfigError(ValueError):
    """The cluster configuration is invalid; the message names every wrong key."""


class PoolConfig(_Strict):
    """A resource pool: the custom Ray resource a kind of worker runs on, and what one unit takes.

    For the draft pool a unit is one replica; for the target pool it is one tensor-parallel rank
    (one placement-group bundle). On a CPU box the pools are custom resources given to
    `ray start --resources`; on a GPU cluster set num_gpus (and keep the custom resource so that
    draft and target land on the nodes meant for them).
    """

    resource: str = Field(min_length=1, description="custom Ray resource that names the pool")
    amount: float = Field(1.0, gt=0, description="units of `resource` per replica / per rank")
    num_cpus: float = Field(
        1.0, ge=0, description="logical CPUs per replica or rank (also its torch threads, >= 1)"
    )
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs per replica or rank (a fraction packs several on one GPU)"
    )

    def actor_options(self) -> dict[str, Any]:
        return {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "resources": {self.resource: self.amount},
        }

    def bundle(self) -> dict[str, float]:
        out = {"CPU": self.num_cpus, self.resource: self.amount}
        if self.num_gpus:
            out["GPU"] = self.num_gpus
        return out

    @property
    def threads(self) -> int:
        """torch threads for one replica / rank: its CPU share, at least one."""
        return max(1, int(self.num_cpus))


def _most_replicas(replicas: int, autoscaling: AutoscalingSettings | None) -> int:
    return max(replicas, autoscaling.max_replicas) if autoscaling else replicas


class DraftConfig(_Strict):
    replicas: int = Field(1, ge=0, description="0 = no draft pool: plain decoding only")
    top_m: int = Field(64, ge=1, description="support size of the sparse draft distribution q")
    confidence_stop: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="end a block after a draft token given less than this probability (0 = off;"
        " empty = the draft's pair's setting, 0 for a checkpoint given by path)",
    )
    pool: PoolConfig = PoolConfig(resource="draft_pool")
    max_ongoing_requests: int = Field(
        256, ge=1, description="Serve's cap on calls in flight to one replica"
    )
    max_kv_tokens: int = Field(
        0,
        ge=0,
        description="KV budget of one replica in tokens (0 = none); a row over it drafts no more",
    )
    autoscaling: AutoscalingSettings | None = Field(
        None, description="scale the draft pool on its rows (empty: `replicas`, fixed)"
    )

    @property
    def most_replicas(self) -> int:
        return _most_replicas(self.replicas, self.autoscaling)


class TargetConfig(_Strict):
    replicas: int = Field(1, ge=1, description="tensor-parallel groups")
    tp_size: int = Field(1, ge=1, description="ranks per group (one Ray actor each)")
    pool: PoolConfig = PoolConfig(resource="target_pool")
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="placement group of one tensor-parallel group's ranks"
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend; auto = nccl with GPUs, gloo without"
    )
    tp_timeout_s: float = Field(120.0, gt=0, description="process-group and rank-call timeout")
    call_timeout_s: float = Field(
        60.0, gt=0, description="a target call slower than this fails over to another target"
    )
    max_ongoing_requests: int = Field(
        256, ge=1, description="Serve's cap on calls in flight to one replica"
    )
    max_kv_tokens: int = Field(
        0,
        ge=0,
        description="KV budget of one replica in tokens (0 = none): admission waits for room, "
        "a request that can never fit is RESOURCE_EXHAUSTED",
    )
    autoscaling: AutoscalingSettings | None = Field(
        None, description="scale the target pool on its rows (empty: `replicas`, fixed)"
    )

    @property
    def most_replicas(self) -> int:
        return _most_replicas(self.replicas, self.autoscaling)

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "nccl" if self.pool.num_gpus > 0 else "gloo"

    @model_validator(mode="after")
    def _check_backend(self) -> TargetConfig:
        if self.backend == "nccl" and self.pool.num_gpus <= 0:
            raise ValueError("backend 'nccl' needs GPUs: set target.pool.num_gpus")
        return self


class LookupSettings(_Strict):
    """Drafting without a model (`cluster.scheduling.lookup`): continuations of text seen before."""

    max_tokens: int = Field(
        32, ge=1, description="longest lookup block (may exceed max_draft_tokens where it pays)"
    )
    min_match: int = Field(
        1, ge=1, description="tokens of a row's end that must match earlier text to propose"
    )
    recent_tokens: int = Field(
        65536,
        ge=0,
        description="tokens of finished rows' outputs each scheduler indexes for lookup (0: none)",
    )
    continuation: Literal["recent", "frequent"] = Field(
        "recent",
        description="a match seen more than once: follow its most recent occurrence, or what "
        "most occurrences went on with (SuffixDecoding; measured below recent on chat)",
    )
    min_support: float = Field(
        0.2,
        ge=0,
        le=1,
        description="frequent: end a block where fewer occurrences than this share still agree",
    )

    def config(self) -> LookupConfig:
        return LookupConfig(
            max_tokens=self.max_tokens,
            min_match=self.min_match,
            recent_tokens=self.recent_tokens,
            continuation=self.continuation,
            min_support=self.min_support,
        )


class SpeculationConfig(_Strict):
    """The draft-length and fallback policy (`scheduling.policy.PolicyConfig`) plus draft timing."""

    k: int = Field(0, ge=0, description="draft tokens per round; 0 = adaptive")
    max_draft_tokens: int = Field(
        8, ge=1, description="largest k a round may propose (the adaptive policy's range)"
    )
    min_gain: float = Field(1.15, gt=0, description="start speculating at this predicted gain")
    keep_gain: float = Field(1.05, gt=0, description="stop speculating below this gain")
    probe_interval: int = Field(
        16, ge=1, description="plain steps before the first probe of speculation"
    )
    max_probe_interval: int = Field(
        256,
        ge=1,
        description="cap of the probe interval, which doubles after each probe that did not pay",
    )
    prior_acceptance: float = Field(
        0.6, ge=0, lt=1, description="per drafted token, before anything is measured"
    )
    pipelined: bool | Literal["auto"] = Field(
        "auto", description='draft ahead while verifying; "auto": measure both ways, run the faster'
    )
    draft_timeout_s: float = Field(10.0, gt=0, description="a slower draft counts as gone")
    drafter: Literal["auto", "model", "lookup"] = Field(
        "auto",
        description="who drafts a request that does not choose: lookup where a match promises "
        "more, the draft model otherwise (auto); the model only; lookup only",
    )
    lookup: LookupSettings = Field(default_factory=LookupSettings)

    def policy(self) -> PolicyConfig:
        return PolicyConfig(
            num_draft_tokens=self.k,
            max_draft_tokens=self.max_draft_tokens,
            min_gain=self.min_gain,
            keep_gain=self.keep_gain,
            probe_interval=self.probe_interval,
            max_probe_interval=self.max_probe_interval,
            prior_acceptance=self.prior_acceptance,
            drafter=Drafter(self.drafter),
            lookup=self.lookup.config(),
        )

    @model_validator(mode="after")
    def _check_policy(self) -> SpeculationConfig:
        if self.k > self.max_draft_tokens:
            raise ValueError(
                f"k must be in [0, max_draft_tokens={self.max_draft_tokens}], got {self.k}"
            )
        self.policy()  # PolicyConfig's own cross-field checks (k <= max_draft_tokens, ...)
        return self


class LimitsConfig(_Strict):
    max_in_flight: int = Field(64, ge=1, description="requests at once per ingress replica")
    max_queued: int = Field(
        64,
        ge=-1,
        description="requests waiting beyond that (-1: no limit); excess: RESOURCE_EXHAUSTED",
    )
    max_new_tokens: int = Field(512, ge=1, description="cap on a request's max_new_tokens")
    default_max_new_tokens: int = Field(128, ge=1, description="when a request leaves it unset")
    max_batch_rows: int = Field(64, ge=1, description="rows in one target's running batch")
    max_in_flight_per_key: int = Field(
        0,
        ge=0,
        description="requests one API key may have in flight on an ingress replica (0 = no"
        " limit); more: RESOURCE_EXHAUSTED",
    )
    max_stop_strings: int = Field(16, ge=0, description="stop strings one request may give")
    max_stop_chars: int = Field(256, ge=1, description="characters of one stop string")
    max_prompt_chars: int = Field(
        1 << 20, ge=1, description="characters of a text prompt (refused before tokenizing)"
    )
    max_request_bytes: int = Field(
        4 << 20, ge=1024, description="bytes of an HTTP request body (more: 413, unread)"
    )
    prefill_tokens_per_step: int = Field(
        2048, ge=1, description="prompt tokens admitted per step (bounds the stall of a burst)"
    )

    @model_validator(mode="after")
    def _check_limits(self) -> LimitsConfig:
        if self.max_queued == 0:
            raise ValueError("max_queued must be -1 (no limit) or >= 1")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("default_max_new_tokens must be <= max_new_tokens")
        return self


class IngressConfig(_Strict):
    grpc_port: int = Field(9000, ge=1, le=65535, description="Serve gRPC proxy port (specdec up)")
    replicas: int = Field(1, ge=1, description="stateless ingress replicas")
    num_cpus: float = Field(0.5, ge=0, description="logical CPUs per ingress replica")
    stream_interval: int = Field(
        1,
        ge=1,
        description="tokens per streamed message after the first (vLLM's --stream-interval); "
        "fewer messages cost less CPU per token, unary calls get the whole response at once",
    )


class ClusterConfig(_Strict):
    models: ModelsConfig = ModelsConfig()
    draft: DraftConfig = DraftConfig()
    target: TargetConfig = TargetConfig()
    speculation: SpeculationConfig = SpeculationConfig()
    limits: LimitsConfig = LimitsConfig()
    ingress: IngressConfig = IngressConfig()
    workers: WorkersNetConfig = WorkersNetConfig()
    security: SecurityConfig = SecurityConfig()

    @model_validator(mode="after")
    def _check_pools(self) -> ClusterConfig:
        if self.draft.replicas and self.draft.pool.resource == self.target.pool.resource:
            raise ValueError(
                "draft.pool.resource and target.pool.resource must differ "
                f"(both are {self.target.pool.resource!r}): they are separate pools"
            )
        return self

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def load(cls, args: Mapping[str, Any] | None = None) -> ClusterConfig:
        """Validate a Serve `args` dict (or None for the defaults); raises ConfigError."""
        if args is None:
            args = {}
        if isinstance(args, ClusterConfig):
            return args
        if not isinstance(args, Mapping):
            raise ConfigError(
                f"invalid specdec config: expected a mapping, got {type(args).__name__}"
            )
        try:
            return cls.model_validate(dict(args))
        except ValidationError as exc:
            raise ConfigError(format_errors(exc)) from None

    def to_args(self) -> dict[str, Any]:
        """The JSON-able args dict that `load` turns back into this config."""
        return json.loads(self.model_dump_json())

    def with_overrides(self, overrides: Mapping[str, Any]) -> ClusterConfig:
        """A copy with dotted-key overrides, e.g. {"target.tp_size": 2}; validated again."""
        args = self.to_args()
        for dotted, value in overrides.items():
            node = args
            *parents, leaf = dotted.split(".")
            for key in parents:
                if node.get(key) is None:  # a section that is off (autoscaling: null) turns on
                    node[key] = {}
                node = node[key]
            node[leaf] = value
        return ClusterConfig.load(args)

    # -- derived ----------------------------------------------------------------------------

    def confidence_stop(self) -> float:
        """draft.confidence_stop, or where it is empty, the setting of the draft's pair."""
        if self.draft.confidence_stop is not None:
            return self.draft.confidence_stop
        from workers.checkpoints.registry import PAIRS

        name = self.models.pair_name("draft")
        return PAIRS[name].confidence_stop if name in PAIRS else 0.0

    def required_resources(self) -> dict[str, float]:
        """Logical resources the whole application needs (for a local `ray.init`)."""
        d, t = self.draft, self.target
        dn, tn = (d.most_replicas if d.replicas else 0), t.most_replicas  # room to scale up
        cpus = (
            dn * d.pool.num_cpus
            + tn * t.tp_size * t.pool.num_cpus
            + self.ingress.replicas * self.ingress.num_cpus
        )
        out = {"CPU": cpus, t.pool.resource: tn * t.tp_size * t.pool.amount}
        if d.replicas:
            out[d.pool.resource] = dn * d.pool.amount
        gpus = dn * d.pool.num_gpus + tn * t.tp_size * t.pool.num_gpus
        if gpus:
            out["GPU"] = gpus
        return out


def format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(err["loc"][:-1])
            lines.append(f"  {loc}: unknown key (allowed: {', '.join(allowed)})")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc}: {msg}")
    return "invalid specdec config:\n" + "\n".join(lines)


def _allowed_keys(parent: tuple) -> list[str]:
    model: type[BaseModel] = ClusterConfig
    for key in parent:
        field = model.model_fields.get(str(key))
        if field is None or not isinstance(field.annotation, type):
            return []
        if not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)
