"""The OpenAI translation alone (cluster/api/openai_*.py): JSON -> proto, router errors -> OpenAI
errors, responses and SSE, the model list.

No Ray, no server: the rules the HTTP API adds on top of the router's validation, in milliseconds.
The end-to-end behaviour (the real openai client against Serve): tests/cluster/test_openai_http.py.
"""

from __future__ import annotations

import json

import grpc
import pytest

from cluster.api.openai_errors import APIError, error_from_router
from cluster.api.openai_fields import parse_json
from cluster.api.openai_models import default_model_id, models_list
from cluster.api.openai_requests import Options, chat_request, completion_request
from cluster.api.openai_responses import DONE, ChunkWriter, Echo, response_json
from cluster.api.validation import RequestError
from cluster.scheduling.rounds import GenerationStats, RoundRecord
from protos import specdec_pb2 as pb
from tests.tiny_models import make_tokenizer

M = "m"


def comp(**body):
    return completion_request({"model": M, "prompt": "x", **body}, model_id=M)


def test_completion_request_maps_every_parameter():
    req, opts = comp(
        prompt=[3, 4],
        max_tokens=7,
        temperature=0.5,
        top_p=0.9,
        top_k=5,
        seed=3,
        stop="##",
        stream=True,
        stream_options={"include_usage": True},
        speculation={"mode": "OFF", "num_draft_tokens": 2, "drafter": "Lookup"},
        n=1,
        best_of=1,
        echo=False,
        user="u",
        presence_penalty=0,
        logit_bias={},
    )
    assert list(req.prompt_token_ids) == [3, 4] and not req.prompt
    assert req.max_new_tokens == 7 and req.temperature == 0.5 and req.top_k == 5
    assert req.top_p == pytest.approx(0.9) and req.seed == 3 and list(req.stop) == ["##"]
    assert req.speculation.mode == pb.SPECULATION_MODE_OFF
    assert req.speculation.num_draft_tokens == 2
    assert req.speculation.drafter == pb.DRAFTER_LOOKUP
    assert opts == Options(M, True, True)


