"""The lossless verifier: a slow reference as oracle, exact distribution checks, masks, seeds.

Setup of the distribution tests: the target's distributions p_1, p_2, ... and the draft's q_1,
q_2, ... are fixed per position and do not depend on the tokens before them. Then the tokens a
speculative generation commits must be distributed exactly as independent draws p_1 x p_2 x ...,
whatever k is and however the positions are cut into blocks, and the first block's outcome
(accepted count j, final token t) has a closed form:

    P(j, t) = prod_{i<j} beta_i * (p_j - q_j)+(t)   for j < k   (rejection at j, recovered t)
    P(k, t) = prod_{i<k} beta_i * p_{k+1}(t)                   (all accepted, bonus t)

with beta_i = sum_v min(p_i, q_i)(v), the probability that position i accepts. Empirical
distributions must approach these as the sample grows (total variation below c/sqrt(n)), and
deliberately broken samplers must fail the same checks, so the checks can fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from workers.sampling import PositionalRng, next_token, warp_probs
from workers.types import SamplingParams, SparseQ, Verdict
from workers.verification import one_hot_q, verify_greedy, verify_sampled

# -- the reference sampler ------------------------------------------------------------------------


def dense_q_row(q: SparseQ, row: int, vocab: int) -> torch.Tensor:
    out = torch.zeros(vocab, dtype=torch.float32)
    for idx, prob in zip(q.indices[row].tolist(), q.probs[row].float(), strict=True):
        out[idx] = prob
    return out


def reference_verify(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    q: SparseQ,
    rng: PositionalRng,
    start: int,
    bug: str | None = None,
) -> Verdict:
    """Position by position, the textbook rule. Position i's generator gives its acceptance
    uniform first, then (where the block ends) the recovered or bonus draw.

    `bug` makes it one of the broken samplers the distribution checks must catch.
    """
    k, vocab = len(draft_tokens), target_probs.shape[-1]
    for i in range(k):
        gen = rng.at(start + i)
        u = float(torch.rand(1, generator=gen))
        d = int(draft_tokens[i])
        p_row, q_row = target_probs[i], dense_q_row(q, i, vocab)
        p_d, q_d = float(p_row[d]), float(q_row[d])
        if bug == "inverted_ratio":  # accept with min(1, q/p): the ratio upside down
            ratio = q_d / p_d if p_d > 0 else math.inf
        else:
            ratio = p_d / q_d if q_d > 0 else math.inf
        if u < min(1.0, ratio):
            continue  # d accepted
        residual = (p_row - q_row).clamp_min(0.0)
        if bug == "recover_from_p":  # resample from p instead of the residual
            residual = p_row
        if bug == "not_renormalized":
            # Inverse-CDF draw from the raw residual, whose mass is 1 - beta < 1: the missing
            # mass falls on the last token.
            u2 = float(torch.rand(1, generator=gen))
            return Verdict(i, min(int((residual.cumsum(0) <= u2).sum()), vocab - 1))
        total = residual.sum()
        dist = residual / total if total > 0 else p_row
        return Verdict(i, int(torch.multinomial(dist, 1, generator=gen)))
    if bug == "bonus_dropped":  # the block ends with its last draft token: no bonus
        return Verdict(k - 1, int(draft_tokens[k - 1]))
    bonus_row = target_probs[k - 1] if bug == "bonus_off_by_one" else target_probs[k]
    return Verdict(k, int(torch.multinomial(bonus_row, 1, generator=rng.at(start + k))), True)


# -- helpers ------------------------------------------------------------------------------------


def random_probs(rows: int, vocab: int, gen: torch.Generator, scale: float = 2.0, zeros=0):
    """Random distributions; `zeros` tokens per row get probability exactly 0 (masked)."""
    logits = torch.randn(rows, vocab, generator=gen) * scale
    if zeros:
        for r in range(rows):
            masked = torch.randperm(vocab, generator=gen)[:zeros]
            logits[r, masked] = -math.inf
    return logits.softmax(-1)


def dense_q(q: torch.Tensor) -> SparseQ:
    rows, vocab = q.shape
    return SparseQ(torch.arange(vocab).expand(rows, vocab).clone(), q.float())


def sparse_q(q: torch.Tensor, m: int) -> SparseQ:
    """The draft's way: its top-m tokens, renormalized."""
    top = torch.topk(q, m, dim=-1)
    return SparseQ(top.indices, top.values / top.values.sum(-1, keepdim=True))


