"""Batched draft/target calls (workers/batch.py rows) against each row run alone.

Oracle: a second draft and target worker pair on the same checkpoints, called one row at a time
(tests/workers/one_row.py) with the same arguments. The batched pair must answer every row
exactly as the oracle does (same drafts, same q to fp32 tolerance, same verdicts), through ragged
k, plain rows, pipelined commits, joins, leaves, refusals, retries and the KV budget. The target's
prefill decodes the first token: it must equal what a plain step at the prompt's length gives
(tests/workers/plain_oracle.py); the draft hears of it as the commit of its first proposal.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny_models import make_model
from tests.workers.one_row import plain_step, prefill, propose, verify
from tests.workers.plain_oracle import plain_step_token
from workers.batch import PrefillRow, ProposeRow, VerifyRow
from workers.draft import DraftWorker, Proposal
from workers.errors import KVBudgetExceeded, StaleSequenceError, UnknownSequenceError
from workers.model_runner import ModelRunner
from workers.target import TargetWorker
from workers.types import SamplingParams, SparseQ

GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("batchw")
    target = make_model(base / "target", seed=0)
    near = base / "near"  # the target plus noise: partial acceptance
    model = AutoModelForCausalLM.from_pretrained(target, local_files_only=True)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(near)
    AutoTokenizer.from_pretrained(target, local_files_only=True).save_pretrained(near)
    return {"target": target, "near": near}


def pair(ckpts, **kw) -> tuple[TargetWorker, DraftWorker]:
    return (
        TargetWorker(ModelRunner(ckpts["target"], **kw)),
        DraftWorker(ModelRunner(ckpts["near"], **kw), top_m=16),
    )


def same_proposal(got: object, want: Proposal) -> None:
    assert isinstance(got, Proposal), got
    assert (got.start, got.tokens) == (want.start, want.tokens)
    if want.q is None:
        assert got.q is None
    else:
        assert torch.equal(got.q.indices, want.q.indices)
        torch.testing.assert_close(got.q.probs, want.q.probs, atol=1e-5, rtol=1e-5)


def test_batched_rounds_equal_each_row_alone(ckpts):
    """Many sequences, ragged prompts and k (0 = plain), greedy and seeded sampling, pipelined
    commits, joins and leaves between steps: every row's answer equals the row alone."""
    bt, bd = pair(ckpts)
    bt.runner.kv.slack = 8  # compact often
    bd.runner.kv.slack = 8
    ot, od = pair(ckpts)
    rng = random.Random(0)
    live: dict[str, dict] = {}
    next_id = 0
    accepted_any = rejected_any = False

    def join(count: int) -> None:
        nonlocal next_id
        rows = []
        for _ in range(count):
            sid = f"s{next_id}"
            next_id += 1
            params = GREEDY if rng.random() < 0.5 else SamplingParams(0.9, 20, seed=next_id)
            prompt = [rng.randrange(2, 96) for _ in range(rng.randint(1, 12))]
            rows.append(PrefillRow(sid, prompt, params))
            first = prefill(ot, sid, prompt, params)
            assert first == plain_step_token(ot.runner.model, prompt, params)
            assert prefill(od, sid, prompt, params) is None
            # The draft hears of the target's first token with the row's first proposal.
            live[sid] = {"n": len(prompt), "commit": [first]}
        assert bt.prefill_batch(rows) == [live[r.seq_id]["commit"][0] for r in rows]
        assert bd.prefill_batch(rows) == [None] * count

    join(5)
    for step in range(14):
        if step % 4 == 3:
            join(rng.randint(1, 3))
        if step % 5 == 4:
            for sid in rng.sample(sorted(live), 2):
                for w in (bt, bd, ot, od):
                    assert w.release(sid)
                del live[sid]
        ks = {sid: rng.choice([0, 1, 2, 3, 4]) for sid in live}
        spec = [sid for sid in live if ks[sid]]
        prows = [ProposeRow(s, live[s]["n"], ks[s], tuple(live[s]["commit"])) for s in spec]
        got = bd.propose_batch(prows)
        proposals = {}
        for r, g in zip(prows, got, strict=True):
            want = propose(od, r.seq_id, r.committed_len, r.k, r.commit)
            same_proposal(g, want)
            proposals[r.seq_id] = want
            live[r.seq_id]["n"] += len(r.commit)
            live[r.seq_id]["commit"] = []
        # The target's committed length: the draft's plus what it was not yet told.
        tlen = {s: live[s]["n"] + len(live[s]["commit"]) for s in live}
        vrows = [
            VerifyRow(s, tlen[s], proposals[s].tokens, proposals[s].q)
            if s in proposals
            else VerifyRow(s, tlen[s])
            for s in live
        ]
        rng.shuffle(vrows)
        got = bt.verify_batch(vrows)
        for r, g in zip(vrows, got, strict=True):
            st = live[r.seq_id]
            if r.plain:  # its draft hears of the token with the row's next proposal
                want_token = plain_step(ot, r.seq_id, r.committed_len)
                assert (g.accepted, g.token, g.bonus) == (0, want_token, False)
                st["commit"].append(want_token)
            else:
                want = verify(ot, r.seq_id, r.committed_len, r.draft_tokens, r.q)
                assert g == want
                st["commit"] += want.committed(list(r.draft_tokens))
                accepted_any |= want.accepted > 0
                rejected_any |= want.accepted < len(r.draft_tokens)
        for sid, st in live.items():
            assert bt.committed_tokens(sid) == ot.committed_tokens(sid)
            assert len(bt.committed_tokens(sid)) == st["n"] + len(st["commit"])
            assert bd.committed_len(sid) == od.committed_len(sid) == st["n"]
    assert accepted_any and rejected_any
    for sid in list(live):
        for w in (bt, bd):
            assert w.release(sid)
    for w in (bt, bd):
        assert w.live_sequences == 0 and w.kv_tokens == 0


