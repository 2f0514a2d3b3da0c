"""Greedy speculative decoding through the in-process engine is exactly the target's own greedy
decoding, and both equal `transformers`' `generate(do_sample=False)` on the target.

Tiny random-weight Llamas (tests/tiny_models.py): a target, a draft with other weights (it almost
never agrees with the target) and the target itself as its own draft (it agrees with everything).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.engine import SpecEngine
from cluster.scheduling.lookup import LookupConfig
from cluster.scheduling.policy import Drafter, PolicyConfig, SpecMode
from cluster.scheduling.rounds import FinishReason
from tests.tiny_models import make_model
from workers.sampling import warp_probs
from workers.types import SamplingParams

PROMPTS = ["def f(x):", "abc", "class Node:", "hello world"]
MAX_NEW = 24
KS = [1, 2, 4, 8]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine_greedy")
    make_model(d / "target", seed=0)
    make_model(d / "draft", seed=1)
    return d


@pytest.fixture(scope="module")
def hf_target(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir / "target", local_files_only=True).eval()


def hf_greedy(model, ids: list[int], max_new_tokens: int, **processing) -> list[int]:
    """HF's greedy decoding; `processing`: its logits processors' arguments
    (repetition_penalty, min_new_tokens, sequence_bias, ...)."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            **processing,
        )
    return out[0, len(ids) :].tolist()


# These engines draft with the model only: the tests below pin what the model draft's blocks do
# (their k, their acceptance). Drafting by lookup has its own tests at the end.
MODEL_ONLY = PolicyConfig(drafter=Drafter.MODEL)


@pytest.fixture(scope="module")
def bad_engine(model_dir):
    engine = SpecEngine.from_paths(model_dir / "target", model_dir / "draft", policy=MODEL_ONLY)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def self_engine(model_dir):
    engine = SpecEngine.from_paths(model_dir / "target", model_dir / "target", policy=MODEL_ONLY)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference(bad_engine, hf_target):
    """prompt -> HF greedy continuation of MAX_NEW tokens (stopping at the target's EOS)."""
    return {p: hf_greedy(hf_target, bad_engine.encode(p), MAX_NEW) for p in PROMPTS}


def assert_no_live(engine: SpecEngine) -> None:
    target, draft = engine.target.worker, engine.draft.worker
    assert target.live_sequences == 0 and target.runner.live_sequences == 0
    assert draft.live_sequences == 0 and draft.runner.live_sequences == 0


def expected_finish(ref: list[int], eos: set[int]) -> FinishReason:
    return FinishReason.EOS if ref and ref[-1] in eos else FinishReason.LENGTH


def test_reference_covers_eos_and_full_length(reference, bad_engine):
    # The prompts exercise both endings: some run to max_new_tokens, at least one stops at EOS.
    eos = bad_engine.target.worker.runner.eos_token_ids
    assert eos == {0}
    assert any(len(r) == MAX_NEW and not set(r) & eos for r in reference.values())
    assert any(r and r[-1] in eos and len(r) < MAX_NEW for r in reference.values())


@pytest.mark.parametrize("prompt", PROMPTS)
def test_plain_mode_equals_hf_generate(bad_engine, reference, prompt):
    res = bad_engine.generate(prompt, max_new_tokens=MAX_NEW, mode=SpecMode.OFF)
    assert res.token_ids == reference[prompt]
    assert res.finish_reason is expected_finish(reference[prompt], {0})
    assert res.stats.rounds == 0 and res.stats.plain_steps == len(res.token_ids)
    assert res.prompt_tokens == len(bad_engine.encode(prompt))
    assert_no_live(bad_engine)


@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
@pytest.mark.parametrize("k", KS)
def test_disagreeing_draft_is_exact(bad_engine, reference, k, pipelined):
    proposed = accepted = 0
    for prompt in PROMPTS:
        res = bad_engine.generate(
            prompt, max_new_tokens=MAX_NEW, mode=SpecMode.ON, k=k, pipelined=pipelined
        )
        assert res.token_ids == reference[prompt], prompt
        assert res.finish_reason is expected_finish(reference[prompt], {0})
        assert res.stats.rounds > 0
        assert all(r.proposed <= k for r in res.stats.records)
        proposed += res.stats.draft_tokens
        accepted += res.stats.accepted_tokens
        if not pipelined:
            assert res.stats.pipeline_hits == res.stats.pipeline_misses == 0
        assert_no_live(bad_engine)
    assert accepted / proposed < 0.3