def draw_from(q: SparseQ, gen: torch.Generator) -> torch.Tensor:
    choice = torch.multinomial(q.probs, 1, generator=gen).squeeze(1)
    return q.indices.gather(1, choice.unsqueeze(1)).squeeze(1)


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a.double() - b.double()).abs().sum())


def tv_threshold(n: int, cells: int) -> float:
    """E[TV(empirical, truth)] <= 0.5 * sqrt(2 * cells / (pi * n)); TV moves by at most 1/n per
    sample, so (McDiarmid) it exceeds its mean by 2/sqrt(n) with probability < exp(-8)."""
    return (0.5 * math.sqrt(2 * cells / math.pi) + 2.0) / math.sqrt(n)


# -- the reference is the oracle for the vectorized sampler --------------------------------------


def random_case(gen: torch.Generator, case: int):
    vocab = [2, 5, 16, 50][case % 4]
    k = [1, 2, 3, 5, 8][case % 5]
    zeros = 0 if vocab < 5 or case % 3 else vocab // 3
    p = random_probs(k + 1, vocab, gen, scale=float(case % 4 + 0.5), zeros=zeros)
    if case % 7 == 0:  # a draft close to the target: long accepted runs, bonus tokens
        qd = (0.9 * p[:k] + 0.1 * random_probs(k, vocab, gen)).float()
    else:
        qd = random_probs(k, vocab, gen, scale=float(case % 3 + 0.5))
    m = [vocab, 1, max(1, vocab // 2), min(3, vocab)][case % 4]
    q = dense_q(qd) if m == vocab else sparse_q(qd, m)
    return p, q, draw_from(q, gen)


def test_vectorized_equals_reference_on_random_cases():
    gen = torch.Generator().manual_seed(1234)
    ends = {"bonus": 0, "first": 0, "middle": 0}
    for case in range(600):
        p, q, drafted = random_case(gen, case)
        seed, start = case * 7919 % 1000, case % 13
        got = verify_sampled(p, drafted, q, PositionalRng(seed, 0), start)
        want = reference_verify(p, drafted, q, PositionalRng(seed, 0), start)
        assert got == want, (case, got, want)
        k = len(drafted)
        assert 0 <= got.accepted <= k and got.bonus == (got.accepted == k)
        ends["bonus" if got.bonus else "first" if got.accepted == 0 else "middle"] += 1
    # The cases cover every way a block ends.
    assert min(ends.values()) >= 50, ends


def test_verdict_committed():
    assert Verdict(2, 9).committed([4, 5, 6]) == [4, 5, 9]
    assert Verdict(0, 9).committed([4, 5, 6]) == [9]
    assert Verdict(3, 9, bonus=True).committed([4, 5, 6]) == [4, 5, 6, 9]


def test_sparse_q_lookup():
    q = SparseQ(torch.tensor([[3, 1], [0, 2]]), torch.tensor([[0.75, 0.25], [0.5, 0.5]]))
    assert q.prob_of(torch.tensor([1, 3])).tolist() == [0.25, 0.0]
    assert q.dense_row(0, 5).tolist() == [0.0, 0.25, 0.0, 0.75, 0.0]
    assert torch.equal(q.dense_row(1, 4), dense_q_row(q, 1, 4))


# -- greedy ---------------------------------------------------------------------------------------


def one_hot_logits(argmaxes: list[int], vocab: int = 10) -> torch.Tensor:
    logits = torch.randn(len(argmaxes), vocab)
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 100.0
    return logits


@pytest.mark.parametrize(
    "target, drafted, want",
    [
        ([3, 4, 5, 6], [3, 4, 5], Verdict(3, 6, True)),
        ([3, 4, 5, 6], [3, 7, 5], Verdict(1, 4)),
        ([3, 4, 5, 6], [9, 4, 5], Verdict(0, 3)),
        ([3, 4], [3], Verdict(1, 4, True)),
        ([3, 4], [2], Verdict(0, 3)),
    ],
)
def test_verify_greedy(target, drafted, want):
    assert verify_greedy(one_hot_logits(target), torch.tensor(drafted)) == want


def test_greedy_is_the_zero_temperature_limit_of_sampling():
    # One-hot p (greedy warp) through the sampled verifier gives the greedy verdict.
    gen = torch.Generator().manual_seed(5)
    for case in range(50):
        k = case % 4 + 1
        logits = torch.randn(k + 1, 12, generator=gen)
        greedy_p = warp_probs(logits, SamplingParams())
        argmax = logits.argmax(-1)
        drafted = argmax[:k].clone()
        if case % 2:
            drafted[case % k] = (drafted[case % k] + 1) % 12
        q = dense_q(random_probs(k, 12, gen))
        got = verify_sampled(greedy_p, drafted, q, PositionalRng(case, 0), 0)
        assert got == verify_greedy(logits, drafted)


# -- distributions --------------------------------------------------------------------------------

V = 8
POSITIONS = 8


def position_dists(seed: int):
    """p_i, q_i per position, independent of the prefix. At the first position q is unrelated to
    p (many rejections: the residual matters); later q is close to p (whole blocks get accepted:
    the bonus matters)."""
    gen = torch.Generator().manual_seed(seed)
    p = random_probs(POSITIONS, V, gen, scale=1.5)
    q = 0.85 * p + 0.15 * random_probs(POSITIONS, V, gen, scale=1.5)
    q[0] = random_probs(1, V, gen, scale=1.5)[0]
    return p, q


Sampler = Callable[..., Verdict]


def simulate(sampler: Sampler, p, q_rows: list[SparseQ], k: int, n: int, seed: int):
    """n independent generations (seeds seed..seed+n-1), each run block by block until it has
    committed two tokens. Returns the first block's (accepted, token) and the first two tokens.

    A generation needs at most two blocks, starting at position 0 and (when the first block
    committed only its recovered token) at position 1; each block gets its own draft draws."""
    gen = torch.Generator().manual_seed(seed)
    blocks = {}
    for pos in (0, 1):
        qs = q_rows[pos : pos + k]
        q = SparseQ(torch.cat([r.indices for r in qs]), torch.cat([r.probs for r in qs]))
        choice = torch.multinomial(q.probs, n, replacement=True, generator=gen)  # [k, n]
        drafted = q.indices.gather(1, choice).T.contiguous()  # [n, k]
        blocks[pos] = (p[pos : pos + k + 1], q, drafted, drafted.tolist())
    first_block, first_two = [], []
    for s in range(n):
        rng = PositionalRng(seed + s, 0)
        probs, q, drafted, lists = blocks[0]
        verdict = sampler(probs, drafted[s], q, rng, 0)
        first_block.append((verdict.accepted, verdict.token))
        out = verdict.committed(lists[s])
        if len(out) == 1:
            probs, q, drafted, lists = blocks[1]
            out += sampler(probs, drafted[s], q, rng, 1).committed(lists[s])
        first_two.append(out[:2])
    return torch.tensor(first_block), torch.tensor(first_two)


def block_oracle(p: torch.Tensor, q_rows: list[SparseQ], k: int) -> torch.Tensor:
    """Exact P(accepted = j, token = t) of the first block: [(k+1) * V]."""
    out = torch.zeros(k + 1, V, dtype=torch.float64)
    reach = 1.0
    for j in range(k):
        qj = q_rows[j].dense_row(0, V).double()
        pj = p[j].double()
        out[j] = reach * (pj - qj).clamp_min(0)
        reach *= float(torch.minimum(pj, qj).sum())
    out[k] = reach * p[k].double()
    return out.flatten()


def empirical(codes: torch.Tensor, cells: int) -> torch.Tensor:
    return torch.bincount(codes, minlength=cells).double() / len(codes)


def q_rows_of(q: torch.Tensor, m: int | None) -> list[SparseQ]:
    return [
        dense_q(q[i : i + 1]) if m is None else sparse_q(q[i : i + 1], m) for i in range(len(q))
    ]


def check_distributions(first_block, first_two, p, q_rows, k, n) -> dict[str, tuple[float, float]]:
    """TV distances of the first n samples from the exact distributions, and their thresholds."""
    fb, ft = first_block[:n], first_two[:n]
    joint = (p[0].double().unsqueeze(1) * p[1].double().unsqueeze(0)).flatten()
    return {
        "block": (
            tv(empirical(fb[:, 0] * V + fb[:, 1], (k + 1) * V), block_oracle(p, q_rows, k)),
            tv_threshold(n, (k + 1) * V),
        ),
        "first": (tv(empirical(ft[:, 0], V), p[0]), tv_threshold(n, V)),
        "second": (tv(empirical(ft[:, 1], V), p[1]), tv_threshold(n, V)),
        "joint": (tv(empirical(ft[:, 0] * V + ft[:, 1], V * V), joint), tv_threshold(n, V * V)),
    }


@pytest.fixture(scope="module")
def dists():
    return position_dists(seed=13)


# name -> (k, top-m of the sparse q or None for dense, generations)
RUNS = {"dense-k1": (1, None, 10_000), "dense-k3": (3, None, 20_000), "sparse-k3": (3, 3, 10_000)}


@pytest.fixture(scope="module")
def runs(dists):
    p, q = dists
    out = {}
    for name, (k, m, n) in RUNS.items():
        rows = q_rows_of(q, m)
        out[name] = (k, rows, *simulate(verify_sampled, p, rows, k, n, seed=1000))
    return out


@pytest.mark.parametrize("size", ["2k", "all"])
@pytest.mark.parametrize("run", sorted(RUNS))
def test_emitted_tokens_converge_to_p(runs, dists, run, size):
    p, _ = dists
    k, rows, first_block, first_two = runs[run]
    n = 2_000 if size == "2k" else len(first_two)
    for what, (dist, threshold) in check_distributions(
        first_block, first_two, p, rows, k, n
    ).items():
        assert dist < threshold, (what, dist, threshold)


def test_sparse_and_dense_q_give_the_same_distribution(runs):
    # The draft samples from its sparse q; the verifier's output distribution does not change.
    _, _, fb_dense, ft_dense = runs["dense-k3"]
    _, _, fb_sparse, ft_sparse = runs["sparse-k3"]
    n_dense, n_sparse = len(ft_dense), len(ft_sparse)
    first = tv(empirical(ft_dense[:, 0], V), empirical(ft_sparse[:, 0], V))
    joint = tv(
        empirical(ft_dense[:, 0] * V + ft_dense[:, 1], V * V),
        empirical(ft_sparse[:, 0] * V + ft_sparse[:, 1], V * V),
    )
    assert first < tv_threshold(n_dense, V) + tv_threshold(n_sparse, V)
    assert joint < tv_threshold(n_dense, V * V) + tv_threshold(n_sparse, V * V)
    # ... while the blocks themselves differ: the sparse draft is accepted less often.
    assert (fb_sparse[:, 0] > 0).float().mean() < (fb_dense[:, 0] > 0).float().mean()


def test_block_oracle_sums_to_one(dists):
    p, q = dists
    for k in (1, 3, 5):
        for m in (None, 3, 1):
            assert float(block_oracle(p, q_rows_of(q, m), k).sum()) == pytest.approx(1.0)


# (bug, k) -> the checks it must fail. The others may pass: a sampler that drops the bonus still
# emits p-distributed tokens (it just commits fewer per block), and with k = 3 a wrong bonus sits
# past the first two tokens.
BROKEN = {
    ("recover_from_p", 1): {"first", "block"},
    ("not_renormalized", 1): {"first", "block"},
    ("inverted_ratio", 1): {"first", "block"},
    ("bonus_dropped", 1): {"block"},
    ("bonus_dropped", 3): {"block"},
    ("bonus_off_by_one", 1): {"second", "joint", "block"},
    ("bonus_off_by_one", 3): {"block"},
}


@pytest.mark.parametrize("bug, k", sorted(BROKEN))
def test_broken_samplers_fail_the_same_checks(dists, bug, k):
    p, q = dists
    rows = q_rows_of(q, None)
    n = 2_000

    def broken(*args):
        return reference_verify(*args, bug=bug)

    fb, ft = simulate(broken, p, rows, k, n, seed=1000)
    result = check_distributions(fb, ft, p, rows, k, n)
    for what in BROKEN[bug, k]:
        dist, threshold = result[what]
        assert dist > threshold, (bug, what, dist, threshold)


def test_the_reference_passes_where_the_broken_ones_fail(dists):
    # The harness itself: the unbroken reference passes the checks at the same sample size.
    p, q = dists
    rows = q_rows_of(q, None)
    for k in (1, 3):
        fb, ft = simulate(reference_verify, p, rows, k, 2_000, seed=1000)
        for what, (dist, threshold) in check_distributions(fb, ft, p, rows, k, 2_000).items():
            assert dist < threshold, (k, what, dist, threshold)


def test_accept_with_p_over_q_needs_no_explicit_min():
    # "u < p/q" and "u < min(1, p/q)" are the same test for u in [0, 1); what the sampler
    # must get right is the residual, which the checks above cover.
    gen = torch.Generator().manual_seed(3)
    u = torch.rand(10_000, generator=gen)
    ratio = torch.rand(10_000, generator=gen) * 3
    assert torch.equal(u < ratio, u < ratio.clamp(max=1.0))


# -- masks and seeds ------------------------------------------------------------------------------


MASKS = [
    SamplingParams(temperature=1.0, top_k=3),
    SamplingParams(temperature=0.7, top_p=0.6),
    SamplingParams(temperature=1.3, top_k=5, top_p=0.8),
]


@pytest.mark.parametrize("params", MASKS, ids=repr)
def test_top_k_top_p_masks_are_never_violated(params):
    gen = torch.Generator().manual_seed(8)
    vocab, emitted = 20, 0
    for case in range(400):
        k = case % 4 + 1
        logits = torch.randn(k + 1, vocab, generator=gen) * 2
        p = warp_probs(logits, params)
        # A draft that ignores the masks proposes masked tokens all the time.
        q = dense_q(torch.randn(k, vocab, generator=gen).softmax(-1))
        drafted = draw_from(q, gen)
        verdict = verify_sampled(p, drafted, q, PositionalRng(case, 0), 0)
        for i, tok in enumerate(verdict.committed(drafted.tolist())):
            assert p[i, tok] > 0, (case, i, tok)
            emitted += 1
        for i in range(k + 1):
            assert p[i, next_token(logits[i], params, PositionalRng(case, 0).at(i))] > 0
    assert emitted > 400


def test_draft_support_outside_the_mask_is_always_rejected():
    # q puts all its mass where p is 0: every draft token is rejected, the recovered one is in p.
    p = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.3, 0.7]])
    q = SparseQ(torch.tensor([[0, 1]]), torch.tensor([[0.6, 0.4]]))
    for seed in range(200):
        drafted = torch.tensor([seed % 2])
        verdict = verify_sampled(p, drafted, q, PositionalRng(seed, 0), 0)
        assert verdict.accepted == 0 and verdict.token in (2, 3)


