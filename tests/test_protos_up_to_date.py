"""The checked-in stubs are what `python -m protos.build` generates from the .proto files."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_match_the_protos():
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) builds the stubs")
    done = subprocess.run(
        [sys.executable, "-m", "protos.build", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_stubs_import_from_the_package():
    from protos import specdec_pb2, specdec_pb2_grpc, worker_pb2, worker_pb2_grpc

    assert specdec_pb2.DESCRIPTOR.package == "specdec.v1"
    assert worker_pb2.DESCRIPTOR.package == "specdec.worker.v1"
    assert hasattr(specdec_pb2_grpc, "add_SpecDecodeServicer_to_server")
    assert hasattr(worker_pb2_grpc, "add_TargetWorkerServicer_to_server")
