"""Bad requests to the in-process engine: each is refused with a ValueError naming the parameter,
nothing is left allocated, and the engine goes on serving normal requests exactly."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from cluster.engine import SpecEngine
from cluster.scheduling.policy import SpecMode
from tests.tiny_models import VOCAB, make_model
from workers.draft import DraftWorker
from workers.target import TargetWorker
from workers.types import SamplingParams

PROMPT = "def f(x):"
MAX_NEW = 12


def shifted_tokenizer(vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    """Like tests/tiny_models.make_tokenizer, same size, but every character maps to another id."""
    chars = [chr(c) for c in range(33, 33 + vocab - 2)]
    table = {"<eos>": 0, "<bos>": 1} | {c: i + 2 for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(table, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_input")
    make_model(d / "target", seed=0)
    make_model(d / "draft", seed=1)
    return d


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = SpecEngine.from_paths(model_dir / "target", model_dir / "draft")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def expected(engine, model_dir):
    """transformers' greedy continuation of PROMPT on the target."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir / "target", local_files_only=True)
    ids = engine.encode(PROMPT)
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def assert_still_serves(engine: SpecEngine, expected: list[int]) -> None:
    for worker in (engine.target.worker, engine.draft.worker):
        assert worker.live_sequences == 0 and worker.runner.live_sequences == 0
    for pipelined in (False, True):
        res = engine.generate(
            PROMPT, max_new_tokens=MAX_NEW, mode=SpecMode.ON, k=3, pipelined=pipelined
        )
        assert res.token_ids == expected
    assert engine.generate(PROMPT, max_new_tokens=MAX_NEW, mode=SpecMode.OFF).token_ids == expected
    for worker in (engine.target.worker, engine.draft.worker):
        assert worker.live_sequences == 0 and worker.runner.live_sequences == 0


def long_prompt(n: int) -> list[int]:
    return [(i * 7) % 90 + 2 for i in range(n)]


# Each case: (name of the parameter the message must name, the request's keyword arguments).
# SamplingParams are built inside the call, so their own validation is part of the request.
CASES = {
    "empty-text": ("prompt", lambda: {"prompt": ""}),
    "empty-ids": ("prompt", lambda: {"prompt": []}),
    "id-too-big": ("prompt", lambda: {"prompt": [5, VOCAB]}),
    "id-negative": ("prompt", lambda: {"prompt": [5, -1]}),
    "k=0": ("k", lambda: {"k": 0}),
    "k=-2": ("k", lambda: {"k": -2}),
    "k-too-big": ("k", lambda: {"k": 9}),
    "k-float": ("k", lambda: {"k": 2.5}),
    "temperature<0": ("temperature", lambda: {"sampling": SamplingParams(temperature=-0.5)}),
    "top_p=0": ("top_p", lambda: {"sampling": SamplingParams(temperature=1.0, top_p=0.0)}),
    "top_p>1": ("top_p", lambda: {"sampling": SamplingParams(temperature=1.0, top_p=1.5)}),
    "top_p<0": ("top_p", lambda: {"sampling": SamplingParams(temperature=1.0, top_p=-0.2)}),
    "top_k<0": ("top_k", lambda: {"sampling": SamplingParams(temperature=1.0, top_k=-1)}),
    "max_new_tokens=0": ("max_new_tokens", lambda: {"max_new_tokens": 0}),
    "max_new_tokens<0": ("max_new_tokens", lambda: {"max_new_tokens": -4}),
    "prompt>context": ("prompt", lambda: {"prompt": long_prompt(300)}),
    "prompt=context": ("prompt", lambda: {"prompt": long_prompt(256)}),
}


@pytest.mark.parametrize("call", ["generate", "stream"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_request_is_refused_and_engine_goes_on(engine, expected, case, call):
    param, make_kwargs = CASES[case]
    with pytest.raises(ValueError, match=param) as info:
        kwargs = {"prompt": PROMPT, "max_new_tokens": MAX_NEW, "mode": SpecMode.ON} | make_kwargs()
        prompt = kwargs.pop("prompt")
        getattr(engine, call)(prompt, **kwargs)  # stream() validates before it yields
    if case.startswith("prompt>") or case.startswith("prompt="):
        assert "context" in str(info.value)
    assert_still_serves(engine, expected)


def test_a_prompt_that_just_fits_generates_up_to_the_context(engine):
    res = engine.generate(long_prompt(255), max_new_tokens=MAX_NEW, mode=SpecMode.ON, k=4)
    assert len(res.token_ids) == 1 and res.finish_reason.value == "length"
    assert engine.target.worker.live_sequences == 0


@pytest.mark.parametrize("how", ["other-vocab-size", "same-size-other-ids"])
def test_draft_and_target_with_different_tokenizers_are_refused(model_dir, engine, expected, how):
    path = model_dir / how
    if not path.exists():
        if how == "other-vocab-size":
            make_model(path, seed=1, tokenizer=shifted_tokenizer(VOCAB - 16))
        else:
            make_model(path, seed=1, tokenizer=shifted_tokenizer())
    with pytest.raises(ValueError, match="tokenizer"):
        SpecEngine.from_paths(model_dir / "target", path)
    target = TargetWorker(engine.target.worker.runner)
    with pytest.raises(ValueError, match="tokenizer"):
        SpecEngine(target, DraftWorker.from_path(path))
    # The engine that was already up is untouched.
    assert_still_serves(engine, expected)


def test_same_tokenizer_different_eos_is_refused(model_dir):
    tok = shifted_tokenizer()
    path = model_dir / "other-eos"
    if not path.exists():
        tok2 = PreTrainedTokenizerFast(
            tokenizer_object=tok.backend_tokenizer, eos_token="<bos>", bos_token="<eos>"
        )
        make_model(path, seed=1, tokenizer=tok2)
        make_model(model_dir / "shifted-target", seed=0, tokenizer=tok)
    with pytest.raises(ValueError, match="tokenizer"):
        SpecEngine.from_paths(model_dir / "shifted-target", path)
