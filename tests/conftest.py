"""Test-wide settings: offline HF, one torch thread per process (the box has 2 cores)."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests that leave the models to the default get the small stdlib pair (fast); the SmolLM2 pair's
# tests name it. Inherited by the Ray and `specdec` processes the tests start.
os.environ.setdefault("SPECDEC_PAIR", "stdlib")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


# Leave without the interpreter's teardown once pytest is done. With torch, grpc and Ray loaded
# in one process the teardown of their native threads segfaulted now and then (seen in CI after
# "N passed"), turning a green run red; every fixture has already shut its servers and Ray down.
_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus) -> None:
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    if _exit_status and not os.environ.get("SPECDEC_TEST_NORMAL_EXIT"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[-1])
