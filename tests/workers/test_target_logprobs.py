"""The target's log-probabilities of the tokens it commits equal `log_softmax` of a from-scratch
forward's logits at those positions: on the prefill's token, on plain steps, and on verified
blocks whatever was accepted (greedy and sampled, model and one-hot blocks); the top alternatives
are that row's top-N. And they survive the wire."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny_models import make_model
from workers.batch import PrefillRow, VerifyRow
from workers.target import TargetWorker
from workers.types import SamplingParams, TokenLogprob
from workers.wire import pack_logprobs, sampling_from_proto, sampling_to_proto, unpack_logprobs

TOP = 3


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("logprobs") / "target", seed=5, layers=2)


@pytest.fixture(scope="module")
def reference(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def logp(tokens: list[int]) -> torch.Tensor:
        """[len(tokens), V]: row i is the distribution of the token after tokens[: i + 1]."""
        with torch.inference_mode():
            return torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), -1)

    return logp


def check(entries, tokens: list[int], start: int, logp: torch.Tensor) -> None:
    """entries: the log-probabilities of tokens[start : start + len(entries)]."""
    assert len(entries) > 0
    for j, e in enumerate(entries):
        pos = start + j
        row = logp[pos - 1]
        assert e.token == tokens[pos]
        assert e.logprob == pytest.approx(float(row[tokens[pos]]), abs=1e-4)
        values, ids = torch.topk(row, TOP)
        assert [i for i, _ in e.top] == ids.tolist()
        assert [v for _, v in e.top] == pytest.approx(values.tolist(), abs=1e-4)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_committed_tokens_carry_the_targets_own_logprobs(path, reference, sampled):
    worker = TargetWorker.from_path(path)
    params = SamplingParams(temperature=0.9 if sampled else 0.0, seed=3, logprobs=TOP)
    prompt = [5, 17, 40, 2, 9, 33]
    first = worker.prefill_batch([PrefillRow("s", prompt, params)])[0]
    tokens = [*prompt, int(first)]
    check(first.logprobs, tokens, len(prompt), reference(tokens))
    gen = torch.Generator().manual_seed(1)
    for step in range(8):
        n = len(tokens)
        if step % 3 == 2:  # a plain step
            verdict = worker.verify_batch([VerifyRow("s", n)])[0]
            draft: list[int] = []
        else:  # a one-hot block: the target's own greedy next token, then noise
            greedy_next = int(reference(tokens)[-1].argmax())
            draft = [greedy_next, *torch.randint(1, 90, (step % 3 + 1,), generator=gen).tolist()]
            verdict = worker.verify_batch([VerifyRow("s", n, draft, one_hot=True)])[0]
        tokens += verdict.committed(draft)
        assert len(verdict.logprobs) == verdict.accepted + 1
        check(verdict.logprobs, tokens, n, reference(tokens))
    assert worker.committed_tokens("s") == tokens


def test_rows_that_do_not_ask_get_none_and_zero_asks_for_the_token_alone(path):
    worker = TargetWorker.from_path(path)
    plain, own = SamplingParams(), SamplingParams(logprobs=0)
    out = worker.prefill_batch([PrefillRow("a", [4, 5, 6], plain), PrefillRow("b", [4, 5, 6], own)])
    assert not getattr(out[0], "logprobs", ())
    assert len(out[1].logprobs) == 1 and out[1].logprobs[0].top == ()
    verdicts = worker.verify_batch([VerifyRow("a", 4, [7, 8]), VerifyRow("b", 4, [7, 8])])
    assert verdicts[0].logprobs == ()
    assert len(verdicts[1].logprobs) == verdicts[1].accepted + 1


def test_logprobs_survive_the_wire_and_malformed_bytes_are_named():
    entries = (TokenLogprob(7, -0.25, ((7, -0.25), (3, -1.5))), TokenLogprob(9, -3.0))
    assert unpack_logprobs(pack_logprobs(entries)) == entries
    assert unpack_logprobs(b"") == () and pack_logprobs(()) == b""
    with pytest.raises(ValueError, match="logprobs"):
        unpack_logprobs(b"\x93\x01\x02")
    params = SamplingParams(temperature=0.5, logprobs=4)
    assert sampling_from_proto(sampling_to_proto(params)) == params
    assert sampling_from_proto(sampling_to_proto(SamplingParams())).logprobs is None


@pytest.mark.parametrize("bad", [-1, 21, 2.0])
def test_sampling_params_refuse_a_bad_logprobs(bad):
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=bad)


def test_the_prompts_logprobs_come_from_the_prefill_beside_rows_that_do_not_ask(path, reference):
    worker = TargetWorker.from_path(path)
    prompt = [5, 17, 40, 2, 9, 33]
    asks = SamplingParams(prompt_logprobs=2, logprobs=0)
    before = worker.prefilled_tokens
    out = worker.prefill_batch(
        [
            PrefillRow("plain", prompt, SamplingParams()),
            PrefillRow("asks", prompt, asks),
            PrefillRow("fork", prompt, asks, fork_of="asks"),  # copies the prompt's too
        ]
    )
    assert worker.prefilled_tokens - before == 2 * len(prompt)  # two forwards, the fork none
    assert int(out[0]) == int(out[1]) == int(out[2])  # greedy: the same first token
    logp = reference(prompt)
    for entries in (out[1].prompt_logprobs, out[2].prompt_logprobs):
        assert [e.token for e in entries] == prompt[1:]
        for pos, e in enumerate(entries, start=1):
            assert e.logprob == pytest.approx(float(logp[pos - 1][prompt[pos]]), abs=1e-4)
            assert [i for i, _ in e.top] == torch.topk(logp[pos - 1], 2).indices.tolist()
    assert not getattr(out[0], "prompt_logprobs", ())
    (first,) = out[1].logprobs  # the first token's own, from the same forward's last row
    assert first.logprob == pytest.approx(float(logp[-1][int(out[1])]), abs=1e-4)