@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
@pytest.mark.parametrize("k", KS)
def test_target_as_draft_accepts_everything(self_engine, reference, k, pipelined):
    for prompt in PROMPTS:
        res = self_engine.generate(
            prompt, max_new_tokens=MAX_NEW, mode=SpecMode.ON, k=k, pipelined=pipelined
        )
        assert res.token_ids == reference[prompt], prompt
        assert res.stats.acceptance_rate == 1.0
        assert res.stats.draft_failures == 0
        assert_no_live(self_engine)


@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
@pytest.mark.parametrize("k", KS)
def test_tokens_per_target_pass_is_k_plus_1(self_engine, reference, hf_target, k, pipelined):
    # No EOS within the window: the prefill pass commits the first token, then every round
    # commits k+1 (max_new_tokens = 1 + a multiple of k+1).
    rounds = 3
    n = 1 + rounds * (k + 1)
    checked = 0
    for prompt in PROMPTS:
        ref = hf_greedy(hf_target, self_engine.encode(prompt), n)
        if len(ref) < n or 0 in ref:
            continue
        res = self_engine.generate(
            prompt, max_new_tokens=n, mode=SpecMode.ON, k=k, pipelined=pipelined
        )
        assert res.token_ids == ref
        assert res.finish_reason is FinishReason.LENGTH
        st = res.stats
        assert st.acceptance_rate == 1.0
        assert st.rounds == rounds and st.plain_steps == 1  # the prefill's token
        assert st.tokens_per_target_pass == n / (rounds + 1)
        assert st.mean_accepted_length == k + 1
        if pipelined:
            # Every block but the last is drafted while the one before it is verified.
            assert st.pipeline_hits == rounds - 1 and st.pipeline_misses == 0
        else:
            assert st.pipeline_hits == 0 and st.pipeline_misses == 0
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("max_new", [1, 2, 7, 11])
def test_max_new_tokens_inside_a_block(self_engine, bad_engine, reference, k, max_new):
    prompt = next(p for p in PROMPTS if len(reference[p]) == MAX_NEW and 0 not in reference[p])
    for engine in (self_engine, bad_engine):
        for pipelined in (False, True):
            res = engine.generate(
                prompt, max_new_tokens=max_new, mode=SpecMode.ON, k=k, pipelined=pipelined
            )
            assert res.token_ids == reference[prompt][:max_new]
            assert len(res.token_ids) == max_new
            assert res.finish_reason is FinishReason.LENGTH
            assert_no_live(engine)


# -- EOS and stop tokens inside a block ---------------------------------------------------------


def _stop_case(reference) -> tuple[str, int, int]:
    """(prompt, token, index of its first occurrence) with the index strictly inside a block for
    k = 4 and k = 8 when the draft accepts everything, so tokens after it were drafted and
    verified in the same pass and must be dropped."""
    for prompt, ref in reference.items():
        if len(ref) < MAX_NEW or 0 in ref:
            continue
        for i, tok in enumerate(ref):
            if 2 <= i < MAX_NEW - 4 and ref.index(tok) == i and (i + 1) % 5 and (i + 1) % 9:
                return prompt, tok, i
    raise AssertionError("no usable stop token in the reference outputs")


@pytest.fixture(scope="module")
def eos_setup(model_dir, reference):
    """The target's weights saved again with eos_token_id = a token it emits mid-output."""
    prompt, tok, idx = _stop_case(reference)
    path = make_model(model_dir / f"target_eos{tok}", seed=0, eos_token_id=tok)
    self_eng = SpecEngine.from_paths(path, path)
    bad_eng = SpecEngine.from_paths(path, model_dir / "draft")
    hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    yield prompt, tok, idx, self_eng, bad_eng, hf
    self_eng.close()
    bad_eng.close()


