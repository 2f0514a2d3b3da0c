"""A saved subset draft loads in plain transformers (trust_remote_code), without this package:
its checkpoint carries its modeling file and an `auto_map`, the Hub's convention."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from tests.tiny_models import make_model, make_tokenizer
from workers.checkpoints.registry import SMOLLM2_DRAFT_DIR
from workers.checkpoints.subset_draft import (
    AUTO_MAP,
    MODELING_FILE,
    SubsetDraftConfig,
    SubsetDraftForCausalLM,
    write_remote_code,
)


def test_the_shipped_draft_carries_the_current_modeling_file():
    import workers.checkpoints.subset_draft as module

    shipped = (SMOLLM2_DRAFT_DIR / MODELING_FILE).read_text()
    assert shipped == open(module.__file__).read(), "rerun write_remote_code on the shipped draft"
    assert '"auto_map"' in (SMOLLM2_DRAFT_DIR / "config.json").read_text()


def test_plain_transformers_loads_a_saved_draft_without_this_package(tmp_path):
    target = make_model(tmp_path / "target", seed=5)
    tok = make_tokenizer()
    cfg = SubsetDraftConfig(
        embeddings_from="a-pair-name-only-this-package-knows",
        head_size=16,
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=0,
    )
    torch.manual_seed(5)
    draft = SubsetDraftForCausalLM(cfg)
    draft.head_ids.copy_(torch.randperm(len(tok))[:16])
    draft.save_pretrained(tmp_path / "draft")
    write_remote_code(tmp_path / "draft")
    ours = SubsetDraftForCausalLM.from_pretrained(tmp_path / "draft", embeddings_from=str(target))
    want = ours(input_ids=torch.tensor([[3, 4, 5, 6]])).logits
    torch.save(want, tmp_path / "want.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["workers"] = None  # this package is not there
        import torch
        from transformers import AutoModelForCausalLM
        draft = {str(tmp_path / "draft")!r}
        try:  # a pair name needs this package: the error names the field
            AutoModelForCausalLM.from_pretrained(draft, trust_remote_code=True)
            raise SystemExit("loaded without embeddings")
        except ValueError as exc:
            assert "embeddings_from" in str(exc), exc
        m = AutoModelForCausalLM.from_pretrained(
            draft, trust_remote_code=True, embeddings_from={str(target)!r}
        )
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        got = m(input_ids=torch.tensor([[3, 4, 5, 6]])).logits
        want = torch.load({str(tmp_path / "want.pt")!r})
        assert torch.equal(got, want), (got - want).abs().max()
        print("ok")
        """
    )
    env_home = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env_home, timeout=120
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]
    assert AUTO_MAP["AutoModelForCausalLM"].endswith("SubsetDraftForCausalLM")
