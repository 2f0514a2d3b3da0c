"""A public generation request, checked: one validation for every API (gRPC and HTTP).

`validate_request` turns a `specdec.v1.GenerateRequest` into a `ValidRequest` (token ids, sampling,
limits, speculation control) or raises `RequestError(INVALID_ARGUMENT, field, ...)` whose details
start with the offending field, e.g. "top_p: must be in (0, 1] (unset = 1.0), got 1.5". Other
front ends (the OpenAI-compatible HTTP API) build the same proto and map `field` back to their own
parameter names, so the rules live here once. The token-range rules (ids inside the vocabulary,
the prompt inside the context) are the workers' own (workers/token_range.py), answered here
before a request reaches one.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import grpc

from cluster.scheduling.policy import Drafter, SpecMode
from protos import specdec_pb2
from workers.grammar import compile_grammar
from workers.token_range import TokenRangeError, check_length, check_token_ids
from workers.types import MAX_TOP_LOGPROBS, SamplingParams

log = logging.getLogger(__name__)

MODES = {
    specdec_pb2.SPECULATION_MODE_UNSPECIFIED: SpecMode.AUTO,
    specdec_pb2.SPECULATION_MODE_AUTO: SpecMode.AUTO,
    specdec_pb2.SPECULATION_MODE_ON: SpecMode.ON,
    specdec_pb2.SPECULATION_MODE_OFF: SpecMode.OFF,
}
MIN_TEMPERATURE = 1e-5  # below it sampling is greedy (vLLM's _SAMPLING_EPS)
DRAFTERS = {
    specdec_pb2.DRAFTER_UNSPECIFIED: None,  # the deployment's default
    specdec_pb2.DRAFTER_AUTO: Drafter.AUTO,
    specdec_pb2.DRAFTER_MODEL: Drafter.MODEL,
    specdec_pb2.DRAFTER_LOOKUP: Drafter.LOOKUP,
}


class RequestError(Exception):
    """A request the router will not (or can no longer) serve; `code` is the gRPC status to answer
    with and `details` (= str(self)) starts with the offending field, e.g.
    "top_p: must be in (0, 1] (unset = 1.0), got 1.5"."""

    def __init__(self, code: grpc.StatusCode, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.code = code
        self.field = field
        self.message = message

    @property
    def details(self) -> str:
        return str(self)


def invalid(field: str, message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, field, message)


def internal_error(exc: BaseException, where: str) -> RequestError:
    """Our own failure: INTERNAL with an id to find in the server's log, which has the whole
    exception; the client's message carries no type, trace, address, pid or actor id."""
    error_id = uuid.uuid4().hex[:12]
    log.error("%s: internal error %s", where, error_id, exc_info=exc)
    return RequestError(
        grpc.StatusCode.INTERNAL, "", f"internal error (id {error_id}; the server logged it)"
    )


@dataclass(frozen=True, slots=True)
class Limits:
    """What a request may ask for (from the router's config)."""

    max_draft_tokens: int
    default_max_new_tokens: int
    max_new_tokens_limit: int
    max_stop_strings: int
    max_stop_chars: int = 256  # characters of one stop string
    max_prompt_chars: int = 1 << 20  # a text prompt is refused before it is tokenized


@dataclass(frozen=True, slots=True)
class ValidRequest:
    seq_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop: tuple[str, ...]
    mode: SpecMode
    k: int  # 0 = the policy's default (adaptive unless configured)
    drafter: Drafter | None = None  # None: the deployment's default
    ignore_eos: bool = False  # vLLM's: generate past the end-of-sequence token
    stop_token_ids: frozenset[int] = frozenset()
    include_stop_str: bool = False  # a matched stop string stays in the text
    n: int = 1  # samples of the prompt
    resumed: int = 0  # prompt_ids[-resumed:] are the request's own output (a moved sequence)


