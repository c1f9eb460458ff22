"""The exact output law of the sibling tests and of ``verify_tree``, against Monte Carlo of the real functions.

An independent plain-Python reference computes, by recursion over the sibling chain and the tree, the exact
law of what a node / a tree emits, for every rule: exact and relaxed (LANTERN δ with the per-sibling or the
node-level budget, LANTERN++ λ), dynamic and static trees, our residual and the original code's. Monte Carlo
runs of the real functions must match it (chi-square, α = ``ALPHA``).
On static trees the node-level budget's per-sibling prefix caps are found by brute force from their definition
(:func:`ref_static_caps`), and its bound is checked on the exact *marginal* law over every ordered draw.

Power. The reference also computes the laws of the one-line bugs listed in ``MUTATIONS``; for each test case
the asymptotic power of its chi-square test against each bug is computed exactly from the noncentral
chi-square (noncentrality N·Σ (p₁ − p₀)² / p₀ over the pooled cells), and ``test_power_against_mutations``
requires power ≥ 0.999 for every bug in at least one fast case of each sibling rule. Independently of any
particular bug, N samples detect every law at TVD ≥ ε_min = sqrt(λ*/(4N)) from the reference with power 0.9,
where λ* is the noncentrality giving power 0.9 at α (Σ d²/p₀ ≥ (Σ|d|)² = 4·TVD² by Cauchy–Schwarz):
:func:`smallest_detectable_tvd` — with the sizes below, ε_min ≈ 0.01 for the sibling tests (N = 100,000,
≤ 12 cells) and ≈ 0.12 for the fast tree-level runs (N = 1,000, ~40 cells; the slow variants use 10,000:
≈ 0.04). The tree-level runs check that ``verify_tree`` walks the tree with the right rule; the power against
residual bugs comes from the sibling tests.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import replace

import pytest
import torch
from scipy.stats import chi2, ncx2

from models.drafters.acceptance import (
    AcceptConfig,
    _sibling_chain,
    node_tvd,
    sibling_output_law,
    static_sibling_test,
    verify_tree,
)
from models.drafters.tree import build_tree

F64 = torch.float64
ALPHA = 1e-3
N_SIBLING = 100_000
N_TREE = 1_000
N_TREE_SLOW = 10_000


# ---------------------------------------------------------------------------------------------------------
# Reference (plain Python floats; every rule written out from its description in acceptance.py / issue 13)
# ---------------------------------------------------------------------------------------------------------

MUTATIONS = {
    "dynamic": ["candidate_kept", "neighbours_kept", "k_plus_1_zeroed"],
    "static": ["candidate_kept", "neighbours_kept", "k_plus_1_zeroed", "no_ptilde", "q_not_renormalised"],
}


def _norm(v: list[float], fallback: list[float]) -> list[float]:
    s = sum(v)
    return [x / s for x in v] if s > 1e-12 else list(fallback)


def ref_static_caps(p, children, big_q, cfg: AcceptConfig, nb, mutation: str | None = None) -> list[int]:
    """Static tree, node budget: per sibling the largest m ≤ k whose law (prefixes min(m, m*_j(δ)) on siblings
    ≤ j, none after) is within δ of the exact rule's law given the same children (m = 0 always allowed)."""
    exact = ref_node_law(p, children, big_q, AcceptConfig(), nb, mutation)
    per_sibling = replace(cfg, budget="sibling")
    caps: list[int] = []
    for j in range(len(children)):
        for m in range(cfg.k, -1, -1):
            trial = caps + [m] + [0] * (len(children) - j - 1)
            law = ref_node_law(p, children, big_q, per_sibling, nb, mutation, caps=trial)
            if m == 0 or 0.5 * sum(abs(a - b) for a, b in zip(law, exact)) <= cfg.delta:
                caps.append(m)
                break
    return caps


