"""Lookup drafting: the matcher, the bounded index of recent outputs, the acceptance it learns, and
how a step prices lookup blocks. Pure: no model, no workers."""

from __future__ import annotations

import random

import pytest

from cluster.scheduling.lookup import (
    LookupAcceptance,
    LookupConfig,
    NgramIndex,
    RecentOutputs,
    RowLookup,
    best_length,
    expected_tokens,
    prior_rate,
)
from cluster.scheduling.lookup_drafting import LookupDrafting
from cluster.scheduling.policy import Drafter, PolicyConfig, SpecMode
from cluster.scheduling.rounds import SequenceRounds, StopConditions
from cluster.scheduling.row_policy import RowPolicy
from cluster.scheduling.rows import Row, RowRequest
from cluster.scheduling.step_costs import StepCosts
from workers.types import SamplingParams


def match(text, max_tokens=8, min_match=2, **kw):
    index = NgramIndex(key_len=2)
    index.add(0, text)
    return index.match(text, max_tokens, min_match=min_match, self_doc=0, **kw)


# -- the matcher ------------------------------------------------------------------------------


def test_the_longest_match_wins_over_a_more_recent_shorter_one():
    # "1 2 3" occurs at the start (followed by 10 11); "9 2 3" later (followed by 20 21): the
    # text ends in "1 2 3", so the 3-token match at the start wins over the recent 2-token one.
    text = [1, 2, 3, 10, 11, 9, 2, 3, 20, 21, 5, 1, 2, 3]
    m = match(text)
    assert m.length == 3
    assert m.continuation[:2] == [10, 11]


def test_ties_go_to_the_most_recent_occurrence():
    text = [7, 8, 1, 2, 50, 7, 8, 1, 2, 60, 7, 8, 1, 2]
    m = match(text)
    assert m.length == 4  # "7 8 1 2" twice before the end: equally long
    assert m.continuation[0] == 60


def test_equally_long_matches_follow_the_most_recent_or_vote_for_the_most_frequent():
    # "1 2" went on with 50 51 twice and with 60 61 once, most recently: the majority wins.
    text = [1, 2, 50, 51, 9, 1, 2, 50, 51, 8, 1, 2, 60, 61, 7, 1, 2]
    assert match(text, max_tokens=2).continuation == [60, 61]  # the most recent: the default
    m = match(text, max_tokens=3, vote=True)
    assert m.length == 2 and m.occurrences == 3
    assert m.continuation[:2] == [50, 51]
    # 50 had 2 of 3 votes; 51 then all the agreeing ones; after it they part (9 vs 8): 1/2.
    assert m.support[:3] == (2 / 3, 1.0, 0.5)
    assert m.continuation[2] == 8  # a tie between what followed: the most recent agreeing one


def test_a_block_ends_where_too_few_occurrences_still_agree():
    # Four occurrences of "0 1 2" agree on 5, part two ways, then again: shares 1, 1/2, 1/2.
    text = [0, 1, 2, 5, 6, 7, 0, 1, 2, 5, 6, 8, 0, 1, 2, 5, 3, 9, 0, 1, 2, 5, 3, 4, 0, 1, 2]
    index = NgramIndex(key_len=2)
    index.add(0, text)
    kw = {"min_match": 2, "self_doc": 0, "vote": True}
    full = index.match(text, 3, **kw)
    assert full.continuation == [5, 3, 4] and full.support == (1.0, 0.5, 0.5)
    cut = index.match(text, 3, min_support=0.3, **kw)  # 1 x 0.5 x 0.5 = 0.25 < 0.3: two tokens
    assert cut.continuation == [5, 3] and cut.support == (1.0, 0.5)
    # The first token is proposed whatever its share: pricing weighs it (expected_tokens).
    assert index.match(text, 3, min_support=1.0, **kw).continuation == [5]


