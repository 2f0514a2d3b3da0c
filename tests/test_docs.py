"""The README and docs/ say what the code does: the configuration reference is the one generated
from cluster/config.py, every `specdec` command they show still parses with the options shown,
every `python -m` module and repository path they name exists, every relative link (and its
#anchor) resolves, and the README stays a front door (at most 160 lines)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from cluster import config_reference
from cluster.cli import main as specdec_main
from cluster.config import ClusterConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 160

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
SPAN = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"\bspecdec ([a-z][a-z0-9-]*)([^`#\n]*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
MODULE = re.compile(r"\bpython -m ([\w.]+)")
REPO_PATH = re.compile(r"^(?:cluster|workers|pairs|bench|protos|deploy|tests|docs)/[\w./*-]*$")


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def code_texts(page: Path) -> list[str]:
    """Inline code spans (whitespace folded: a span may wrap) and fenced code blocks."""
    text = page.read_text()
    spans = [" ".join(s.split()) for s in SPAN.findall(prose(text))]
    return spans + FENCE.findall(text)


def shown_commands() -> dict[str, set[str]]:
    """specdec subcommand -> every --option shown with it, over the README and docs/."""
    found: dict[str, set[str]] = {}
    for page in PAGES:
        for code in code_texts(page):
            for sub, rest in COMMAND.findall(code):
                found.setdefault(sub, set()).update(FLAG.findall(rest))
    return found


def help_text(sub: str, capfd) -> str:
    """`specdec SUB --help`, run in this process (deploy/status run `serve ... --help`)."""
    try:
        code = specdec_main([sub, "--help"])
    except SystemExit as exc:
        code = exc.code
    out = capfd.readouterr()
    assert code in (0, None), f"`specdec {sub} --help` exited {code}:\n{out.err[-2000:]}"
    return out.out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", prose(page.read_text()), re.M)}


# -- the configuration reference ------------------------------------------------------------------


def test_configuration_reference_is_generated_from_the_config():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == config_reference.render(), (
        "docs/configuration.md is out of date: python -m cluster.config_reference > "
        "docs/configuration.md"
    )
    assert config_reference.main(["--check"]) == 0


def test_every_config_key_is_in_the_reference_with_a_description():
    keys = [key for section in config_reference.sections() for key in section.keys]
    dotted = {key.dotted for key in keys}
    assert {"target.tp_size", "draft.pool.resource", "speculation.pipelined"} <= dotted
    assert [key.dotted for key in keys if not key.description] == []
    for section in config_reference.sections():
        required = {k.dotted: "x" for k in section.keys if k.default is config_reference.REQUIRED}
        for key in section.keys:  # every dotted key is one the config accepts (its default,
            # round-tripped; a section with keys that have no default gets them set)
            if key.default is not config_reference.REQUIRED:
                ClusterConfig.load({}).with_overrides({**required, key.dotted: key.default})


# -- commands -------------------------------------------------------------------------------------


def test_the_docs_show_the_main_commands():
    assert {"up", "generate", "deploy", "status", "models", "bench"} <= set(shown_commands())


@pytest.mark.parametrize("sub", sorted(shown_commands()))
def test_every_specdec_command_shown_parses_with_its_options(sub, capfd):
    text = help_text(sub, capfd)
    missing = sorted(flag for flag in shown_commands()[sub] if flag not in text)
    assert not missing, f"`specdec {sub} --help` has no {missing}, which the docs show"


def test_every_python_module_shown_exists():
    modules = {m for page in PAGES for code in code_texts(page) for m in MODULE.findall(code)}
    assert "cluster.config_reference" in modules
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not missing, f"`python -m` of modules that do not exist: {missing}"


# -- paths and links ------------------------------------------------------------------------------


def test_every_repository_path_named_exists():
    bad = []
    for page in PAGES:
        for span in SPAN.findall(prose(page.read_text())):
            if REPO_PATH.match(span) and not list(ROOT.glob(span.rstrip("/"))):
                bad.append(f"{rel(page)}: {span}")
    assert not bad, "paths that do not exist:\n" + "\n".join(bad)


def test_every_relative_link_resolves():
    bad = []
    for page in PAGES:
        for target in LINK.findall(prose(page.read_text())):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{rel(page)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{rel(page)}: {target} (no such heading)")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_readme_is_a_front_door_to_every_page():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    linked = {target.partition("#")[0] for target in LINK.findall(prose(text))}
    unlinked = [rel(p) for p in PAGES[1:] if rel(p) not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