def ref_chain(p, children, big_q, cfg: AcceptConfig, nb, mutation: str | None = None,
              caps: list[int] | None = None):
    """One node's sibling process given its children -> (P(child j is the accepted one) per j,
    P(no child accepted), the final residual). ``mutation`` switches on one of the bugs in ``MUTATIONS``;
    ``caps`` limits sibling j's aggregated prefix to caps[j] neighbours."""
    vocab = len(p)
    if (caps is None and big_q is not None and cfg.relax == "lantern" and cfg.budget == "node"
            and cfg.residual == "exact"):  # the static node budget: δ per sibling, prefixes capped
        caps = ref_static_caps(p, children, big_q, cfg, nb, mutation)
        cfg = replace(cfg, budget="sibling")
    r, reach, spent, accept_mass = list(p), 1.0, 0.0, []
    q_rem = list(big_q) if big_q is not None else None
    uniform = [1.0 / vocab] * vocab
    original = cfg.enabled and cfg.residual != "exact"
    for j, x in enumerate(children):
        agg: list[int] = []  # N_1..N_{m*} on the current residual
        c = 0.0
        if cfg.enabled:
            if cfg.relax == "lantern":
                budget = cfg.delta
                if cfg.budget == "node":
                    budget = (max(cfg.delta - spent, 0.0) / reach) if reach > 1e-12 else cfg.delta
            else:
                budget = (cfg.lam - 1.0) * r[x]
            for m in range(cfg.k):
                y = nb[x][m]
                if y < 0 or c + r[y] > budget or (caps is not None and m >= caps[j]):
                    break
                c += r[y]
                agg.append(y)
        pt = r[x] + c
        far = {y for y in nb[x][: cfg.k + 1] if y >= 0} if cfg.enabled else set()  # N_1..N_{k+1}
        if big_q is None:  # dynamic: q = δ_x, accept with probability p̃(x)
            a = min(pt, 1.0)
            if original:  # x, and N_1..N_{k+1} whenever m* >= 1; empty -> uniform
                zero = {x} | set(agg) | (far if agg else set())
                nxt = _norm([0.0 if y in zero else r[y] for y in range(vocab)], uniform)
            else:
                zero = {x} | set(agg)
                if mutation == "candidate_kept":
                    zero = set(agg) - {x}
                elif mutation == "neighbours_kept":
                    zero = {x}
                elif mutation == "k_plus_1_zeroed":
                    zero = {x} | far
                nxt = _norm([0.0 if y in zero else r[y] for y in range(vocab)], r)
        else:  # static: q_j = Q renormalised on the not-yet-drawn codes
            s = sum(q_rem)
            q_j = list(q_rem) if mutation == "q_not_renormalised" else [v / s for v in q_rem]
            a = min(1.0, pt / q_j[x]) if q_j[x] > 0 else float(pt > 0)
            if original and cfg.residual == "original":  # normalise(max(0, r − q′)), q′ = q_j zeroed on N_1..N_{k+1}
                q_prime = [0.0 if y in far else q_j[y] for y in range(vocab)]
                nxt = _norm([max(0.0, r[y] - q_prime[y]) for y in range(vocab)], uniform)
            elif original:  # Lumina: p zeroed on N_1..N_{k+1}, then q_j subtracted
                nxt = _norm([max(0.0, (0.0 if y in far else r[y]) - q_j[y]) for y in range(vocab)], uniform)
            else:  # normalise(max(0, P̃_x − q_j))
                zero = set(agg)
                if mutation == "neighbours_kept":
                    zero = set()
                elif mutation == "k_plus_1_zeroed":
                    zero = far - {x}
                relaxed = [0.0 if y in zero else r[y] for y in range(vocab)]
                relaxed[x] = pt
                base = r if mutation == "no_ptilde" else relaxed
                res = [max(0.0, base[y] - q_j[y]) for y in range(vocab)]
                if mutation == "candidate_kept":
                    res[x] = base[x]
                nxt = _norm(res, base)
            q_rem[x] = 0.0
        accept_mass.append(reach * a)
        spent += reach * max(pt - r[x], 0.0)
        reach *= 1.0 - a
        r = nxt
    return accept_mass, reach, r


def ref_node_law(p, children, big_q, cfg, nb, mutation=None, caps=None) -> list[float]:
    """Exact law of the token one node emits."""
    acc, reach, r = ref_chain(p, children, big_q, cfg, nb, mutation, caps)
    law = [reach * v for v in r]
    for x, a in zip(children, acc):
        law[x] += a
    return law


def ref_tree_law(tokens, parents, target_rows, draft_rows, cfg, nb, mutation=None) -> dict[tuple, float]:
    """Exact law of verify_tree's emitted sequence (accepted tokens, then the next token), by recursion."""
    kids_of = {i: [j for j in range(len(parents)) if parents[j] == i] for i in range(len(parents))}
    out: dict[tuple, float] = {}

    def emit(prefix: tuple, dist: list[float], prob: float) -> None:
        for y, v in enumerate(dist):
            if prob * v > 0:
                out[prefix + (y,)] = out.get(prefix + (y,), 0.0) + prob * v

    def walk(node: int, prefix: tuple, prob: float) -> None:
        kids = kids_of[node]
        if not kids:  # a leaf samples from p
            emit(prefix, target_rows[node], prob)
            return
        big_q = draft_rows[node] if draft_rows is not None else None
        acc, reach, r = ref_chain(target_rows[node], [tokens[k] for k in kids], big_q, cfg, nb, mutation)
        for k, a in zip(kids, acc):
            if a > 0:
                walk(k, prefix + (tokens[k],), prob * a)
        emit(prefix, r, prob * reach)

    walk(0, (), 1.0)
    return out


# ---------------------------------------------------------------------------------------------------------
# Statistics: chi-square with pooling, exact power against an alternative, smallest detectable TVD
# ---------------------------------------------------------------------------------------------------------


def _cells(probs: torch.Tensor, n: int) -> torch.Tensor:
    """Cell grouping: cells expected ≥ 5 stay, the rest are pooled into one (index = number of big cells)."""
    big = probs * n >= 5
    group = torch.full(probs.shape, int(big.sum()), dtype=torch.long)
    group[big] = torch.arange(int(big.sum()))
    return group


