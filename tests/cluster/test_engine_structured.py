"""Structured outputs through the engine's scheduler: 50 sampled generations against JSON
schemas (nested objects, enums, arrays), speculation on (model, lookup and the grammar's forced
blocks) and off, all parse and validate; greedy with speculation equals greedy without."""

from __future__ import annotations

import json

import jsonschema
import pytest

from cluster.engine import SpecEngine
from cluster.scheduling.policy import SpecMode
from tests.tiny_models import make_model
from workers.grammar import compile_grammar
from workers.types import SamplingParams

SCHEMAS = [
    {  # a nested object
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                               "admin": {"type": "boolean"}},
                "required": ["id", "admin"],
                "additionalProperties": False,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["user", "ok"],
        "additionalProperties": False,
    },
    {  # enums
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]},
                       "size": {"enum": [1, 2, 3]}},
        "required": ["color", "size"],
        "additionalProperties": False,
    },
    {  # arrays
        "type": "array",
        "items": {"type": "object",
                  "properties": {"k": {"type": "string", "maxLength": 3}},
                  "required": ["k"], "additionalProperties": False},
        "minItems": 1,
        "maxItems": 3,
    },
]  # fmt: skip
MAX_NEW = 120


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = tmp_path_factory.mktemp("structured")
    make_model(d / "target", seed=2)
    engine = SpecEngine.from_paths(d / "target", d / "target")  # the target as its own draft
    yield engine
    engine.close()


def text(engine: SpecEngine, ids: list[int]) -> str:
    assert ids and ids[-1] == 0, "the grammar's end is followed by EOS"
    return "".join(engine.tokenizer.decode([t]) for t in ids[:-1])


def test_fifty_sampled_generations_parse_and_validate(engine):
    rounds = 0
    for i in range(50):
        schema = SCHEMAS[i % len(SCHEMAS)]
        params = SamplingParams(
            temperature=1.0, seed=i, grammar=compile_grammar("json_schema", json.dumps(schema))
        )
        mode = SpecMode.ON if i % 2 == 0 else SpecMode.OFF
        res = engine.generate("q:", max_new_tokens=MAX_NEW, sampling=params, mode=mode, k=4)
        jsonschema.validate(json.loads(text(engine, res.token_ids)), schema)
        rounds += res.stats.rounds
    assert rounds > 0


def test_greedy_with_speculation_equals_greedy_without(engine):
    for schema in SCHEMAS:
        params = SamplingParams(grammar=compile_grammar("json_schema", json.dumps(schema)))
        on = engine.generate("q:", max_new_tokens=MAX_NEW, sampling=params, mode=SpecMode.ON, k=4)
        off = engine.generate("q:", max_new_tokens=MAX_NEW, sampling=params, mode=SpecMode.OFF)
        assert on.token_ids == off.token_ids
        assert on.stats.rounds > 0 and on.stats.accepted_tokens > 0
        # The keys and punctuation the schema forces went as certain blocks, all accepted.
        rounds, proposed, accepted = on.stats.by_drafter["grammar"]
        assert rounds > 0 and proposed == accepted > rounds
        assert "grammar" not in off.stats.by_drafter  # OFF: plain steps only, as asked
        jsonschema.validate(json.loads(text(engine, on.token_ids)), schema)
    regex = SamplingParams(grammar=compile_grammar("regex", "(yes|no), [0-9]{2}"))
    out = engine.generate("q:", max_new_tokens=MAX_NEW, sampling=regex, mode=SpecMode.ON, k=3)
    assert text(engine, out.token_ids) in {
        f"{w}, {n:02d}" for w in ("yes", "no") for n in range(100)
    }
