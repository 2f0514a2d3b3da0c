"""Serve's autoscaling of the worker pools on the rows they serve, so the draft pool and the
target pool scale apart.

Serve's default policy counts requests routed through its handles. Neither pool sees those: a
draft replica is called over its own gRPC port by the target replicas' schedulers, and a target
replica's handle calls last a whole request. So every worker replica reports its rows as a
custom autoscaling metric (`record_autoscaling_stats`, cluster/serve/worker_deployments.py):

* a draft replica: the sequences it holds KV for (rows speculating with it);
* a target replica: the requests its scheduler holds (running, waiting and arriving).

`rows_policy` sizes the pool at ceil(sum of rows / target_rows) replicas; Serve applies the
bounds, the up/down delays and the smoothing (`autoscaling_config` from
`cluster.config.AutoscalingSettings`). A new draft replica registers with the registry and the
schedulers lease it the next rows (least loaded first); a new target replica starts its scheduler
and Serve routes new requests to it. A replica Serve removes unregisters first and then drains
(`drain_s`), so the rows on it finish or move before its port closes.

Serve cloudpickles this module into its controller: keep it free of heavy imports.
"""

from __future__ import annotations

from typing import Any

ROWS_METRIC = "specdec_rows"  # the custom autoscaling metric every worker replica reports


def desired_replicas(rows_by_replica: dict[Any, float], target_rows: float) -> float:
    """Replicas the pool wants for its rows (Serve rounds up and bounds it)."""
    return sum(rows_by_replica.values()) / max(target_rows, 1e-9)


def rows_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Serve's policy function (`policy_function: cluster.serve.autoscaling:rows_policy`); ctx
    is Serve's `AutoscalingContext`."""
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    rows = (ctx.aggregated_metrics or {}).get(ROWS_METRIC, {})
    return desired_replicas(rows, ctx.config.target_ongoing_requests), {}
