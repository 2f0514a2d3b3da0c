"""`specdec models`: the named pairs and their local paths, and the exact --json shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import build_parser, main, up_config
from workers.checkpoints import registry, smollm2


def _default_available() -> bool:
    return registry.get_pair().available() or smollm2.is_converted()


@pytest.mark.skipif(not _default_available(), reason="the default pair is not available here")
def test_models_json_is_exactly_default_and_pairs(capsys):
    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"default", "pairs"}
    assert data["default"] == registry.default_pair_name() and data["default"] in data["pairs"]
    assert set(data["pairs"]) >= {registry.STDLIB, registry.SMOLLM2}
    for paths in data["pairs"].values():
        assert set(paths) == {"target", "draft"}
        assert all(Path(p).is_absolute() for p in paths.values())
    # The default is usable once the command returns (converted first if needed).
    default = data["pairs"][data["default"]]
    assert (Path(default["target"]) / "config.json").is_file()


def test_models_lists_every_pair_with_its_paths(capsys):
    assert main(["models"]) == 0 or not _default_available()
    out = capsys.readouterr().out
    for name in registry.PAIRS:
        assert name in out
    assert str(registry.PAIRS[registry.STDLIB].draft()) in out


def test_a_pair_name_is_a_model_for_up_and_the_config():
    args = build_parser().parse_args(["up", "--pair", registry.STDLIB])
    cfg = up_config(args)
    assert cfg.models.target == cfg.models.draft == registry.STDLIB
    assert cfg.models.target_path() == registry.PAIRS[registry.STDLIB].target()
    args = build_parser().parse_args(["up", "--target", registry.STDLIB, "--draft", "/x/d"])
    cfg = up_config(args)
    assert cfg.models.target == registry.STDLIB and cfg.models.draft == "/x/d"
