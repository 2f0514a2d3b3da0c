"""The benchmark runs end to end (tiny models, a few tokens) and checks greedy outputs agree."""

from __future__ import annotations

import json

from bench.run import main
from tests.tiny_models import make_model


def test_bench_runs_and_outputs_agree(tmp_path, capsys):
    target = make_model(tmp_path / "target", seed=0, eos_token_id=None)
    draft = make_model(tmp_path / "draft", seed=1, layers=1, eos_token_id=None)
    out = tmp_path / "bench.json"
    rc = main(
        [
            "--target",
            str(target),
            "--draft",
            str(draft),
            "--prompts",
            "2",
            "--max-new-tokens",
            "12",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "greedy outputs identical to hf generate: yes" in printed
    rows = json.loads(out.read_text())
    names = {r["name"] for r in rows}
    assert {
        "hf generate (target only)",
        "hf assisted generation",
        "grpc plain (mode OFF)",
        "engine spec k=4, pipelined",
    } <= names
    assert all(r["tokens"] == 2 * 12 and r["tokens_per_s"] > 0 for r in rows)