def test_seeded_verdicts_repeat():
    gen = torch.Generator().manual_seed(99)
    same_seed_differs = other_seed_differs = 0
    cases = 300
    for case in range(cases):
        p, q, drafted = random_case(gen, case)
        a = verify_sampled(p, drafted, q, PositionalRng(case, 0), 5)
        b = verify_sampled(p, drafted, q, PositionalRng(case, 0), 5)
        c = verify_sampled(p, drafted, q, PositionalRng(case + 10_000, 0), 5)
        d = verify_sampled(p, drafted, q, PositionalRng(case, 1), 5)  # another stream
        same_seed_differs += a != b
        other_seed_differs += (a != c) + (a != d)
    assert same_seed_differs == 0
    assert other_seed_differs > 0.25 * 2 * cases


def test_unseeded_requests_differ():
    p = torch.full((2, 50), 1 / 50)
    q = dense_q(torch.full((1, 50), 1 / 50))
    drafted = torch.tensor([0])
    # p == q: always accepted; the bonus is uniform over 50 tokens.
    bonuses = {verify_sampled(p, drafted, q, PositionalRng(None, 0), 0).token for _ in range(40)}
    assert len(bonuses) > 10


# -- one-hot q: blocks proposed with certainty (lookup drafting) ----------------------------------


