"""Drafting without a model: continuations found in text already seen. Pure: no I/O, no torch.

Much of what a served model writes repeats what it was given or wrote before: an edit of code in
the prompt, quotes from a passage, JSON and tool calls that recur. There the best draft costs
nothing: find where the text's current end occurred before and propose what followed it.

* `NgramIndex` holds token texts ("documents") and, for every `key_len`-gram in them, where it
  ended. `match(context)` takes the context's last `key_len` tokens, looks at their earlier
  occurrences (the most recent `max_candidates`), extends each match backwards, and keeps the
  longest (prompt lookup with the longest match, as HF's `prompt_lookup_num_tokens` and vLLM's
  n-gram proposer do, over any text held). Where the longest match occurred more than once, the
  block follows the most recent occurrence, or with `continuation: frequent` the occurrences
  vote token by token, as SuffixDecoding follows the most frequent path of its suffix tree
  (arXiv 2411.04975): the block is what most of them went on with (ties: the most recent), each
  token carries the share that agreed (its price weighs it), and the block ends where the
  agreeing share falls below `min_support`.
* Each row keeps its own index over its prompt and output (`RowLookup`), fed as tokens commit.
  A scheduler keeps one bounded index of the recent outputs of its finished rows
  (`RecentOutputs`, capped in tokens, oldest dropped first): what other requests wrote is often
  what the next one writes (agent loops, templated answers). A seeded row reads only its own
  index: its drafts, and so its exact output, must not depend on other requests.
* `LookupAcceptance` learns how far a row's lookup blocks get, per match length (a 2-token
  match is a guess, a 16-token one is a copy: the block's length follows from the match, as
  SuffixDecoding's grows with it), and `best_length` prices a block of each length by its
  expected committed tokens (that rate times each token's share of the vote) against the
  verify's cost, so a proposal may run longer than the model draft's cap where the match
  supports it and the verify stays cheap.

A proposal is a block of tokens with certainty (a one-hot q): the acceptance rule stays exact for
sampling (accept d with probability p(d); on rejection sample from p with d removed).
"""

from __future__ import annotations

import array
import collections
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

RECENT, FREQUENT = "recent", "frequent"  # which occurrence of a match a block follows


@dataclass(frozen=True, slots=True)
class LookupConfig:
    max_tokens: int = 32  # longest lookup block (may exceed the model draft's max_draft_tokens)
    # Context tokens that must match before anything is proposed. One, as HF's prompt lookup
    # falls back to: what a one-token match is worth is learnt (its own acceptance bucket).
    min_match: int = 1
    key_len: int = 1  # n-gram length the indexes are keyed by (<= min_match)
    max_candidates: int = 64  # earlier occurrences examined per lookup (the most recent)
    max_match: int = 64  # how far back a match is extended
    # Where the longest match occurred more than once and the occurrences went on differently:
    # "recent" proposes what the most recent occurrence went on with (as HF's and vLLM's prompt
    # lookup do); "frequent" what most of them did, the block ending once the share still
    # agreeing falls below `min_support` (SuffixDecoding's path probability, arXiv 2411.04975).
    # Recent is the default: in one process, lookup only, float32, 12 held-out prompts x 96
    # tokens each served in turn (recent outputs on), tokens per target pass were 4.22 grounded
    # and 1.71 chat with "recent", 4.24 and 1.63 with plain votes, 3.92 and 1.69 with votes that
    # also price each token by its share: text near the end predicts better than counts.
    continuation: str = "recent"
    min_support: float = 0.2
    recent_tokens: int = 65536  # cap of a scheduler's index of recent outputs (0 = none)
    prior_acceptance: float = 0.5  # per proposed token after a one-token match, before measuring
    # A longer matched context is stronger evidence that the copy goes on: the prior's chance of a
    # rejection shrinks by 1 + prior_rise x bucket (buckets 1, 2-3, 4-7, 8-15, 16+: 0.5, 0.875,
    # 0.93, 0.95, 0.96 at the defaults). Measured in one process on the default pair's held-out
    # chat and code prompts (bf16, lookup only): 1.25 -> 1.42 tokens a pass (HF prompt lookup
    # 1.51); grounded requests 4.04 -> 4.21. With a flat 0.5 a 15-token match drew a 4-token block.
    prior_rise: float = 3.0
    prior_strength: float = 2.0  # rounds the prior weighs
    window: float = 8.0  # rounds: older observations fade over this many

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"lookup max_tokens must be >= 1, got {self.max_tokens}")
        if not 1 <= self.key_len <= self.min_match:
            raise ValueError("lookup key_len must be in [1, min_match]")
        if self.continuation not in (RECENT, FREQUENT):
            raise ValueError(
                f'lookup continuation must be "{RECENT}" or "{FREQUENT}", got {self.continuation!r}'
            )
        if not 0 <= self.min_support <= 1:
            raise ValueError(f"lookup min_support must be in [0, 1], got {self.min_support}")
        if self.max_candidates < 1 or self.max_match < self.min_match:
            raise ValueError("lookup max_candidates must be >= 1 and max_match >= min_match")
        if self.recent_tokens < 0:
            raise ValueError(f"lookup recent_tokens must be >= 0, got {self.recent_tokens}")
        if not 0 <= self.prior_acceptance < 1:
            raise ValueError("lookup prior_acceptance must be in [0, 1)")
        if self.prior_rise < 0:
            raise ValueError(f"lookup prior_rise must be >= 0, got {self.prior_rise}")
        if self.prior_strength <= 0 or self.window < 1:
            raise ValueError("lookup prior_strength must be > 0 and window >= 1")