def test_defaults_follow_openai_and_unset_stays_unset():
    req, opts = comp()
    assert req.prompt == "x" and req.temperature == 1.0  # OpenAI's default: sampling
    assert not req.HasField("max_new_tokens") and not req.HasField("seed")  # router defaults
    assert not req.HasField("top_p") and req.top_k == 0  # proto "unset"
    assert comp(top_p=0)[0].HasField("top_p")  # explicit: the one validation refuses it
    assert not opts.stream and not opts.include_usage
    assert comp(top_k=-1)[0].top_k == 0  # vLLM's "no top-k"
    assert comp(max_tokens=3.0)[0].max_new_tokens == 3  # an integral float is an integer


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"prompt": 3}, "prompt", "invalid_type"),
        ({"prompt": ["a", "b"]}, "prompt", "unsupported_parameter"),
        ({"prompt": [[1, 2]]}, "prompt", "unsupported_parameter"),
        ({"prompt": [1, True]}, "prompt", "invalid_type"),
        ({"prompt": [2**40]}, "prompt", "invalid_value"),
        ({"prompt": None}, "prompt", "missing_required_parameter"),
        ({"model": None}, "model", "missing_required_parameter"),
        ({"model": 3}, "model", "invalid_type"),
        ({"model": "other"}, "model", "model_not_found"),
        ({"max_tokens": True}, "max_tokens", "invalid_type"),
        ({"max_tokens": 1.5}, "max_tokens", "invalid_type"),
        ({"max_tokens": 2**40}, "max_tokens", "invalid_value"),
        ({"temperature": "1"}, "temperature", "invalid_type"),
        ({"seed": 2**70}, "seed", "invalid_value"),
        ({"stop": [1]}, "stop", "invalid_type"),
        ({"stream": 1}, "stream", "invalid_type"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"stream": True, "stream_options": {"x": 1}}, "stream_options.x", "unknown_parameter"),
        ({"speculation": {"mode": 2}}, "speculation.mode", "invalid_value"),
        ({"speculation": {"k": 2}}, "speculation.k", "unknown_parameter"),
        ({"speculation": {"drafter": "ngram"}}, "speculation.drafter", "invalid_value"),
        (
            {"speculation": {"num_draft_tokens": "2"}},
            "speculation.num_draft_tokens",
            "invalid_type",
        ),
        ({"frobnicate": 1}, "frobnicate", "unknown_parameter"),
        ({"n": "3"}, "n", "invalid_type"),
        ({"logprobs": True}, "logprobs", "invalid_type"),
        ({"echo": "yes"}, "echo", "invalid_type"),
        ({"best_of": 3}, "best_of", "unsupported_parameter"),
        ({"suffix": ""}, "suffix", "unsupported_parameter"),
        ({"frequency_penalty": "0.1"}, "frequency_penalty", "invalid_type"),
        ({"logit_bias": [1]}, "logit_bias", "invalid_type"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "invalid_value"),
        ({"logit_bias": {"1": True}}, "logit_bias", "invalid_value"),
        ({"temperature": 10**400}, "temperature", "invalid_value"),
    ],
)
def test_json_shapes_and_refused_parameters_are_400s_naming_them(body, param, code):
    with pytest.raises(APIError) as info:
        completion_request({"model": M, "prompt": "x", **body}, model_id=M)
    err = info.value
    assert (err.status, err.param, err.code) == (400, param, code)
    assert err.message.startswith(f"{param}: ")
    assert json.dumps(err.body())  # serialisable, OpenAI's shape
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("raw", [b"{", b"[]", b"3", b"\xff", b""])
def test_a_body_that_is_not_a_json_object_is_a_400(raw):
    with pytest.raises(APIError) as info:
        parse_json(raw)
    assert info.value.status == 400 and info.value.param is None


@pytest.mark.parametrize(
    ("code", "field", "status", "param"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens", 400, "max_tokens"),
        (grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids", 400, "prompt"),
        (grpc.StatusCode.INVALID_ARGUMENT, "top_p", 400, "top_p"),
        (grpc.StatusCode.INVALID_ARGUMENT, "speculation.num_draft_tokens", 400,
         "speculation.num_draft_tokens"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "", 429, None),
        (grpc.StatusCode.UNAVAILABLE, "", 503, None),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", 408, None),
        (grpc.StatusCode.CANCELLED, "", 499, None),
        (grpc.StatusCode.INTERNAL, "", 500, None),
    ],
)  # fmt: skip
def test_router_errors_map_to_http_status_and_param(code, field, status, param):
    exc = RequestError(code, field, "why")
    err = error_from_router(exc.code, exc.field, exc.message)
    assert (err.status, err.param) == (status, param)
    assert err.message == (f"{param}: why" if param else "why")


def test_a_field_named_only_in_the_message_is_the_param():
    """The router's RequestError from a later refusal (a worker's ValueError) has no field, but
    its message starts with it."""
    err = error_from_router(
        grpc.StatusCode.INVALID_ARGUMENT, "", "prompt: 512 tokens exceed the model context of 512"
    )
    assert err.param == "prompt" and err.message.startswith("prompt: 512 tokens")
    err = error_from_router(grpc.StatusCode.INVALID_ARGUMENT, "", "worker: something: odd")
    assert err.param is None and err.message == "worker: something: odd"


def test_chat_names_prompt_errors_messages_and_max_tokens_as_sent():
    err = error_from_router(grpc.StatusCode.INVALID_ARGUMENT, "prompt", "too long", chat=True)
    assert err.param == "messages"
    err = error_from_router(
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_new_tokens",
        "bad",
        chat=True,
        max_tokens_param="max_completion_tokens",
    )
    assert err.param == "max_completion_tokens"


TEMPLATE = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}[assistant]"