def test_eos_inside_a_block(eos_setup, reference):
    prompt, tok, idx, self_eng, bad_eng, hf = eos_setup
    assert self_eng.target.worker.runner.eos_token_ids == {tok}
    want = reference[prompt][: idx + 1]
    assert hf_greedy(hf, self_eng.encode(prompt), MAX_NEW) == want  # HF stops there too
    plain = self_eng.generate(prompt, max_new_tokens=MAX_NEW, mode=SpecMode.OFF)
    assert plain.token_ids == want
    for engine in (self_eng, bad_eng):
        for k in KS:
            for pipelined in (False, True):
                res = engine.generate(
                    prompt, max_new_tokens=MAX_NEW, mode=SpecMode.ON, k=k, pipelined=pipelined
                )
                assert res.token_ids == want, (k, pipelined)
                assert res.finish_reason is FinishReason.EOS
                assert_no_live(engine)
    # With the self-draft and k=8, EOS sits inside the first block: more was verified than sent.
    res = self_eng.generate(prompt, max_new_tokens=MAX_NEW, mode=SpecMode.ON, k=8)
    assert res.stats.rounds == 1 + idx // 9
    assert res.stats.accepted_tokens > idx


def test_stop_token_inside_a_block(self_engine, bad_engine, reference):
    prompt, tok, idx = _stop_case(reference)
    want = reference[prompt][: idx + 1]
    for engine in (self_engine, bad_engine):
        plain = engine.generate(
            prompt, max_new_tokens=MAX_NEW, mode=SpecMode.OFF, stop_token_ids=[tok]
        )
        assert plain.token_ids == want and plain.finish_reason is FinishReason.STOP
        for k in KS:
            for pipelined in (False, True):
                res = engine.generate(
                    prompt,
                    max_new_tokens=MAX_NEW,
                    mode=SpecMode.ON,
                    k=k,
                    pipelined=pipelined,
                    stop_token_ids=[tok],
                )
                assert res.token_ids == want, (k, pipelined)
                assert res.finish_reason is FinishReason.STOP
                assert_no_live(engine)


# -- AUTO mode, streaming, cleanup ----------------------------------------------------------------


@pytest.mark.parametrize("k", [None, 4], ids=["adaptive", "k4"])
def test_auto_mode_falls_back_to_plain_and_stays_exact(bad_engine, hf_target, k):
    prompt = "def f(x):"
    n = 48
    ref = hf_greedy(hf_target, bad_engine.encode(prompt), n)
    res = bad_engine.generate(prompt, max_new_tokens=n, mode=SpecMode.AUTO, k=k)
    assert res.token_ids == ref
    st = res.stats
    assert st.plain_steps > 0
    # It really switched: most target passes were plain steps, not just the final one.
    assert st.plain_steps > st.rounds, (st.rounds, st.plain_steps)
    assert_no_live(bad_engine)


@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
def test_stream_yields_the_same_tokens(self_engine, bad_engine, reference, pipelined):
    for engine in (self_engine, bad_engine):
        for prompt in PROMPTS:
            chunks = list(
                engine.stream(
                    prompt, max_new_tokens=MAX_NEW, mode=SpecMode.ON, k=4, pipelined=pipelined
                )
            )
            assert all(chunks)
            assert [t for c in chunks for t in c] == reference[prompt]
            assert_no_live(engine)


@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
@pytest.mark.parametrize("mode", [SpecMode.ON, SpecMode.OFF, SpecMode.AUTO])
def test_abandoned_stream_frees_every_worker(bad_engine, self_engine, reference, mode, pipelined):
    prompt = next(p for p in PROMPTS if len(reference[p]) == MAX_NEW)
    for engine in (self_engine, bad_engine):
        stream = engine.stream(prompt, max_new_tokens=MAX_NEW, mode=mode, k=2, pipelined=pipelined)
        got: list[int] = []
        for chunk in stream:
            got.extend(chunk)
            break
        stream.close()  # the row leaves the batch (or has finished), freed before this returns
        assert got and got == reference[prompt][: len(got)]
        assert_no_live(engine)
        # The engine goes on serving.
        res = engine.generate(prompt, max_new_tokens=MAX_NEW, mode=mode, k=2)
        assert res.token_ids == reference[prompt]
        assert_no_live(engine)


