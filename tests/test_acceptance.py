"""Acceptance rules: relaxed mass, sibling tests (dynamic / static), greedy, and tree verification.

p = target (verifier) distribution, q = drafter distribution. Statistical tests use fixed seeds and a
chi-square goodness-of-fit test that must not reject at p-value 1e-3 (with the seeds fixed the outcome is
deterministic; the threshold says how surprising a pass of a wrong implementation would have to be).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from models.drafters.acceptance import (
    AcceptConfig,
    dynamic_sibling_test,
    greedy_accept,
    relaxed_distribution,
    relaxed_mass,
    static_sibling_test,
    verify_tree,
)
from models.drafters.tree import StaticTreeTemplate, build_tree

F64 = torch.float64
P_MIN = 1e-3  # chi-square p-value below which a statistical test fails


# ---------------------------------------------------------------------------------------------------------
# Reference implementations (plain Python, float64, one element at a time)
# ---------------------------------------------------------------------------------------------------------


def ref_relax(p: list[float], x: int, nb_row: list[int], k: int, delta, lam) -> tuple[float, int, list[int]]:
    """(p̃(x), m*, [N_1..N_{m*}]) by walking the neighbours in distance order."""
    if delta is None and lam is None:
        return p[x], 0, []
    budget = delta if delta is not None else (lam - 1.0) * p[x]
    c, agg = 0.0, []
    for m in range(k):
        if nb_row[m] < 0:
            break
        if c + p[nb_row[m]] > budget:
            break
        c += p[nb_row[m]]
        agg.append(nb_row[m])
    return p[x] + c, len(agg), agg


def cfg_args(cfg: AcceptConfig) -> tuple[int, float | None, float | None]:
    return cfg.k, cfg.delta, cfg.lam


def ref_dynamic_output(p, children, nb, cfg) -> tuple[list[float], float]:
    """Exact output distribution of the dynamic sibling process, and Σ_j P(reach j)·c_{m*_j}."""
    r, reach, out, shift = list(p), 1.0, [0.0] * len(p), 0.0
    for x in children:
        pt, _, agg = ref_relax(r, x, nb[x] if nb is not None else [], *cfg_args(cfg))
        pt = min(pt, 1.0)
        out[x] += reach * pt
        shift += reach * (pt - r[x])
        for y in [x] + agg:
            r[y] = 0.0
        s = sum(r)
        r = [v / s for v in r]
        reach *= 1.0 - pt
    return [o + reach * v for o, v in zip(out, r)], shift


def ref_static_output(p, big_q, n_children, nb, cfg) -> list[float]:
    """Exact output distribution of the static sibling process, enumerating every ordered draw of
    ``n_children`` codes without replacement from Q."""
    vocab = len(p)
    total = [0.0] * vocab
    for seq in itertools.permutations(range(vocab), n_children):
        prob, used = 1.0, 0.0
        for x in seq:
            prob *= big_q[x] / (1.0 - used)
            used += big_q[x]
        if prob == 0.0:
            continue
        r, q_rem, reach, out = list(p), list(big_q), 1.0, [0.0] * vocab
        for x in seq:
            s = sum(q_rem)
            q_j = [v / s for v in q_rem]
            pt, _, agg = ref_relax(r, x, nb[x] if nb is not None else [], *cfg_args(cfg))
            relaxed = list(r)
            for y in agg:
                relaxed[y] = 0.0
            relaxed[x] = pt
            a = min(1.0, pt / q_j[x])
            out[x] += reach * a
            reach *= 1.0 - a
            res = [max(0.0, u - v) for u, v in zip(relaxed, q_j)]
            s = sum(res)
            r = [v / s for v in res] if s > 0 else relaxed
            q_rem[x] = 0.0
        for y in range(vocab):
            total[y] += prob * (out[y] + reach * r[y])
    return total


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness-of-fit p-value of ``counts`` against ``probs`` (cells with zero probability must be empty)."""
    counts, probs = counts.to(F64).flatten(), probs.to(F64).flatten()
    n = counts.sum()
    expected = probs * n
    assert counts[probs <= 1e-15].sum() == 0, "samples where the distribution has no mass"
    live = probs > 1e-15
    stat = ((counts[live] - expected[live]) ** 2 / expected[live]).sum()
    dof = int(live.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=F64), stat / 2))


