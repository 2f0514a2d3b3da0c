"""Sampling through the batched path: many sampled requests share one batch (one batched propose,
one batched verify a step), and the tokens they emit are distributed exactly as the target's own
warped distribution p. The oracle is p computed from the target alone (HF forward + the same
temperature / top-k / top-p warp); the check is the TV distance bound of the verifier's own
distribution tests. Run on tiny random models (p spread wide; a model draft, and a feature head
whose vocabulary is half the target's) and on the SmolLM2-135M-Instruct
pair (a real target and its distilled reduced-vocabulary draft, whose q is sparse), and on the
tiny pair in bfloat16 with compiled forwards (`models.compile: on`) against HF in bfloat16."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.engine import SpecEngine
from cluster.scheduling.policy import SpecMode
from tests.tiny_models import make_model
from tests.workers.test_verification import tv, tv_threshold
from workers.checkpoints import registry
from workers.draft_loading import load_draft
from workers.sampling import warp_probs
from workers.target import TargetWorker
from workers.types import SamplingParams

PROMPTS = ["def f(x):", "class Stack:\n    pass"]  # interleaved: a mixed-up row would show
PARAMS = SamplingParams(temperature=1.3, top_k=40, top_p=0.95)
SMOLLM2 = registry.PAIRS[registry.SMOLLM2]
# samples (sequences of two tokens) per pair: the real pair's steps cost ~10x the tiny ones'
SAMPLES = {"tiny": 3000, "tiny-feature": 3000, "smollm2": 1500}
SAMPLES |= {"tiny-bf16": 3000, "tiny-bf16-compiled": 3000}


@pytest.fixture(
    scope="module",
    params=[
        "tiny",
        "tiny-feature",
        "tiny-bf16",  # ragged steps packed: projections and MLP over the real tokens only
        "tiny-bf16-compiled",
        pytest.param(
            "smollm2",
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(not SMOLLM2.available(), reason="SmolLM2 is not available"),
            ],
        ),
    ],
)
def setup(request, tmp_path_factory):
    if request.param == "tiny":
        d = tmp_path_factory.mktemp("batched_sampling")
        # Small logits (no x8 head here) so that p spreads over many tokens.
        make_model(d / "target", seed=0)
        make_model(d / "draft", seed=2)
        target, draft = d / "target", d / "draft"
    elif request.param == "tiny-feature":  # a head over the target's features, half the words
        from pairs.feature_recipe import new_head

        d = tmp_path_factory.mktemp("batched_sampling_feature")
        target = make_model(d / "target", seed=0)
        model = AutoModelForCausalLM.from_pretrained(target, local_files_only=True).eval()
        new_head(model, torch.arange(0, 96, 2)).save(d / "head", target=str(target))
        draft = d / "head"
    elif request.param.startswith("tiny-bf16"):  # as `models.dtype: bfloat16` serves
        d = tmp_path_factory.mktemp("batched_sampling_bf16")
        make_model(d / "target", seed=0)
        make_model(d / "draft", seed=2)
        target, draft = d / "target", d / "draft"
    else:
        target, draft = SMOLLM2.target(), SMOLLM2.draft()
    if request.param == "tiny-bf16-compiled":
        runner = {"dtype": torch.bfloat16, "forward": "lean", "compile": "on"}
        engine = SpecEngine(TargetWorker.from_path(target, **runner), load_draft(draft, **runner))
        assert engine.target.worker.runner.forward == "lean+compiled"
        # The oracle in the served dtype: losslessness is against the target as it runs.
        dtype = torch.bfloat16
    else:
        engine = SpecEngine.from_paths(target, draft)
        dtype = torch.float32
    hf = AutoModelForCausalLM.from_pretrained(target, local_files_only=True, dtype=dtype).eval()
    yield engine, hf, SAMPLES[request.param]
    engine.close()


def exact_first_two(hf, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """p(first token) and the marginal p(second token) = sum_a p(a) p(. | a), from the target
    (summed over the first token's support only: top-k keeps it small whatever the vocabulary)."""
    with torch.inference_mode():
        logits = hf(torch.tensor([ids])).logits[0, -1].float()
        p0 = warp_probs(logits, PARAMS).double()
        support = torch.nonzero(p0).flatten().tolist()
        batch = torch.tensor([ids + [a] for a in support])
        p1 = warp_probs(hf(batch).logits[:, -1].float(), PARAMS).double()  # [support, V]
    return p0, (p0[support].unsqueeze(1) * p1).sum(0)


def test_batched_sampling_emits_the_targets_distribution(setup):
    engine, hf, N = setup
    exact = {p: exact_first_two(hf, engine.encode(p)) for p in PROMPTS}
    got: dict[str, tuple[list[int], list[int]]] = {p: ([], []) for p in PROMPTS}
    lock = threading.Lock()

    def one(seed: int) -> None:
        prompt = PROMPTS[seed % 2]
        res = engine.generate(
            prompt,
            max_new_tokens=2,
            sampling=SamplingParams(PARAMS.temperature, PARAMS.top_k, PARAMS.top_p, seed=seed),
            mode=SpecMode.ON,
            k=1 + seed % 3,  # ragged k inside one batch
        )
        with lock:
            got[prompt][0].append(res.token_ids[0])
            if len(res.token_ids) > 1:
                got[prompt][1].append(res.token_ids[1])

    max_batch = 0
    for wave in range(0, N, 50):  # 50 concurrent requests at a time share the batch
        threads = [threading.Thread(target=one, args=(s,)) for s in range(wave, wave + 50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        max_batch = max(max_batch, engine.scheduler.max_batch)
    assert max_batch > 8  # the samples really came out of shared batches
    runner = engine.target.worker.runner
    if runner.dtype == torch.bfloat16 and runner.lean.compiled is None:
        assert runner.packed_steps > 10  # ragged k: the target's passes ran packed
    for prompt, (p0, p1) in exact.items():
        firsts, seconds = got[prompt]
        vocab = p0.shape[0]
        emp0 = torch.bincount(torch.tensor(firsts), minlength=vocab).double() / len(firsts)
        emp1 = torch.bincount(torch.tensor(seconds), minlength=vocab).double() / len(seconds)
        assert tv(emp0, p0) < tv_threshold(len(firsts), int((p0 > 0).sum())), prompt
        assert tv(emp1, p1) < tv_threshold(len(seconds), int((p1 > 0).sum())), prompt
        # Masks are never violated: nothing outside top-k / top-p is ever emitted.
        assert all(p0[t] > 0 for t in firsts)
    # Not vacuous: the two prompts' distributions are far apart at this sample size.
    (a0, _), (b0, _) = exact.values()
    assert tv(a0, b0) > 2 * tv_threshold(N // 2, int((a0 > 0).sum()))