def test_abandoned_generation_reports_cancelled(bad_engine, reference):
    prompt = next(p for p in PROMPTS if len(reference[p]) == MAX_NEW)
    # Long enough that the consumer leaves long before the sequence could finish.
    gen = bad_engine.start(prompt, max_new_tokens=200, mode=SpecMode.ON, k=2)
    it = iter(gen)
    first = next(it)
    it.close()
    res = gen.result()
    # The batch runs ahead of a slow reader: the sequence holds what it committed until the
    # consumer left, of which the reader saw a prefix.
    assert res.finish_reason is FinishReason.CANCELLED
    assert res.token_ids[: len(first)] == first
    n = min(len(res.token_ids), MAX_NEW)
    assert res.token_ids[:n] == reference[prompt][:n]
    assert_no_live(bad_engine)


def test_concurrent_requests_share_the_workers(self_engine, bad_engine, reference):
    # Two streams interleaved on the same engine: each sequence has its own KV and state.
    for engine in (self_engine, bad_engine):
        streams = {
            p: engine.stream(p, max_new_tokens=MAX_NEW, mode=SpecMode.ON, k=3) for p in PROMPTS
        }
        got = {p: [] for p in PROMPTS}
        live = dict(streams)
        while live:
            for p, s in list(live.items()):
                chunk = next(s, None)
                if chunk is None:
                    del live[p]
                else:
                    got[p].extend(chunk)
        assert got == reference
        assert_no_live(engine)


@pytest.mark.parametrize("room", [1, 3, 6])
def test_context_limit_inside_a_block(self_engine, bad_engine, hf_target, room):
    # prompt + output never pass the target's context (256 positions), however big k is.
    ctx = self_engine.target.worker.max_context
    ids = self_engine.encode(("def f(x): return x * 2; " * 20)[: ctx - room])
    assert len(ids) == ctx - room
    ref = hf_greedy(hf_target, ids, room)
    assert 0 not in ref
    for engine in (self_engine, bad_engine):
        for k in (1, 4, 8):
            res = engine.generate(ids, max_new_tokens=20, mode=SpecMode.ON, k=k)
            assert res.token_ids == ref, k
            assert res.finish_reason is FinishReason.LENGTH
            assert_no_live(engine)
        plain = engine.generate(ids, max_new_tokens=20, mode=SpecMode.OFF)
        assert plain.token_ids == ref and plain.finish_reason is FinishReason.LENGTH


# -- sampling through the same engine (the seeded path and the masks, end to end) ---------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=3, seed=7),
        SamplingParams(temperature=0.8, top_p=0.7, seed=11),
    ],
    ids=["top_k", "top_p"],
)
def test_seeded_sampling_repeats_and_respects_the_masks(self_engine, bad_engine, hf_target, params):
    prompt = PROMPTS[0]
    ids = self_engine.encode(prompt)
    for engine in (self_engine, bad_engine):
        for k in (1, 3):
            runs = [
                engine.generate(
                    prompt,
                    max_new_tokens=MAX_NEW,
                    mode=SpecMode.ON,
                    k=k,
                    pipelined=pipelined,
                    sampling=params,
                ).token_ids
                for pipelined in (False, True, True)
            ]
            # Same seed, same k: the same tokens, whether or not the draft ran ahead.
            assert runs[0] == runs[1] == runs[2]
            out = runs[0]
            # Every token is inside the target's top-k / top-p set at its position.
            with torch.inference_mode():
                logits = hf_target(torch.tensor([ids + out])).logits[0, len(ids) - 1 : -1]
            allowed = warp_probs(logits, params) > 0
            assert allowed[torch.arange(len(out)), torch.tensor(out)].all()
            assert_no_live(engine)
    other = replace(params, seed=params.seed + 1)
    a = bad_engine.generate(prompt, max_new_tokens=MAX_NEW, mode=SpecMode.ON, k=2, sampling=params)
    b = bad_engine.generate(prompt, max_new_tokens=MAX_NEW, mode=SpecMode.ON, k=2, sampling=other)
    assert a.token_ids != b.token_ids