def test_chat_request_renders_the_template_and_refuses_without_one():
    tok = make_tokenizer()
    body = {"model": M, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    with pytest.raises(APIError) as info:
        chat_request(body, model_id=M, tokenizer=tok)
    assert info.value.status == 400 and info.value.code == "chat_template_missing"
    assert "no chat template" in info.value.message
    tok.chat_template = TEMPLATE
    req, opts = chat_request({**body, "max_completion_tokens": 5}, model_id=M, tokenizer=tok)
    assert req.prompt == "[user]hi[assistant]" and req.max_new_tokens == 5
    assert opts.chat and opts.max_tokens_param == "max_completion_tokens"
    for bad, param in [
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0]"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"top_logprobs": 2}, "top_logprobs"),  # only with logprobs: true
        ({"logprobs": 1}, "logprobs"),
        ({"max_tokens": 3, "max_completion_tokens": 3}, "max_tokens"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
        ({"guided_regex": "a", "response_format": {"type": "text"}}, "guided_regex"),
    ]:  # fmt: skip
        with pytest.raises(APIError) as info:
            chat_request({**body, **bad}, model_id=M, tokenizer=tok)
        assert info.value.param == param, bad


def final_message(text: str = "b") -> pb.GenerateResponse:
    msg = pb.GenerateResponse(text=text, token_ids=[5], finish_reason=pb.FINISH_REASON_EOS)
    msg.usage.prompt_tokens, msg.usage.completion_tokens = 3, 2
    msg.stats.rounds, msg.stats.draft_tokens, msg.stats.accepted_tokens = 2, 6, 3
    msg.stats.acceptance_histogram.extend([0, 1, 1, 0])
    msg.stats.acceptance_rate = 0.5
    return msg


def test_unary_response_and_the_vllm_metrics_shape():
    opts = Options(M, False, False)
    out = response_json(final_message("ab"), opts, rid="cmpl-1", created=7)
    assert out["id"] == "cmpl-1" and out["object"] == "text_completion" and out["created"] == 7
    assert out["choices"] == [{"index": 0, "text": "ab", "logprobs": None, "finish_reason": "stop"}]
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    m = out["metrics"]["speculative_decoding"]
    assert m["mean_acceptance_length"] == 2.5 and m["draft_acceptance_rate"] == 0.5
    assert m["acceptance_histogram"] == [0, 1, 1, 0] and m["num_spec_tokens"] == 3
    assert (m["num_spec_steps"], m["num_draft_tokens"], m["num_accepted_draft_tokens"]) == (2, 6, 3)
    chat = response_json(final_message(), Options(M, False, False, chat=True))
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "b"}


def with_logprobs(msg: pb.GenerateResponse, *entries: tuple) -> pb.GenerateResponse:
    """entries: (token id, logprob, [(top id, top logprob), ...])"""
    for token, lp, top in entries:
        e = msg.logprobs.add(token_id=token, logprob=lp)
        for i, v in top:
            e.top.add(token_id=i, logprob=v)
    return msg


TEXTS = {5: "b", 6: "é", 7: "c"}.__getitem__


