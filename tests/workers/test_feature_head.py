"""The feature head (workers/checkpoints/feature_head.py): what it saves is what it loads, and a
draft through its KV cache, rolled back, equals a draft from scratch."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from pairs.feature_eval import head_chain
from pairs.feature_recipe import last_layer_features, new_head
from tests.tiny_models import make_model
from workers.checkpoints.feature_head import is_feature_head, load_feature_head


def _setup(tmp_path):
    path = make_model(tmp_path / "target", seed=3)
    target = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    head = new_head(target, torch.arange(0, 96, 2)).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # off the pass-through start, so the layer matters
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(2, 96, (1, 24))
    return path, target, head, ids


def test_a_saved_head_loads_with_its_targets_parts(tmp_path):
    path, target, head, ids = _setup(tmp_path)
    feats = last_layer_features(target, ids)
    head.save(tmp_path / "head", target=str(path))
    assert is_feature_head(tmp_path / "head") and not is_feature_head(path)
    loaded = load_feature_head(tmp_path / "head", path)
    pos = torch.arange(1, 24)[None]
    with torch.no_grad():
        want = head.logits(head(ids[:, 1:], feats[:, :-1], pos))
        got = loaded.logits(loaded(ids[:, 1:], feats[:, :-1], pos))
    # saved in bfloat16: the trained weights are rounded once
    assert torch.allclose(got, want, atol=0.05, rtol=0.05)
    assert torch.equal(loaded.head_ids, head.head_ids)


def test_drafting_through_the_cache_after_a_rollback_equals_drafting_from_scratch(tmp_path):
    _, target, head, ids = _setup(tmp_path)
    feats = last_layer_features(target, ids)[0]
    ids = ids[0]
    fresh = head_chain(head, ids, feats, 15, 4)
    # One cache: the prefix to position 13, a wrong guess drafted on, rolled back, then on.
    cache = DynamicCache()
    with torch.no_grad():
        head(ids[1:14][None], feats[:13][None], torch.arange(1, 14)[None], past=cache)
        head(ids[14:17][None], feats[13:16][None] * 0.5, torch.arange(14, 17)[None], past=cache)
        cache.crop(-3)  # roll back the 3 guessed positions: 1..13 stay
        fp = head(ids[14:17][None], feats[13:16][None], torch.arange(14, 17)[None], past=cache)
        out = []
        tok, f, pos = ids[16:17][None], fp[:, -1:], torch.tensor([[16]])
        # the fresh chain's first token comes from f' at position t+1 = 16
        out.append(int(head.head_ids[head.logits(fp[:, -1:])[0, -1].argmax()]))
        for _ in range(3):
            tok = torch.tensor([[out[-1]]])
            pos = pos + 1
            f = head(tok, f, pos, past=cache)[:, -1:]
            out.append(int(head.head_ids[head.logits(f)[0, -1].argmax()]))
    assert out == fresh
