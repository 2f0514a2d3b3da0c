"""The router's configuration: one source of defaults, the cluster config's (cluster/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from cluster.api.validation import Limits
from cluster.config import (
    IngressConfig,
    LimitsConfig,
    SpeculationConfig,
    TargetConfig,
    WorkersNetConfig,
)
from cluster.scheduling.policy import PolicyConfig
from cluster.scheduling.scheduler import SchedulerOptions


def _default(model: Any, name: str) -> Any:
    """One source of defaults: the cluster config's (cluster/config.py)."""
    return model.model_fields[name].default


@dataclass(frozen=True, slots=True)
class RouterConfig:
    target_model_path: str  # local checkpoint of the target: tokenizer, context, EOS
    max_draft_tokens: int = _default(SpeculationConfig, "max_draft_tokens")
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # default policy thresholds
    pipelined: bool | str = _default(SpeculationConfig, "pipelined")  # or True / False
    draft_timeout_s: float = _default(SpeculationConfig, "draft_timeout_s")
    target_timeout_s: float = _default(TargetConfig, "call_timeout_s")
    max_in_flight: int = _default(LimitsConfig, "max_in_flight")
    default_max_new_tokens: int = _default(LimitsConfig, "default_max_new_tokens")
    max_new_tokens_limit: int = _default(LimitsConfig, "max_new_tokens")
    max_batch_rows: int = _default(LimitsConfig, "max_batch_rows")
    prefill_tokens_per_step: int = _default(LimitsConfig, "prefill_tokens_per_step")
    kv_budget_tokens: int = _default(TargetConfig, "max_kv_tokens")  # per target; 0 = none
    max_stop_strings: int = _default(LimitsConfig, "max_stop_strings")
    max_stop_chars: int = _default(LimitsConfig, "max_stop_chars")
    max_prompt_chars: int = _default(LimitsConfig, "max_prompt_chars")
    health_recheck_s: float = _default(WorkersNetConfig, "health_check_period_s")
    probe_timeout_s: float = 2.0  # Stats call used as a health check
    stream_interval: int = _default(IngressConfig, "stream_interval")  # Serve ingress only
    draft_features: bool = False  # the draft is a feature head (SchedulerOptions.draft_features)

    def __post_init__(self) -> None:
        if not self.target_model_path:
            raise ValueError("target_model_path: required (the target's tokenizer comes from it)")
        if self.max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens must be >= 1, got {self.max_draft_tokens}")
        for name in ("draft_timeout_s", "target_timeout_s", "health_recheck_s", "probe_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_in_flight", "default_max_new_tokens", "max_new_tokens_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("default_max_new_tokens must be <= max_new_tokens_limit")
        self.policy_config()  # PolicyConfig's own checks against max_draft_tokens
        self.scheduler_options()

    @classmethod
    def from_cluster_config(cls, cfg: Any) -> RouterConfig:
        """From a `cluster.config.ClusterConfig`, for the Serve ingress."""
        spec, limits = cfg.speculation, cfg.limits
        return cls(
            target_model_path=str(cfg.models.target_path()),
            max_draft_tokens=spec.max_draft_tokens,
            policy=spec.policy(),
            pipelined=spec.pipelined,
            draft_timeout_s=spec.draft_timeout_s,
            target_timeout_s=cfg.target.call_timeout_s,
            max_in_flight=limits.max_in_flight,
            default_max_new_tokens=limits.default_max_new_tokens,
            max_new_tokens_limit=limits.max_new_tokens,
            max_batch_rows=limits.max_batch_rows,
            prefill_tokens_per_step=limits.prefill_tokens_per_step,
            max_stop_strings=limits.max_stop_strings,
            max_stop_chars=limits.max_stop_chars,
            max_prompt_chars=limits.max_prompt_chars,
            kv_budget_tokens=cfg.target.max_kv_tokens,
            health_recheck_s=cfg.workers.health_check_period_s,
            stream_interval=cfg.ingress.stream_interval,
            draft_features=cfg.models.draft_reads_features(),
        )

    def policy_config(self) -> PolicyConfig:
        return replace(self.policy, max_draft_tokens=self.max_draft_tokens)

    def scheduler_options(self) -> SchedulerOptions:
        return SchedulerOptions(
            draft_timeout_s=self.draft_timeout_s,
            target_timeout_s=self.target_timeout_s,
            max_rows=self.max_batch_rows,
            prefill_tokens_per_step=self.prefill_tokens_per_step,
            pipelined=self.pipelined,
            kv_budget_tokens=self.kv_budget_tokens,
            draft_features=self.draft_features,
        )

    def limits(self) -> Limits:
        return Limits(
            self.max_draft_tokens,
            self.default_max_new_tokens,
            self.max_new_tokens_limit,
            self.max_stop_strings,
            self.max_stop_chars,
            self.max_prompt_chars,
        )
