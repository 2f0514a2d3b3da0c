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
        # through a draft worker process started with --confidence-stop
        "grpc spec adaptive (AUTO), not pipelined, draft stops below p=0.4",
    } <= names
    timed = [r for r in rows if "tokens" in r]
    assert all(r["tokens"] == 2 * 12 and r["tokens_per_s"] > 0 for r in timed)
    ttft = {r["name"]: r["ms"] for r in rows if "ms" in r}
    assert len(ttft) == 3 and all(ms > 0 for ms in ttft.values())
    assert "time to first token" in printed


def test_concurrency_sweep_runs_and_agrees_with_plain(tmp_path, capsys):
    target = make_model(tmp_path / "target", seed=0, eos_token_id=None)
    draft = make_model(tmp_path / "draft", seed=1, layers=1, eos_token_id=None)
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    rc = main(
        ["--target", str(target), "--draft", str(draft), "--prompts", "2"]
        + ["--max-new-tokens", "6", "--threads", "1", "--concurrency", "1,3"]
        + ["--requests-per-stream", "1", "--plot", str(png), "--json", str(out)]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "greedy outputs identical to plain decoding: yes" in printed
    rows = json.loads(out.read_text())
    assert {(r["mode"], r["streams"]) for r in rows} == {
        (m, n) for m in ("plain", "auto", "k=4") for n in (1, 3)
    }
    assert all(r["tok/s"] > 0 and r["rows/pass"] >= 1 for r in rows)
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
