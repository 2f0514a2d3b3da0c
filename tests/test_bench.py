"""The benchmarks run end to end (tiny models, a few tokens) and report what they measured: the
printed tok/s and ratios are the JSON rows', every row decoded the tokens asked for, and the greedy
outputs of every system agree."""

from __future__ import annotations

import json
import re
from decimal import Decimal

import pytest

from bench.run import main
from tests.tiny_models import make_model

PROMPTS, NEW_TOKENS = 2, 12


def printed_row(printed: str, name: str) -> tuple[str, str]:
    """(tok/s, ratio) as the table prints them for the system `name`."""
    found = re.findall(rf"^{re.escape(name)} +([\d.]+) +([\d.]+)x", printed, flags=re.M)
    assert len(found) == 1, (name, printed)
    return found[0]


def test_bench_runs_and_outputs_agree(tmp_path, capsys):
    # No EOS: every system decodes exactly NEW_TOKENS for every prompt.
    target = make_model(tmp_path / "target", seed=0, eos_token_id=None)
    draft = make_model(tmp_path / "draft", seed=1, layers=1, eos_token_id=None)
    out = tmp_path / "bench.json"
    rc = main(
        ["--target", str(target), "--draft", str(draft), "--prompts", str(PROMPTS)]
        + ["--max-new-tokens", str(NEW_TOKENS), "--threads", "1", "--json", str(out)]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed  # 1 when any system's greedy output differs from hf generate's
    assert "greedy outputs identical to hf generate: yes" in printed
    assert f"{PROMPTS} prompts x {NEW_TOKENS} new tokens, greedy" in printed
    rows = json.loads(out.read_text())
    timed = [r for r in rows if "tokens" in r]
    names = [r["name"] for r in timed]
    assert names[0] == "hf generate (target only)"  # the baseline every ratio is against
    assert {
        "hf assisted generation",
        "grpc plain (mode OFF)",
        "engine spec k=4, pipelined",
        # through a draft worker process started with --confidence-stop
        "grpc spec adaptive (AUTO), not pipelined, draft stops below p=0.4",
    } <= set(names)
    assert len(names) == len(set(names))
    base = timed[0]["tokens_per_s"]
    for r in timed:
        assert r["tokens"] == PROMPTS * NEW_TOKENS, r
        assert r["seconds"] > 0 and abs(r["tokens_per_s"] - r["tokens"] / r["seconds"]) < 1e-6
        tok_s, ratio = printed_row(printed, r["name"])
        assert tok_s == f"{r['tokens_per_s']:.1f}"
        assert ratio == f"{r['tokens_per_s'] / base:.2f}"
        if "alpha" in r:  # the engine's and the gRPC router's own stats
            if "plain (mode OFF)" in r["name"]:
                assert r["alpha"] is None, r  # nothing drafted
            elif " k=" in r["name"]:  # a fixed k always drafts (AUTO may fall back to plain)
                assert 0 <= r["alpha"] <= 1, r
            if "not pipelined" in r["name"]:
                assert r["pipeline_hits"] == 0, r
    assert printed_row(printed, names[0])[1] == "1.00"
    ttft = {r["name"]: r["ms"] for r in rows if "ms" in r}
    assert len(ttft) == 3 and all(ms > 0 for ms in ttft.values())
    assert "time to first token" in printed
    for name, ms in ttft.items():
        assert re.search(rf"^  {re.escape(name)} +{ms:.1f} ms$", printed, flags=re.M), name


def test_concurrency_sweep_runs_and_agrees_with_plain(tmp_path, capsys):
    target = make_model(tmp_path / "target", seed=0, eos_token_id=None)
    draft = make_model(tmp_path / "draft", seed=1, layers=1, eos_token_id=None)
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    rc = main(
        ["--target", str(target), "--draft", str(draft), "--prompts", "2"]
        + ["--max-new-tokens", "6", "--threads", "1", "--concurrency", "1,3", "--dtype", "float32"]
        + ["--requests-per-stream", "1", "--plot", str(png), "--json", str(out)]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed  # 1 when any cell's greedy output differs from plain decoding's
    assert "greedy outputs identical to plain decoding: yes" in printed
    rows = json.loads(out.read_text())
    assert {(r["mode"], r["streams"]) for r in rows} == {
        (m, n) for m in ("plain", "auto", "k=4") for n in (1, 3)
    }
    for r in rows:
        # The printed table is the JSON rows, column for column.
        assert "| " + " | ".join(str(v) for v in r.values()) + " |" in printed.splitlines()
        assert r["tok/s"] > 0 and 1 <= r["rows/pass"] <= r["streams"], r
        assert r["tau"] >= 1 and 0 < r["ttft p50 ms"] <= r["ttft p95 ms"], r
        assert r["itl p50 ms"] <= r["itl p95 ms"], r
        # Plain decoding's rows are all plain; the others' share lies between none and all.
        assert r["plain share"] == 1.0 if r["mode"] == "plain" else 0 <= r["plain share"] <= 1
    tok_s = {(r["mode"], r["streams"]): r["tok/s"] for r in rows}
    for n in (1, 3):
        ratio = re.search(rf"{n} streams: AUTO/plain ([\d.]+)x", printed)
        assert ratio, printed
        assert abs(float(ratio.group(1)) - tok_s[("auto", n)] / tok_s[("plain", n)]) <= 0.011
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_the_sweep_prints_each_repeats_ratio_and_their_median():
    from bench.concurrency import Cell, markdown, repeat_ratios

    def cell(mode: str, streams: int, tok_s: float) -> Cell:
        return Cell(mode, streams, seconds=1.0, tokens=int(tok_s))

    # Three repeats at 16 streams, the first with a slow plain cell: pooled 1.50x, median 1.40x.
    runs = [(110, 232), (179, 250), (172, 209)]
    cells = [cell(m, 16, t) for plain, auto in runs for m, t in (("plain", plain), ("auto", auto))]
    assert repeat_ratios(cells) == {16: pytest.approx([232 / 110, 250 / 179, 209 / 172])}
    text = markdown(cells)
    assert "16 streams: AUTO/plain 1.50x (repeats 2.11, 1.40, 1.22: median 1.40x)" in text
    # Each cell's profile line: shares of its time, then a target pass's cost and yield.
    plain = Cell("plain", 16, seconds=2.0, tokens=320, steps=20, phases={"verify": 1.9})
    assert plain.profile() == "verify 95%; a target pass 95 ms, 16.0 tokens"


def chain_rows(printed: str, title: str) -> list[tuple[str, Decimal, str, Decimal]]:
    """(layer, ms/step, share, adds ms) of the profile's chain headed `title`, as printed."""
    lines = printed.splitlines()
    start = lines.index(title) + 2  # the title, then the column heads
    rows = []
    for line in lines[start:]:
        m = re.fullmatch(r"  (\S.*?) +(\d+\.\d\d) +(\d+\.\d%) +([+-]\d+\.\d\d)", line)
        if not m:
            break
        rows.append((m[1], Decimal(m[2]), m[3], Decimal(m[4])))
    return rows


def test_profile_prints_each_layer_and_what_it_adds(tmp_path, capsys):
    target = make_model(tmp_path / "target", seed=0, eos_token_id=None)
    draft = make_model(tmp_path / "draft", seed=1, layers=1, eos_token_id=None)
    rc = main(
        ["--profile", "--target", str(target), "--draft", str(draft), "--prompts", "2"]
        + ["--max-new-tokens", "6", "--threads", "1"]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "# torch threads: target 1, draft 1" in printed
    assert "[2/2] router AUTO" in printed  # progress, prompt by prompt
    layers = ("forward: ", "worker in-process: ", "worker over gRPC: ", "router, mode ")
    for title in ("plain step (one token):", "speculative step (k=4, not pipelined):"):
        rows = chain_rows(printed, title)
        assert [r[0][: len(p)] for r, p in zip(rows, layers, strict=True)] == list(layers), rows
        prev = Decimal(0)
        for _, ms, _, adds in rows:
            assert ms > 0, rows
            assert adds == ms - prev, rows  # what a layer adds: the printed figures' difference
            prev = ms
        assert rows[-1][2] == "100.0%"  # shares are of the full path's step
    for mode in ("OFF", "ON k=4", "AUTO"):
        phases = re.search(rf"^  {re.escape(mode)} +((?:-?[\d.]+ +){{8}}[\d.]+)$", printed, re.M)
        assert phases, (mode, printed)
        *parts, other, step, tokens_per_step, _ = (float(x) for x in phases[1].split())
        assert step > 0 and tokens_per_step >= 1
        assert abs(sum(parts) + other - step) <= 0.04  # the phases and the rest make the step
    assert re.search(r"^draft, 4 tokens a block: forward alone 4 x [\d.]+ = ", printed, re.M)
    assert re.search(r"^verify of k=4 \(5 tokens\) vs a one-token step: forward ", printed, re.M)
    assert re.search(r"^reference: HF generate [\d.]+ ms per token", printed, re.M)
    assert "top operators by self CPU time" in printed


def test_cluster_stream_against_a_running_router(tmp_path, capsys):
    # A running cluster's public API (here the standalone router over worker processes, float32):
    # every system decodes the prompts, the cluster's greedy output is HF's in float32, and each
    # printed ratio is that row's tok/s over the faster HF row's.
    from cluster.routing.worker_processes import ServerProcess, start_all, stop_all, worker_process

    target = make_model(tmp_path / "target", seed=0, eos_token_id=None)
    draft = make_model(tmp_path / "draft", seed=1, layers=1, eos_token_id=None)
    workers = start_all(worker_process("target", target), worker_process("draft", draft))
    router = ServerProcess(
        ["-m", "cluster.routing.grpc_server", "--target", workers[0].address]
        + ["--draft", workers[1].address, "--target-model", str(target), "--port", "0"],
        "router",
    )
    try:
        router.wait_ready()
        rc = main(
            ["--target", str(target), "--draft", str(draft), "--cluster", router.address]
            + ["--prompts", "2", "--max-new-tokens", "6", "--repeats-cluster", "2"]
            + ["--threads", "1"]
        )
    finally:
        stop_all([router, *workers])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert printed.count("repeat ") == 2 * 12
    rows = {}
    for line in printed.splitlines():
        name = r"(hf (?:generate|prompt lookup|assisted) \w+|cluster .+?)"
        m = re.match(name + r"\s+([\d.]+)\s+([\d.]+)x\s+(\d+|-)\s+(.*)$", line)
        if m:
            rows[m[1]] = (float(m[2]), float(m[3]), m[4], m[5])
    assert set(rows) == {
        "hf generate bfloat16",
        "hf generate float32",
        "hf prompt lookup bfloat16",
        "hf prompt lookup float32",
        "hf assisted bfloat16",
        "hf assisted float32",
        "cluster plain (mode OFF)",
        "cluster plain (mode OFF), unary",
        "cluster AUTO",
        "cluster AUTO, unary",
        "cluster AUTO, draft model only",
        "cluster AUTO, lookup only",
    }
    best = max(rate for name, (rate, *_) in rows.items() if name.startswith("hf generate"))
    for _name, (rate, ratio, _ttft, _same) in rows.items():
        # ratio printed to 2 decimals, both rates to 1: the rounding bounds the difference
        assert abs(ratio - rate / best) <= 0.005 + 0.05 * (1 + rate / best) / best
    for name, (_, _, ttft, _) in rows.items():  # time to first token, ms; none for unary calls
        assert ttft == "-" if name.endswith("unary") else int(ttft) > 0, name
    for name in rows:  # greedy through the cluster (every drafter), HF prompt lookup: exact
        if not name.startswith("hf generate"):
            assert "float32" in rows[name][3], name


def test_structured_bench_runs_and_speculation_keeps_the_outputs(capsys):
    rc = main(
        ["--structured", "--pair", "stdlib", "--prompts", "2", "--max-new-tokens", "10"]
        + ["--repeats-cluster", "1", "--threads", "1"]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed  # 1 when AUTO's greedy outputs differ from plain decoding's
    assert "greedy outputs with speculation identical to plain: yes" in printed
    for name in ("plain, grammar", "AUTO, grammar", "AUTO model draft only, grammar"):
        tps, ratio = printed_row(printed, name)
        assert float(tps) > 0 and float(ratio) > 0
    assert printed_row(printed, "plain, grammar")[1] == "1.00"
    assert re.search(r"^AUTO, grammar .*grammar=\d+/\d+/\d+", printed, re.M)  # forced blocks