def test_a_row_and_the_recent_outputs_vote_together_when_they_match_equally_long():
    frequent = LookupConfig(recent_tokens=100, continuation="frequent")
    recent = RecentOutputs(frequent)
    for _ in range(3):
        recent.add([4, 1, 2, 70, 71])
    text = [4, 1, 2, 30, 31, 4, 1, 2]
    # By default a row's own text wins a tie: it is the more recent.
    assert RowLookup(LookupConfig(), text).match(2, recent).continuation == [30, 31]
    row = RowLookup(frequent, text)
    assert row.match(2).continuation == [30, 31]  # alone: its one earlier occurrence
    m = row.match(2, recent)  # voting, three recent outputs outvote it
    assert m.continuation == [70, 71] and m.support == (0.75, 1.0) and m.occurrences == 4


def test_a_split_vote_prices_a_block_below_a_unanimous_one():
    assert expected_tokens(0.9, 2, (0.5, 1.0)) == pytest.approx(1 + 0.45 + 0.45 * 0.9)
    assert expected_tokens(0.9, 2, (0.5, 1.0)) < expected_tokens(0.9, 2)
    cost = lambda width: 1.0 + 0.3 * (width - 1)  # noqa: E731
    assert best_length(0.9, 8, cost, (0.3,) + (1.0,) * 7)[0] == 0  # a guess: plain pays more
    assert best_length(0.9, 8, cost)[0] >= 4  # the same match, unanimous: a block


def test_no_match_and_too_short_a_match_propose_nothing():
    assert match([1, 2, 3, 4, 5]) is None  # the end "4 5" never occurred before
    assert match([1, 2, 9, 2]) is None  # "9 2" unseen; a 1-token match is not indexed
    assert match([1, 2, 3, 8, 2, 3], min_match=3) is None  # "2 3" matches, 2 tokens < 3
    assert match([1]) is None


def test_the_context_own_end_is_not_an_earlier_occurrence():
    # The only occurrence of the end is the end itself: nothing to propose.
    assert match([5, 6, 7, 8]) is None
    # An earlier occurrence that reaches up to the end proposes what followed it so far.
    m = match([4, 4, 4], max_tokens=3)
    assert m is not None and m.continuation == [4, 4, 4]


def test_a_match_near_the_end_repeats_what_followed_it():
    text = [1, 2, 3, 1, 2]
    m = match(text, max_tokens=7)
    assert m.length == 2
    # What followed the match is "3 1 2", which is the text repeating with period 3: it goes on.
    assert m.continuation == [3, 1, 2, 3, 1, 2, 3]
    # Another document's continuation stops where that document ends.
    index = NgramIndex(key_len=2)
    index.add(0, [7, 1, 2, 3])
    assert index.match([9, 1, 2], 7, min_match=2).continuation == [3]


def test_very_long_repeats_are_matched_to_the_cap_quickly():
    unit = [11, 12, 13, 14, 15, 16, 17]
    text = unit * 400  # 2800 tokens of one repeated phrase
    m = match(text, max_tokens=16, max_match=64, max_candidates=8)
    assert m.length == 64
    assert m.continuation == (unit * 3)[:16]


def test_an_index_grows_with_the_text():
    lookup = RowLookup(LookupConfig(), [1, 2, 3, 4])
    assert lookup.match(4) is None
    lookup.extend([9, 1, 2])
    m = lookup.match(4)
    assert m.length == 2 and m.continuation == [3, 4, 9, 1]  # then "2 3 4 9 1 2" repeats


# -- the recent outputs of other rows ---------------------------------------------------------


def test_recent_outputs_stay_within_their_cap_under_a_long_stream():
    cap = 5_000
    recent = RecentOutputs(LookupConfig(recent_tokens=cap))
    rng = random.Random(0)
    for _ in range(2_000):
        n = rng.randint(1, 400)
        recent.add([rng.randrange(300) for _ in range(n)])
        assert recent.index.tokens <= cap
        assert recent.index.keys <= recent.index.tokens
    assert recent.index.tokens == sum(len(d) for d in recent.index.docs.values())
    # An output longer than the cap keeps its end.
    recent.add(list(range(10_000, 10_000 + 2 * cap)))
    assert recent.index.tokens == cap
    assert list(recent.index.docs.values())[-1][-1] == 10_000 + 2 * cap - 1


