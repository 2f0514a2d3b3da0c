"""The feature draft (a head over the target's features) through the in-process engine: greedy
output is the target's own (HF `generate`), the features reach the draft in step every round
(no draft failures: a lagging row would be refused), nothing drafts ahead, nothing leaks."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.engine import SpecEngine
from cluster.scheduling.policy import Drafter, PolicyConfig, SpecMode
from tests.cluster.test_engine_greedy import hf_greedy
from tests.feature_heads import trained_head
from tests.tiny_models import make_model
from workers.types import SamplingParams

PROMPTS = ["def f(x):", "abc", "class Node:", "hello world"]
MAX_NEW = 24


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine_feature")
    target = make_model(d / "target", seed=0)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    head = trained_head(target, d / "head")  # accepts some, rejects some
    eng = SpecEngine.from_paths(target, head, policy=PolicyConfig(drafter=Drafter.MODEL))
    yield eng, model
    eng.close()


@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_with_the_feature_draft_is_the_targets_own(engine, k, pipelined):
    eng, model = engine
    assert eng.scheduler.options.draft_features
    proposed = accepted = 0
    for prompt in PROMPTS:
        res = eng.generate(
            prompt, max_new_tokens=MAX_NEW, mode=SpecMode.ON, k=k, pipelined=pipelined
        )
        assert res.token_ids == hf_greedy(model, eng.encode(prompt), MAX_NEW), prompt
        assert res.stats.rounds > 0 and res.stats.draft_failures == 0
        assert res.stats.pipeline_hits == res.stats.pipeline_misses == 0
        proposed += res.stats.draft_tokens
        accepted += res.stats.accepted_tokens
    assert 0 < accepted < proposed  # both paths of the acceptance rule ran
    assert eng.target.worker.live_sequences == 0 and eng.draft.worker.live_sequences == 0


def test_seeded_sampling_with_the_feature_draft_repeats(engine):
    eng, _ = engine
    params = SamplingParams(temperature=0.8, seed=7)
    runs = [
        eng.generate("abc", max_new_tokens=MAX_NEW, sampling=params, mode=SpecMode.ON, k=3)
        for _ in range(2)
    ]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].stats.rounds > 0 and runs[0].stats.draft_failures == 0
