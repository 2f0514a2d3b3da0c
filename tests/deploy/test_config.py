"""The cluster configuration: defaults, strictness (unknown keys are named), derived values."""

from __future__ import annotations

import json

import pytest

from cluster.config import ClusterConfig, ConfigError
from cluster.config_checks import check_models, check_tp_divides
from tests.tiny_models import make_model


def test_defaults_are_valid_and_round_trip():
    cfg = ClusterConfig.load(None)
    assert cfg.target.tp_size == 1 and cfg.draft.replicas == 1
    assert cfg.draft.pool.resource == "draft_pool" and cfg.target.pool.resource == "target_pool"
    assert ClusterConfig.load(cfg.to_args()) == cfg
    assert cfg.speculation.policy().max_draft_tokens == cfg.speculation.max_draft_tokens


def test_pipelined_is_true_false_or_auto():
    for value in (True, False, "auto"):
        spec = ClusterConfig.load({"speculation": {"pipelined": value}}).speculation
        assert spec.pipelined == value
    with pytest.raises(ConfigError, match="speculation.pipelined"):
        ClusterConfig.load({"speculation": {"pipelined": "sometimes"}})


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"target": {"tp_sise": 2}}, "target.tp_sise: unknown key (allowed: replicas, tp_size"),
        ({"draftt": {}}, "draftt: unknown key (allowed: models, draft, target"),
        ({"draft": {"pool": {"resource": "x", "gpus": 1}}}, "draft.pool.gpus: unknown key"),
        ({"speculation": {"k": 9}}, "k must be in [0, max_draft_tokens=8], got 9"),
        ({"speculation": {"pipelined": "sometimes"}}, "speculation.pipelined"),
        ({"target": {"backend": "nccl"}}, "backend 'nccl' needs GPUs"),
        ({"draft": {"pool": {"resource": "target_pool"}}}, "must differ"),
        ({"limits": {"max_new_tokens": 0}}, "limits.max_new_tokens"),
        ({"target": {"placement_strategy": "TIGHT"}}, "target.placement_strategy"),
        ({"draft": {"confidence_stop": 1.0}}, "draft.confidence_stop"),
    ],
)
def test_bad_configs_name_the_key(args, needle):
    with pytest.raises(ConfigError) as err:
        ClusterConfig.load(args)
    assert needle in str(err.value)


def test_overrides_and_required_resources():
    cfg = ClusterConfig.load({"draft": {"replicas": 2}}).with_overrides(
        {"target.tp_size": 2, "target.replicas": 2, "ingress.num_cpus": 0}
    )
    assert cfg.required_resources() == {"CPU": 6.0, "target_pool": 4.0, "draft_pool": 2.0}
    with pytest.raises(ConfigError, match="target.tp_size"):
        cfg.with_overrides({"target.tp_size": 0})


def test_missing_models_and_tp_divisibility(tmp_path):
    cfg = ClusterConfig.load({"models": {"target": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match="models.target: no Hugging Face checkpoint"):
        check_models(cfg)
    path = make_model(tmp_path / "t", seed=0)  # 4 heads, 2 kv heads, MLP 64
    check_tp_divides(path, 2)
    with pytest.raises(ConfigError, match="num_key_value_heads=2"):
        check_tp_divides(path, 4)
    assert json.loads((path / "config.json").read_text())["num_attention_heads"] == 4


def test_confidence_stop_defaults_to_the_drafts_pair(tmp_path):
    from workers.checkpoints.registry import PAIRS, SMOLLM2, STDLIB

    assert ClusterConfig.load({"models": {"target": SMOLLM2}}).confidence_stop() == 0.4
    assert PAIRS[SMOLLM2].confidence_stop == 0.4
    assert ClusterConfig.load({"models": {"target": STDLIB}}).confidence_stop() == 0.0
    by_path = {"target": str(tmp_path / "t"), "draft": str(tmp_path / "d")}
    assert ClusterConfig.load({"models": by_path}).confidence_stop() == 0.0
    given = {"models": {"target": SMOLLM2}, "draft": {"confidence_stop": 0.0}}
    assert ClusterConfig.load(given).confidence_stop() == 0.0  # set: the setting wins