def test_failing_rows_fail_alone_and_retries_answer_again(ckpts):
    t, d = pair(ckpts)
    ot, _ = pair(ckpts)
    prompt = [5, 6, 7, 8, 9]
    first = plain_step_token(ot.runner.model, prompt, GREEDY)
    for sid in ("a", "b"):
        assert prefill(t, sid, prompt, GREEDY) == prefill(ot, sid, prompt, GREEDY) == first
        assert prefill(d, sid, prompt, GREEDY) is None
    n = len(prompt) + 1  # the target's committed length: the prompt and its first token
    block = propose(d, "a", n - 1, 3, [first]).tokens
    rows = [
        VerifyRow("a", n, block),
        VerifyRow("nope", n),
        VerifyRow("b", n + 1),  # stale
        VerifyRow("b", n, [1], None),
    ]
    got = t.verify_batch(rows)
    assert got[0] == verify(ot, "a", n, block)
    assert isinstance(got[1], UnknownSequenceError)
    assert isinstance(got[2], StaleSequenceError)
    assert got[3] == verify(ot, "b", n, [1])
    again = t.verify_batch([rows[0], rows[3]])  # the retry of the applied calls
    assert again == [got[0], got[3]]
    # The same sequence twice in one batch: handled in order, like a row-by-row loop.
    n_b = len(t.committed_tokens("b"))
    twice = t.verify_batch([VerifyRow("b", n_b), VerifyRow("b", n_b + 1)])
    assert [v.token for v in twice] == [plain_step(ot, "b", n_b), plain_step(ot, "b", n_b + 1)]
    # Draft refusals: bad k, bad start and unknown rows fail alone; the good row drafts.
    prows = [
        ProposeRow("a", n, 0),
        ProposeRow("a", n, 2, start=n + 10),
        ProposeRow("zz", n, 2),
        ProposeRow("b", n - 1, 2, (first,)),
    ]
    got = d.propose_batch(prows)
    assert isinstance(got[0], ValueError) and isinstance(got[2], UnknownSequenceError)
    assert isinstance(got[1], ValueError)  # "a" named twice: after the batch, in order
    assert isinstance(got[3], Proposal) and len(got[3].tokens) == 2
    pre = t.prefill_batch([PrefillRow("x", [], GREEDY), PrefillRow("y", [3, 4], GREEDY)])
    assert isinstance(pre[0], ValueError)
    assert pre[1] == plain_step_token(ot.runner.model, [3, 4], GREEDY)
    for w in (t, d):
        for sid in ("a", "b", "x", "y"):
            w.release(sid)
        assert w.live_sequences == 0 and w.kv_tokens == 0


