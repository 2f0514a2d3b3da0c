"""The algorithmic modules import neither ray nor grpc (DESIGN: they are tested alone, fast), and
the scheduling core loads no torch either (it holds tensors only as opaque values).

One fresh interpreter imports them one after another and reports, after each, which of ray/grpc
are in sys.modules, so a module that pulls one in is named (one interpreter: torch and
transformers load once).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PURE = [
    "workers.sampling",
    "workers.verification",
    "workers.types",
    "workers.batch_kv",
    "workers.model_runner",
    "workers.draft",
    "workers.target",
    "workers.batch",
    "cluster.scheduling.rounds",
    "cluster.scheduling.acceptance",
    "cluster.scheduling.row_policy",
    "cluster.scheduling.switching",
    "cluster.scheduling.step_costs",
    "cluster.scheduling.step_loop",
    "cluster.scheduling.policy",
    "cluster.scheduling.batch_policy",
    "cluster.scheduling.pipelining",
    "cluster.scheduling.worker_api",
    "cluster.scheduling.rows",
    "cluster.scheduling.drafting",
    "cluster.scheduling.scheduler",
    "cluster.engine",
    "cluster.api.openai_requests",
    "cluster.api.openai_responses",
    "cluster.api.openai_models",
]
FORBIDDEN = ["ray", "grpc"]
# Loaded first, in an interpreter of their own, so that nothing else has pulled torch in yet.
TORCH_FREE = [
    "workers.types",
    "workers.batch",
    "workers.errors",
    "cluster.scheduling.scheduler",
    "cluster.scheduling.drafting",
    "cluster.scheduling.batch_policy",
    "cluster.scheduling.admission",
    "cluster.scheduling.row_policy",
    "cluster.scheduling.step_loop",
]

PROBE = """
import importlib, json, sys
forbidden = set(json.loads(sys.argv[1]))
report = {}
for name in json.loads(sys.argv[2]):
    importlib.import_module(name)
    report[name] = sorted({m.split(".")[0] for m in sys.modules} & forbidden)
print(json.dumps(report))
"""


def probe(modules: list[str], forbidden: list[str] = FORBIDDEN) -> dict[str, list[str]]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(forbidden), json.dumps(modules)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pure_modules_load_neither_ray_nor_grpc():
    report = probe(PURE)
    assert list(report) == PURE
    assert {name: found for name, found in report.items() if found} == {}


def test_the_scheduling_core_loads_no_torch():
    report = probe(TORCH_FREE, ["torch", "transformers", *FORBIDDEN])
    assert {name: found for name, found in report.items() if found} == {}


def test_the_probe_sees_an_import():
    # Not vacuous: a module that does import grpc is reported.
    pytest.importorskip("grpc")
    assert probe(["json", "grpc"]) == {"json": [], "grpc": ["grpc"]}
