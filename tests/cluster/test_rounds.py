"""SequenceRounds: what each round commits, when a sequence ends, and its statistics."""

from __future__ import annotations

import pytest

from cluster.scheduling.rounds import FinishReason, RoundRecord, SequenceRounds, StopConditions

EOS = 0
STOP = 7


def seq(prompt=(10, 11, 12), max_new=16, max_context=1 << 30, eos=(EOS,), stop=(STOP,)):
    cond = StopConditions(max_new, frozenset(eos), frozenset(stop), max_context)
    return SequenceRounds(list(prompt), cond)


# -- ending a sequence --------------------------------------------------------------------------


def test_round_commits_accepted_plus_one():
    s = seq()
    assert s.on_round([20, 21, 22], accepted=2, token=30) == [20, 21, 30]
    assert s.on_round([40, 41], accepted=2, token=42) == [40, 41, 42]  # all accepted: bonus
    assert s.generated == [20, 21, 30, 40, 41, 42]
    assert s.tokens == [10, 11, 12, 20, 21, 30, 40, 41, 42]
    assert s.committed_len == 9 and not s.finished


@pytest.mark.parametrize("where", [0, 1, 2])
def test_eos_inside_a_block_ends_there(where):
    s = seq()
    block = [20, 21, 22]
    block[where] = EOS
    out = s.on_round(block, accepted=3, token=30)
    assert out == block[: where + 1]
    assert s.generated == out and s.finish_reason is FinishReason.EOS
    assert s.stats.records[-1] == RoundRecord(proposed=3, accepted=3, committed=where + 1)


def test_eos_as_recovered_or_bonus_token():
    s = seq()
    assert s.on_round([20, 21], accepted=1, token=EOS) == [20, EOS]
    assert s.finish_reason is FinishReason.EOS
    s = seq()
    assert s.on_round([20, 21], accepted=2, token=EOS) == [20, 21, EOS]
    assert s.finish_reason is FinishReason.EOS


def test_rejected_draft_tokens_never_stop_the_sequence():
    # An EOS among the *rejected* draft tokens is not committed and ends nothing.
    s = seq()
    assert s.on_round([20, EOS, STOP], accepted=1, token=25) == [20, 25]
    assert not s.finished


def test_stop_token_inside_a_block():
    s = seq()
    assert s.on_round([20, STOP, 22], accepted=3, token=30) == [20, STOP]
    assert s.finish_reason is FinishReason.STOP
    s = seq()
    assert s.on_plain(STOP) == [STOP] and s.finish_reason is FinishReason.STOP


def test_eos_set_and_stop_set_are_independent():
    s = seq(eos=(3, 4), stop=())
    assert s.on_round([20, 4, 22], accepted=3, token=30) == [20, 4]
    assert s.finish_reason is FinishReason.EOS
    s = seq(eos=(), stop=(5, 6))
    assert s.on_round([0, 6], accepted=2, token=30) == [0, 6]  # 0 is no EOS here
    assert s.finish_reason is FinishReason.STOP


def test_max_new_tokens_inside_a_block():
    s = seq(max_new=5)
    assert s.on_round([20, 21], accepted=2, token=22) == [20, 21, 22]
    assert s.on_round([23, 24, 25], accepted=3, token=26) == [23, 24]
    assert len(s.generated) == 5 and s.finish_reason is FinishReason.LENGTH


def test_max_new_tokens_one_plain_step():
    s = seq(max_new=1)
    assert s.block_size(8) == 0
    assert s.on_plain(50) == [50] and s.finish_reason is FinishReason.LENGTH


def test_eos_wins_over_length_on_the_same_token():
    s = seq(max_new=2)
    assert s.on_round([20, EOS], accepted=2, token=30) == [20, EOS]
    assert s.finish_reason is FinishReason.EOS


def test_context_limit():
    # The committed length (prompt + generated) never passes the model context.
    s = seq(prompt=range(1, 8), max_context=10)  # 7 prompt tokens, room for 3 more
    assert s.block_size(8) == 2  # a round of 2 commits up to 3 tokens
    assert s.on_round([20, 21, 22, 23], accepted=4, token=24) == [20, 21, 22]
    assert s.committed_len == 10 and s.finish_reason is FinishReason.LENGTH

    s = seq(prompt=range(1, 9), max_context=10)
    assert s.block_size(4) == 1
    s.on_plain(20)
    assert s.block_size(4) == 0 and not s.finished  # one token of room: a plain step
    assert s.on_plain(21) == [21]
    assert s.committed_len == 10 and s.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("n", [10, 11, 50])
def test_prompt_that_fills_the_context_is_refused(n):
    with pytest.raises(ValueError, match="prompt") as info:
        seq(prompt=range(1, n + 1), max_context=10)
    assert "context" in str(info.value) and "10" in str(info.value)


def test_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="prompt"):
        seq(prompt=[])