def one_hot_rows(tokens: list[int]) -> list[SparseQ]:
    return [one_hot_q(torch.tensor([t])) for t in tokens]


@pytest.mark.parametrize("k", [1, 3])
def test_one_hot_blocks_keep_the_target_distribution(dists, k):
    # A lookup drafter's block is certain: q is one-hot on each proposed token. The rule then
    # accepts d with probability p(d) and recovers from p without d; the emitted tokens must
    # still be distributed as p, whichever tokens were proposed (a likely one, an unlikely one).
    p, _ = dists
    likely = p.argmax(-1).tolist()
    tokens = [int(p[0].argmin())] + likely[1:]  # the first proposal is the least likely token
    rows = one_hot_rows(tokens)
    n = 10_000
    first_block, first_two = simulate(verify_sampled, p, rows, k, n, seed=4000)
    for what, (dist, threshold) in check_distributions(
        first_block, first_two, p, rows, k, n
    ).items():
        assert dist < threshold, (what, dist, threshold)


def test_one_hot_q_matches_the_reference_sampler(dists):
    p, _ = dists
    tokens = p.argmax(-1).tolist()
    rows = one_hot_rows(tokens)
    q = one_hot_q(torch.tensor(tokens[:3]))
    assert q.indices.shape == (3, 1) and torch.equal(q.probs, torch.ones(3, 1))
    for s in range(300):
        rng = PositionalRng(s, 0)
        got = verify_sampled(p[:4], torch.tensor(tokens[:3]), q, rng, 0)
        want = reference_verify(p[:4], torch.tensor(tokens[:3]), q, PositionalRng(s, 0), 0)
        assert got == want
    assert len(rows) == len(tokens)
