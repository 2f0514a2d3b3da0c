"""Worker gRPC servers (workers.server) as local subprocesses, for benchmarks and tests.

Each process prints its bound port on its first stdout line when it is ready to serve.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

START_TIMEOUT_S = 120.0
REPO_ROOT = Path(__file__).resolve().parents[2]  # cluster/routing/ -> the checkout


def server_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(threads or 1),
        PYTHONUNBUFFERED="1",
    )
    return env


class ServerProcess:
    """A server subprocess (`python ARGS...`) that prints its bound port when ready."""

    def __init__(self, args: list[str], name: str, *, threads: int = 1) -> None:
        self.name = name
        self.popen = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO_ROOT,
            env=server_env(threads),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr_tail: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        self.port: int | None = None

    def _drain_stderr(self) -> None:
        for line in self.popen.stderr:
            self.stderr_tail = (self.stderr_tail + [line])[-40:]

    def _read_stdout(self) -> None:
        for line in self.popen.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> ServerProcess:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            line = None
        if not line or not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"{self.name} did not start:\n{''.join(self.stderr_tail)}")
        self.port = int(line)
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()

    def stop(self) -> None:
        self.terminate()
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)


def worker_process(
    role: str, model: str | os.PathLike, *, threads: int = 1, extra: Sequence[str] = ()
) -> ServerProcess:
    """Start (not wait for) a `workers.server` process on 127.0.0.1 and a free port; `extra`:
    more of its flags (`--confidence-stop 0.4`)."""
    args = ["-m", "workers.server", "--role", role, "--model", str(model), "--port", "0", *extra]
    return ServerProcess(
        [*args, "--threads", str(threads)], f"{role} worker ({Path(model).name})", threads=threads
    )


def start_all(*procs: ServerProcess) -> list[ServerProcess]:
    """Wait for processes started together (they load in parallel); stop all on a failure."""
    try:
        return [p.wait_ready() for p in procs]
    except BaseException:
        stop_all(procs)
        raise


def stop_all(procs) -> None:
    """SIGTERM every process first, then wait: they shut down in parallel."""
    for p in procs:
        p.terminate()
    for p in procs:
        p.stop()
