"""Processing the target's logits by the text so far: each row of a verify pass is processed
exactly as a plain step after that row's own prefix would be, and each processor is HF's (where
HF has it) or OpenAI's formula. The target worker samples the processed distribution."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
)

from tests.tiny_models import make_model
from workers.batch import PrefillRow, VerifyRow
from workers.logits_processing import process_logits, with_held_ids
from workers.sampling import warp_probs
from workers.target import TargetWorker
from workers.types import SamplingParams

V = 50
GEN = torch.Generator().manual_seed(0)
HISTORY = torch.randint(0, V, (12,), generator=GEN).tolist()
PROMPT_LEN = 7
BLOCK = torch.randint(0, V, (4,), generator=GEN).tolist()
LOGITS = torch.randn(5, V, generator=GEN) * 3

ALL_ON = SamplingParams(
    presence_penalty=0.7,
    frequency_penalty=-0.4,
    repetition_penalty=1.6,
    logit_bias=((3, 5.0), (9, -100.0)),
    min_tokens=7,
    held_ids=(0, 4),
)


@pytest.mark.parametrize("params", [ALL_ON, SamplingParams(repetition_penalty=0.5)])
def test_each_row_is_processed_as_a_plain_step_after_its_own_prefix(params):
    rows = process_logits(LOGITS, HISTORY, PROMPT_LEN, BLOCK, params)
    for i in range(LOGITS.shape[0]):
        alone = process_logits(LOGITS[i : i + 1], HISTORY + BLOCK[:i], PROMPT_LEN, (), params)
        torch.testing.assert_close(rows[i], alone[0])


def test_repetition_penalty_is_hfs_over_prompt_and_output():
    params = SamplingParams(repetition_penalty=1.6)
    rows = process_logits(LOGITS, HISTORY, PROMPT_LEN, BLOCK, params)
    hf = RepetitionPenaltyLogitsProcessor(1.6)
    for i in range(LOGITS.shape[0]):
        ids = torch.tensor([HISTORY + BLOCK[:i]])
        torch.testing.assert_close(rows[i], hf(ids, LOGITS[i : i + 1].clone())[0])


def test_presence_frequency_bias_and_min_tokens_are_openais_formulas():
    rows = process_logits(LOGITS, HISTORY, PROMPT_LEN, BLOCK, ALL_ON)
    for i in range(LOGITS.shape[0]):
        output = HISTORY[PROMPT_LEN:] + BLOCK[:i]
        want = LOGITS[i].clone()
        want[3] += 5.0
        want[9] -= 100.0
        if len(output) < ALL_ON.min_tokens:
            want[[0, 4]] = float("-inf")
        seen = torch.zeros(V, dtype=torch.bool)
        seen[HISTORY + BLOCK[:i]] = True
        want = torch.where(seen, torch.where(want > 0, want / 1.6, want * 1.6), want)
        counts = torch.bincount(torch.tensor(output), minlength=V).float()
        want -= -0.4 * counts + 0.7 * (counts > 0).float()
        torch.testing.assert_close(rows[i], want)
    held = rows[:, [0, 4]]  # 5 output tokens before row 0: rows 0 and 1 are held back
    assert torch.isinf(held[:2]).all() and torch.isfinite(held[2:]).all()


def test_min_p_is_hfs_after_temperature():
    params = SamplingParams(temperature=0.7, min_p=0.2)
    scores = TemperatureLogitsWarper(0.7)(None, LOGITS.clone())
    scores = MinPLogitsWarper(0.2)(None, scores)
    torch.testing.assert_close(warp_probs(LOGITS, params), scores.softmax(-1))


def test_nothing_to_process_is_the_logits_themselves_and_held_ids_need_min_tokens():
    assert process_logits(LOGITS, HISTORY, PROMPT_LEN, BLOCK, SamplingParams()) is LOGITS
    assert with_held_ids(SamplingParams(), {0}).held_ids == ()
    assert with_held_ids(SamplingParams(min_tokens=2), {4, 0}).held_ids == (0, 4)
    assert not SamplingParams(min_tokens=3).processed  # nothing to hold back


@pytest.mark.parametrize(
    "kw",
    [
        {"presence_penalty": 2.5},
        {"frequency_penalty": float("nan")},
        {"repetition_penalty": 0.0},
        {"min_p": 1.5},
        {"logit_bias": ((3, 101.0),)},
        {"logit_bias": ((-1, 1.0),)},
        {"min_tokens": -1},
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingParams(**kw)


@pytest.fixture(scope="module")
def target_path(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("processing") / "target", seed=9, layers=2)


def test_the_target_samples_the_processed_distribution_under_speculation(target_path):
    """The token after the first, verified from a one-hot block, over many seeds: its marginal
    is the processed target's, sum over t1 of p(t1) p(t2 | t1), each processed by its prefix (a
    strong frequency penalty and a bias make it far from the unprocessed one)."""
    from transformers import AutoModelForCausalLM

    worker = TargetWorker.from_path(target_path)
    model = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    prompt = [5, 17, 40, 2]
    base = SamplingParams(temperature=1.0, frequency_penalty=2.0, logit_bias=((7, 3.0),))
    vocab = worker.runner.vocab_size
    with torch.inference_mode():
        first = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1], -1)
        p1 = warp_probs(process_logits(first.view(1, -1), prompt, 4, (), base), base)[0]
        seqs = torch.tensor([[*prompt, t] for t in range(vocab)])
        after = model(seqs).logits[:, -1]
    p2 = torch.zeros(vocab)
    for t in range(vocab):
        row = process_logits(after[t : t + 1], [*prompt, t], 4, (), base)
        p2 += p1[t] * warp_probs(row, base)[0]
    plain2 = (p1.unsqueeze(1) * torch.softmax(after, -1)).sum(0)
    n = 6000  # TV noise ~0.04 over 96 tokens
    counts = torch.zeros(vocab)
    for seed in range(n):
        params = SamplingParams(
            temperature=1.0, frequency_penalty=2.0, logit_bias=((7, 3.0),), seed=seed
        )
        t1 = worker.prefill_batch([PrefillRow("s", prompt, params, prompt_len=4)])[0]
        verdict = worker.verify_batch([VerifyRow("s", 5, [7], one_hot=True)])[0]
        counts[verdict.committed([7])[0]] += 1
        worker.release("s")
        assert isinstance(t1, int)
    empirical = counts / n
    tv = 0.5 * (empirical - p2).abs().sum()
    assert tv < 0.07, tv
    assert 0.5 * (empirical - plain2).abs().sum() > 0.12  # a missed processing would show
