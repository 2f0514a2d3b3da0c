"""The feature draft worker (workers/feature_draft.py): after any sequence of commits (each
with the target's features of the positions before its tokens), a propose drafts what the head
drafts from scratch on the committed prefix; lagging features are refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pairs.feature_eval import head_chain
from pairs.feature_recipe import last_layer_features, new_head
from tests.tiny_models import make_model
from workers.batch import PrefillRow, ProposeRow
from workers.feature_draft import FeatureDraftWorker
from workers.types import SamplingParams
from workers.wire import pack_features


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("feature_draft")
    path = make_model(base / "target", seed=3)
    target = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    head = new_head(target, torch.arange(0, 96, 2)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    head.save(base / "head", target=str(path))
    seq = torch.randint(2, 96, (60,), generator=torch.Generator().manual_seed(1))
    # bfloat16 on the wire: the oracle reads the features as they arrive
    feats = last_layer_features(target, seq[None])[0].to(torch.bfloat16).float()
    return base / "head", path, seq, feats


def test_drafts_after_commits_equal_drafts_from_scratch(setup):
    head_dir, target_path, seq, feats = setup
    worker = FeatureDraftWorker.from_path(head_dir, target_path)
    n = 12
    tokens = seq[:n].tolist()
    assert worker.prefill_batch([PrefillRow("s", tokens, SamplingParams())]) == [None]
    # the target's prefill: the first token and the prompt's n features come with propose #1
    commit, fs = [int(seq[n])], feats[:n]
    c = n
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        row = ProposeRow("s", c, 3, commit=commit, commit_features=pack_features(fs))
        (prop,) = worker.propose_batch([row])
        c += len(commit)
        assert prop.start == c and prop.drafter == "feature"
        assert prop.tokens == head_chain(worker.head, seq, feats, c - 2, 3)
        a = int(torch.randint(0, 4, (1,), generator=gen))  # accepted; then one more token
        commit = seq[c : c + a + 1].tolist()
        fs = feats[c - 1 : c + a]  # the fed and committed positions' features
    assert worker.kv_tokens <= c + 3


def test_lagging_or_excess_features_are_refused_by_name(setup):
    head_dir, target_path, seq, feats = setup
    worker = FeatureDraftWorker.from_path(head_dir, target_path)
    worker.prefill_batch([PrefillRow("s", seq[:8].tolist(), SamplingParams())])
    short = ProposeRow("s", 8, 2, commit=[int(seq[8])], commit_features=pack_features(feats[:5]))
    (err,) = worker.propose_batch([short])
    assert isinstance(err, ValueError) and "commit_features" in str(err)
    # the commit stays applied: the missing features alone complete the row
    rest = ProposeRow("s", 9, 2, commit_features=pack_features(feats[5:8]))
    (prop,) = worker.propose_batch([rest])
    assert prop.tokens == head_chain(worker.head, seq, feats, 7, 2)
    too_many = ProposeRow("s", 9, 2, commit_features=pack_features(feats[8:10]))
    (err,) = worker.propose_batch([too_many])
    assert isinstance(err, ValueError) and "at most 8" in str(err)
    (err,) = worker.propose_batch([ProposeRow("s", 9, 2, commit_features=b"\x00junk")])
    assert isinstance(err, ValueError) and "commit_features" in str(err)


def test_sampled_drafts_carry_a_normalized_q_inside_the_heads_vocabulary(setup):
    head_dir, target_path, seq, feats = setup
    worker = FeatureDraftWorker.from_path(head_dir, target_path)
    params = SamplingParams(temperature=0.9, seed=4)
    worker.prefill_batch([PrefillRow("s", seq[:10].tolist(), params)])
    row = ProposeRow("s", 10, 4, commit=[int(seq[10])], commit_features=pack_features(feats[:10]))
    (prop,) = worker.propose_batch([row])
    assert prop.q is not None and prop.q.indices.shape[0] == len(prop.tokens) == 4
    torch.testing.assert_close(prop.q.probs.sum(-1), torch.ones(4))
    allowed = set(worker.head.head_ids.tolist())
    assert set(prop.tokens) <= allowed
    assert all(prop.q.prob_of(torch.tensor(prop.tokens)) > 0)
