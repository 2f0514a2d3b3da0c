"""The batched worker interface: one call carries many sequences (rows), answered per row.

A step scheduler (cluster/scheduling/scheduler.py) sends one batched call per worker per step. Each
row is checked and applied on its own: a row that fails (unknown sequence, stale committed length,
bad argument) comes back as its exception in that row's slot and changes nothing of its sequence;
its neighbours are unaffected. No ray, no grpc.

    results = target.verify_batch([VerifyRow("a", 12, [5, 9]), VerifyRow("b", 40, [])])
    # -> [Verdict(...), Verdict(accepted=0, token=..., bonus=False)]   (row b: a plain step)

The workers run each batched call as real batched forwards over one batched KV cache
(workers/batch_kv.py): a verify_batch is ONE forward for all its rows, a prefill_batch one forward
for all its prompts, a propose_batch k_max forwards (rows with a smaller k drop out). Row errors:
UnknownSequenceError, StaleSequenceError, ValueError (bad argument, context), KVBudgetExceeded
(prefill only: the worker's max_kv_tokens would be passed; retry when rows have left). A seq_id
named twice in one call is allowed: its later rows run after the batch, in order (an extra
forward). The workers check each row's token ids and lengths by workers/token_range.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from workers.types import SamplingParams, SparseQ, TokenLogprob, Verdict


@dataclass(frozen=True, slots=True)
class Proposal:
    """Draft tokens starting at absolute position `start`; q is None for greedy."""

    start: int
    tokens: list[int]
    q: SparseQ | None = None
    # The draft was unsure of the last token (below its confidence stop): the block would have
    # ended there whatever k. What the policy learns how far blocks reach from.
    unsure_last: bool = False
    # Who proposed it: "model" (a draft worker) or "lookup" (text already seen: the tokens are
    # certain, a one-hot q, and no q travels).
    drafter: str = "model"


@dataclass(frozen=True, slots=True)
class PrefillRow:
    """(Re)start a sequence from its committed tokens. The target answers with the next token
    (its prefill pass decodes it, as a plain step would); the draft with None."""

    seq_id: str
    token_ids: Sequence[int]
    params: SamplingParams
    features: bool = False  # target: also hand out every prompt position's features
    # token_ids[:prompt_len] are the request's prompt, the rest its output so far (a re-prefill
    # after a fault); None: all prompt. The target's penalties count the output.
    prompt_len: int | None = None
    # The seq_id of an earlier row of the same call with the same token ids (one of n samples
    # of a prompt): the target copies its KV instead of computing it again.
    fork_of: str | None = None


@dataclass(frozen=True, slots=True)
class ProposeRow:
    """Draft k tokens; `commit` (committed after committed_len) is applied first, `start` drafts
    from that absolute position (see DraftWorker.propose_batch)."""

    seq_id: str
    committed_len: int
    k: int
    commit: Sequence[int] = ()
    start: int | None = None
    # A feature draft's input: the target's packed features (workers/wire.py) of the positions
    # before each committed token it has not read yet (see FeatureDraftWorker).
    commit_features: bytes = b""


@dataclass(frozen=True, slots=True)
class VerifyRow:
    """Verify `draft_tokens` (q: the draft's distributions, None for greedy). No draft tokens is a
    plain step: the answer is Verdict(accepted=0, token=the next token, bonus=False).
    `one_hot`: the tokens were proposed with certainty (a lookup drafter), so q is one-hot on
    each of them and is not sent; a sampled row then needs no q."""

    seq_id: str
    committed_len: int
    draft_tokens: Sequence[int] = ()
    q: SparseQ | None = None
    one_hot: bool = False
    features: bool = False  # the Verdict also carries the committed positions' features

    @property
    def plain(self) -> bool:
        return not self.draft_tokens


# One slot per row: the row's value, or the exception that refused (only) that row.
RowResult = object


def plain_verdict(
    token: int, features: bytes = b"", logprobs: tuple[TokenLogprob, ...] = ()
) -> Verdict:
    return Verdict(0, int(token), bonus=False, features=features, logprobs=logprobs)


class PrefillToken(int):
    """A target prefill's next token that also carries what the row asked for beside it: the
    prompt's packed features (PrefillRow.features), the token's log-probability
    (SamplingParams.logprobs) and the prompt's (SamplingParams.prompt_logprobs: one per prompt
    token after the first). An int everywhere a token is expected."""

    features: bytes = b""
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    forced: tuple[int, ...] = ()  # a structured output's next tokens, forced by its grammar

    @classmethod
    def of(
        cls,
        token: int,
        features: bytes = b"",
        logprobs: tuple[TokenLogprob, ...] = (),
        prompt_logprobs: tuple[TokenLogprob, ...] = (),
        forced: tuple[int, ...] = (),
    ) -> int:
        """The token itself when it carries nothing."""
        if not (features or logprobs or prompt_logprobs or forced):
            return int(token)
        out = cls(token)
        out.features = features
        out.logprobs = logprobs
        out.prompt_logprobs = prompt_logprobs
        out.forced = forced
        return out


def run_row(fn, *args) -> object:
    """One row of a batched call: its value, or the exception that refused it (alone)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - a failing row fails alone, never the batch
        return exc


def split_prefill(
    rows: Sequence[PrefillRow], runner, check, *, holds_last: bool = False
) -> tuple[list, list[int], list[int]]:
    """The row checks of a batched prefill: (slots, rows to prefill now, rows to redo after).

    `check(row)` raises for a bad row. Each admitted row is charged its cache length (len - 1:
    the last token is fed with the next call; len when `holds_last`: the target's prefill feeds
    every token, to decode the next one) against the runner's KV budget, with the
    rows admitted before it in the same call, less what its own earlier state frees (a refused row
    gets KVBudgetExceeded; nothing of it changes). A seq_id named again is redone after the
    batch, in order, as a row-by-row loop would.
    """
    out: list[object] = [None] * len(rows)
    now: list[int] = []
    later: list[int] = []
    named: set[str] = set()
    pending = 0
    for i, r in enumerate(rows):
        if r.seq_id in named:
            later.append(i)
            continue
        named.add(r.seq_id)
        try:
            check(r)
            held = runner.held(r.seq_id)
            cached = len(r.token_ids) - (0 if holds_last else 1)
            runner.kv.check_admit(cached, held, pending)
        except Exception as exc:  # noqa: BLE001 - a refused row fails alone
            out[i] = exc
            continue
        pending += cached - held
        now.append(i)
    return out, now, later
