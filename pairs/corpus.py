"""The training corpus: the running interpreter's standard library sources, split by file."""

from __future__ import annotations

import json
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

_DEF_RE = re.compile(r"^[ \t]*(async[ \t]+)?def[ \t]+\w+.*:[ \t]*(#.*)?$")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def list_stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths of every stdlib .py file, sorted, site-packages excluded."""
    root = root or stdlib_root()
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if "site-packages" in rel.parts or "dist-packages" in rel.parts:
            continue
        out.append(rel.as_posix())
    return sorted(out)


@dataclass(slots=True)
class Split:
    root: str
    train: list[str]
    heldout: list[str]
    seed: int

    def save(self, path: Path) -> None:
        # Only the held-out list is needed to reproduce the split; train is everything else.
        data = {
            "root": self.root,
            "seed": self.seed,
            "n_train": len(self.train),
            "heldout": self.heldout,
        }
        path.write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: Path, root: Path | None = None) -> Split:
        data = json.loads(Path(path).read_text())
        root = root or stdlib_root()
        held = [f for f in data["heldout"] if (root / f).is_file()]
        held_set = set(held)
        train = [f for f in list_stdlib_files(root) if f not in held_set]
        return cls(root=str(root), train=train, heldout=held, seed=data["seed"])


def make_split(files: list[str], root: Path, heldout_frac: float, seed: int) -> Split:
    """Seeded split by file, so no held-out text leaks into training."""
    rng = random.Random(seed)
    shuffled = list(files)
    rng.shuffle(shuffled)
    n_held = max(1, round(len(files) * heldout_frac))
    held = sorted(shuffled[:n_held])
    held_set = set(held)
    return Split(str(root), [f for f in files if f not in held_set], held, seed)


def read_text(root: Path, rel: str) -> str:
    try:
        return (Path(root) / rel).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


def function_prompts(text: str, max_chars: int = 4000) -> list[str]:
    """Prompts at function starts: the file text up to a `def ...:` line plus the next line."""
    lines = text.splitlines(keepends=True)
    prompts = []
    offset = 0
    starts = []
    for line in lines:
        starts.append(offset)
        offset += len(line)
    for i, line in enumerate(lines[:-1]):
        if _DEF_RE.match(line.rstrip("\n")) and lines[i + 1].strip():
            # Stop before the next line's newline: byte-level BPE merges "\n" with the
            # following indentation, so a prompt ending in a bare "\n" would tell the model
            # the next line starts at column 0.
            end = starts[i + 1] + len(lines[i + 1].rstrip("\r\n"))
            prompts.append(text[max(0, end - max_chars) : end])
    return prompts