def validate_request(
    request: specdec_pb2.GenerateRequest,
    *,
    tokenizer: Any,
    vocab_size: int,
    max_context: int,
    limits: Limits,
) -> ValidRequest:
    """Check a request and tokenize it; RequestError(INVALID_ARGUMENT, field, ...) if bad."""
    has_text, has_ids = bool(request.prompt), len(request.prompt_token_ids) > 0
    if has_text and has_ids:
        raise invalid("prompt", "set either prompt or prompt_token_ids, not both")
    if not has_text and not has_ids:
        raise invalid("prompt", "must not be empty (set prompt or prompt_token_ids)")
    if has_text and len(request.prompt) > limits.max_prompt_chars:
        raise invalid(
            "prompt", f"at most {limits.max_prompt_chars} characters, got {len(request.prompt)}"
        )
    if has_text:
        field, ids = "prompt", tokenizer.encode(request.prompt, add_special_tokens=False)
        if not ids:
            raise invalid("prompt", "tokenizes to no tokens")
    else:
        field, ids = "prompt_token_ids", request.prompt_token_ids
    try:  # the workers' token-range rules, answered before the request reaches one
        ids = check_token_ids(field, ids, vocab_size)
        check_length("prompt", len(ids), max_context, new_tokens=1)  # room for one new token
    except TokenRangeError as exc:
        raise invalid(exc.field, exc.message) from None
    max_new = (
        request.max_new_tokens
        if request.HasField("max_new_tokens")
        else limits.default_max_new_tokens
    )
    if not 1 <= max_new <= limits.max_new_tokens_limit:
        raise invalid(
            "max_new_tokens", f"must be in [1, {limits.max_new_tokens_limit}], got {max_new}"
        )
    temperature = request.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise invalid("temperature", f"must be >= 0 (0 = greedy), got {temperature}")
    if temperature < MIN_TEMPERATURE:  # logits / a tinier one overflow: greedy is its limit
        temperature = 0.0
    if request.top_k < 0:
        raise invalid("top_k", f"must be >= 0 (0 = off), got {request.top_k}")
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise invalid("top_p", f"must be in (0, 1] (unset = 1.0), got {request.top_p}")
    seed = request.seed if request.HasField("seed") else None
    if seed is not None and seed < 0:
        raise invalid("seed", f"must be >= 0, got {seed}")
    stops = tuple(request.stop)
    if any(not s for s in stops):
        raise invalid("stop", "stop strings must not be empty")
    if len(stops) > limits.max_stop_strings:
        raise invalid("stop", f"at most {limits.max_stop_strings} stop strings, got {len(stops)}")
    longest = max((len(s) for s in stops), default=0)
    if longest > limits.max_stop_chars:
        raise invalid(
            "stop", f"a stop string has at most {limits.max_stop_chars} characters, got {longest}"
        )
    try:
        stop_ids = check_token_ids("stop_token_ids", request.stop_token_ids, vocab_size)
    except TokenRangeError as exc:
        raise invalid(exc.field, exc.message) from None
    if len(stop_ids) > limits.max_stop_strings:
        raise invalid(
            "stop_token_ids", f"at most {limits.max_stop_strings} ids, got {len(stop_ids)}"
        )
    spec = request.speculation
    mode = MODES.get(spec.mode)
    if mode is None:
        raise invalid("speculation.mode", f"unknown value {spec.mode} (use AUTO, ON or OFF)")
    k = spec.num_draft_tokens
    if not 0 <= k <= limits.max_draft_tokens:
        raise invalid(
            "speculation.num_draft_tokens",
            f"must be in [0, {limits.max_draft_tokens}] (0 = adaptive), got {k}",
        )
    if spec.drafter not in DRAFTERS:
        raise invalid(
            "speculation.drafter", f"unknown value {spec.drafter} (use AUTO, MODEL or LOOKUP)"
        )
    resumed = request.resumed_tokens
    if resumed >= len(ids):
        raise invalid("resumed_tokens", f"must be below the prompt's {len(ids)} tokens")
    logprobs = request.logprobs if request.HasField("logprobs") else None
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise invalid(
            "logprobs",
            f"must be in [0, {MAX_TOP_LOGPROBS}] (alternatives per token), got {logprobs}",
        )
    prompt_logprobs = request.prompt_logprobs if request.HasField("prompt_logprobs") else None
    if prompt_logprobs is not None and not 0 <= prompt_logprobs <= MAX_TOP_LOGPROBS:
        raise invalid(
            "prompt_logprobs",
            f"must be in [0, {MAX_TOP_LOGPROBS}] (alternatives per token), got {prompt_logprobs}",
        )
    params = SamplingParams(
        temperature=float(temperature),
        top_k=int(request.top_k),
        top_p=top_p,
        seed=seed,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        **_processing(request, vocab_size, int(max_new) + resumed),
    )
    return ValidRequest(
        uuid.uuid4().hex,
        ids,
        params,
        int(max_new),
        stops,
        mode,
        int(k),
        DRAFTERS[spec.drafter],
        ignore_eos=bool(request.ignore_eos),
        stop_token_ids=frozenset(int(t) for t in stop_ids),
        include_stop_str=bool(request.include_stop_str_in_output),
        n=_samples(request.n),
        resumed=resumed,
    )