def test_recent_outputs_at_their_cap_take_bytes_not_kilobytes_per_token():
    """The index lives as long as its scheduler: at its default cap of 65,536 tokens of varied
    text it holds about 8 MB (int32 texts, packed int64 occurrences), and dropping outputs gives
    their memory back (lists of tuples in deques took ~4x as much)."""
    import tracemalloc

    rng = random.Random(1)
    outputs = [[rng.randrange(300, 40_000) for _ in range(32)] for _ in range(4_000)]
    tracemalloc.start()
    try:
        recent = RecentOutputs(LookupConfig())
        for out in outputs:
            recent.add(out)
        full = tracemalloc.get_traced_memory()[0]
        assert recent.index.tokens == LookupConfig().recent_tokens
        assert full / recent.index.tokens < 200, full
        while recent.index.docs:
            recent.index.drop_oldest()
        assert tracemalloc.get_traced_memory()[0] < full / 3  # the key table keeps its size
    finally:
        tracemalloc.stop()


def test_recent_outputs_serve_a_new_row_and_drop_the_oldest_first():
    recent = RecentOutputs(LookupConfig(recent_tokens=12))
    recent.add([1, 2, 3, 4, 5, 6])
    row = RowLookup(LookupConfig(), [9, 9, 1, 2])
    assert row.match(4, recent).continuation == [3, 4, 5, 6]
    assert row.match(4) is None  # its own text alone has no match
    recent.add([30, 31, 32, 33, 34, 35, 36, 37])  # 14 > 12: the first output goes
    assert row.match(4, recent) is None
    assert recent.index.tokens == 8


def test_a_disabled_recent_index_holds_nothing():
    recent = RecentOutputs(LookupConfig(recent_tokens=0))
    recent.add([1, 2, 3, 4])
    assert recent.index.tokens == 0


# -- acceptance and block length ----------------------------------------------------------------


def test_acceptance_is_learnt_per_match_length():
    acc = LookupAcceptance(LookupConfig(prior_acceptance=0.5))
    for _ in range(30):
        acc.observe(16, 8, 8)  # long matches: copies, accepted whole
        acc.observe(2, 4, 0)  # short matches: guesses, rejected at once
    assert acc.rate(20) > 0.9
    assert acc.rate(2) < 0.1
    # A bucket nothing was seen in keeps its prior, which rises with the matched context.
    cfg = LookupConfig(prior_acceptance=0.5)
    assert acc.rate(5) == pytest.approx(prior_rate(cfg, 2))
    priors = [LookupAcceptance(cfg).rate(n) for n in (1, 2, 4, 8, 16)]
    assert priors[0] == pytest.approx(0.5) and priors == sorted(priors) and priors[-1] < 1.0
    flat = LookupAcceptance(LookupConfig(prior_acceptance=0.5, prior_rise=0.0))
    assert {flat.rate(n) for n in (1, 2, 4, 8, 16)} == {0.5}


def test_expected_tokens_and_best_length():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    cost = lambda w: 1.0 + 0.1 * (w - 1)  # noqa: E731
    assert best_length(0.05, 16, cost)[0] == 0  # guesses do not pay: a plain step
    long_copy = best_length(0.98, 32, cost)[0]
    assert long_copy > 16  # a reliable copy runs past the model draft's usual cap
    steep = lambda w: 1.0 + 0.6 * (w - 1)  # noqa: E731 - where verify positions are expensive
    assert best_length(0.98, 32, steep)[0] < long_copy


# -- a step's plan ------------------------------------------------------------------------------


def make_row(seq: str, tokens: list[int], seed: int | None = None, **request) -> Row:
    rounds = SequenceRounds(tokens, StopConditions(64))
    params = SamplingParams(temperature=0.8, seed=seed) if seed is not None else SamplingParams()
    row = Row(seq, rounds, params, sink=None, request=RowRequest(**request))
    row.policy = RowPolicy.for_request(PolicyConfig(), row.mode, None, row.deterministic)
    return row


COPY = list(range(100, 140))  # a "function" in the prompt that the output copies


def grounded_row(seq: str, **kw) -> Row:
    # The prompt holds COPY; the output so far repeats its first 10 tokens.
    return make_row(seq, [1, 2, *COPY, 3, 4, *COPY[:10]], **kw)