def test_seeded_sampling_repeats_in_auto_mode(bad_engine):
    """AUTO adapts k and falls back to plain; for a seeded request those choices must not depend
    on timing, or the same request would give different (each correctly distributed) outputs."""
    params = SamplingParams(temperature=1.0, seed=3)
    runs = {
        tuple(
            bad_engine.generate(
                PROMPTS[1], max_new_tokens=MAX_NEW, sampling=params, pipelined=pipelined
            ).token_ids
        )
        for pipelined in (False, True, False, True)
    }
    assert len(runs) == 1
    assert_no_live(bad_engine)


@pytest.fixture(scope="module")
def stopping_engine(model_dir):
    """The target drafting for itself, ending a block after a token it gave < 0.05: the tiny
    random model is that unsure of about a third of its tokens, so blocks of every length up
    to k = 4 come back."""
    engine = SpecEngine.from_paths(model_dir / "target", model_dir / "target", confidence_stop=0.05)
    yield engine
    engine.close()


@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
def test_blocks_that_end_early_stay_exact_and_are_learned(stopping_engine, reference, pipelined):
    lengths = []
    for prompt in PROMPTS:
        res = stopping_engine.generate(
            prompt, max_new_tokens=MAX_NEW, mode=SpecMode.ON, k=4, pipelined=pipelined
        )
        assert res.token_ids == reference[prompt], prompt
        lengths += [r.proposed for r in res.stats.records if r.proposed]
        assert_no_live(stopping_engine)
    assert 1 in lengths and 4 in lengths  # both stops and full blocks happened
    # The deployment's estimate of how far a block reaches follows the stops it saw.
    reach = stopping_engine.scheduler.acceptance.reach()
    assert reach[1] < 0.9 and reach[3] < reach[1]


@pytest.mark.parametrize("mode", [SpecMode.OFF, SpecMode.ON, SpecMode.AUTO])
def test_the_first_token_comes_from_the_prefill_pass(bad_engine, reference, mode):
    # max_new_tokens 1 costs the target exactly one forward pass (the prefill's), whatever the
    # mode: no separate step after the prompt for the first token.
    runner = bad_engine.target.worker.runner
    calls: list[list[int]] = []
    extend = runner.extend_batch

    def counted(items, *args, **kwargs):
        calls.append([len(toks) for _, toks in items])
        return extend(items, *args, **kwargs)

    runner.extend_batch = counted
    try:
        for prompt in PROMPTS:
            calls.clear()
            res = bad_engine.generate(prompt, max_new_tokens=1, mode=mode, k=4)
            assert res.token_ids == reference[prompt][:1]
            assert calls == [[len(bad_engine.encode(prompt))]]  # one pass over the whole prompt
            assert res.stats.plain_steps == 1 and res.stats.rounds == 0
    finally:
        del runner.extend_batch
    assert_no_live(bad_engine)


# -- drafting by lookup -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lookup_engine(model_dir):
    # The draft model is the one that disagrees: whatever lookup does not cover, it gets wrong.
    # The model's blocks are capped at 3 tokens; lookup blocks at lookup.max_tokens (16).
    policy = PolicyConfig(max_draft_tokens=3)
    engine = SpecEngine.from_paths(model_dir / "target", model_dir / "draft", policy=policy)
    yield engine
    engine.close()


@pytest.mark.parametrize("drafter", [Drafter.LOOKUP, Drafter.AUTO])
def test_lookup_drafting_is_exact(lookup_engine, reference, drafter):
    """Lookup blocks (alone, or chosen per step beside the model) commit exactly the target's
    greedy tokens; this random target's greedy output repeats itself, so lookup gets used, with
    blocks past the model draft's cap (lookup.max_tokens 16 > max_draft_tokens 3)."""
    longest = 0
    lookup_rounds = 0
    for prompt in PROMPTS:
        res = lookup_engine.generate(prompt, max_new_tokens=MAX_NEW, drafter=drafter)
        assert res.token_ids == reference[prompt], prompt
        used = res.stats.by_drafter
        lookup_rounds += used.get("lookup", [0])[0]
        if drafter is Drafter.LOOKUP:
            assert "model" not in used
        longest = max([longest, *(r.proposed for r in res.stats.records)])
    assert lookup_rounds > 0
    assert longest > 3
    assert_no_live(lookup_engine)


