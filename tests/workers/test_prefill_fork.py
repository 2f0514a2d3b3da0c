"""n samples of one prompt: a prefill row that forks an earlier row of the same call copies its
KV (the prompt is computed once) and draws its own first token; the copy then decodes exactly
as a sequence prefilled on its own would."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import make_model
from workers.batch import PrefillRow, VerifyRow
from workers.batch_kv import BatchedKV
from workers.target import TargetWorker
from workers.types import SamplingParams


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("fork") / "target", seed=6, layers=2)


def test_kv_fork_copies_a_prefix_and_counts_it(path):
    worker = TargetWorker.from_path(path)
    kv: BatchedKV = worker.runner.kv
    worker.runner.extend_batch([("a", [4, 9, 12, 30, 7])])
    held = kv.kv_tokens
    worker.runner.fork("a", "b", 3)
    assert kv.length("b") == 3 and kv.kv_tokens == held + 3
    with pytest.raises(ValueError, match="fork"):
        worker.runner.fork("a", "c", 9)
    # b decodes its next tokens as a fresh sequence holding the same three would
    worker.runner.extend_batch([("fresh", [4, 9, 12])])
    got = worker.runner.extend_batch([("b", [40, 41]), ("fresh", [40, 41])])
    torch.testing.assert_close(got[0], got[1], atol=1e-5, rtol=1e-5)


def test_forked_rows_share_the_prompts_prefill_and_sample_on_their_own(path):
    worker = TargetWorker.from_path(path)
    prompt = [5, 17, 40, 2, 9, 33, 60]
    params = [SamplingParams(temperature=1.0, seed=s) for s in (1, 2, 3, 4)]
    rows = [PrefillRow("s0", prompt, params[0])] + [
        PrefillRow(f"s{i}", prompt, params[i], fork_of="s0") for i in (1, 2, 3)
    ]
    before = worker.prefilled_tokens
    firsts = worker.prefill_batch(rows)
    assert worker.prefilled_tokens - before == len(prompt)  # computed once
    # Each forked row goes on exactly as the same request prefilled alone.
    alone = TargetWorker.from_path(path)
    for i in (1, 3):
        (own,) = alone.prefill_batch([PrefillRow("x", prompt, params[i])])
        assert own == firsts[i]
        mine, theirs = [*prompt, firsts[i]], [*prompt, own]
        for _ in range(4):
            v1 = worker.verify_batch([VerifyRow(f"s{i}", len(mine))])[0]
            v2 = alone.verify_batch([VerifyRow("x", len(theirs))])[0]
            assert v1.token == v2.token
            mine.append(v1.token)
            theirs.append(v2.token)
        alone.release("x")
    # A fork whose source is not in the call, or has other tokens, is computed.
    before = worker.prefilled_tokens
    worker.prefill_batch([PrefillRow("t", prompt[:4], params[0], fork_of="s0")])
    assert worker.prefilled_tokens - before == 4
