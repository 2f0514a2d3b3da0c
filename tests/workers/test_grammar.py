"""Structured outputs: compiling a schema, expression or grammar (clear errors), the per-row
masks of a verify pass (each row the grammar's state after its own prefix, the matcher back
where it began), and the target: greedy with speculation equals plain decoding, and every
sampled output, speculative or not, parses and validates."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from tests.tiny_models import make_model
from workers.batch import PrefillRow, VerifyRow
from workers.grammar import OutputGrammar, compile_grammar
from workers.model_runner import load_tokenizer
from workers.target import TargetWorker
from workers.types import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 4},
        "ok": {"type": "boolean"},
        "size": {"enum": ["S", "M", "L"]},
        "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                 "maxItems": 3},
    },
    "required": ["name", "ok", "size", "tags"],
    "additionalProperties": False,
}  # fmt: skip


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("grammar") / "target", seed=4, layers=2)


@pytest.mark.parametrize(
    ("kind", "source", "says"),
    [
        ("json_schema", "{not json", "not valid JSON"),
        ("json_schema", "[1, 2]", "schema is an object"),
        ("regex", "a(b", "unclosed group"),
        ("lark", "start: missing_rule", "missing_rule"),
        ("xml", "", "unknown kind"),
        ("regex", "a" * 70000, "at most"),
    ],
)
def test_what_does_not_compile_is_a_clear_value_error(kind, source, says):
    with pytest.raises(ValueError, match=says):
        compile_grammar(kind, source)


def test_each_row_is_masked_by_the_state_after_its_own_prefix(path):
    tok = load_tokenizer(path)
    grammar = compile_grammar("regex", r'\{"a":[0-9]{1,3}\}')
    ids = tok.encode('{"a":12}', add_special_tokens=False)
    state = OutputGrammar(tok, grammar, 96, ids[:2])
    block = [*ids[2:6], tok.encode("x", add_special_tokens=False)[0], ids[6]]  # 'x' is refused
    rows = state.mask(torch.zeros(len(block) + 1, 96), block)
    for i in range(5):  # up to and including the refused token's row
        alone = OutputGrammar(tok, grammar, 96, ids[:2] + block[:i]).mask(torch.zeros(1, 96), ())
        assert torch.equal(rows[i], alone[0]), i
    assert torch.equal(rows[5], rows[4]) and torch.equal(rows[6], rows[4])  # never used
    again = state.mask(torch.zeros(1, 96), ())  # the matcher is back where it began
    assert torch.equal(again[0], rows[0])
    allowed = (rows[4] > float("-inf")).nonzero().view(-1).tolist()
    assert sorted(tok.decode([t]) for t in allowed) == [*"0123456789", "}"]


def run(worker: TargetWorker, params: SamplingParams, draft_len: int, n_max: int = 120):
    """Decode to EOS: blocks of the target's own argmax so far (a lookup-like draft that is
    often wrong under the grammar), or plain steps when draft_len is 0."""
    prompt = [5, 17, 40]
    tokens = [*prompt, int(worker.prefill_batch([PrefillRow("s", prompt, params)])[0])]
    gen = torch.Generator().manual_seed(params.seed or 0)
    while tokens[-1] != 0 and len(tokens) - len(prompt) < n_max:
        draft = torch.randint(1, 96, (draft_len,), generator=gen).tolist()
        verdict = worker.verify_batch([VerifyRow("s", len(tokens), draft, one_hot=True)])[0]
        tokens += verdict.committed(draft)
    worker.release("s")
    return tokens[len(prompt) :]


def test_structured_output_on_the_target_with_and_without_speculation(path):
    worker = TargetWorker.from_path(path)
    tok = worker.runner.tokenizer
    grammar = compile_grammar("json_schema", json.dumps(SCHEMA))

    def text(ids: list[int]) -> str:
        assert ids[-1] == 0, "the grammar ended the output with EOS"
        return "".join(tok.decode([t]) for t in ids[:-1])

    greedy = SamplingParams(grammar=grammar)
    assert run(worker, greedy, 0) == run(worker, greedy, 3) == run(worker, greedy, 6)
    jsonschema.validate(json.loads(text(run(worker, greedy, 0))), SCHEMA)
    for seed in range(12):
        sampled = SamplingParams(temperature=1.0, seed=seed, grammar=grammar)
        for k in (0, 4):
            jsonschema.validate(json.loads(text(run(worker, sampled, k))), SCHEMA)
    assert worker.live_sequences == 0


def test_a_re_prefill_resumes_the_grammar_from_the_output_so_far(path):
    worker = TargetWorker.from_path(path)
    grammar = compile_grammar("regex", "[a-c]{6}")
    params = SamplingParams(grammar=grammar)
    whole = run(worker, params, 2)
    prompt = [5, 17, 40]
    resumed = prompt + whole[:3]
    first = worker.prefill_batch([PrefillRow("r", resumed, params, prompt_len=3)])[0]
    assert first == whole[3]  # the grammar counted the three output letters already there
    bad = SamplingParams(grammar='{"grammars": [{"lark_grammar": "start: nope"}]}')
    (err,) = worker.prefill_batch([PrefillRow("b", prompt, bad)])
    assert isinstance(err, ValueError) and "grammar" in str(err)
    assert worker.runner.held("b") == 0
