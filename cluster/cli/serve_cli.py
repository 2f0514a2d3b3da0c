"""`specdec deploy` and `specdec serve-status`: Ray's `serve` CLI, with Ray's token authentication
switched on the way `ray start` switches it on.

    specdec deploy ARGS  =  serve deploy ARGS
    specdec serve-status ARGS  =  serve status ARGS
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

COMMANDS = {"deploy": "deploy a Serve config (serve deploy)", "serve-status": "serve status"}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Listed in `specdec --help` only: `main` hands their arguments to `serve` unparsed."""
    for name, help_text in COMMANDS.items():
        sub.add_parser(
            name,
            help=f"{help_text}, with Ray's token auth as `ray start` set it (args go to serve)",
            add_help=False,
        )


def ray_token_source(env: dict[str, str]) -> str | None:
    """Where Ray would read its auth token from in this environment, or None: RAY_AUTH_TOKEN,
    then the file RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token (Ray's AuthenticationError lists
    these)."""
    if env.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return path if Path(path).expanduser().is_file() else None
    home = env.get("HOME") or str(Path.home())
    default = Path(home) / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def serve_cli_env(env: dict[str, str]) -> tuple[dict[str, str], str | None]:
    """The environment for the serve CLI that matches a `ray start` run in `env`.

    Ray 2.60's `ray start --head` turns token authentication on by itself when RAY_AUTH_MODE is
    unset and a token exists (any local `ray.init()`, so `specdec up`, writes ~/.ray/auth_token),
    but the serve CLI does not follow, and fails with "AuthenticationError: ... Missing
    authentication token". Apply the same rule for it; an explicit RAY_AUTH_MODE is kept.
    Returns the environment and the token source it switched on (None: unchanged)."""
    out = dict(env)
    if out.get("RAY_AUTH_MODE") is not None:
        return out, None
    source = ray_token_source(out)
    if source is not None:
        out["RAY_AUTH_MODE"] = "token"
    return out, source


def run(command: str, argv: list[str]) -> int:
    """`serve COMMAND ARGV...` (the `serve` beside this Python first), its exit code."""
    serve = Path(sys.executable).with_name("serve")
    exe = str(serve) if serve.is_file() else shutil.which("serve")
    if exe is None:
        print("specdec: the `serve` command (ray[serve]) is not installed", file=sys.stderr)
        return 2
    env, source = serve_cli_env(dict(os.environ))
    if source is not None:
        print(f"specdec {command}: Ray token authentication on (token: {source})", file=sys.stderr)
    return subprocess.call([exe, command.removeprefix("serve-"), *argv], env=env)
