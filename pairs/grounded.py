"""Grounded requests: the answer repeats text the prompt gives (the `grounded` bench workload).

Built from the held-out files of a pair's split (Python's standard library, installed with the
interpreter; nothing is downloaded): edits of a function given in the prompt (rename a variable,
add type hints, add a docstring: the answer is mostly the function again) and extraction from a
passage (a module's docstring: quote the sentences that mention a word). Where drafting by lookup
pays, and where a model draft of the same text does no better than on chat.
"""

from __future__ import annotations

import ast
import random
import re
from pathlib import Path

from pairs import corpus

EDITS = (
    "Rename the variable `{name}` to `{new}` in this Python function. Reply with the whole "
    "function and nothing else.",
    "Add type hints to this Python function. Reply with the whole function and nothing else.",
    "Add a one-line comment above each statement of this Python function. Reply with the whole "
    "function.",
)
EXTRACT = (
    "Quote, word for word, every sentence of this passage that mentions `{word}`.",
    "Copy the first two sentences of this passage exactly, then summarise the rest in one line.",
)


def _functions(text: str, min_lines: int = 6, max_lines: int = 28) -> list[tuple[str, str]]:
    """(source, a local variable name) of the mid-sized top-level functions of a file."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        src = ast.get_source_segment(text, node)
        if src is None or not min_lines <= src.count("\n") + 1 <= max_lines:
            continue
        names = sorted(
            {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and len(n.id) > 2}
            | {a.arg for a in node.args.args if len(a.arg) > 2}
        )
        if names:
            out.append((src, names[0]))
    return out


def _passage(text: str, max_chars: int = 1200) -> tuple[str, str] | None:
    """(a module docstring of several sentences, a word it uses) or None."""
    try:
        doc = ast.get_docstring(ast.parse(text))
    except (SyntaxError, ValueError):
        return None
    if not doc or doc.count(". ") < 3:
        return None
    doc = doc[:max_chars]
    words = re.findall(r"[A-Za-z]{6,}", doc)
    return (doc, words[len(words) // 2]) if words else None


def grounded_requests(split_path: Path, n: int, seed: int = 0) -> list[str]:
    """n user messages (two edits for every extraction), in a fixed seeded order."""
    split = corpus.Split.load(split_path)
    root = Path(split.root)
    rng = random.Random(seed)
    edits, extracts = [], []
    for rel in split.heldout:
        text = corpus.read_text(root, rel)
        if not text:
            continue
        for src, name in _functions(text):
            ask = rng.choice(EDITS).format(name=name, new=f"{name}_value")
            edits.append(f"{ask}\n\n```python\n{src}\n```")
        passage = _passage(text)
        if passage is not None:
            doc, word = passage
            ask = rng.choice(EXTRACT).format(word=word)
            extracts.append(f"{ask}\n\n{doc}")
    rng.shuffle(edits)
    rng.shuffle(extracts)
    k = n // 3
    return edits[: n - k] + extracts[:k]


def grounded_prompts(tok, split_path: Path, n: int, chat: bool, max_tokens: int = 768):
    """The requests as prompt token ids: through the chat template for an instruct target,
    plain text otherwise; prompts longer than max_tokens are left out."""
    out = []
    for msg in grounded_requests(split_path, 4 * n):
        if chat:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": msg}], add_generation_prompt=True, tokenize=True
            )
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        else:
            ids = tok.encode(msg, add_special_tokens=False)
        if len(ids) <= max_tokens:
            out.append(ids)
        if len(out) == n:
            break
    return out