def test_token_ranges_are_refused_by_the_worker_row_by_row(ckpts):
    """Whoever calls (here no gRPC service in front): ids outside the vocabulary and sequences
    past the context are refused per row with a ValueError naming the field, before the model
    sees them; the sequences they name are unchanged, the good neighbours are answered, and the
    workers go on serving exactly."""
    t, d = pair(ckpts)
    ot, _ = pair(ckpts)
    vocab, ctx = t.runner.vocab_size, t.runner.max_context
    prompt = [5, 6, 7, 8, 9]
    n = len(prompt)  # the draft's committed length; the target's is n + 1 (its first token)
    first = plain_step_token(ot.runner.model, prompt, GREEDY)
    for w, want in ((t, first), (d, None)):
        got = w.prefill_batch(
            [
                PrefillRow("over", [1, vocab], GREEDY),
                PrefillRow("a", prompt, GREEDY),
                PrefillRow("under", [-1, 2], GREEDY),
                PrefillRow("long", [3] * (ctx + 1), GREEDY),
            ]
        )
        assert got[1] == want
        assert all(str(g).startswith("token_ids: token id") for g in (got[0], got[2]))
        assert str(got[3]).startswith("prompt:") and "context" in str(got[3])
        assert all(isinstance(g, ValueError) for g in (got[0], got[2], got[3]))
        assert w.live_sequences == 1
    # A target's prompt needs room for the token its prefill decodes.
    (full,) = t.prefill_batch([PrefillRow("full", [3] * ctx, GREEDY)])
    assert isinstance(full, ValueError)
    assert str(full).startswith("prompt:") and "context" in str(full)
    assert t.live_sequences == 1
    sampled = SamplingParams(temperature=1.0, seed=2)
    first_s = prefill(t, "s", prompt, sampled)
    assert first_s == plain_step_token(ot.runner.model, prompt, sampled)
    q_outside = SparseQ(torch.tensor([[4, vocab]]), torch.tensor([[0.5, 0.5]]))
    got = t.verify_batch(
        [
            VerifyRow("a", n + 1, [vocab]),
            VerifyRow("s", n + 1, [4], q_outside),
            VerifyRow("a", n + 1, [1] * (ctx - n)),  # the block would pass the context
        ]
    )
    assert all(isinstance(g, ValueError) for g in got)
    assert str(got[0]).startswith("draft_tokens: token id")
    assert str(got[1]).startswith("q: token id")
    assert str(got[2]).startswith("draft_tokens:") and "context" in str(got[2])
    assert t.committed_tokens("a") == [*prompt, first]
    assert t.committed_tokens("s") == [*prompt, first_s]
    got = d.propose_batch([ProposeRow("a", n, 2, (-3,)), ProposeRow("a", n, 2, (vocab,))])
    assert all(isinstance(g, ValueError) and str(g).startswith("commit: token id") for g in got)
    assert d.committed_len("a") == n
    block = propose(d, "a", n, 2, [first]).tokens
    assert prefill(ot, "a", prompt, GREEDY) == first
    assert verify(t, "a", n + 1, block) == verify(ot, "a", n + 1, block)


def test_kv_budget_refuses_prefill_rows_alone(ckpts):
    t = TargetWorker(ModelRunner(ckpts["target"], max_kv_tokens=20))
    # A target's prefill row holds all n prompt tokens (its pass decodes the first token).
    rows = [
        PrefillRow("a", list(range(2, 11)), GREEDY),  # holds 9
        PrefillRow("b", list(range(2, 13)), GREEDY),  # 11 more -> 20: fits exactly
        PrefillRow("c", [3, 4], GREEDY),  # 2 more -> 22: refused
    ]
    got = t.prefill_batch(rows)
    oracle = [plain_step_token(t.runner.model, r.token_ids, GREEDY) for r in rows[:2]]
    assert got[:2] == oracle and isinstance(got[2], KVBudgetExceeded)
    assert t.live_sequences == 2 and t.kv_tokens == 20
    with pytest.raises(KVBudgetExceeded):
        prefill(t, "c", [3, 4], GREEDY)
    # A re-prefill frees its old tokens first: fits.
    assert prefill(t, "a", [3, 4], GREEDY) == plain_step_token(t.runner.model, [3, 4], GREEDY)
    assert t.kv_tokens == 13
    for sid in ("a", "b"):
        t.release(sid)
    assert t.kv_tokens == 0 and t.live_sequences == 0


