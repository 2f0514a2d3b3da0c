"""The sections of the cluster configuration about operating it (cluster/config.py holds the
whole and the rest): how the pools autoscale, who may call the public APIs, and how the worker
replicas serve their internal API (address, registry, health, mutual TLS, leases, drain). Plain
pydantic models, strict like every section: an unknown key is an error that names it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from workers.tls import TLSFiles


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class AutoscalingSettings(_Strict):
    """Serve autoscaling of one pool on the rows it serves (cluster/serve/autoscaling.py): the
    draft pool on the sequences its replicas hold, the target pool on the requests its
    schedulers hold, so the two scale apart."""

    min_replicas: int = Field(1, ge=1, description="fewest replicas")
    max_replicas: int = Field(4, ge=1, description="most replicas (the pool must have room)")
    target_rows: float = Field(
        8.0,
        gt=0,
        description="rows per replica the pool is sized for: drafts, sequences held; targets,"
        " requests running and waiting",
    )
    upscale_delay_s: float = Field(5.0, ge=0, description="demand must last this long to add")
    downscale_delay_s: float = Field(60.0, ge=0, description="... and this long to remove")
    metrics_interval_s: float = Field(2.0, gt=0, description="how often replicas report rows")
    look_back_period_s: float = Field(10.0, gt=0, description="rows averaged over this window")

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self

    def serve_config(self, initial: int) -> dict[str, Any]:
        """Serve's `autoscaling_config` (our policy reads target_ongoing_requests as the rows
        per replica)."""
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "initial_replicas": min(max(initial, self.min_replicas), self.max_replicas),
            "target_ongoing_requests": self.target_rows,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "metrics_interval_s": self.metrics_interval_s,
            "look_back_period_s": self.look_back_period_s,
            "policy": {"policy_function": "cluster.serve.autoscaling:rows_policy"},
        }


class SecurityConfig(_Strict):
    """Who may call the public APIs."""

    api_key_env: str = Field(
        "SPECDEC_API_KEY",
        min_length=1,
        description="the environment variable holding the API key on the cluster's nodes; when"
        " it is set, every gRPC and HTTP call but health and readiness needs"
        " `authorization: Bearer <key>`",
    )


class WorkersTLSConfig(_Strict):
    """Mutual TLS on the internal worker channels: PEM files present on every node."""

    ca_file: str = Field(..., min_length=1, description="the CA that signs every certificate")
    cert_file: str = Field(..., min_length=1, description="this node's certificate chain")
    key_file: str = Field(..., min_length=1, description="its private key")
    server_name: str = Field(
        "specdec-worker", min_length=1, description="the name worker certificates carry (SAN)"
    )

    def files(self) -> TLSFiles:
        from workers.tls import TLSFiles

        return TLSFiles(self.ca_file, self.cert_file, self.key_file, self.server_name)


class WorkersNetConfig(_Strict):
    """Where worker replicas serve the internal worker gRPC API."""

    host: str | None = Field(
        None, description="address to bind and advertise; empty = the Ray node's IP"
    )
    heartbeat_s: float = Field(1.0, gt=0, description="re-registration period with the registry")
    registry_ttl_s: float = Field(5.0, gt=0, description="an address not renewed this long expires")
    health_check_period_s: float = Field(
        2.0, gt=0, description="Serve's health-check period of worker replicas"
    )
    health_check_timeout_s: float = Field(
        30.0, gt=0, description="a worker replica whose health check takes longer is restarted"
    )
    tls: WorkersTLSConfig | None = Field(
        None,
        description="mutual TLS between schedulers and workers (empty: plaintext on the"
        " cluster network)",
    )
    lease_timeout_s: float = Field(
        30.0,
        ge=0,
        description="a worker frees the sequences of a scheduler it has not heard from this long"
        " (a crashed one; schedulers renew every min(5 s, a quarter of it)); 0 = never",
    )
    drain_s: float = Field(
        30.0,
        ge=0,
        description="a worker replica Serve stops (scale-down, redeploy) first leaves the"
        " registry, then serves the rows it holds this long at most before it closes",
    )

    @model_validator(mode="after")
    def _check_ttl(self) -> WorkersNetConfig:
        if self.host in ("0.0.0.0", "::", "[::]"):
            raise ValueError(
                "host must be an address the router can reach (it is also advertised); "
                "leave it empty for the Ray node's IP"
            )
        if self.registry_ttl_s < 2 * self.heartbeat_s:
            raise ValueError("registry_ttl_s must be at least twice heartbeat_s")
        return self