def test_logprobs_in_each_endpoints_shape():
    msg = with_logprobs(final_message("bé"), (5, -0.5, [(5, -0.5), (7, -1.0)]), (6, -2.0, []))
    chat = response_json(msg, Options(M, False, False, chat=True, logprobs=True), text_of=TEXTS)
    assert chat["choices"][0]["logprobs"] == {
        "content": [
            {
                "token": "b",
                "logprob": -0.5,
                "bytes": [98],
                "top_logprobs": [
                    {"token": "b", "logprob": -0.5, "bytes": [98]},
                    {"token": "c", "logprob": -1.0, "bytes": [99]},
                ],
            },
            {"token": "é", "logprob": -2.0, "bytes": [195, 169], "top_logprobs": []},
        ]
    }
    text = response_json(msg, Options(M, False, False, logprobs=True), text_of=TEXTS)
    assert text["choices"][0]["logprobs"] == {
        "tokens": ["b", "é"],
        "token_logprobs": [-0.5, -2.0],
        "top_logprobs": [{"b": -0.5, "c": -1.0}, {"é": -2.0}],  # the chosen token always in
        "text_offset": [0, 1],
    }
    assert (
        response_json(msg, Options(M, False, False), text_of=TEXTS)["choices"][0]["logprobs"]
        is None
    )  # not asked
    # Streamed: each chunk carries its own tokens' entries; offsets run on across chunks.
    w = ChunkWriter(Options(M, True, False, logprobs=True), text_of=TEXTS)
    first = with_logprobs(pb.GenerateResponse(text="b", token_ids=[5]), (5, -0.5, []))
    last = with_logprobs(final_message("c"), (7, -1.0, []))
    got = events(w, first, last)
    assert [c["choices"][0]["logprobs"]["tokens"] for c in got] == [["b"], ["c"]]
    assert [c["choices"][0]["logprobs"]["text_offset"] for c in got] == [[0], [1]]


def test_echo_starts_the_text_and_the_logprobs_with_the_prompt():
    msg = with_logprobs(final_message("c"), (7, -1.0, []))
    msg.prompt_logprobs.add(token_id=6, logprob=-2.0)  # the prompt is "bé": 5, 6
    echo = Echo("bé", 5)
    opts = Options(M, False, False, logprobs=True, echo=True)
    out = response_json(msg, opts, text_of=TEXTS, echo=echo)["choices"][0]
    assert out["text"] == "béc"
    assert out["logprobs"] == {
        "tokens": ["b", "é", "c"],
        "token_logprobs": [None, -2.0, -1.0],  # nothing predicts the first prompt token
        "top_logprobs": [None, {"é": -2.0}, {"c": -1.0}],
        "text_offset": [0, 1, 2],
    }
    stream = ChunkWriter(
        Options(M, True, False, logprobs=True, echo=True), text_of=TEXTS, echo=echo
    )
    first = with_logprobs(pb.GenerateResponse(text="c", token_ids=[7]), (7, -1.0, []))
    first.prompt_logprobs.add(token_id=6, logprob=-2.0)
    got = events(stream, first, final_message(""))
    assert got[0]["choices"][0]["text"] == "béc" and got[1]["choices"][0]["text"] == ""
    assert got[0]["choices"][0]["logprobs"]["tokens"] == ["b", "é", "c"]
    req, opts = comp(echo=True, logprobs=2)
    assert opts.echo and req.prompt_logprobs == 2
    assert not comp(echo=True)[0].HasField("prompt_logprobs")  # text only: none computed


def events(writer: ChunkWriter, *msgs: pb.GenerateResponse) -> list[dict]:
    out = []
    for msg in msgs:
        for line in writer.events(msg):
            assert line.startswith("data: ") and line.endswith("\n\n")
            out.append(json.loads(line[6:]))
    return out


def test_stream_chunks_in_openai_order():
    w = ChunkWriter(Options(M, True, True), rid="cmpl-2")
    got = events(w, pb.GenerateResponse(text="a"), pb.GenerateResponse(), final_message())
    assert [c["choices"][0]["text"] if c["choices"] else None for c in got] == ["a", "b", None]
    assert [c["choices"][0]["finish_reason"] if c["choices"] else None for c in got] == [
        None,
        "stop",
        None,
    ]
    assert got[0]["usage"] is None and got[-1]["usage"]["total_tokens"] == 5
    assert "metrics" in got[1] and "metrics" in got[2]
    assert {c["id"] for c in got} == {"cmpl-2"}
    chat = ChunkWriter(Options(M, True, False, chat=True))
    got = events(chat, pb.GenerateResponse(text="a"), final_message(""))
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert got[1]["choices"][0]["delta"] == {"content": "a"}
    assert got[2]["choices"][0]["delta"] == {} and got[2]["choices"][0]["finish_reason"] == "stop"
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in got)
    assert DONE == "data: [DONE]\n\n"