def _pool(v: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    return torch.zeros(int(group.max()) + 1, dtype=F64).index_add_(0, group, v.to(F64))


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness-of-fit p-value (pooled cells); samples where the law has no mass fail outright."""
    counts, probs = counts.to(F64).flatten(), probs.to(F64).flatten()
    n = int(counts.sum())
    assert counts[probs <= 1e-15].sum() == 0, "samples where the exact law has no mass"
    group = _cells(probs, n)
    obs, exp = _pool(counts, group), _pool(probs, group) * n
    keep = exp > 0
    if int(keep.sum()) < 2:  # a point mass, and every sample on it
        return 1.0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return float(chi2.sf(stat, int(keep.sum()) - 1))


def power_against(p0: torch.Tensor, p1: torch.Tensor, n: int) -> float:
    """Asymptotic power of the pooled chi-square test of p0 at ``ALPHA`` when the samples follow p1."""
    p0, p1 = p0.to(F64).flatten(), p1.to(F64).flatten()
    if float(p1[p0 <= 1e-15].sum()) * n > 20:  # ≥ 20 expected samples where p0 has no mass: fails outright
        return 1.0
    group = _cells(p0, n)
    a, b = _pool(p0, group), _pool(p1, group)
    keep = a > 0
    dof = int(keep.sum()) - 1
    if dof < 1:
        return 0.0
    nc = n * float(((b[keep] - a[keep]) ** 2 / a[keep]).sum())
    return float(ncx2.sf(chi2.isf(ALPHA, dof), dof, nc))


def smallest_detectable_tvd(n: int, cells: int, power: float = 0.9) -> float:
    """Every law at TVD ≥ this from the reference is rejected with probability ≥ ``power``."""
    dof = max(cells - 1, 1)
    crit = chi2.isf(ALPHA, dof)
    lo, hi = 0.0, 1e4
    for _ in range(100):  # the noncentrality giving the wanted power, by bisection
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ncx2.sf(crit, dof, mid) < power else (lo, mid)
    return math.sqrt(hi / (4 * n))


# ---------------------------------------------------------------------------------------------------------
# One node: the sibling tests
# ---------------------------------------------------------------------------------------------------------


def _random_case(seed: int, vocab: int, scale_p: float, scale_q: float):
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(scale_p * torch.randn(vocab, generator=gen, dtype=F64), -1)
    q = torch.softmax(scale_q * torch.randn(vocab, generator=gen, dtype=F64), -1)
    rows = []
    for i in range(vocab):
        perm = torch.randperm(vocab, generator=gen)
        rows.append(perm[perm != i])
    return p, q, torch.stack(rows), gen


CONFIGS = {
    "off": AcceptConfig(),
    "delta": AcceptConfig(relax="lantern", k=3, delta=0.3),
    "delta_node": AcceptConfig(relax="lantern", k=3, delta=0.3, budget="node"),
    "lambda": AcceptConfig(relax="lantern++", k=3, lam=3.0),
    "original": AcceptConfig(relax="lantern", k=2, delta=0.3, residual="original"),
    "original_lumina": AcceptConfig(relax="lantern", k=2, delta=0.3, residual="original_lumina"),
}
EXACT_RESIDUAL = ["off", "delta", "delta_node", "lambda"]
# (seed, vocab, p flatness, Q flatness, number of children): flat and peaked targets, 2-4 siblings. Static
# cases take Q's top codes as the draw (a draw of positive probability where Q ≫ p, so siblings get rejected
# and every residual matters; with a relaxed p̃ ≥ q the first child would always pass)
PARAMS = {
    "dynamic": [(1, 8, 0.6, 1.5, 3), (2, 6, 1.5, 1.5, 2), (3, 10, 1.0, 1.0, 4)],
    "static": [(1, 8, 0.5, 2.5, 3), (2, 6, 0.8, 2.0, 2), (3, 10, 0.4, 3.0, 4)],
}
SIBLING_CASES = [(kind, name, i) for kind in PARAMS for name in CONFIGS for i in range(3)]


def _sibling_setup(kind: str, i: int):
    seed, vocab, sp, sq, c = PARAMS[kind][i]
    p, q, nb, gen = _random_case(seed, vocab, sp, sq)
    if kind == "dynamic":
        children = torch.randperm(vocab, generator=gen)[:c]
    else:
        children = torch.topk(q, c).indices
    return p, q if kind == "static" else None, nb, children, gen


def _sibling_exact(kind: str, name: str, i: int, mutation: str | None = None) -> torch.Tensor:
    p, q, nb, children, _ = _sibling_setup(kind, i)
    law = ref_node_law(p.tolist(), children.tolist(), None if q is None else q.tolist(), CONFIGS[name], nb.tolist(),
                       mutation)
    return torch.tensor(law, dtype=F64)


@pytest.mark.parametrize("kind,name,i", SIBLING_CASES)
def test_sibling_law_matches_monte_carlo(kind, name, i):
    """N_SIBLING trials of the real sibling test (batched) vs the reference's exact law given the children."""
    p, q, nb, children, gen = _sibling_setup(kind, i)
    cfg = CONFIGS[name]
    exact = _sibling_exact(kind, name, i)
    assert abs(float(exact.sum()) - 1.0) < 1e-12
    # the library's own exact law (behind node_tvd) agrees with the reference to rounding
    assert torch.allclose(sibling_output_law(p, children, cfg, nb, q), exact, atol=1e-12)
    n = N_SIBLING
    qs = None if q is None else q.expand(n, -1)
    acc, res, _ = _sibling_chain(p.expand(n, -1), qs, children.expand(n, -1), cfg, nb, gen, None)
    fallback = torch.multinomial(res, 1, generator=gen).squeeze(1)
    out = torch.where(acc >= 0, children[acc.clamp(min=0)], fallback)
    assert chi2_pvalue(torch.bincount(out, minlength=p.numel()), exact) > ALPHA


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_power_against_mutations(kind):
    """Each one-line residual / renormalisation bug moves the exact law of at least one fast case so far that
    its chi-square test rejects with power ≥ 0.999, in each sibling rule (computed, not sampled)."""
    for mutation in MUTATIONS[kind]:
        best = max(power_against(_sibling_exact(kind, name, i), _sibling_exact(kind, name, i, mutation), N_SIBLING)
                   for name in EXACT_RESIDUAL for i in range(3))
        assert best >= 0.999, f"{kind}: the tests cannot see the '{mutation}' bug (power {best:.3f})"
    # and, for any bug: the smallest TVD the sibling tests detect with power 0.9 (≤ 12 cells)
    assert smallest_detectable_tvd(N_SIBLING, 12) < 0.015


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_original_residual_differs_from_exact(kind):
    """The original mode is a different rule (not the exact one by another name) on these cases."""
    diff = max(0.5 * float((_sibling_exact(kind, "original", i)
                            - _sibling_exact(kind, "delta", i)).abs().sum()) for i in range(3))
    assert diff > 0.01


def test_original_uniform_fallback_and_table_width():
    """An emptied residual becomes uniform over the whole vocabulary; k+1 neighbour columns are required."""
    p = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=F64)
    nb = torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    cfg = AcceptConfig(relax="lantern", k=1, delta=0.4, residual="original")
    # x = 0 takes nothing (p(N_1) = 0.5 > δ) so m* = 0: only x leaves; the residual is δ_1
    law = sibling_output_law(p, torch.tensor([0]), cfg, nb)
    assert torch.allclose(law, torch.tensor([0.5, 0.5, 0, 0], dtype=F64))
    cfg = AcceptConfig(relax="lantern", k=1, delta=0.5, residual="original")
    # m* = 1 (N_1 = 1 aggregated): x and N_1..N_2 = {1, 2} leave; nothing is left -> uniform over 4 codes
    law = sibling_output_law(p, torch.tensor([0]), cfg, nb)
    assert torch.allclose(law, torch.tensor([1.0, 0, 0, 0], dtype=F64))  # p̃(0) = 1: always accepted
    # p(N_1) = 0.3 fits: p̃(0) = 0.7; on rejection {0, 1, 2} leave and nothing is left -> uniform over 4 codes
    law = sibling_output_law(torch.tensor([0.4, 0.3, 0.3, 0.0], dtype=F64), torch.tensor([0]), cfg, nb)
    assert torch.allclose(law, torch.tensor([0.7 + 0.3 * 0.25, 0.3 * 0.25, 0.3 * 0.25, 0.3 * 0.25], dtype=F64))
    # the exact rule removes only x and N_1 there (p(2) = 0.3 is left)
    exact = AcceptConfig(relax="lantern", k=1, delta=0.5)
    law = sibling_output_law(torch.tensor([0.4, 0.3, 0.3, 0.0], dtype=F64), torch.tensor([0]), exact, nb)
    assert torch.allclose(law, torch.tensor([0.7, 0.0, 0.3, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="k\\+1"):
        sibling_output_law(p, torch.tensor([0]), AcceptConfig(relax="lantern", k=3, delta=0.5, residual="original"), nb)
    assert cfg.table_columns == 2 and AcceptConfig(relax="lantern", k=1, delta=0.5).table_columns == 1


# ---------------------------------------------------------------------------------------------------------
# The node-level budget: TVD ≤ δ at every node, by construction
# ---------------------------------------------------------------------------------------------------------


def _random_nodes(seed: int, batch: int, vocab: int, children: int):
    gen = torch.Generator().manual_seed(seed)
    scale = 0.3 + 2.0 * torch.rand(batch, 1, generator=gen, dtype=F64)
    p = torch.softmax(scale * torch.randn(batch, vocab, generator=gen, dtype=F64), -1)
    kids = torch.argsort(torch.rand(batch, vocab, generator=gen), -1)[:, :children]
    nb = torch.stack([(lambda perm: perm[perm != i])(torch.randperm(vocab, generator=gen)) for i in range(vocab)])
    return p, kids, nb


@pytest.mark.parametrize("delta", [0.05, 0.1, 0.2, 0.4])
def test_node_budget_bounds_the_node_tvd(delta):
    p, kids, nb = _random_nodes(61, 400, 64, 12)
    for k in (5, 20):
        sib = AcceptConfig(relax="lantern", k=k, delta=delta)
        node = AcceptConfig(relax="lantern", k=k, delta=delta, budget="node")
        tvd_node = node_tvd(p, kids, node, nb)
        tvd_sib = node_tvd(p, kids, sib, nb)
        assert float(tvd_node.max()) <= delta + 1e-12
        assert float(tvd_sib.max()) > 1.5 * delta, "the per-sibling budget should exceed δ here (many children)"
        assert float(tvd_node.mean()) > 0.3 * delta, "the node budget should still relax"
    # relaxation off: lossless at every node, whatever the children
    assert float(node_tvd(p, kids, AcceptConfig(), nb).max()) < 1e-12
    # λ: the per-sibling rule keeps O(y) ≤ λ·p(y) for the whole node
    lam = AcceptConfig(relax="lantern++", k=20, lam=3.0)
    law = sibling_output_law(p, kids, lam, nb)
    assert bool((law <= 3.0 * p + 1e-12).all())


@functools.cache
def _demo_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """The demo model's own next-token distributions (256, 1024) along 4 sampled images, and its neighbour
    table (k = 20)."""
    from models.drafters.neighbours import load_neighbour_table
    from models.generation import generate_ar
    from models.registry import REPO_ROOT, load_family
    from models.sampling import SamplingConfig, target_probs

    dev = torch.device("cpu")
    family = load_family("demo", dev, torch.float32)
    nb = load_neighbour_table(REPO_ROOT / "ckpts" / "demo" / "neighbours.safetensors", k=20)
    rows = []
    sampling = SamplingConfig(temperature=1.0)
    for digit in range(4):
        prefix = family.build_prefix([str(digit)], family.defaults.cfg)
        generate_ar(family.target, prefix, family.num_image_tokens, sampling, torch.Generator().manual_seed(digit),
                    family.allowed_tokens, on_step=lambda i, logits, tok: rows.append(target_probs(logits, sampling)))
    p = torch.cat(rows).double()
    return p / p.sum(-1, keepdim=True), nb  # float32 rounding removed


def test_node_budget_on_demo_distributions():
    """The demo model's own next-token distributions, its neighbour table (k = 20) and its drafter-like
    children (p's top 10 in rank order, then as a second case 10 codes at random)."""
    p, nb = _demo_rows()
    gen = torch.Generator().manual_seed(0)
    for kids in (torch.topk(p, 10).indices, torch.argsort(torch.rand(p.shape, generator=gen), -1)[:, :10]):
        for delta in (0.1, 0.2, 0.4):
            t_node = node_tvd(p, kids, AcceptConfig(relax="lantern", k=20, delta=delta, budget="node"), nb)
            t_sib = node_tvd(p, kids, AcceptConfig(relax="lantern", k=20, delta=delta), nb)
            assert float(t_node.max()) <= delta + 1e-9
            assert float(t_sib.max()) > delta
        assert float(node_tvd(p, kids, AcceptConfig(), nb).max()) < 1e-9


# ---------------------------------------------------------------------------------------------------------
# The whole tree: verify_tree's emitted sequence
# ---------------------------------------------------------------------------------------------------------

#            0
#       /    |    \
#      1     2     3
#     / \    |
#    4   5   6
#    |
#    7
TREE_PARENTS = [-1, 0, 0, 0, 1, 1, 2, 4]


def _tree_setup(kind: str, seed: int, vocab: int = 6):
    gen = torch.Generator().manual_seed(seed)
    n = len(TREE_PARENTS)
    target = torch.softmax(0.8 * torch.randn(n, vocab, generator=gen, dtype=F64), -1)
    draft = torch.softmax(1.2 * torch.randn(n, vocab, generator=gen, dtype=F64), -1) if kind == "static" else None
    kids = {i: [j for j in range(n) if TREE_PARENTS[j] == i] for i in range(n)}
    tokens = [0] * n
    for i in range(n):
        if not kids[i]:
            continue
        if kind == "static":  # children drawn without replacement from Q at their parent
            draws = torch.multinomial(draft[i], len(kids[i]), replacement=False, generator=gen).tolist()
        else:
            draws = torch.randperm(vocab, generator=gen)[: len(kids[i])].tolist()
        for j, t in zip(kids[i], draws):
            tokens[j] = t
    nb = torch.stack([(lambda perm: perm[perm != i])(torch.randperm(vocab, generator=gen)) for i in range(vocab)])
    tree = build_tree(torch.tensor(tokens), torch.tensor(TREE_PARENTS), draft)
    return tree, tokens, target, draft, nb, gen


def _check_tree_law(kind: str, name: str, seed: int, n: int) -> None:
    tree, tokens, target, draft, nb, gen = _tree_setup(kind, seed)
    cfg = CONFIGS[name]
    law = ref_tree_law(tokens, TREE_PARENTS, target.tolist(), None if draft is None else draft.tolist(), cfg,
                       nb.tolist())
    assert abs(sum(law.values()) - 1.0) < 1e-12
    index = {seq: i for i, seq in enumerate(law)}
    counts = torch.zeros(len(law))
    for _ in range(n):
        res = verify_tree(tree, target, cfg, nb, generator=gen, measure_shift=False)
        seq = tuple(res.accepted_tokens(tree).tolist()) + (int(res.next_token),)
        assert seq in index, f"verify_tree emitted {seq}, which has probability 0"
        counts[index[seq]] += 1
    assert chi2_pvalue(counts, torch.tensor(list(law.values()), dtype=F64)) > ALPHA


TREE_FAST = [("dynamic", "delta_node", 71), ("static", "lambda", 73)]
TREE_SLOW = [(kind, name, seed) for kind in ("dynamic", "static") for name in CONFIGS for seed in (75,)]


@pytest.mark.parametrize("kind,name,seed", TREE_FAST)
def test_verify_tree_law(kind, name, seed):
    _check_tree_law(kind, name, seed, N_TREE)


@pytest.mark.slow
@pytest.mark.parametrize("kind,name,seed", TREE_SLOW)
def test_verify_tree_law_many_samples(kind, name, seed):
    _check_tree_law(kind, name, seed, N_TREE_SLOW)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_verify_tree_reports_the_node_shift(kind):
    """node_tvd on the path = the exact per-node shift (dynamic: TVD(law, p); static: TVD(law, exact law))."""
    tree, tokens, target, draft, nb, gen = _tree_setup(kind, 81)
    cfg = CONFIGS["delta"]
    kids_of = {i: [j for j in range(len(TREE_PARENTS)) if TREE_PARENTS[j] == i] for i in range(len(TREE_PARENTS))}
    seen = set()
    for _ in range(60):
        res = verify_tree(tree, target, cfg, nb, generator=gen)
        assert res.node_tvd.shape == (res.accept_len + 1,)
        for node, t in zip(res.path.tolist(), res.node_tvd.tolist()):
            kids = kids_of[node]
            if not kids:
                assert t == 0.0
                continue
            q = None if draft is None else draft[node].tolist()
            law = ref_node_law(target[node].tolist(), [tokens[k] for k in kids], q, cfg, nb.tolist())
            ref = target[node].tolist() if q is None else ref_node_law(target[node].tolist(),
                                                                       [tokens[k] for k in kids], q, CONFIGS["off"],
                                                                       nb.tolist())
            assert abs(t - 0.5 * sum(abs(a - b) for a, b in zip(law, ref))) < 1e-12
            seen.add(node)
        off = verify_tree(tree, target, CONFIGS["off"], nb, generator=gen)
        assert float(off.node_tvd.abs().max()) == 0.0
    assert len(seen) >= 2
    greedy = verify_tree(tree, target, cfg, nb, greedy=True)
    emitted = greedy.accepted_tokens(tree).tolist() + [int(greedy.next_token)]
    expect = [float(e != int(target[n].argmax())) for n, e in zip(greedy.path.tolist(), emitted)]
    assert greedy.node_tvd.tolist() == expect


def test_accept_config_budget_and_residual_options():
    assert AcceptConfig.from_original_flags(True, 5, 0.2, budget="node") == AcceptConfig(
        relax="lantern", k=5, delta=0.2, budget="node")
    # λ bounds the node's ratio with the per-sibling rule already: "node" is the same rule
    p, q, nb, children, _ = _sibling_setup("dynamic", 0)
    lam, lam_node = CONFIGS["lambda"], AcceptConfig(relax="lantern++", k=3, lam=3.0, budget="node")
    assert torch.equal(sibling_output_law(p, children, lam, nb), sibling_output_law(p, children, lam_node, nb))
    with pytest.raises(ValueError, match="budget"):
        AcceptConfig(relax="lantern", k=3, delta=0.2, budget="tree")
    with pytest.raises(ValueError, match="residual"):
        AcceptConfig(relax="lantern", k=3, delta=0.2, residual="paper")
    assert AcceptConfig(budget="node").table_columns == 0  # relaxation off: nothing is read


def test_stated_detectable_tvds():
    """The ε_min values the module docstring states."""
    assert smallest_detectable_tvd(N_SIBLING, 12) == pytest.approx(0.0095, abs=0.0005)
    assert smallest_detectable_tvd(N_TREE, 40) == pytest.approx(0.12, abs=0.01)
    assert smallest_detectable_tvd(N_TREE_SLOW, 40) == pytest.approx(0.038, abs=0.003)


# ---------------------------------------------------------------------------------------------------------
# The engine reports the realised shift
# ---------------------------------------------------------------------------------------------------------


def test_engine_reports_node_tvd():
    """GenerationStats carries the mean / max per-token TVD; ≤ δ with the node budget, 0 when exact."""
    from test_engine import _prefix, _random_drafter, _tiny_target

    from models.ea_model import SpeculativeDecoder, TreeConfig
    from models.sampling import SamplingConfig

    target = _tiny_target()
    prefix = _prefix(target, torch.tensor([0]), torch.ones(1, 1, dtype=torch.bool), 2.0)
    neighbours = torch.tensor([[1, 2, 3], [0, 2, 3], [3, 1, 0], [2, 0, 1]])
    drafter = _random_drafter(target, seed=3)
    tree = TreeConfig(top_k_draft=3, depth=3, total_token=10)
    stats = {}
    for name, acc in {"exact": AcceptConfig(), "sibling": AcceptConfig(relax="lantern", k=2, delta=0.2),
                      "node": AcceptConfig(relax="lantern", k=2, delta=0.2, budget="node"),
                      "original": AcceptConfig(relax="lantern", k=2, delta=0.2, residual="original")}.items():
        nb = neighbours[:, : acc.table_columns] if acc.enabled else None
        dec = SpeculativeDecoder(target, drafter, 4, SamplingConfig(), 2.0, accept=acc, tree=tree, neighbours=nb)
        gen = torch.Generator().manual_seed(0)
        runs = [dec.generate(prefix, gen)[1].extra for _ in range(30)]
        stats[name] = (max(r.get("node_tvd_max", 0.0) for r in runs), sum(r.get("node_tvd_mean", 0.0) for r in runs))
    assert stats["exact"] == (0.0, 0.0)
    assert 0.0 < stats["node"][0] <= 0.2 + 1e-6
    assert stats["sibling"][1] > 0.0
    assert stats["original"][1] > 0.0
    # a static tree with the node budget: every node's shift (given its draws) ≤ δ, and it relaxes
    static = TreeConfig(static_choices=((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)))
    acc = AcceptConfig(relax="lantern", k=2, delta=0.2, budget="node")
    dec = SpeculativeDecoder(target, drafter, 4, SamplingConfig(), 2.0, accept=acc, tree=static, neighbours=neighbours[:, :2])
    gen = torch.Generator().manual_seed(0)
    runs = [dec.generate(prefix, gen)[1].extra for _ in range(30)]
    assert 0.0 < max(r.get("node_tvd_max", 0.0) for r in runs) <= 0.2 + 1e-6


@pytest.mark.parametrize("flags,budget,residual,columns", [
    (["--lantern", "--lantern_delta", "0.2"], "node", "exact", 20),  # the command line's default budget
    (["--lantern_tvd", "0.2", "--lantern_budget", "sibling"], "sibling", "exact", 20),
    (["--lantern_tvd", "0.2", "--lantern_residual", "original"], "node", "original", 21),  # k+1 columns
    (["--lantern_lambda", "5", "--lantern_residual", "original_lumina", "--static_tree"], "node", "original_lumina", 21),
])
def test_generate_images_flags_reach_the_rule(flags, budget, residual, columns):
    from entrypoints.benchmark import parse_setting
    from entrypoints.generate_images import parse_args, resolve_defaults
    from models.ea_model import build_speculative_decoder
    from models.registry import load_family
    from models.sampling import SamplingConfig

    args = resolve_defaults(parse_args().parse_args(["--model", "demo", "--model_type", "eagle", "--lantern_k", "20",
                                                     *flags]))
    dec = build_speculative_decoder(load_family("demo"), args, SamplingConfig(), 4.0)
    assert (dec.accept.budget, dec.accept.residual) == (budget, residual)
    assert dec.neighbours.shape[1] == columns
    assert parse_setting("lantern:delta=0.2,budget=sibling,residual=original", 20, "mc_sim_7b_63")["residual"] == "original"
    with pytest.raises(ValueError, match="budget"):
        parse_setting("lantern:delta=0.2,budget=tree", 20, "mc_sim_7b_63")
    with pytest.raises(ValueError, match="lantern"):
        parse_setting("eagle2:budget=node", 20, "mc_sim_7b_63")
    assert parse_setting("lantern:delta=0.2,static=1", 20, "mc_sim_7b_63")["static"] is True  # δ on a static tree
    with pytest.raises(ValueError, match="static"):
        parse_setting("lantern++:lam=2,static=1", 20, "mc_sim_7b_63")


def test_static_relaxation_is_not_bounded_by_delta():
    """What the docs say is *not* guaranteed: one sampled child, marginal law over its draw (exact), TVD ≫ δ."""
    gen = torch.Generator().manual_seed(0)
    vocab, cfg, worst = 6, AcceptConfig(relax="lantern", k=3, delta=0.2), 0.0
    for _ in range(300):
        p = torch.softmax(3 * float(torch.rand(1, generator=gen)) * torch.randn(vocab, generator=gen, dtype=F64), 0)
        q = torch.softmax(3 * float(torch.rand(1, generator=gen)) * torch.randn(vocab, generator=gen, dtype=F64), 0)
        nb = torch.stack([(lambda perm: perm[perm != i])(torch.randperm(vocab, generator=gen)) for i in range(vocab)])
        laws = sibling_output_law(p.expand(vocab, -1), torch.arange(vocab)[:, None], cfg, nb, q.expand(vocab, -1))
        marginal = (q[:, None] * laws).sum(0)  # child x drawn with probability Q(x)
        worst = max(worst, 0.5 * float((marginal - p).abs().sum()))
    assert worst > 2 * cfg.delta


# ---------------------------------------------------------------------------------------------------------
# The node-level budget on static trees: conditional on the draws, hence marginally, TVD ≤ δ
# ---------------------------------------------------------------------------------------------------------


def _draw_sequences(q: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered draw of c children without replacement from Q, and its probability: (S, c), (S,)."""
    seqs = list(itertools.permutations(range(q.numel()), c))
    kids = torch.tensor(seqs)
    qs = q[kids]  # (S, c)
    before = torch.cat([torch.zeros(len(seqs), 1, dtype=q.dtype), qs.cumsum(-1)[:, :-1]], -1)
    return kids, (qs / (1.0 - before)).prod(-1)


def _static_case(gen: torch.Generator, vocab: int):
    p = torch.softmax(3 * float(torch.rand(1, generator=gen)) * torch.randn(vocab, generator=gen, dtype=F64), 0)
    q = torch.softmax(3 * float(torch.rand(1, generator=gen)) * torch.randn(vocab, generator=gen, dtype=F64), 0)
    nb = torch.stack([(lambda perm: perm[perm != i])(torch.randperm(vocab, generator=gen)) for i in range(vocab)])
    return p, q, nb


def test_static_node_budget_bounds_the_marginal_tvd():
    """Exact marginal law over all draw sequences (small vocabularies, 1-3 children; one case with 5 of 7 and
    one with 8 of 8 codes): TVD from p ≤ δ with budget=node, > δ with the per-sibling budget somewhere, lossless
    with relaxation off."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(vocab, c) for vocab in (4, 5, 6) for c in (1, 2, 3)] * 12 + [(7, 5), (8, 8)]
    worst = {"sibling": 0.0, "node": 0.0}
    relaxed_some = False
    for vocab, c in shapes:
        p, q, nb = _static_case(gen, vocab)
        kids, weight = _draw_sequences(q, c)
        assert abs(float(weight.sum()) - 1.0) < 1e-12
        ps, qs = p.expand(len(kids), -1), q.expand(len(kids), -1)
        off = (weight[:, None] * sibling_output_law(ps, kids, AcceptConfig(), nb, qs)).sum(0)
        assert float((off - p).abs().max()) < 1e-12
        for delta in (0.1, 0.3):
            for budget in worst:
                cfg = AcceptConfig(relax="lantern", k=3, delta=delta, budget=budget)
                marginal = (weight[:, None] * sibling_output_law(ps, kids, cfg, nb, qs)).sum(0)
                tvd = 0.5 * float((marginal - p).abs().sum())
                worst[budget] = max(worst[budget], tvd / delta)
                if budget == "node":
                    assert tvd <= delta + 1e-9, (vocab, c, delta, tvd)
                    relaxed_some |= tvd > 0.5 * delta
    assert worst["sibling"] > 2.0, worst  # the per-sibling budget exceeds δ by far on static trees
    assert relaxed_some, "the node budget should still relax"


@pytest.mark.parametrize("delta", [0.05, 0.2, 0.4])
def test_static_node_budget_bounds_the_conditional_tvd(delta):
    """Given any drawn children (here 8 or 12 drawn from Q, 64 codes, k = 5 / 20), the relaxed law is within δ
    of the exact rule's law given the same draws (what node_tvd reports for static nodes)."""
    p, _, nb = _random_nodes(67, 300, 64, 1)
    gen = torch.Generator().manual_seed(68)
    q = torch.softmax(torch.log(p) + 1.5 * torch.randn(p.shape, generator=gen, dtype=F64), -1)  # a drafter near p
    for c in (8, 12):
        kids = torch.multinomial(q, c, replacement=False, generator=gen)
        for k in (5, 20):
            node = AcceptConfig(relax="lantern", k=k, delta=delta, budget="node")
            t_node = node_tvd(p, kids, node, nb, q)
            t_sib = node_tvd(p, kids, AcceptConfig(relax="lantern", k=k, delta=delta), nb, q)
            assert float(t_node.max()) <= delta + 1e-12
            assert float(t_sib.max()) > delta
            assert float(t_node.mean()) > 0.2 * delta, "the node budget should still relax"
    assert float(node_tvd(p, kids, AcceptConfig(), nb, q).max()) == 0.0


def test_static_node_budget_on_demo_distributions():
    """64 of the demo's own target rows and its neighbour table (k = 20); the drafter is the half-right mixture
    Q = (p + p of the next position) / 2, 10 children drawn from it without replacement."""
    p, nb = _demo_rows()
    p = p[::4]  # 64 rows from along the 4 images (the static node budget costs O(c²·k) chain steps)
    q = 0.5 * (p + p.roll(1, 0))
    kids = torch.multinomial(q, 10, replacement=False, generator=torch.Generator().manual_seed(1))
    for delta in (0.1, 0.4):
        t_node = node_tvd(p, kids, AcceptConfig(relax="lantern", k=20, delta=delta, budget="node"), nb, q)
        t_sib = node_tvd(p, kids, AcceptConfig(relax="lantern", k=20, delta=delta), nb, q)
        assert float(t_node.max()) <= delta + 1e-9
        assert float(t_sib.max()) > delta
        assert float(t_node.mean()) > 0.0


# (seed, vocab, number of children): cases where the node budget binds (its law differs from the per-sibling one)
STATIC_NODE_MC = [(11, 6, 3), (15, 8, 4)]


@pytest.mark.parametrize("seed,vocab,c", STATIC_NODE_MC)
def test_static_node_budget_monte_carlo(seed, vocab, c):
    """N_SIBLING runs of the real static_sibling_test with budget=node (then the residual when nothing passed)
    vs the reference's exact law given the children; the test's power against the per-sibling rule's law is
    computed (≥ 0.999) so a node budget that did nothing would be caught."""
    p, q, nb = _static_case(torch.Generator().manual_seed(seed), vocab)
    kids = torch.topk(q, c).indices  # Q's top codes: a positive-probability draw where siblings get rejected
    cfg = AcceptConfig(relax="lantern", k=3, delta=0.2, budget="node")
    exact = torch.tensor(ref_node_law(p.tolist(), kids.tolist(), q.tolist(), cfg, nb.tolist()), dtype=F64)
    sib = torch.tensor(ref_node_law(p.tolist(), kids.tolist(), q.tolist(), replace(cfg, budget="sibling"),
                                    nb.tolist()), dtype=F64)
    assert torch.allclose(sibling_output_law(p, kids, cfg, nb, q), exact, atol=1e-12)
    assert power_against(exact, sib, N_SIBLING) >= 0.999
    n = N_SIBLING
    gen = torch.Generator().manual_seed(seed + 100)
    acc, res = static_sibling_test(p.expand(n, -1), q.expand(n, -1), kids.expand(n, -1), cfg, nb, gen)
    out = torch.where(acc >= 0, kids[acc.clamp(min=0)], torch.multinomial(res, 1, generator=gen).squeeze(1))
    assert chi2_pvalue(torch.bincount(out, minlength=vocab), exact) > ALPHA
