"""What travels between the router and the workers besides plain proto fields.

* The draft's sparse distributions q (`SparseQ`, indices and probs of shape [k, m]) travel
  msgpack-packed in a bytes field: a map {"v": 1, "k": k, "m": m, "indices": <int32 LE bytes>,
  "probs": <float32 LE bytes>}. float32 is what both sides compute in, so the trip is exact and a
  seeded request samples the same over gRPC as in-process. Greedy sends b"" (no q).
* The target's features (a feature draft's input: the last layer's output at committed
  positions, [n, hidden]) travel as raw little-endian bfloat16, row after row (the receiver
  knows the width): ~1.2 KB a token for SmolLM2. Opaque bytes to the scheduler, which appends
  each answer's to its row's and sends the draft what it has not had yet.
* The target's log-probabilities of committed tokens (`TokenLogprob`s) travel msgpack-packed:
  a list of [token, logprob, [top ids], [top logprobs]], one per token.
* `SamplingParams` <-> the worker proto's SamplingParams message (top_p 0 reads as 1.0, unset).
* `tokenizer_fingerprint`: a digest of a tokenizer's vocabulary and EOS id, so the router can check
  that draft and target workers tokenize exactly like it does without shipping vocabularies.

No grpc import here: only the generated message classes.
"""

from __future__ import annotations

import hashlib
import json

import msgpack
import numpy as np
import torch

from protos import worker_pb2
from workers.types import MAX_TOP_LOGPROBS, SamplingParams, SparseQ, TokenLogprob

_Q_VERSION = 1


def pack_q(q: SparseQ | None) -> bytes:
    if q is None:
        return b""
    k, m = q.indices.shape
    if q.probs.shape != (k, m):
        raise ValueError(f"q: indices {tuple(q.indices.shape)} and probs {tuple(q.probs.shape)}")
    return msgpack.packb(
        {
            "v": _Q_VERSION,
            "k": int(k),
            "m": int(m),
            "indices": q.indices.to(torch.int32).contiguous().numpy().astype("<i4").tobytes(),
            "probs": q.probs.to(torch.float32).contiguous().numpy().astype("<f4").tobytes(),
        },
        use_bin_type=True,
    )


def unpack_q(data: bytes) -> SparseQ | None:
    """The inverse of pack_q; ValueError ("q: ...") on anything malformed."""
    if not data:
        return None
    try:
        obj = msgpack.unpackb(data, raw=False)
        k, m = int(obj["k"]), int(obj["m"])
        if obj.get("v") != _Q_VERSION:
            raise ValueError(f"unsupported version {obj.get('v')!r}")
        indices = np.frombuffer(obj["indices"], dtype="<i4")
        probs = np.frombuffer(obj["probs"], dtype="<f4")
        if k < 1 or m < 1 or indices.size != k * m or probs.size != k * m:
            raise ValueError(f"sizes do not match shape [{k}, {m}]")
    except ValueError as exc:
        raise ValueError(f"q: malformed packed distribution ({exc})") from None
    except (KeyError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"q: malformed packed distribution ({exc!r})") from None
    return SparseQ(
        torch.from_numpy(indices.astype(np.int64).reshape(k, m)),
        torch.from_numpy(probs.astype(np.float32).reshape(k, m)),
    )


def pack_features(feats) -> bytes:
    """[n, d] features -> raw little-endian bfloat16 bytes, row after row (b"" for none).
    No header: packed chunks concatenate into the packing of their rows, so the scheduler
    carries a row's features as one growing byte string without reading them."""
    if feats is None or feats.numel() == 0:
        return b""
    raw = feats.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return raw.astype("<i2").tobytes()


def unpack_features(data: bytes, hidden: int, field: str = "features") -> torch.Tensor:
    """The inverse of pack_features for rows of width `hidden` ([0, hidden] for b"");
    ValueError naming `field` for a length that is not whole rows, or a non-finite value."""
    if len(data) % (2 * hidden):
        raise ValueError(
            f"{field}: {len(data)} bytes are not whole rows of {hidden} bfloat16 features"
        )
    raw = np.frombuffer(data, dtype="<i2").astype(np.int16)
    out = torch.from_numpy(raw.reshape(-1, hidden)).view(torch.bfloat16)
    if not torch.isfinite(out).all():
        raise ValueError(f"{field}: features must be finite")
    return out


def pack_logprobs(logprobs: tuple[TokenLogprob, ...]) -> bytes:
    if not logprobs:
        return b""
    return msgpack.packb(
        [[t.token, t.logprob, [i for i, _ in t.top], [v for _, v in t.top]] for t in logprobs],
        use_bin_type=True,
    )


def unpack_logprobs(data: bytes) -> tuple[TokenLogprob, ...]:
    """The inverse of pack_logprobs; ValueError ("logprobs: ...") on anything malformed."""
    if not data:
        return ()
    try:
        out = []
        for token, logprob, ids, values in msgpack.unpackb(data, raw=False):
            if len(ids) != len(values) or len(ids) > MAX_TOP_LOGPROBS:
                raise ValueError("top ids and values differ in length or exceed the cap")
            top = tuple((int(i), float(v)) for i, v in zip(ids, values, strict=True))
            out.append(TokenLogprob(int(token), float(logprob), top))
    except (TypeError, ValueError, msgpack.UnpackException) as exc:
        raise ValueError(f"logprobs: malformed packed log-probabilities ({exc})") from None
    return tuple(out)


def sampling_to_proto(params: SamplingParams) -> worker_pb2.SamplingParams:
    msg = worker_pb2.SamplingParams(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    msg.presence_penalty = params.presence_penalty
    msg.frequency_penalty = params.frequency_penalty
    if params.repetition_penalty != 1.0:
        msg.repetition_penalty = params.repetition_penalty
    msg.min_p = params.min_p
    msg.logit_bias.update(dict(params.logit_bias))
    msg.min_tokens = params.min_tokens
    msg.held_ids.extend(params.held_ids)
    msg.grammar = params.grammar
    if params.prompt_logprobs is not None:
        msg.prompt_logprobs = params.prompt_logprobs
    return msg


def sampling_from_proto(msg: worker_pb2.SamplingParams) -> SamplingParams:
    """ValueError naming the field on bad values (SamplingParams checks them)."""
    return SamplingParams(
        temperature=float(msg.temperature),
        top_k=int(msg.top_k),
        top_p=float(msg.top_p) if msg.top_p != 0 else 1.0,
        seed=int(msg.seed) if msg.HasField("seed") else None,
        logprobs=int(msg.logprobs) if msg.HasField("logprobs") else None,
        presence_penalty=float(msg.presence_penalty),
        frequency_penalty=float(msg.frequency_penalty),
        repetition_penalty=(
            float(msg.repetition_penalty) if msg.HasField("repetition_penalty") else 1.0
        ),
        min_p=float(msg.min_p),
        logit_bias=tuple(sorted((int(t), float(b)) for t, b in msg.logit_bias.items())),
        min_tokens=int(msg.min_tokens),
        held_ids=tuple(int(t) for t in msg.held_ids),
        grammar=msg.grammar,
        prompt_logprobs=(int(msg.prompt_logprobs) if msg.HasField("prompt_logprobs") else None),
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the sorted vocabulary and the EOS id: equal iff they tokenize alike (for the
    check `workers.model_runner.check_same_tokenizer` does in-process)."""
    blob = json.dumps(
        {"vocab": sorted(tokenizer.get_vocab().items()), "eos": tokenizer.eos_token_id},
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()
