"""The lean forward (workers/lean_forward.py) against transformers' own modules: float32 logits
bit for bit through ragged batches, rollbacks, joins, leaves and prefills; bfloat16 within the
dtype's rounding; the subset draft's scattered head; and which models it refuses, and why."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tests.tiny_models import make_model, make_tokenizer
from workers.checkpoints.subset_draft import SubsetDraftConfig, SubsetDraftForCausalLM
from workers.lean_forward import LeanForward, onednn_bf16_available, unsupported
from workers.model_runner import ModelRunner

CONTEXT = 160


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("lean") / "m", seed=9, max_positions=CONTEXT)


def _drive(lean: ModelRunner, ref: ModelRunner, vocab: int, seed: int, steps: int = 40):
    """The same random schedule on both runners; yields each step's pair of logits lists."""
    rng = random.Random(seed)
    names = ["a", "b", "c", "d"]
    for _ in range(steps):
        items = []
        for s in names:
            if rng.random() < 0.7:
                held = lean.held(s)
                n = rng.choice([1, 1, 2, 4, 6]) if held else rng.randint(3, 30)
                if held + n < CONTEXT:
                    items.append((s, [rng.randrange(2, vocab) for _ in range(n)]))
        if not items:
            continue
        mode = rng.choice(["all", "all", "last", "none"])
        kw = {"last": True} if mode == "last" else {"logits": False} if mode == "none" else {}
        yield lean.extend_batch(items, **kw), ref.extend_batch(items, **kw)
        for s in names:
            held = lean.held(s)
            r = rng.random()
            if held > 4 and r < 0.3:  # a rejected block: holes
                keep = held - rng.randint(1, 4)
                lean.rollback(s, keep)
                ref.rollback(s, keep)
            elif held and r > 0.95:  # a leave: a free row for the next join
                lean.release(s)
                ref.release(s)


def test_float32_logits_equal_transformers_bit_for_bit(path):
    lean = ModelRunner(path, forward="lean")
    ref = ModelRunner(path, forward="hf")
    assert (lean.forward, ref.forward) == ("lean", "hf")
    vocab = lean.vocab_size
    checked = 0
    for ours, theirs in _drive(lean, ref, vocab, seed=1):
        for x, y in zip(ours, theirs, strict=True):
            assert x.shape == y.shape
            assert torch.equal(x, y)
            checked += x.shape[0]
    assert checked > 100
    assert lean.kv_tokens == ref.kv_tokens


def test_bfloat16_logits_agree_within_rounding(path):
    lean = ModelRunner(path, dtype="bfloat16", forward="lean")
    ref = ModelRunner(path, dtype="bfloat16", forward="hf")
    # oneDNN's kernels are used where the CPU has them: the sums' order differs from F.linear's.
    assert lean.forward == ("lean+onednn" if onednn_bf16_available() else "lean")
    for ours, theirs in _drive(lean, ref, lean.vocab_size, seed=2, steps=25):
        for x, y in zip(ours, theirs, strict=True):
            assert x.shape == y.shape
            if x.numel():
                scale = y.abs().max().clamp(min=1.0)
                assert (x - y).abs().max() <= 0.05 * scale
                assert (x.argmax(-1) == y.argmax(-1)).float().mean() >= 0.9
    # Ragged steps (rows bringing unequal numbers of tokens: prefills beside decodes, blocks of
    # unequal length) ran their projections and MLP on the real tokens only, packed.
    assert lean.packed_steps > 5 and ref.packed_steps == 0


def test_the_subset_draft_head_scatters_as_its_module_does(tmp_path, path):
    tok = make_tokenizer()
    cfg = SubsetDraftConfig(
        embeddings_from=str(path),  # not saved with the draft: read from its target at load
        head_size=16,
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        eos_token_id=0,
    )
    torch.manual_seed(3)
    model = SubsetDraftForCausalLM(cfg)
    model.head_ids.copy_(torch.randperm(len(tok))[:16])
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lean = ModelRunner(tmp_path, forward="lean")
    ref = ModelRunner(tmp_path, forward="hf")
    for ours, theirs in _drive(lean, ref, len(tok), seed=3, steps=20):
        for x, y in zip(ours, theirs, strict=True):
            assert torch.equal(x, y)
            if x.numel():  # -inf outside the head's subset, as the module gives
                assert torch.isinf(x).sum(-1).eq(len(tok) - 16).all()


def test_models_it_cannot_run_keep_transformers_forward(tmp_path):
    tok = make_tokenizer()
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    )
    assert "GPT2LMHeadModel" in unsupported(gpt2)
    with pytest.raises(ValueError, match="unsupported model"):
        LeanForward(gpt2)
    gpt2.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert ModelRunner(tmp_path).forward == "hf"  # auto
    with pytest.raises(ValueError, match="forward: lean cannot run"):
        ModelRunner(tmp_path, forward="lean")
    with pytest.raises(ValueError, match="forward must be one of"):
        ModelRunner(tmp_path, forward="fast")


def test_the_compiled_forward_decodes_as_the_eager_one(path):
    """`compile: on` (torch.compile of the lean forward, frozen weights on a CPU): the shapes
    one stream meets compile at load; logits agree with the eager lean forward within float32
    rounding through ragged batches, rollbacks and joins, and greedy choices are the same."""
    compiled = ModelRunner(path, forward="lean", compile="on")
    eager = ModelRunner(path, forward="lean")
    assert compiled.forward == "lean+compiled" and compiled.compile_seconds > 0
    assert compiled.live_sequences == 0 and compiled.kv_tokens == 0  # the warm-up left nothing
    for ours, theirs in _drive(compiled, eager, eager.vocab_size, seed=5, steps=25):
        for x, y in zip(ours, theirs, strict=True):
            assert x.shape == y.shape
            if x.numel():
                assert torch.allclose(x, y, atol=1e-4, rtol=1e-4)
                assert torch.equal(x.argmax(-1), y.argmax(-1))
    with pytest.raises(ValueError, match="compile must be one of"):
        ModelRunner(path, compile="yes")
    with pytest.raises(ValueError, match="compile: on needs the lean forward"):
        ModelRunner(path, forward="hf", compile="on")


def test_the_config_names_the_forward_and_reads_yaml_switches():
    import yaml

    from cluster.config import ClusterConfig, ConfigError

    cfg = ClusterConfig.load({})
    assert (cfg.models.forward, cfg.models.compile) == ("auto", "auto")
    # YAML 1.1 reads a bare on/off as a boolean; the manifests' users write them bare.
    for text, want in (("compile: on", "on"), ("compile: off", "off"), ("compile: auto", "auto")):
        assert ClusterConfig.load({"models": yaml.safe_load(text)}).models.compile == want
    with pytest.raises(ConfigError, match="models.forward"):
        ClusterConfig.load({"models": {"forward": "fast"}})