def random_probs(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.softmax(scale * torch.randn(*shape, generator=gen, dtype=F64), -1)


def random_neighbours(gen: torch.Generator, vocab: int) -> torch.Tensor:
    """(V, V-1) random distance orders, self excluded."""
    rows = []
    for i in range(vocab):
        perm = torch.randperm(vocab, generator=gen)
        rows.append(perm[perm != i])
    return torch.stack(rows)


def sample_output(accepted: torch.Tensor, children: torch.Tensor, residual: torch.Tensor, gen) -> torch.Tensor:
    fallback = torch.multinomial(residual, 1, generator=gen).squeeze(1)
    return torch.where(accepted >= 0, children.gather(1, accepted.clamp(min=0)[:, None]).squeeze(1), fallback)


def tvd(a, b) -> float:
    return 0.5 * float((torch.as_tensor(a, dtype=F64) - torch.as_tensor(b, dtype=F64)).abs().sum())


LANTERN = AcceptConfig(relax="lantern", k=3, delta=0.25)
LANTERN_PP = AcceptConfig(relax="lantern++", k=3, lam=2.0)
OFF = AcceptConfig()


# ---------------------------------------------------------------------------------------------------------
# Relaxed mass
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("delta, lam", [(0.0, None), (0.05, None), (0.3, None), (None, 1.0), (None, 1.5), (None, 3.0)])
def test_relaxed_mass_matches_bruteforce(k, delta, lam):
    gen = torch.Generator().manual_seed(11)
    vocab, batch = 20, 64
    p = random_probs(gen, batch, vocab, scale=1.5)
    cand = torch.randint(0, vocab, (batch,), generator=gen)
    nb = random_neighbours(gen, vocab)[:, :8]
    p_tilde, m_star = relaxed_mass(p, cand, nb, k, delta, lam)
    assert p_tilde.shape == cand.shape == m_star.shape
    for b in range(batch):
        ref_pt, ref_m, _ = ref_relax(p[b].tolist(), int(cand[b]), nb[int(cand[b])].tolist(), k, delta, lam)
        assert int(m_star[b]) == ref_m
        assert abs(float(p_tilde[b]) - ref_pt) < 1e-12


@pytest.mark.parametrize("delta, lam", [(0.1, None), (0.4, None), (None, 1.5), (None, 4.0)])
def test_relaxed_distribution_shifts_only_the_aggregated_mass(delta, lam):
    gen = torch.Generator().manual_seed(12)
    vocab, batch, k = 16, 256, 6
    p = random_probs(gen, batch, vocab, scale=1.0)
    cand = torch.randint(0, vocab, (batch,), generator=gen)
    nb = random_neighbours(gen, vocab)
    p_tilde, m_star = relaxed_mass(p, cand, nb, k, delta, lam)
    relaxed = relaxed_distribution(p, cand, nb, k, delta, lam)
    p_x = p.gather(1, cand[:, None]).squeeze(1)
    c_star = p_tilde - p_x
    assert torch.allclose(relaxed.sum(-1), torch.ones(batch, dtype=F64), atol=1e-12)
    assert torch.allclose(relaxed.gather(1, cand[:, None]).squeeze(1), p_tilde, atol=1e-15)
    # TVD(p, P̃_x) = c_{m*}, and the budget holds
    assert torch.allclose(0.5 * (relaxed - p).abs().sum(-1), c_star, atol=1e-12)
    if delta is not None:
        assert bool((c_star <= delta + 1e-12).all())
    else:
        assert bool((p_tilde <= lam * p_x + 1e-12).all())
    # exactly the distance-order prefix N_1..N_{m*} is emptied, nothing else changes
    for b in range(batch):
        prefix = nb[int(cand[b]), : int(m_star[b])]
        assert bool((relaxed[b, prefix] == 0).all())
        untouched = torch.ones(vocab, dtype=torch.bool)
        untouched[prefix] = False
        untouched[cand[b]] = False
        assert torch.equal(relaxed[b, untouched], p[b, untouched])
    assert bool((m_star > 0).any()), "test data should exercise the relaxation"


def test_relaxed_mass_without_relaxation_and_padding():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=F64)
    nb = torch.tensor([[1, 2, -1], [0, 2, 3], [1, 3, 0], [2, -1, -1]])
    pt, m = relaxed_mass(p, torch.tensor([3]), nb, 3, None, None)
    assert float(pt) == pytest.approx(0.4) and int(m) == 0
    # row 3 has one real neighbour (code 2, p = 0.3); -1 pads add nothing
    pt, m = relaxed_mass(p, torch.tensor([3]), nb, 3, 0.9, None)
    assert float(pt) == pytest.approx(0.7) and int(m) == 1
    pt, m = relaxed_mass(p, torch.tensor([0]), nb, 3, 0.5, None)  # 0.2 + 0.3 ≤ 0.5
    assert float(pt) == pytest.approx(0.6) and int(m) == 2
    pt, m = relaxed_mass(p, torch.tensor([0]), nb, 3, None, 3.0)  # budget 0.2: N_1 = 1 (0.2) fits, then stop
    assert float(pt) == pytest.approx(0.3) and int(m) == 1