def planner(**lookup) -> LookupDrafting:
    cfg = PolicyConfig(lookup=LookupConfig(**lookup))
    return LookupDrafting(cfg, StepCosts(cfg))


def test_one_stream_takes_a_long_block_from_its_prompt():
    lk = planner(max_tokens=24)
    row = grounded_row("a")
    lk.admit(row)
    for _ in range(20):  # the row has been copying well
        row.lookup.acceptance.observe(10, 8, 8)
    ks = [0]
    plan = lk.plan([row], ks)
    block = plan["a"]
    assert block.proposal.tokens == COPY[10 : 10 + len(block.proposal.tokens)]
    assert len(block.proposal.tokens) > PolicyConfig().max_draft_tokens
    assert block.proposal.start == row.rounds.committed_len
    assert ks == [0]


def test_a_row_with_a_model_block_keeps_it_when_lookup_promises_less():
    lk = planner()
    row = grounded_row("a")
    lk.admit(row)
    for _ in range(30):
        row.lookup.acceptance.observe(10, 4, 0)  # this row's lookups keep failing
    ks = [4]
    assert lk.plan([row], ks) == {}
    assert ks == [4]


def test_a_big_batch_does_not_widen_for_one_long_block():
    lk = planner(max_tokens=16)
    costs = lk.costs
    for rows, width in ((64, 1), (64, 2), (8, 1), (8, 4), (1, 1)):  # compute-bound at 64 rows
        for _ in range(5):
            costs.observe_target(rows, width, 0.004 * rows * width)
    copying = grounded_row("copy")
    lk.admit(copying)
    others = [make_row(f"r{i}", [7, i % 50 + 1000, 7]) for i in range(63)]
    for r in others:
        lk.admit(r)
    ks = [0] * 64
    plan = lk.plan([copying, *others], ks)
    # A block of L widens 64 rows to L + 1 positions: at this cost no block pays.
    assert plan == {}


def test_rows_that_may_not_look_up_propose_nothing():
    lk = planner()
    off = grounded_row("off", mode=SpecMode.OFF)
    model_only = grounded_row("model", drafter=Drafter.MODEL)
    for r in (off, model_only):
        r.drafter = r.request.drafter or Drafter.AUTO
        lk.admit(r)
    assert off.lookup is None and model_only.lookup is None
    assert lk.plan([off, model_only], [0, 0]) == {}


def test_a_seeded_row_reads_only_its_own_text():
    lk = planner()
    lk.recent.add([5, 6, 50, 51, 52, 53])
    seeded = make_row("s", [9, 5, 6], seed=3)
    free = make_row("f", [9, 5, 6])
    for r in (seeded, free):
        lk.admit(r)
    assert lk.plan([seeded], [0]) == {}
    plan = lk.plan([free], [0])
    assert plan["f"].proposal.tokens[:1] == [50]


def test_finished_rows_teach_the_next_ones():
    lk = planner()
    first = make_row("a", [1, 2, 3])
    lk.admit(first)
    first.rounds.on_plain(40)
    first.rounds.generated += [41, 42, 43, 44]
    lk.finished(first)
    second = make_row("b", [8, 40, 41])
    lk.admit(second)
    tokens = lk.plan([second], [0])["b"].proposal.tokens
    assert tokens and tokens == [42, 43, 44][: len(tokens)]


def test_a_seeded_row_decides_alone_from_its_own_text():
    lk = planner()
    row = grounded_row("s", seed=5)
    lk.admit(row)
    for _ in range(10):
        row.lookup.acceptance.observe(10, 8, 8)
    ks = [0]
    block = lk.plan([row], ks)["s"]
    tokens = block.proposal.tokens
    assert tokens == row.rounds.prompt_ids[12 : 12 + len(tokens)]  # what followed COPY[:10]
    # The same state plans the same block, whatever shares the batch.
    other = make_row("x", [3, 3, 3, 3, 3, 3])
    lk.admit(other)
    again = lk.plan([row, other], [0, 0])["s"]
    assert again.proposal.tokens == block.proposal.tokens