def test_pipelined_proposals_with_tails_commits_and_start(ckpts):
    """The draft's speculative tail: batched proposals that extend a tail, commit into it (agree
    or not) and restart from `start` equal the same calls row by row."""
    _, bd = pair(ckpts)
    _, od = pair(ckpts)
    sampled = SamplingParams(1.0, 0, seed=3)
    prompts = {"p": [4, 5, 6, 7], "q": [8, 9], "r": [10, 11, 12, 13, 14, 15]}
    for sid, toks in prompts.items():
        params = sampled if sid == "q" else GREEDY
        prefill(bd, sid, toks, params)
        prefill(od, sid, toks, params)
    n = {s: len(t) for s, t in prompts.items()}

    def both(rows: list[ProposeRow]) -> list[Proposal]:
        got = bd.propose_batch(rows)
        want = [propose(od, r.seq_id, r.committed_len, r.k, r.commit, r.start) for r in rows]
        for g, w in zip(got, want, strict=True):
            same_proposal(g, w)
        return want

    first = both([ProposeRow(s, n[s], k) for s, k in (("p", 2), ("q", 3), ("r", 1))])
    # Pipelined: the next block before the first is verified (the tail grows).
    second = both([ProposeRow(s, n[s], 2) for s in ("p", "q", "r")])
    assert [p.start for p in second] == [n["p"] + 2, n["q"] + 3, n["r"] + 1]
    # p: the whole first block and 1 more accepted (the tail stays); q: a commit that disagrees
    # at its second token (the tail after it goes); r: restart inside the tail.
    commit_p = first[0].tokens + second[0].tokens[:1]
    commit_q = [first[1].tokens[0], (first[1].tokens[1] + 1) % 90]
    rows = [
        ProposeRow("p", n["p"], 2, tuple(commit_p)),
        ProposeRow("q", n["q"], 4, tuple(commit_q)),
        ProposeRow("r", n["r"], 3, (), n["r"] + 1),
    ]
    both(rows)
    for sid in prompts:
        assert bd.committed_len(sid) == od.committed_len(sid)
        assert bd.release(sid)
    assert bd.live_sequences == 0 and bd.kv_tokens == 0


@pytest.mark.parametrize("threshold", [0.3, 0.999])
def test_confidence_stop_drafts_a_prefix_of_the_full_block(ckpts, threshold):
    """A draft with confidence_stop drafts, per row, the full block's tokens (and q) up to the
    first token it gave less than the threshold; greedy and sampled rows alike."""
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    params = [
        GREEDY,
        SamplingParams(temperature=1.0, seed=3),
        SamplingParams(temperature=0.7, seed=4),
    ]
    _, full = pair(ckpts)
    _, short = pair(ckpts)
    short.confidence_stop = threshold
    for w in (full, short):
        w.prefill_batch([PrefillRow(f"s{i}", p, params[i]) for i, p in enumerate(prompts)])
    k = 6
    rows = [ProposeRow(f"s{i}", len(p), k) for i, p in enumerate(prompts)]
    want, got = full.propose_batch(rows), short.propose_batch(rows)
    lengths = []
    for w, g in zip(want, got, strict=True):
        n = len(g.tokens)
        assert 1 <= n <= k and g.tokens == w.tokens[:n] and g.start == w.start
        if w.q is not None:
            torch.testing.assert_close(g.q.probs, w.q.probs[:n])
        lengths.append(n)
        # A block short of k ended at a token the draft was unsure of, and says so.
        assert g.unsure_last or n == k
        assert not w.unsure_last  # a draft without a stop is never unsure
    if threshold == 0.999:
        assert lengths == [1, 1, 1]  # a tiny model is never that sure
        assert all(g.unsure_last for g in got)
    with pytest.raises(ValueError, match="confidence_stop"):
        DraftWorker(full.runner, confidence_stop=1.0)


def test_one_hot_rows_need_no_q_and_refuse_one(ckpts):
    """A lookup block (one_hot) on a sampled row is verified with q one-hot on its tokens, sent
    as nothing: the verdict equals the same block with that q sent explicitly. A one_hot row that
    also sends a q, and a sampled row with neither, are refused alone."""
    t, _ = pair(ckpts)
    ot, _ = pair(ckpts)
    sampled = SamplingParams(temperature=0.9, seed=7)
    prompt = [5, 6, 7, 8, 9]
    first = prefill(t, "s", prompt, sampled)
    assert prefill(ot, "s", prompt, sampled) == first
    n = len(prompt) + 1
    block = [11, 12, 13]
    explicit = SparseQ(torch.tensor(block).view(3, 1), torch.ones(3, 1))
    bad = t.verify_batch(
        [
            VerifyRow("s", n, block, explicit, one_hot=True),
            VerifyRow("s", n, block),  # sampled, no q, not one_hot
        ]
    )
    assert all(isinstance(g, ValueError) and str(g).startswith("q:") for g in bad)
    (got,) = t.verify_batch([VerifyRow("s", n, block, one_hot=True)])
    assert got == verify(ot, "s", n, block, explicit)
    assert t.committed_tokens("s") == ot.committed_tokens("s")