def test_config_from_original_flags():
    assert AcceptConfig.from_original_flags(False, 5, 0.2) == AcceptConfig()
    assert AcceptConfig.from_original_flags(True, 5, 0.2) == AcceptConfig(relax="lantern", k=5, delta=0.2)
    assert AcceptConfig.from_original_flags(True, 5, 1.0) == AcceptConfig(relax="lantern", k=5, delta=1.0)
    assert AcceptConfig.from_original_flags(True, 3, 2.0) == AcceptConfig(relax="lantern++", k=3, lam=2.0)
    assert not AcceptConfig().enabled and AcceptConfig(relax="lantern", k=1, delta=0.1).enabled
    for bad in (
        dict(relax="lantern", k=0, delta=0.1),
        dict(relax="lantern", k=2, delta=1.5),
        dict(relax="lantern", k=2),
        dict(relax="lantern++", k=2, lam=0.5),
        dict(relax="lantern++", k=2, delta=0.1),
        dict(relax="other", k=2, delta=0.1),
    ):
        with pytest.raises(ValueError):
            AcceptConfig(**bad)


# ---------------------------------------------------------------------------------------------------------
# One sibling test, statistically (trials vectorised along the batch dimension)
# ---------------------------------------------------------------------------------------------------------

TRIALS = 200_000


def test_dynamic_sibling_test_is_lossless():
    gen = torch.Generator().manual_seed(21)
    vocab = 10
    p = random_probs(gen, vocab, scale=1.2)
    children = torch.argsort(p, descending=True)[[0, 4, 7]]  # the likeliest code first, then two others
    analytic, shift = ref_dynamic_output(p.tolist(), children.tolist(), None, OFF)
    assert tvd(analytic, p) < 1e-12 and shift == 0.0

    batch_children = children.expand(TRIALS, -1)
    accepted, residual = dynamic_sibling_test(p.expand(TRIALS, -1), batch_children, OFF, generator=gen)
    out = sample_output(accepted, batch_children, residual, gen)
    counts = torch.bincount(out, minlength=vocab)
    assert chi2_pvalue(counts, p) > P_MIN
    # the acceptance rate of the first child is p(x_1)
    assert abs(float((accepted == 0).double().mean()) - float(p[children[0]])) < 5 * math.sqrt(0.25 / TRIALS)