@dataclass(frozen=True, slots=True)
class Match:
    """`length` context tokens matched earlier text (`occurrences` times), which went on with
    `continuation`; `support[j]`: the share of the occurrences agreeing up to token j that went
    on with token j (empty for a single occurrence: 1.0 each)."""

    length: int
    continuation: list[int]
    support: tuple[float, ...] = ()
    occurrences: int = 1


# Occurrences of a long repeat (all matching `max_match` tokens) that vote before the scan stops.
MAX_VOTES = 8


class NgramIndex:
    """Documents of tokens and where each `key_len`-gram in them ends. Documents are kept in the
    order added; `drop_oldest` forgets the first (its entries sit at the front of every list).

    Compact on purpose: a scheduler's recent-outputs index holds tens of thousands of tokens for
    the process's lifetime. Texts are int32 arrays and each occurrence one packed int64 (document
    << 32 | end) in a per-key array: ~12 bytes a token, where lists of tuples in deques took ~130
    (and a 600-byte deque block per distinct key)."""

    def __init__(self, key_len: int = 2) -> None:
        self.key_len = key_len
        self.docs: collections.OrderedDict[int, array.array] = collections.OrderedDict()
        self._ends: dict[tuple[int, ...], array.array] = {}
        self.tokens = 0  # held, over all documents

    def add(self, doc: int, tokens: Sequence[int] = ()) -> None:
        if not 0 <= doc < 1 << 31:
            raise ValueError(f"document id {doc} out of range")
        self.docs[doc] = array.array("i")
        self.extend(doc, tokens)

    def extend(self, doc: int, tokens: Sequence[int]) -> None:
        text = self.docs[doc]
        n = self.key_len
        packed = doc << _END_BITS
        for tok in tokens:
            text.append(tok)
            if len(text) >= n:
                key = tuple(text[-n:])
                ends = self._ends.get(key)
                if ends is None:
                    ends = self._ends[key] = array.array("q")
                ends.append(packed | len(text))
        self.tokens += len(tokens)

    def drop_oldest(self) -> None:
        doc, text = self.docs.popitem(last=False)
        n = self.key_len
        for end in range(n, len(text) + 1):
            key = tuple(text[end - n : end])
            ends = self._ends[key]
            del ends[0]  # this document's entry: the oldest there
            if not ends:
                del self._ends[key]
        self.tokens -= len(text)

    @property
    def keys(self) -> int:
        return len(self._ends)

    def occurrences(
        self,
        context: Sequence[int],
        *,
        min_match: int,
        max_candidates: int = 32,
        max_match: int = 64,
        self_doc: int | None = None,
        votes: int = MAX_VOTES,
    ) -> tuple[int, list[tuple[int, int]]]:
        """(length, where) of the longest earlier match of the context's end: every occurrence
        (doc, end) that matches that long, the most recent first; (0, []) below `min_match`.
        The most recent `max_candidates` occurrences of the key are examined; once `votes` of
        them reach `max_match` (a long repeat) the rest are not."""
        n = self.key_len
        if len(context) < max(n, min_match):
            return 0, []
        ends = self._ends.get(tuple(context[-n:]))
        if not ends:
            return 0, []
        best, where = 0, []
        for packed in itertools.islice(reversed(ends), max_candidates):
            doc, end = packed >> _END_BITS, packed & _END_MASK
            if end >= len(self.docs[doc]):
                continue  # nothing followed it (yet), as at the context's own end
            length = _common_suffix(self.docs[doc], end, context, max_match)
            if length > best:
                best, where = length, [(doc, end)]
            elif length == best:
                where.append((doc, end))
            if best >= max_match and len(where) >= votes:
                break
        if best < min_match:
            return 0, []
        return best, where

    def continuation(self, doc: int, end: int, max_tokens: int, self_doc: int | None = None):
        """Up to `max_tokens` tokens that followed `end` in `doc`."""
        text = self.docs[doc]
        out = text[end : end + max_tokens].tolist()
        if doc == self_doc:
            # The text repeats itself from `end` on: what follows its end is that repeat going
            # on (an overlapping copy, as in LZ77), so a period shorter than the block still
            # fills it.
            period = len(text) - end
            while len(out) < max_tokens:
                out.append(out[len(out) - period])
        return out

    def candidates(
        self,
        context: Sequence[int],
        max_tokens: int,
        self_doc: int | None = None,
        vote: bool = False,
        **kw,
    ) -> tuple[int, list[list[int]]]:
        """(length, continuations) of the longest earlier matches (`occurrences`' keywords):
        all of them to `vote`, else the most recent one's."""
        if max_tokens < 1:
            return 0, []
        length, where = self.occurrences(
            context, self_doc=self_doc, votes=MAX_VOTES if vote else 1, **kw
        )
        where = where if vote else where[:1]
        return length, [self.continuation(d, e, max_tokens, self_doc) for d, e in where]

    def match(
        self,
        context: Sequence[int],
        max_tokens: int,
        *,
        min_match: int,
        max_candidates: int = 32,
        max_match: int = 64,
        self_doc: int | None = None,
        vote: bool = False,
        min_support: float = 0.0,
    ) -> Match | None:
        """The longest earlier match of the context's end and what its most recent occurrence
        went on with, or with `vote` what most of its occurrences did (`consensus`); None below
        `min_match`. `self_doc`: the document that *is* the context (its own end is not an
        earlier occurrence)."""
        length, conts = self.candidates(
            context,
            max_tokens,
            self_doc,
            vote,
            min_match=min_match,
            max_candidates=max_candidates,
            max_match=max_match,
        )
        return consensus(length, conts, min_support)