def test_acceptance_histogram_of_the_round_records():
    s = GenerationStats(records=[RoundRecord(3, 3, 4), RoundRecord(0, 0, 1), RoundRecord(2, 0, 1),
                                 RoundRecord(3, 1, 2)])  # fmt: skip
    assert s.acceptance_histogram == [1, 1, 0, 1]
    assert GenerationStats().acceptance_histogram == []


def test_default_model_id_is_the_target_directory_name(tmp_path):
    assert default_model_id(tmp_path / "SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert models_list("x", 5)["data"][0] == {
        "id": "x",
        "object": "model",
        "created": 5,
        "owned_by": "specdec",
    }


def test_penalties_bias_and_min_p_translate_to_the_proto():
    req, _ = comp(
        presence_penalty=0.5,
        frequency_penalty=-1,
        repetition_penalty=1.2,
        min_p=0.1,
        logit_bias={"5": -100, "7": 2.5},
    )
    assert (req.presence_penalty, req.frequency_penalty) == (0.5, -1.0)
    assert req.HasField("repetition_penalty") and req.repetition_penalty == pytest.approx(1.2)
    assert req.min_p == pytest.approx(0.1) and dict(req.logit_bias) == {5: -100.0, 7: 2.5}
    assert not comp()[0].HasField("repetition_penalty")  # unset: off, not 0


def test_structured_outputs_translate_to_the_proto():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    req, opts = comp(response_format=fmt)
    assert json.loads(req.structured_output.json_schema) == schema
    assert opts.structured_param == "response_format"
    assert comp(response_format={"type": "json_object"})[0].structured_output.json_object
    assert not comp(response_format={"type": "text"})[0].HasField("structured_output")
    assert json.loads(comp(guided_json=schema)[0].structured_output.json_schema) == schema
    req, opts = comp(guided_regex="[0-9]+")
    assert req.structured_output.regex == "[0-9]+" and opts.structured_param == "guided_regex"
    assert comp(guided_grammar='start: "x"')[0].structured_output.lark == 'start: "x"'
    err = error_from_router(
        "INVALID_ARGUMENT", "structured_output.regex", "bad", structured_param="guided_regex"
    )
    assert err.param == "guided_regex"


def test_vllm_benchmark_fields_are_taken():
    """What vLLM's benchmark and load clients send: ignore_eos with min_tokens = max_tokens,
    stop: null, both stream_options flags, stop_token_ids, include_stop_str_in_output."""
    req, opts = comp(
        max_tokens=8,
        ignore_eos=True,
        min_tokens=8,
        stop=None,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        include_stop_str_in_output=True,
    )
    assert req.ignore_eos and req.include_stop_str_in_output and req.max_new_tokens == 8
    assert opts.include_usage and opts.continuous_usage
    assert req.min_tokens == 8
    req, _ = comp(stop_token_ids=[3, 7], min_tokens=4)
    assert list(req.stop_token_ids) == [3, 7] and not req.ignore_eos and req.min_tokens == 4
    for body, param in (
        ({"min_tokens": 2**40}, "min_tokens"),
        ({"stop_token_ids": [1.5]}, "stop_token_ids"),
        ({"stop_token_ids": [-2]}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ):
        with pytest.raises(APIError) as err:
            comp(**body)
        assert err.value.param == param, body


def test_continuous_usage_is_on_every_chunk():
    _, opts = comp(stream=True, stream_options={"continuous_usage_stats": True})
    writer = ChunkWriter(opts, rid="cmpl-1", now=lambda: 0, prompt_tokens=5)
    first = [
        json.loads(e[6:]) for e in writer.events(pb.GenerateResponse(text="ab", token_ids=[1, 2]))
    ]
    last = [
        json.loads(e[6:])
        for e in writer.events(
            pb.GenerateResponse(text="c", token_ids=[3], finish_reason=pb.FINISH_REASON_LENGTH)
        )
    ]
    assert first[0]["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert last[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
