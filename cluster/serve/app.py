"""The Ray Serve application: draft and target deployments on their own pools, the router ingress.

    serve deploy deploy/cluster.yaml    # import_path: cluster.serve.app:build_app, args: the config
    serve.run(build_app({...}))               # the same from Python (what `specdec up` does)

Deployments (one application, named in the Serve config):

* `SpecDecodeDraft`, `SpecDecodeTarget` (cluster/serve/worker_deployments.py): the worker pools;
  each target replica also runs the step scheduler of its own batch.
* `SpecDecodeRegistry` (cluster/serve/registry.py): one small replica that knows the worker
  addresses, renewed by the workers' heartbeats.
* `SpecDecodeIngress` (cluster/serve/ingress.py): the public gRPC and OpenAI HTTP APIs, stateless;
  it forwards each request to a target replica's scheduler.

This module derives every deployment's Serve options from the validated config (pools, TP
placement, health checks, back-pressure) and binds them into the application.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from cluster.config import AutoscalingSettings, ClusterConfig
from cluster.config_checks import check_models
from cluster.serve.ingress import IngressDeployment
from cluster.serve.registry import RegistryDeployment
from cluster.serve.worker_deployments import DraftDeployment, TargetDeployment

APP_NAME = "specdec"
# Serve's gRPC proxy carries the public API and the standard health service (answered by the
# ingress: SERVING while every pool has a live replica).
GRPC_SERVICERS = [
    "cluster.api.grpc_service.add_SpecDecodeServicer_to_server",  # bad bytes: INVALID_ARGUMENT
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


def deployment_options(cfg: ClusterConfig) -> dict[str, dict[str, Any]]:
    """Serve options of each deployment, derived from the config (pools, TP placement, health)."""
    w = cfg.workers
    health = {
        "health_check_period_s": w.health_check_period_s,
        "health_check_timeout_s": w.health_check_timeout_s,
    }
    t = cfg.target
    if t.tp_size == 1:
        target: dict[str, Any] = {"ray_actor_options": t.pool.actor_options()}
    else:
        # The replica only coordinates; each rank actor takes one bundle's resources.
        target = {
            "ray_actor_options": {"num_cpus": 0, "num_gpus": 0},
            "placement_group_bundles": [t.pool.bundle() for _ in range(t.tp_size)],
            "placement_group_strategy": t.placement_strategy,
        }
    # A target replica's scheduler admits limits.max_in_flight requests and refuses the rest:
    # Serve must not send it more, so that the excess waits for (or goes to) another replica.
    ongoing = min(t.max_ongoing_requests, cfg.limits.max_in_flight)
    target.update(replicas(t.replicas, t.autoscaling), max_ongoing_requests=ongoing)
    # Serve waits this long for a stopping replica: its drain, then its own teardown.
    workers = {**health, "graceful_shutdown_timeout_s": w.drain_s + 10}
    target.update(workers)
    d = cfg.draft
    return {
        "registry": {"ray_actor_options": {"num_cpus": 0}, "num_replicas": 1, **health},
        "draft": {
            **replicas(d.replicas, d.autoscaling),
            "ray_actor_options": d.pool.actor_options(),
            "max_ongoing_requests": d.max_ongoing_requests,
            **workers,
        },
        "target": target,
        "ingress": {
            "num_replicas": cfg.ingress.replicas,
            "ray_actor_options": {"num_cpus": cfg.ingress.num_cpus},
            "max_ongoing_requests": cfg.limits.max_in_flight,
            "max_queued_requests": cfg.limits.max_queued,
            # Serve's own rejection past max_queued: 429 over HTTP, as overload is for the
            # OpenAI API (gRPC gets RESOURCE_EXHAUSTED either way).
            "backpressure_config": {"status_code": 429, "retry_after_s": 1},
            **health,
        },
    }


def replicas(fixed: int, autoscaling: AutoscalingSettings | None) -> dict[str, Any]:
    """A pool's replica count: fixed, or Serve's autoscaling on its rows."""
    if autoscaling is None:
        return {"num_replicas": fixed}
    return {"autoscaling_config": autoscaling.serve_config(fixed)}


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The Serve application builder (`import_path: cluster.serve.app:build_app`).

    `args` is the cluster config (see cluster/config.py); unknown keys are an error that names
    them. Model paths are checked here so a bad path fails the deploy at once.
    """
    cfg = ClusterConfig.load(args)
    check_models(cfg)
    opts = deployment_options(cfg)
    conf = cfg.to_args()
    registry = RegistryDeployment.options(**opts["registry"]).bind(cfg.workers.registry_ttl_s)
    targets = TargetDeployment.options(**opts["target"]).bind(conf, registry)
    drafts = None
    if cfg.draft.replicas:
        drafts = DraftDeployment.options(**opts["draft"]).bind(conf, registry)
    return IngressDeployment.options(**opts["ingress"]).bind(conf, registry, drafts, targets)