def test_static_sibling_test_is_lossless():
    gen = torch.Generator().manual_seed(22)
    vocab, n_children = 10, 3
    p = random_probs(gen, vocab, scale=1.2)
    big_q = random_probs(gen, vocab, scale=1.2)
    analytic = ref_static_output(p.tolist(), big_q.tolist(), n_children, None, OFF)
    assert tvd(analytic, p) < 1e-12

    children = torch.multinomial(big_q.expand(TRIALS, -1), n_children, replacement=False, generator=gen)
    accepted, residual = static_sibling_test(
        p.expand(TRIALS, -1), big_q.expand(TRIALS, -1), children, OFF, generator=gen
    )
    out = sample_output(accepted, children, residual, gen)
    counts = torch.bincount(out, minlength=vocab)
    assert chi2_pvalue(counts, p) > P_MIN
    # first-child acceptance is Σ_x min(p(x), Q(x)), as in ordinary speculative sampling
    expected_first = float(torch.minimum(p, big_q).sum())
    assert abs(float((accepted == 0).double().mean()) - expected_first) < 5 * math.sqrt(0.25 / TRIALS)


def test_sibling_tests_respect_child_mask():
    p = torch.tensor([[0.0, 1.0, 0.0]], dtype=F64)
    children = torch.tensor([[1, 2]])
    mask = torch.tensor([[False, True]])
    accepted, residual = dynamic_sibling_test(p, children, OFF, child_mask=mask)
    assert int(accepted) == -1 and torch.equal(residual, p)  # child 1 would be accepted, but it is padding
    accepted, _ = static_sibling_test(p, torch.full((1, 3), 1 / 3, dtype=F64), children, OFF, child_mask=mask)
    assert int(accepted) == -1


@pytest.mark.parametrize("cfg", [LANTERN, LANTERN_PP], ids=["delta", "lambda"])
def test_dynamic_relaxed_step_matches_analytic(cfg):
    gen = torch.Generator().manual_seed(23)
    vocab = 10
    p = random_probs(gen, vocab, scale=0.7)  # flat, as visual AR targets are
    nb = random_neighbours(gen, vocab)
    children = torch.tensor([2, 5, 8])
    analytic, shift = ref_dynamic_output(p.tolist(), children.tolist(), nb.tolist(), cfg)
    assert abs(sum(analytic) - 1.0) < 1e-12
    assert shift > 0.01, "test data should exercise the relaxation"
    # theory: each stage outputs P̃ of its residual, so TVD(p, output) ≤ Σ_j P(reach j)·c_{m*_j} (≤ c·δ for δ)
    assert tvd(analytic, p) <= shift + 1e-12
    if cfg.delta is not None:
        assert shift <= len(children) * cfg.delta

    batch_children = children.expand(TRIALS, -1)
    accepted, residual = dynamic_sibling_test(p.expand(TRIALS, -1), batch_children, cfg, nb, generator=gen)
    out = sample_output(accepted, batch_children, residual, gen)
    assert chi2_pvalue(torch.bincount(out, minlength=vocab), torch.tensor(analytic)) > P_MIN


def test_dynamic_relaxed_single_child_outputs_relaxed_target():
    gen = torch.Generator().manual_seed(24)
    vocab = 12
    p = random_probs(gen, vocab, scale=0.5)
    nb = random_neighbours(gen, vocab)
    for x in range(vocab):
        analytic, shift = ref_dynamic_output(p.tolist(), [x], nb.tolist(), LANTERN)
        relaxed = relaxed_distribution(p, torch.tensor(x), nb, LANTERN.k, LANTERN.delta, None)
        assert tvd(analytic, relaxed) < 1e-12
        assert abs(tvd(analytic, p) - shift) < 1e-12 and shift <= LANTERN.delta + 1e-12


