"""`specdec up --once` (the README's first command) and the `specdec` client's error paths."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.cli import build_parser, main
from cluster.cli.up_options import up_config
from cluster.config import ConfigError
from tests.deploy.helpers import free_port, noisy_copy, tmpdir
from tests.tiny_models import make_model, make_tokenizer
from workers.checkpoints import shipped_draft_path, shipped_target_path

BIN = Path(sys.executable).parent
SHIPPED = (shipped_target_path() / "config.json").is_file() and (
    shipped_draft_path() / "config.json"
).is_file()


@pytest.mark.slow
def test_specdec_up_once_brings_the_cluster_up_and_answers(tmp_path):
    cmd = [str(BIN / "specdec"), "up", "--once", "--max-new-tokens", "24"]
    cmd += ["--port", str(free_port()), "--http-port", str(free_port()), "--num-cpus", "3"]
    root = None
    if not SHIPPED:  # until the pair ships, the same command with tiny models
        root = tmpdir("sd-up-")
        target = make_model(root / "target", seed=1, tokenizer=make_tokenizer())
        draft = noisy_copy(target, root / "draft", std=0.15)
        cmd += ["--target", str(target), "--draft", str(draft)]
    t0 = time.monotonic()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
    finally:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nspecdec up --once: {time.monotonic() - t0:.1f}s (shipped pair: {SHIPPED})")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps = ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "replicas running", "output:", "endpoints:")
    for step in (*steps, "dtype: target "):  # the dtype each worker resolved models.dtype to
        assert step in out.stdout, out.stdout
    assert re.search(r"up in [\d.]+s", out.stdout)
    assert re.search(r"gRPC 127\.0\.0\.1:\d+ +HTTP http://127\.0\.0\.1:\d+/v1", out.stdout)
    assert re.search(r"completion_tokens=\d+ .*rounds=\d+ plain_steps=\d+", out.stdout)


def test_up_refuses_a_missing_model_before_starting_anything(tmp_path, capsys):
    assert main(["up", "--once", "--target", str(tmp_path / "nope")]) == 2
    assert "models.target: no Hugging Face checkpoint" in capsys.readouterr().err


def test_generate_reports_an_unreachable_cluster(capsys):
    port = free_port()
    rc = main(["generate", "hi", "--address", f"127.0.0.1:{port}", "--timeout", "3"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err


def test_up_reads_a_serve_config_and_applies_overrides():
    root = Path(__file__).resolve().parents[2]
    args = build_parser().parse_args(
        ["up", "--config", str(root / "deploy" / "cluster.yaml"), "--tp", "2"]
        + ["--draft-replicas", "2", "--target", "/m/t"]
    )
    cfg = up_config(args)
    assert cfg.target.tp_size == 2 and cfg.draft.replicas == 2
    assert cfg.models.target == "/m/t" and cfg.models.draft is None
    assert cfg.ingress.grpc_port == 9000  # grpc_options.port of the file
    assert cfg.workers.host == "127.0.0.1"  # a local cluster keeps its workers on loopback
    assert up_config(build_parser().parse_args(["up", "--port", "9100"])).ingress.grpc_port == 9100
    assert cfg.target.pool.num_cpus == 1  # the file's


def test_up_sets_any_key_by_its_dotted_path():
    parse = build_parser().parse_args
    sets = ["--set", "speculation.lookup.recent_tokens=0", "--set", "target.pool.num_cpus=3"]
    cfg = up_config(parse(["up", *sets]))
    assert cfg.speculation.lookup.recent_tokens == 0
    assert cfg.target.pool.num_cpus == 3  # set: not the machine's cores
    with pytest.raises(ConfigError, match="speculation.lookup.recent_tokns: unknown key"):
        up_config(parse(["up", "--set", "speculation.lookup.recent_tokns=0"]))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        up_config(parse(["up", "--set", "recent_tokens"]))


def test_up_gives_the_target_the_machines_cores_unless_the_file_says(monkeypatch, tmp_path):
    # One machine: draft and target take turns on its cores, so each target rank gets its share
    # of all of them as torch threads (the file's num_cpus wins).
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    parse = build_parser().parse_args
    assert up_config(parse(["up"])).target.pool.num_cpus == 8
    assert up_config(parse(["up", "--tp", "2"])).target.pool.num_cpus == 4
    assert up_config(parse(["up", "--target-replicas", "3"])).target.pool.num_cpus == 2
    assert up_config(parse(["up"])).target.pool.threads == 8
    # With Ray's CPUs given, the target's share fits beside the draft (1) and the ingress (0.5).
    assert up_config(parse(["up", "--num-cpus", "3"])).target.pool.num_cpus == 1
    assert up_config(parse(["up", "--num-cpus", "6"])).target.pool.num_cpus == 4
    file = tmp_path / "args.yaml"
    file.write_text("target: {pool: {resource: target_pool, num_cpus: 3}}\n")
    assert up_config(parse(["up", "--config", str(file)])).target.pool.num_cpus == 3


def test_busy_default_ports_move_but_explicit_ones_are_errors(monkeypatch, capsys):
    from cluster.cli import up_options

    monkeypatch.setattr(up_options, "port_free", lambda port: port not in (9000, 8000, 9100))
    parse = build_parser().parse_args
    cfg, http = up_options.choose_ports(parse(["up"]), up_config(parse(["up"])))
    assert cfg.ingress.grpc_port not in (9000, 0) and http not in (8000, 0)
    assert "port 9000 is in use" in capsys.readouterr().out
    args = parse(["up", "--port", "9100"])
    with pytest.raises(ValueError, match="port 9100 is in use"):
        up_options.choose_ports(args, up_config(args))
    args = parse(["up", "--http-port", "8000"])
    with pytest.raises(ValueError, match="HTTP port 8000"):
        up_options.choose_ports(args, up_config(args))


def test_parser_has_every_subcommand():
    parser = build_parser()
    text = parser.format_help()
    for name in ("up", "generate", "train-pair", "eval-pair", "bench"):
        assert name in text
    args = parser.parse_args(
        ["generate", "p", "--max-new-tokens", "5", "--temperature", "0.7", "--top-k", "4"]
        + ["--top-p", "0.9", "--seed", "3", "--no-spec", "--stream", "--address", "h:1"]
    )
    assert (args.max_new_tokens, args.top_k, args.seed, args.no_spec, args.stream) == (
        5,
        4,
        3,
        True,
        True,
    )


def test_passthrough_commands_reach_their_modules(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train-pair", "--help"])
    assert exit_.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_deploy_and_status_follow_ray_starts_token_rule(tmp_path):
    """`ray start` turns token auth on when RAY_AUTH_MODE is unset and a token exists; `specdec
    deploy` / `specdec status` run the serve CLI the same way (tested end to end in
    tests/deploy/test_serve_deploy.py)."""
    from cluster.cli.serve_cli import serve_cli_env

    home = tmp_path / "home"
    home.mkdir()
    assert serve_cli_env({"HOME": str(home)}) == ({"HOME": str(home)}, None)  # fresh machine
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("t")
    env, source = serve_cli_env({"HOME": str(home)})  # after `specdec up`
    assert env["RAY_AUTH_MODE"] == "token" and source == str(home / ".ray" / "auth_token")
    for mode in ("disabled", "token"):  # an explicit mode is kept
        env, source = serve_cli_env({"HOME": str(home), "RAY_AUTH_MODE": mode})
        assert env["RAY_AUTH_MODE"] == mode and source is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert serve_cli_env({"HOME": str(empty), "RAY_AUTH_TOKEN": "x"})[1] == "RAY_AUTH_TOKEN"
    env, source = serve_cli_env({"HOME": str(empty), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "no")})
    assert source is None and "RAY_AUTH_MODE" not in env
    env, source = serve_cli_env(
        {"HOME": str(empty), "RAY_AUTH_TOKEN_PATH": str(home / ".ray" / "auth_token")}
    )
    assert env["RAY_AUTH_MODE"] == "token"
