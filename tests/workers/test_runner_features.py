"""The target's features (the last decoder layer's output, before the final norm) as the runner
hands them out equal a from-scratch forward's at those positions, through rollbacks, joins and
leaves of batch rows, on both forwards."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pairs.feature_recipe import last_layer_features
from tests.tiny_models import make_model
from workers.model_runner import ModelRunner


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("feat") / "target", seed=11, layers=3)


@pytest.mark.parametrize("forward", ["lean", "hf"])
def test_features_equal_a_from_scratch_forward_through_rollbacks_joins_and_leaves(path, forward):
    runner = ModelRunner(path, forward=forward)
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    seqs: dict[str, list[int]] = {}

    def new(n: int) -> list[int]:
        return torch.randint(2, 96, (n,), generator=gen).tolist()

    def step(work: dict[str, list[int]], last: bool = False) -> None:
        items = list(work.items())
        logits, feats = runner.extend_batch_features(items, last=last)
        for (sid, toks), f, lg in zip(items, feats, logits, strict=True):
            start = len(seqs.get(sid, []))
            seqs[sid] = seqs.get(sid, []) + toks
            ref = last_layer_features(ref_model, torch.tensor([seqs[sid]]))[0]
            assert f.shape == (len(toks), runner.hidden_size)
            torch.testing.assert_close(f, ref[start:], atol=1e-4, rtol=1e-4)
            assert lg.shape[0] == (1 if last else len(toks))

    def rollback(sid: str, n: int) -> None:
        seqs[sid] = seqs[sid][:n]
        runner.rollback(sid, n)

    step({"a": new(10), "b": new(7)}, last=True)  # two prefills in one forward
    step({"a": new(4), "b": new(4)})  # verify-sized blocks
    rollback("a", 12)
    rollback("b", 8)  # holes in the batched cache
    step({"a": new(3)})  # one row of two
    runner.release("b")
    seqs.pop("b")
    step({"a": new(1), "c": new(5)})  # a join beside a decoding row
    step({"c": new(2), "a": new(2)})