@pytest.mark.parametrize("cfg", [LANTERN, LANTERN_PP], ids=["delta", "lambda"])
def test_static_relaxed_step_matches_analytic(cfg):
    gen = torch.Generator().manual_seed(25)
    vocab, n_children = 8, 3
    p = random_probs(gen, vocab, scale=0.7)
    big_q = random_probs(gen, vocab, scale=0.7)
    nb = random_neighbours(gen, vocab)
    analytic = ref_static_output(p.tolist(), big_q.tolist(), n_children, nb.tolist(), cfg)
    assert abs(sum(analytic) - 1.0) < 1e-12
    assert tvd(analytic, p) > 1e-3, "test data should exercise the relaxation"

    children = torch.multinomial(big_q.expand(TRIALS, -1), n_children, replacement=False, generator=gen)
    accepted, residual = static_sibling_test(
        p.expand(TRIALS, -1), big_q.expand(TRIALS, -1), children, cfg, nb, generator=gen
    )
    out = sample_output(accepted, children, residual, gen)
    assert chi2_pvalue(torch.bincount(out, minlength=vocab), torch.tensor(analytic)) > P_MIN


def test_relaxation_raises_acceptance():
    gen = torch.Generator().manual_seed(26)
    vocab = 10
    p = random_probs(gen, vocab, scale=0.5)
    nb = random_neighbours(gen, vocab)
    children = torch.tensor([[1, 4]]).expand(20_000, -1)
    rates = []
    for cfg in (OFF, LANTERN):
        accepted, _ = dynamic_sibling_test(p.expand(20_000, -1), children, cfg, nb, generator=gen)
        rates.append(float((accepted >= 0).double().mean()))
    assert rates[1] > rates[0] + 0.05


# ---------------------------------------------------------------------------------------------------------
# Greedy
# ---------------------------------------------------------------------------------------------------------


def test_greedy_without_relaxation_is_argmax():
    gen = torch.Generator().manual_seed(31)
    p = random_probs(gen, 500, 30)
    cand = torch.randint(0, 30, (500,), generator=gen)
    cand[:250] = p[:250].argmax(-1)
    assert torch.equal(greedy_accept(p, cand, OFF), cand == p.argmax(-1))
    tied = torch.tensor([[0.4, 0.4, 0.2], [0.4, 0.4, 0.2]])
    assert greedy_accept(tied, torch.tensor([0, 1]), OFF).tolist() == [True, False]  # ties → lowest index


@pytest.mark.parametrize("cfg", [LANTERN, LANTERN_PP], ids=["delta", "lambda"])
def test_greedy_with_relaxation(cfg):
    gen = torch.Generator().manual_seed(32)
    vocab, batch = 12, 2000
    p = random_probs(gen, batch, vocab, scale=0.7)
    nb = random_neighbours(gen, vocab)
    cand = torch.randint(0, vocab, (batch,), generator=gen)
    passes = greedy_accept(p, cand, cfg, nb)
    for b in range(batch):
        pt, _, _ = ref_relax(p[b].tolist(), int(cand[b]), nb[int(cand[b])].tolist(), *cfg_args(cfg))
        lifted = p[b].clone()
        lifted[cand[b]] = pt
        assert bool(passes[b]) == (int(lifted.argmax()) == int(cand[b]))
    assert int(passes.sum()) > int((cand == p.argmax(-1)).sum()), "relaxation should let more tokens pass"


# ---------------------------------------------------------------------------------------------------------
# Tree verification
# ---------------------------------------------------------------------------------------------------------

#         0 (5)
#        /     \
#    1 (2)     2 (3)
#      |         |
#    3 (4)     4 (1)
HAND_PARENTS = torch.tensor([-1, 0, 0, 1, 2])
HAND_TOKENS = torch.tensor([5, 2, 3, 4, 1])


def one_hot_rows(*tokens: int, vocab: int = 8) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).to(F64)