MAX_LOGIT_BIAS = 1024  # tokens a request may bias
MAX_N = 16  # samples of one prompt


def _samples(n: int) -> int:
    if not 0 <= n <= MAX_N:
        raise invalid("n", f"must be in [1, {MAX_N}] (0 = 1), got {n}")
    return max(1, n)


def _processing(
    request: specdec_pb2.GenerateRequest, vocab_size: int, max_new: int
) -> dict[str, Any]:
    """The logits-processing parameters, checked (SamplingParams' fields; held_ids, which
    depend on the model's EOS, are the router's to add)."""
    out: dict[str, Any] = {}
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(request, name)
        if not (math.isfinite(value) and -2.0 <= value <= 2.0):
            raise invalid(name, f"must be in [-2, 2] (0 = off), got {value}")
        out[name] = float(value)
    if request.HasField("repetition_penalty"):
        value = request.repetition_penalty
        if not (math.isfinite(value) and 0.0 < value <= 2.0):
            raise invalid("repetition_penalty", f"must be in (0, 2] (1 = off), got {value}")
        out["repetition_penalty"] = float(value)
    if not (math.isfinite(request.min_p) and 0.0 <= request.min_p <= 1.0):
        raise invalid("min_p", f"must be in [0, 1] (0 = off), got {request.min_p}")
    out["min_p"] = float(request.min_p)
    bias = dict(request.logit_bias)
    if len(bias) > MAX_LOGIT_BIAS:
        raise invalid("logit_bias", f"at most {MAX_LOGIT_BIAS} tokens, got {len(bias)}")
    try:
        check_token_ids("logit_bias", bias, vocab_size)
    except TokenRangeError as exc:
        raise invalid(exc.field, exc.message) from None
    for token, value in bias.items():
        if not (math.isfinite(value) and -100.0 <= value <= 100.0):
            raise invalid("logit_bias", f"token {token}: must be in [-100, 100], got {value}")
    out["logit_bias"] = tuple(sorted((int(t), float(v)) for t, v in bias.items()))
    if not 0 <= request.min_tokens <= max_new:  # (a moved sequence's: with what it has)
        raise invalid(
            "min_tokens", f"must be in [0, max_new_tokens = {max_new}], got {request.min_tokens}"
        )
    out["min_tokens"] = int(request.min_tokens)
    kind = request.structured_output.WhichOneof("kind")
    if kind is not None:
        source = getattr(request.structured_output, kind)
        if kind == "json_object" and not source:
            raise invalid("structured_output.json_object", "must be true when set")
        try:
            out["grammar"] = compile_grammar(kind, "" if kind == "json_object" else source)
        except ValueError as exc:
            raise invalid(f"structured_output.{kind}", str(exc)) from None
    return out


class Admission:
    """Sequences in flight against a limit: more is RESOURCE_EXHAUSTED at once. Thread-safe."""

    def __init__(self, limit: int, who: str) -> None:
        self.limit = limit
        self.who = who
        self._lock = threading.Lock()
        self._n = 0

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._n

    def enter(self) -> None:
        with self._lock:
            if self._n >= self.limit:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "",
                    f"{self.who} is at its limit of {self.limit} sequences in flight",
                )
            self._n += 1

    def leave(self) -> None:
        with self._lock:
            self._n -= 1
