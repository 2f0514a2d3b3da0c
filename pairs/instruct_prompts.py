"""Prompts for distilling a draft from an instruct target, built from what is on the machine.

Two kinds, because a served instruct model sees both: chat requests (through the chat
template) made from the standard library's functions, docstrings and module summaries, and raw
code prompts (a file up to a function's first line). Built per source file, so a file split
keeps held-out prompts apart from training ones.
"""

from __future__ import annotations

import ast
import random
from dataclasses import dataclass

from pairs import corpus

_GENERAL = (
    "Give me three tips about {t}.",
    "Explain {t} to a beginner.",
    "Write a short paragraph about {t}.",
    "What are common mistakes people make with {t}?",
    "Write a haiku about {t}.",
    "Summarize in two sentences what {t} means.",
)


@dataclass(slots=True, frozen=True)
class Prompt:
    kind: str  # "chat" (a user message for the chat template) or "code" (raw text)
    text: str


def _first_sentence(doc: str) -> str:
    line = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
    return line.split(". ")[0].rstrip(".")


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


def file_prompts(
    module: str, text: str, rng: random.Random, max_code_chars: int = 900
) -> list[Prompt]:
    """Chat and code prompts from one source file (empty when it does not parse)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines()
    out: list[Prompt] = []
    mod_doc = ast.get_docstring(tree)
    if mod_doc and len(_first_sentence(mod_doc)) > 12:
        topic = _lower_first(_first_sentence(mod_doc))
        out.append(Prompt("chat", f"What is the Python module `{module}` for?"))
        out.append(Prompt("chat", rng.choice(_GENERAL).format(t=topic)))
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if node.name.startswith("_") or node.name.startswith("test"):
            continue
        doc = ast.get_docstring(node)
        args = ", ".join(a.arg for a in node.args.args if a.arg not in ("self", "cls"))
        src = "\n".join(
            lines[node.lineno - 1 : min(node.end_lineno or node.lineno, node.lineno + 18)]
        )
        choice = rng.random()
        if doc and len(_first_sentence(doc)) > 12 and choice < 0.45:
            what = _lower_first(_first_sentence(doc))
            out.append(
                Prompt(
                    "chat", f"Write a Python function `{node.name}({args})` that does this: {what}."
                )
            )
        elif choice < 0.75 and len(src) < 1200:
            out.append(
                Prompt("chat", f"What does this Python function do?\n\n```python\n{src}\n```")
            )
        elif doc and len(_first_sentence(doc)) > 12:
            out.append(Prompt("chat", f"In Python's `{module}`, how is `{node.name}` used?"))
    for p in corpus.function_prompts(text, max_code_chars):
        if rng.random() < 0.35:
            out.append(Prompt("code", p))
    return out


def build_prompts(files: list[str], seed: int) -> list[Prompt]:
    """Prompts from the given stdlib files (relative paths), shuffled with a seed."""
    root = corpus.stdlib_root()
    rng = random.Random(seed)
    out: list[Prompt] = []
    for rel in files:
        text = corpus.read_text(root, rel)
        if not text:
            continue
        module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        out += file_prompts(module, text, rng)
    rng.shuffle(out)
    return out


def encode(tok, prompt: Prompt, max_tokens: int) -> list[int]:
    """Token ids the target sees: chat through its template, code as raw text (left-cut)."""
    if prompt.kind == "chat":
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt.text}], add_generation_prompt=True, tokenize=True
        )
        if not isinstance(ids, list):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)[-max_tokens:]
    return tok(prompt.text, add_special_tokens=False)["input_ids"][-max_tokens:]


def encoded_prompts(
    tok, files: list[str], seed: int, max_tokens: int
) -> list[tuple[str, list[int]]]:
    """(kind, ids) of the files' prompts in build_prompts' order. A chat request longer than
    max_tokens is left out, never cut (its template's head must stay); code is left-cut."""
    rows = []
    for p in build_prompts(files, seed):
        ids = encode(tok, p, 10**9)
        if p.kind == "chat" and len(ids) > max_tokens:
            continue
        rows.append((p.kind, ids[-max_tokens:]))
    return rows