@pytest.mark.parametrize("mode", ["dynamic", "static", "greedy"])
def test_verify_tree_hand_built(mode):
    # the target wants 3 at the root (node 2), then 1 (node 4), then 0 after the leaf
    target = one_hot_rows(7, 6, 1, 6, 0)
    draft = torch.full((5, 8), 1 / 8, dtype=F64) if mode == "static" else None
    tree = build_tree(HAND_TOKENS, HAND_PARENTS, draft)
    gen = torch.Generator().manual_seed(0)
    target[0] = one_hot_rows(3)[0]
    res = verify_tree(tree, target, OFF, greedy=mode == "greedy", generator=gen)
    assert res.path.tolist() == [0, 2, 4] and res.accept_len == 2
    assert int(res.next_token) == 0
    assert res.accepted_tokens(tree).tolist() == [3, 1]
    assert res.attempted_per_depth.tolist() == [1, 1] and res.accepted_per_depth.tolist() == [1, 1]

    # nothing acceptable at the root: the next token comes from the residual (here the target's 7)
    target[0] = one_hot_rows(7)[0]
    res = verify_tree(tree, target, OFF, greedy=mode == "greedy", generator=gen)
    assert res.path.tolist() == [0] and res.accept_len == 0 and int(res.next_token) == 7
    assert res.attempted_per_depth.tolist() == [1, 0] and res.accepted_per_depth.tolist() == [0, 0]

    # accept node 1 (token 2) then reject its only child: sample from row 1's residual
    target[0] = one_hot_rows(2)[0]
    target[1] = one_hot_rows(6)[0]
    res = verify_tree(tree, target, OFF, greedy=mode == "greedy", generator=gen)
    assert res.path.tolist() == [0, 1] and int(res.next_token) == 6
    assert res.attempted_per_depth.tolist() == [1, 1] and res.accepted_per_depth.tolist() == [1, 0]


def test_verify_tree_relaxed_accepts_a_neighbour_and_needs_a_table():
    # target puts 0.6 on code 6 and 0.4 on code 2 (node 1's token); 6 is 2's nearest neighbour
    target = one_hot_rows(6, 0, 0, 0, 0)
    target[0, 6], target[0, 2] = 0.6, 0.4
    nb = torch.stack([torch.roll(torch.arange(8), -i)[1:] for i in range(8)])
    nb[2] = torch.tensor([6, 0, 1, 3, 4, 5, 7])
    tree = build_tree(HAND_TOKENS, HAND_PARENTS)
    cfg = AcceptConfig(relax="lantern", k=1, delta=0.6)
    for greedy in (False, True):
        res = verify_tree(tree, target, cfg, nb, greedy=greedy, generator=torch.Generator().manual_seed(1))
        assert res.path.tolist()[:2] == [0, 1]  # p̃(2) = 0.4 + 0.6 = 1 → always accepted, argmax after lifting
    with pytest.raises(ValueError, match="neighbour"):
        verify_tree(tree, target, cfg, None, generator=torch.Generator())


def test_verify_tree_greedy_equals_greedy_autoregression():
    gen = torch.Generator().manual_seed(41)
    vocab, depth = 16, 5
    init = random_probs(gen, vocab)
    trans = random_probs(gen, vocab, vocab)  # Markov target p(next | last)
    greedy_seq = [int(init.argmax())]
    for _ in range(depth):
        greedy_seq.append(int(trans[greedy_seq[-1]].argmax()))
    for n_right in range(depth + 1):
        drafts = list(greedy_seq[:depth])
        if n_right < depth:
            drafts[n_right] = (drafts[n_right] + 1) % vocab  # first wrong draft at position n_right
        # a chain with a decoy sibling *before* every chain node (never the argmax): level l holds
        # decoy 2l-1 and chain node 2l, both children of chain node 2(l-1)
        tokens, parents, rows = [3], [-1], [init]
        for level, tok in enumerate(drafts, start=1):
            parent = 2 * (level - 1)
            parent_row = rows[parent]
            tokens += [(int(parent_row.argmax()) + 2) % vocab, tok]
            parents += [parent, parent]
            rows += [init, trans[tok]]
        tree = build_tree(torch.tensor(tokens), torch.tensor(parents))
        res = verify_tree(tree, torch.stack(rows), OFF, greedy=True)
        assert res.accept_len == n_right
        assert res.path.tolist() == [2 * level for level in range(n_right + 1)]
        assert res.accepted_tokens(tree).tolist() + [int(res.next_token)] == greedy_seq[: n_right + 1]


