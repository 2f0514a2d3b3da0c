"""The shipped draft/target pair and its training recipe."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pairs import corpus
from pairs.acceptance import load_pair, measure_acceptance
from pairs.heldout import heldout_code_prompts, heldout_texts
from pairs.stdlib_recipe import train_pair
from pairs.target_greedy import plain_greedy
from workers.checkpoints import SHIPPED_PAIR_DIR, shipped_draft_path, shipped_target_path

# The pair ships with the package: a missing asset is a failure, never a skip.
needs_assets = pytest.mark.usefixtures("shipped_assets")


@pytest.fixture(scope="module")
def shipped_assets() -> None:
    for path in (shipped_target_path(), shipped_draft_path()):
        assert (path / "config.json").is_file() and any(path.glob("*.safetensors")), path


PINNED_PROMPT = 'def read_config(path):\n    """Read the configuration file."""'
# The shipped target's greedy continuation (16 tokens) of PINNED_PROMPT, computed once from the
# committed checkpoint (smallest top-1/top-2 logit margin along it: 0.21, so it is stable
# across CPUs). A retrained or corrupted checkpoint changes it.
# fmt: off
PINNED_IDS: list[int] = [325, 309, 525, 750, 587, 267, 13, 545,
                         290, 263, 432, 263, 432, 263, 432, 263]
# fmt: on

# Acceptance floor at k=4 on 10 held-out prompts x 32 tokens: the shipped pair measured 0.68,
# a random-weight draft 0.0.
ALPHA_FLOOR = 0.3


@pytest.fixture(scope="module")
def pair():
    with load_pair(shipped_target_path(), shipped_draft_path()) as loaded:
        yield loaded


@needs_assets
def test_shipped_pair_loads_and_shares_tokenizer(pair):
    target, draft, tok = pair.target, pair.draft, pair.tokenizer
    assert tok.eos_token_id is not None
    draft_tok = AutoTokenizer.from_pretrained(shipped_draft_path())
    assert draft_tok.get_vocab() == tok.get_vocab()
    assert target.config.vocab_size == draft.config.vocab_size == len(tok)
    n_t = sum(p.numel() for p in target.parameters())
    n_d = sum(p.numel() for p in draft.parameters())
    assert 15e6 <= n_t <= 30e6 and n_d <= n_t / 4
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        assert getattr(target.config, key) % 2 == 0
    assert target.config.base_model_tp_plan


@needs_assets
def test_split_is_by_file_and_recorded():
    data = json.loads((SHIPPED_PAIR_DIR / "split.json").read_text())
    held = set(data["heldout"])
    assert len(held) >= 0.05 * (len(held) + data["n_train"])
    assert all(f.endswith(".py") and "site-packages" not in f for f in held)


@needs_assets
def test_target_greedy_continuation_is_pinned(pair):
    target, tok = pair.target, pair.tokenizer
    prompt = tok(PINNED_PROMPT, add_special_tokens=False)["input_ids"]
    out = plain_greedy(target, prompt, 16)
    # The oracle: transformers' own greedy generate agrees with our loop.
    ref = target.generate(
        torch.tensor([prompt]),
        max_new_tokens=16,
        do_sample=False,
        min_new_tokens=16,
        pad_token_id=tok.pad_token_id,
    )
    assert out == ref[0, len(prompt) :].tolist()
    assert out == PINNED_IDS, f"pinned ids changed: {out}"


@needs_assets
def test_acceptance_above_floor_and_random_draft_below(pair, tmp_path):
    prompts = heldout_code_prompts(pair.tokenizer, heldout_texts(SHIPPED_PAIR_DIR), 10, seed=0)
    assert len(prompts) == 10
    # Measured through the engine (the serving scheduler), checked against plain greedy.
    shipped = measure_acceptance(pair, prompts, 32, 4, verify=2)
    assert shipped.mismatches == 0  # speculation reproduces the target's greedy output exactly
    alpha = shipped.stats.acceptance_rate
    assert alpha >= ALPHA_FLOOR, alpha
    torch.manual_seed(0)
    rand = AutoModelForCausalLM.from_config(pair.draft.config)
    rand.save_pretrained(tmp_path)  # the engine loads checkpoints by path
    pair.tokenizer.save_pretrained(tmp_path)
    with load_pair(shipped_target_path(), tmp_path) as random_pair:
        rand_measured = measure_acceptance(random_pair, prompts[:4], 32, 4, verify=1)
    assert rand_measured.mismatches == 0
    assert rand_measured.stats.acceptance_rate < ALPHA_FLOOR, rand_measured.stats.acceptance_rate


def test_split_by_file_is_seeded_and_disjoint():
    files = [f"pkg/m{i}.py" for i in range(100)]
    a = corpus.make_split(files, corpus.stdlib_root(), 0.06, seed=1)
    b = corpus.make_split(files, corpus.stdlib_root(), 0.06, seed=1)
    assert a.heldout == b.heldout and len(a.heldout) == 6
    assert not set(a.heldout) & set(a.train) and len(a.train) == 94


def test_function_prompts_end_after_the_line_following_def():
    text = (
        "import os\n\n\ndef f(x):\n    return x + 1\n\n\nclass A:\n    def g(self):\n        pass\n"
    )
    assert corpus.function_prompts(text) == [
        "import os\n\n\ndef f(x):\n    return x + 1",
        text.rstrip("\n"),
    ]


def test_recipe_smoke(tmp_path):
    # threads: keep conftest's per-process setting.
    summary = train_pair(tmp_path, smoke=True, threads=torch.get_num_threads())
    for name in ("target", "draft"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(tmp_path / name)
        assert model.config.vocab_size == len(tok) and tok.eos_token is not None
        ids = tok("def f(x):\n    return x\n", return_tensors="pt")["input_ids"]
        assert tok.decode(ids[0]) == "def f(x):\n    return x\n"  # byte-level: lossless
        assert torch.isfinite(model(ids).logits).all()
    split = json.loads((tmp_path / "split.json").read_text())
    assert split["heldout"]
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["draft_params"] < log["target_params"] == summary["target_params"]