def consensus(length: int, continuations: list[list[int]], min_support: float = 0.0):
    """The Match of `length` whose tokens are, one after another, what most of the occurrences
    still agreeing with it went on with (ties: the earliest listed, i.e. the most recent), as
    SuffixDecoding proposes the most frequent path of its suffix tree. Each token's `support`
    is the share of those occurrences that continued with it (1.0 for a single occurrence); the
    block ends where the product of the shares falls below `min_support`, or where no
    occurrence goes on. None without continuations."""
    alive = [c for c in continuations if c]
    if len(alive) <= 1:  # one occurrence (or none): no vote, every share 1.0
        return Match(length, alive[0], (), len(continuations)) if alive else None
    out: list[int] = []
    support: list[float] = []
    path = 1.0
    j = 0
    while alive:
        votes: dict[int, int] = {}
        for c in alive:
            votes[c[j]] = votes.get(c[j], 0) + 1
        token = max(votes, key=votes.__getitem__)  # first-seen among equals: the most recent
        share = votes[token] / len(alive)
        path *= share
        if out and path < min_support:
            break
        out.append(token)
        support.append(share)
        j += 1
        alive = [c for c in alive if len(c) > j and c[j - 1] == token]
    return Match(length, out, tuple(support), len(continuations))


_END_BITS = 32
_END_MASK = (1 << _END_BITS) - 1


def _common_suffix(text: Sequence[int], end: int, context: Sequence[int], limit: int) -> int:
    """How many tokens before `text[end]` equal the context's last ones (up to `limit`)."""
    n = 0
    top = min(limit, end, len(context))
    while n < top and text[end - 1 - n] == context[-1 - n]:
        n += 1
    return n


class RecentOutputs:
    """The outputs of a scheduler's finished rows, at most `cap` tokens, oldest dropped first."""

    def __init__(self, config: LookupConfig) -> None:
        self.config = config
        self.index = NgramIndex(config.key_len)
        self._ids = itertools.count()

    def add(self, tokens: Sequence[int]) -> None:
        cap = self.config.recent_tokens
        if cap <= 0 or len(tokens) <= self.config.key_len:
            return
        tokens = list(tokens)[-cap:]
        while self.index.docs and self.index.tokens + len(tokens) > cap:
            self.index.drop_oldest()
        self.index.add(next(self._ids), tokens)

    def candidates(self, context: Sequence[int], max_tokens: int) -> tuple[int, list[list[int]]]:
        return self.index.candidates(context, max_tokens, **_search(self.config))

    def match(self, context: Sequence[int], max_tokens: int) -> Match | None:
        return consensus(*self.candidates(context, max_tokens), self.config.min_support)