def test_verify_tree_is_reproducible_and_accepts_half_precision():
    gen = torch.Generator().manual_seed(42)
    tmpl = StaticTreeTemplate.from_choices([[0], [1], [0, 0], [0, 1], [1, 0]])
    tokens = torch.randint(0, 20, (6,), generator=gen)
    target = random_probs(gen, 6, 20, scale=2.0).float()
    tree = tmpl.make_tree(tokens, random_probs(gen, 6, 20).float())
    nb = random_neighbours(gen, 20)

    def run(seed: int) -> tuple[list[int], int]:
        res = verify_tree(tree, target, LANTERN_PP, nb, generator=torch.Generator().manual_seed(seed))
        return res.path.tolist(), int(res.next_token)

    assert [run(s) for s in range(8)] == [run(s) for s in range(8)]
    res = verify_tree(tree, target.bfloat16(), OFF, generator=torch.Generator().manual_seed(0))
    assert 0 <= int(res.next_token) < 20


# --- lossless over a depth-2 tree: a small decode loop against a Markov target -----------------------------

VOCAB2 = 4
TRIALS_TREE = 3000


def _markov(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return (
        random_probs(gen, VOCAB2, scale=1.0),  # target p(first)
        random_probs(gen, VOCAB2, VOCAB2, scale=1.0),  # target p(next | last)
        random_probs(gen, VOCAB2, scale=1.0),  # drafter Q(first)
        random_probs(gen, VOCAB2, VOCAB2, scale=1.0),  # drafter Q(next | last)
        gen,
    )


def _decode_two_tokens(static: bool, seed: int) -> torch.Tensor:
    """Joint counts (V, V) of the first two generated tokens over many runs of speculative decoding."""
    p_init, p_trans, q_init, q_trans, gen = _markov(seed)
    tmpl = StaticTreeTemplate.from_choices([[0], [1], [0, 0], [0, 1], [1, 0], [1, 1]])
    parents = tmpl.parents
    counts = torch.zeros(VOCAB2, VOCAB2, dtype=torch.long)
    for _ in range(TRIALS_TREE):
        out: list[int] = []
        while len(out) < 2:
            root = out[-1] if out else 0  # the root's token only matters through the target rows below
            p_root = p_trans[out[-1]] if out else p_init
            q_root = q_trans[out[-1]] if out else q_init
            tokens = torch.zeros(7, dtype=torch.long)
            tokens[0] = root
            if static:  # children sampled without replacement from Q at their parent
                tokens[1:3] = torch.multinomial(q_root, 2, generator=gen)
                tokens[3:5] = torch.multinomial(q_trans[tokens[1]], 2, generator=gen)
                tokens[5:7] = torch.multinomial(q_trans[tokens[2]], 2, generator=gen)
            else:  # EAGLE-2 style deterministic top-2
                tokens[1:3] = torch.topk(q_root, 2).indices
                tokens[3:5] = torch.topk(q_trans[tokens[1]], 2).indices
                tokens[5:7] = torch.topk(q_trans[tokens[2]], 2).indices
            target = torch.cat([p_root[None], p_trans[tokens[1:]]])
            draft = torch.cat([q_root[None], q_trans[tokens[1:]]]) if static else None
            tree = build_tree(tokens, parents, draft)
            res = verify_tree(tree, target, OFF, generator=gen)
            out += res.accepted_tokens(tree).tolist() + [int(res.next_token)]
        counts[out[0], out[1]] += 1
    return counts


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_verify_tree_is_lossless_for_two_tokens(static):
    p_init, p_trans, *_ = _markov(51)
    joint = p_init[:, None] * p_trans
    counts = _decode_two_tokens(static, 51)
    assert chi2_pvalue(counts, joint) > P_MIN