@pytest.mark.parametrize("continuation", ["recent", "frequent"])
def test_lookup_drafting_without_a_draft_model_is_exact(model_dir, reference, continuation):
    """Exact either way a repeated match is followed: its most recent occurrence, or what most
    occurrences went on with (votes over the row's own text and the recent outputs)."""
    policy = PolicyConfig(lookup=LookupConfig(continuation=continuation))
    engine = SpecEngine.from_paths(model_dir / "target", None, policy=policy)
    try:
        for prompt in PROMPTS[:3]:
            res = engine.generate(prompt, max_new_tokens=MAX_NEW)
            assert res.token_ids == reference[prompt], prompt
            assert res.stats.by_drafter.get("lookup", [0])[0] > 0
        assert (
            engine.generate(PROMPTS[0], max_new_tokens=MAX_NEW, drafter=Drafter.MODEL).stats.rounds
            == 0
        )
    finally:
        engine.close()


# -- processed logits: penalties, bias, min_tokens ----------------------------------------------


@pytest.mark.parametrize("drafter", [Drafter.MODEL, Drafter.AUTO])
def test_processed_greedy_under_speculation_equals_hf_and_a_plain_run(
    self_engine, hf_target, drafter
):
    """The self draft proposes the unprocessed target's argmax: wherever a penalty moves the
    argmax, its block is rejected there, and the output is still exactly the processed target's.
    HF has repetition_penalty, min_new_tokens and a bias (sequence_bias); presence and frequency
    penalties are checked against a plain run of ours."""
    boost_eos = ((0, 6.0),)  # EOS likely, so that min_tokens has something to hold back
    for prompt in PROMPTS[:3]:
        ids = self_engine.encode(prompt)
        cases = [
            (SamplingParams(repetition_penalty=1.8), {"repetition_penalty": 1.8}),
            (
                SamplingParams(logit_bias=boost_eos, min_tokens=9),
                {"sequence_bias": {(0,): 6.0}, "min_new_tokens": 9},
            ),
            (SamplingParams(presence_penalty=1.5, frequency_penalty=0.8), None),
        ]
        for params, hf_kw in cases:
            spec = self_engine.generate(
                ids, max_new_tokens=MAX_NEW, sampling=params, mode=SpecMode.ON, k=4, drafter=drafter
            )
            plain = self_engine.generate(
                ids, max_new_tokens=MAX_NEW, sampling=params, mode=SpecMode.OFF
            )
            assert spec.token_ids == plain.token_ids, (prompt, params)
            assert spec.stats.rounds > 0 and plain.stats.rounds == 0
            if hf_kw is not None:
                assert spec.token_ids == hf_greedy(hf_target, ids, MAX_NEW, **hf_kw)
            if params.min_tokens:  # EOS held back for 9 tokens, then (boosted) it ends the text
                assert 0 not in spec.token_ids[:9] and spec.token_ids[-1] == 0
            unprocessed = self_engine.generate(ids, max_new_tokens=MAX_NEW, mode=SpecMode.OFF)
            assert spec.token_ids != unprocessed.token_ids  # the processing changed something
    assert_no_live(self_engine)


def test_compiled_forwards_in_float32_equal_hf_generate(model_dir, reference):
    """`models.compile: on` (torch.compile of the lean forward's decode and verify steps over
    the batched cache; what a GPU serves with CUDA graphs), float32: the greedy output is still
    HF `generate`'s, plain and speculative, both workers compiled."""
    from workers.draft_loading import load_draft
    from workers.target import TargetWorker

    kw = {"forward": "lean", "compile": "on"}
    target = TargetWorker.from_path(model_dir / "target", **kw)
    draft = load_draft(model_dir / "draft", **kw)
    engine = SpecEngine(target, draft, policy=MODEL_ONLY)
    try:
        assert target.runner.forward == draft.runner.forward == "lean+compiled"
        for prompt in PROMPTS:
            for mode, k in ((SpecMode.OFF, None), (SpecMode.ON, 3)):
                ask = {} if k is None else {"k": k}
                res = engine.generate(prompt, max_new_tokens=MAX_NEW, mode=mode, **ask)
                assert res.token_ids == reference[prompt], (prompt, mode)
        assert_no_live(engine)
    finally:
        engine.close()