def _search(c: LookupConfig) -> dict:
    return {
        "vote": c.continuation == FREQUENT,
        "min_match": c.min_match,
        "max_candidates": c.max_candidates,
        "max_match": c.max_match,
    }


# Match lengths are bucketed for acceptance: a short match is a guess, a long one a copy.
_BUCKETS = (1, 2, 4, 8, 16)


def _bucket(length: int) -> int:
    return sum(1 for b in _BUCKETS[1:] if length >= b)


def prior_rate(config: LookupConfig, bucket: int) -> float:
    """The prior acceptance of a token proposed after a match in `bucket` (0: one token)."""
    return 1.0 - (1.0 - config.prior_acceptance) / (1.0 + config.prior_rise * bucket)


class LookupAcceptance:
    """Per match-length bucket, the chance a lookup token is accepted given the ones before it
    were: decayed accepted tokens over decayed (accepted + rejected) tokens, with a prior."""

    def __init__(self, config: LookupConfig) -> None:
        self.keep = 1.0 - 1.0 / config.window
        strength = config.prior_strength
        self._accepted = [prior_rate(config, b) * strength for b in range(len(_BUCKETS))]
        self._tried = [strength] * len(_BUCKETS)

    def copy(self) -> LookupAcceptance:
        out = LookupAcceptance.__new__(LookupAcceptance)
        out.keep, out._accepted, out._tried = self.keep, list(self._accepted), list(self._tried)
        return out

    def rate(self, match_length: int) -> float:
        b = _bucket(match_length)
        return self._accepted[b] / self._tried[b]

    def observe(self, match_length: int, proposed: int, accepted: int) -> None:
        b = _bucket(match_length)
        tried = accepted + (1 if accepted < proposed else 0)
        self._accepted[b] = self._accepted[b] * self.keep + accepted
        self._tried[b] = self._tried[b] * self.keep + tried


def expected_tokens(rate: float, length: int, support: Sequence[float] = ()) -> float:
    """Committed tokens of a block of `length` proposed tokens, each accepted with `rate` given the
    ones before (times its `support`, the share of a match's occurrences that went on with it,
    where given): 1 + rate + rate^2 + ... + rate^length (the recovered or bonus token is the 1)."""
    total, r = 1.0, 1.0
    for j in range(length):
        r *= rate * (support[j] if j < len(support) else 1.0)
        total += r
    return total


def best_length(
    rate: float,
    longest: int,
    pass_cost: Callable[[int], float],
    support: Sequence[float] = (),
) -> tuple[int, float]:
    """(length, committed tokens per unit of cost) of the best block of at most `longest`
    tokens; `pass_cost(width)` is the cost of a verify of `width` positions (width 1 = a plain
    step). Length 0 is the plain step."""
    best = (0, 1.0 / pass_cost(1))
    for n in range(1, longest + 1):
        value = expected_tokens(rate, n, support) / pass_cost(n + 1)
        if value > best[1]:
            best = (n, value)
    return best


class RowLookup:
    """One row's index of its own prompt and output, and how its lookup blocks fared."""

    def __init__(self, config: LookupConfig, tokens: Sequence[int]) -> None:
        self.config = config
        self.index = NgramIndex(config.key_len)
        self.index.add(0, tokens)
        self.acceptance = LookupAcceptance(config)

    @property
    def tokens(self) -> Sequence[int]:
        return self.index.docs[0]

    def extend(self, tokens: Sequence[int]) -> None:
        self.index.extend(0, tokens)

    def match(self, max_tokens: int, recent: RecentOutputs | None = None) -> Match | None:
        """The longest match in the row's own text and, when given, the recent outputs of other
        rows; where both match equally long, its own text's (or, voting, all of them: its own
        first)."""
        text = self.tokens
        search = _search(self.config)
        length, conts = self.index.candidates(text, max_tokens, 0, **search)
        if recent is not None:
            other, more = recent.candidates(text, max_tokens)
            if other > length:
                length, conts = other, more
            elif other == length and search["vote"]:
                conts += more
        return consensus(length, conts, self.config.min_support)