@pytest.mark.parametrize("bad", [0, -1, 2.5, None])
def test_max_new_tokens_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="max_new_tokens"):
        StopConditions(bad)


# -- block size -----------------------------------------------------------------------------------


def test_block_size_clamping():
    s = seq(max_new=10)
    assert [s.block_size(k) for k in (0, 1, 4, 8, 9, 20)] == [0, 1, 4, 8, 9, 9]
    s.on_round([1, 2, 3], accepted=3, token=4)  # 4 generated, 6 to go: at most 5 drafted
    assert s.block_size(8) == 5 and s.block_size(3) == 3
    s.on_round([1, 2, 3, 4, 5], accepted=4, token=6)  # 9 generated, 1 to go
    assert s.block_size(8) == 0
    assert s.block_size(-3) == 0


def test_a_clamped_block_never_overshoots():
    # Driving with block_size alone, no round ever commits past max_new_tokens or the context.
    for max_new, ctx, k in [(7, 1 << 30, 4), (50, 12, 8), (3, 100, 8), (13, 20, 2)]:
        s = seq(prompt=[1, 2, 3], max_new=max_new, max_context=ctx, eos=(), stop=())
        nxt = 100
        while not s.finished:
            b = s.block_size(k)
            if b == 0:
                out = s.on_plain(nxt)
                assert len(out) == 1
            else:
                block = list(range(nxt, nxt + b))
                out = s.on_round(block, accepted=b, token=nxt + b)
                assert out == block + [nxt + b]  # nothing trimmed: the block fit
            nxt += 10
        assert len(s.generated) == min(max_new, ctx - 3)
        assert s.committed_len <= ctx


def test_finished_sequences_refuse_more_rounds():
    s = seq(max_new=1)
    s.on_plain(5)
    with pytest.raises(RuntimeError, match="finished"):
        s.on_plain(6)
    with pytest.raises(RuntimeError, match="finished"):
        s.on_round([1], accepted=1, token=2)


def test_cancel_and_finish():
    s = seq()
    s.on_plain(5)
    s.cancel()
    assert s.finish_reason is FinishReason.CANCELLED and s.generated == [5]
    s.finish(FinishReason.STOP)  # the first reason stays
    assert s.finish_reason is FinishReason.CANCELLED
    s = seq()
    s.finish(FinishReason.STOP)
    assert s.finished and s.finish_reason is FinishReason.STOP
    s.cancel()
    assert s.finish_reason is FinishReason.STOP


# -- statistics -----------------------------------------------------------------------------------


def test_stats():
    s = seq(eos=(), stop=())
    st = s.stats
    assert st.acceptance_rate == 0.0 and st.mean_accepted_length == 0.0
    assert st.tokens_per_target_pass == 0.0
    s.on_round([1, 2, 3, 4], accepted=4, token=5)  # 5 committed
    s.on_round([1, 2, 3, 4], accepted=1, token=5)  # 2 committed
    s.on_round([1, 2], accepted=0, token=5)  # 1 committed
    assert st.rounds == 3 and st.draft_tokens == 10 and st.accepted_tokens == 5
    assert st.acceptance_rate == pytest.approx(0.5)
    assert st.mean_accepted_length == pytest.approx(8 / 3)
    assert st.tokens_per_target_pass == pytest.approx(8 / 3)
    s.on_plain(9)  # plain steps count as target passes with one token
    assert st.plain_steps == 1
    assert st.tokens_per_target_pass == pytest.approx(9 / 4)
    assert st.mean_accepted_length == pytest.approx(8 / 3)  # spec rounds only
    assert [r.committed for r in st.records] == [5, 2, 1, 1]
    assert st.records[-1] == RoundRecord(0, 0, 1)


def test_tau_counts_trimmed_tokens_only():
    # A block cut at max_new_tokens counts what went out, not what was verified.
    s = seq(max_new=3, eos=(), stop=())
    s.on_round([1, 2, 3, 4], accepted=4, token=5)
    assert s.generated == [1, 2, 3]
    assert s.stats.tokens_per_target_pass == 3.0
    assert s.stats.accepted_tokens == 4  # acceptance still reflects the verifier's verdict


def test_tokens_from_equals_a_slice_of_all_tokens():
    r = SequenceRounds([1, 2, 3], StopConditions(10))
    r.on_plain(4)
    r.on_plain(5)
    for start in range(7):
        assert r.tokens_from(start) == r.tokens[start:]


def test_without_eos_ids_a_sequence_runs_past_the_end_of_sequence_token():
    """ignore_eos: the router builds the stop conditions without the model's EOS ids."""
    eos = StopConditions(5, frozenset({9}))
    ignored = StopConditions(5, frozenset())
    a, b = SequenceRounds([1, 2], eos), SequenceRounds([1, 2], ignored)
    assert a.on_round([4, 9, 4], 3, 7) == [4, 9] and a.finish_reason is FinishReason.EOS
    assert b.on_round([4, 9, 4], 3, 7) == [4, 9, 4, 7] and not b.finished
