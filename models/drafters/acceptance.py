r"""Acceptance rules for (relaxed) speculative tree verification, as pure tensor functions.

Notation (ours, the papers use the opposite letters): **p = target (verifier) distribution**,
**q = drafter distribution**. ``target_probs`` are the *processed* target probabilities at a node (after CFG,
temperature, top-k, top-p, softmax); ``draft_probs`` the drafter's.

Relaxation (SPEC §3). For a candidate x with latent neighbours N_1(x), N_2(x), … in distance order (first k)::

    c_m  = p(N_1) + … + p(N_m)                      m = 1..k
    LANTERN   (δ):  m* = largest m with c_m ≤ δ
    LANTERN++ (λ):  m* = largest m with c_m ≤ (λ − 1)·p(x)       ⇒ p̃(x) ≤ λ·p(x)
    p̃(x) = p(x) + c_{m*}                            (m* = 0 ⇒ p̃(x) = p(x))

c_m is non-decreasing, so m* = #{m : c_m ≤ budget} and the aggregated set is the strict prefix N_1..N_{m*}.
The relaxed target P̃_x moves the mass of N_1..N_{m*} onto x; TVD(p, P̃_x) = c_{m*}.

Sibling tests (children of one node, in drafting order x_1, x_2, …; r_1 = p):

* dynamic tree (EAGLE-2, deterministic top-k drafts, q(x) = 1): accept x_j with probability p̃_j(x_j),
  computed on the current residual r_j; on rejection r_{j+1} = normalise(r_j with x_j and N_1..N_{m*_j}
  zeroed) — this is exactly normalise(max(0, P̃_{x_j} − δ_{x_j})), the speculative residual for q = δ_{x_j}.
* static tree (EAGLE-1 / LANTERN++, children sampled without replacement from Q): the j-th child has
  q_j(x) = Q(x) / (1 − Σ_{l<j} Q(x_l)) on the not-yet-drawn support; accept with probability
  min(1, P̃_{x_j}(x_j) / q_j(x_j)) where P̃ is built on r_j; on rejection
  r_{j+1} = normalise(max(0, P̃_{x_j} − q_j)) (SpecInfer-style recursive rejection sampling).
* if no child is accepted the next token is drawn from the final residual; at a leaf, from p.

With relaxation off both rules are exactly lossless: the output token is distributed as p (tests prove it).

GSD (:mod:`models.drafters.grouped`, a config with ``group_mask``) plugs into the same sibling chain with its own
test: G_j = the group of x_j built on r_j; accept with min(1, r_j(G_j) / q_j(G_j)) (dynamic: q_j = δ_{x_j}, so
r_j(G_j)); on rejection r_{j+1} = normalise(max(0, r_j − q_j)), the plain speculative residual.

What δ and λ guarantee (``AcceptConfig.budget``; R_j = P(sibling j is tested) = Π_{l<j}(1 − a_l), a_l the
acceptance probability of sibling l, c*_j = p̃_j(x_j) − r_j(x_j) the mass moved onto x_j):

* dynamic tree, exact residual: each stage outputs P̃_j (on r_j) when the rest of the chain is lossless, so by
  induction the node's output law O has **TVD(O, p) ≤ Σ_j R_j·c*_j**, with equality when no child lies in an
  earlier sibling's aggregated set (then x_j is emitted with probability R_j·p̃_j(x_j), every untouched code
  y with R_{c+1}·r_{c+1}(y) = p(y), aggregated codes never).
  - ``budget="sibling"`` (the paper's and original code's rule): each c*_j ≤ δ, so TVD(O, p) ≤ (#children)·δ.
  - ``budget="node"``: sibling j gets δ_j = (δ − Σ_{l<j} R_l·c*_l) / R_j (R_j, c*_l are known inside the
    loop), so Σ_j R_j·c*_j ≤ δ: **TVD(O, p) ≤ δ at every node by construction**.
  - LANTERN++ (λ): c*_j ≤ (λ−1)·r_j(x_j), so O(x_j) = R_j·p̃_j(x_j) ≤ λ·R_j·r_j(x_j) = λ·p(x_j) and O(y) ≤ p(y)
    elsewhere: **O(y) ≤ λ·p(y) for every y holds for the whole node with the per-sibling rule** — that is the
    node-level λ rule, nothing to carry over, so ``budget="node"`` with λ is the same rule as ``"sibling"``.
    Its TVD is Σ_j R_j·c*_j ≤ (λ−1)·Σ_j p(x_j).
* static tree (children sampled from Q): the relaxed target P̃_x depends on the drawn x, so the stage's
  marginal output is no longer P̃ of anything and the carry-over argument above does not apply.
  - ``budget="sibling"``: **not bounded** (exact enumeration over the draws finds marginal TVD > 2.5·δ for a
    single child; the carry-over δ_j, which the static path used before, has the same worst cases).
  - ``budget="node"`` (exact residual): **TVD(marginal O, p) ≤ δ at every node by construction**. Condition
    on the drawn children D (known before the acceptance uniforms, so the rule may depend on them); let
    O(·|D) and O₀(·|D) be the node's laws under the relaxed and the exact rule given D (both exact, by the
    sibling chain). The exact rule is lossless, E_D[O₀(·|D)] = p, so by convexity of TVD
    TVD(E_D O(·|D), p) ≤ E_D TVD(O(·|D), O₀(·|D)), and it suffices that TVD(O(·|D), O₀(·|D)) ≤ δ for
    every D. :func:`_static_node_caps` ensures it greedily: for j = 1..c, sibling j aggregates the prefix
    N_1..N_{m_j} with m_j the largest m ≤ m*_j(δ) (LANTERN's prefix on its residual r_j) such that the law
    with prefixes m_1..m_j and no relaxation after j is within δ of O₀(·|D). m_j = 0 is always allowed
    (it is the previous step's law, within δ; at j = 1 it is O₀ itself), so after the last sibling
    TVD(O(·|D), O₀(·|D)) ≤ δ. Cost: every candidate m = 0..k runs through the rest of the chain at once
    (a leading dimension), so a node takes O(c²) chain steps on (k + 1)-times larger tensors instead of c
    steps — the slowest option, used only with ``relax="lantern", budget="node"`` on static trees.
  - λ: the node budget is the per-sibling rule (as on dynamic trees); its ratio bound O(y) ≤ λ·p(y) was not
    exceeded in the random cases of ``tests/test_verify_law.py`` but is not proven for static trees.
  :func:`node_tvd` reports, per static node, TVD(O(·|D), O₀(·|D)) given the actual draws (≤ δ with
  ``budget="node"``); its mean over draws bounds the node's marginal TVD from p from above.
* ``residual="original*"``: no bound (the residual is not the speculative residual of P̃; measured shifts are
  several times δ).

The original code's rule, ``residual="original"`` (LlamaGen / Anole) and ``"original_lumina"``
(Lumina-mGPT's static path; its dynamic path is the same as ``"original"``). The acceptance test is ours;
the residual after rejecting x_j differs:

* dynamic: r_{j+1} = normalise(r_j with x_j zeroed, and N_1(x_j)..N_{k+1}(x_j) zeroed too whenever m*_j ≥ 1);
* static, ``original``: r_{j+1} = normalise(max(0, r_j − q′_j)), q′_j = q_j with N_1..N_{k+1} zeroed and not
  renormalised (P̃ not used);
* static, ``original_lumina``: r_{j+1} = normalise(max(0, r_j with N_1..N_{k+1} zeroed − q_j));
* a residual that empties becomes the uniform distribution over the whole vocabulary (the exact rule keeps
  the previous distribution there, a branch of probability ~0).
It needs k+1 neighbour columns (:attr:`AcceptConfig.table_columns`).

Greedy (temperature 0): x passes iff it is the argmax of p after replacing p(x) by p̃(x) (ties → lowest
index, as ``torch.argmax``); the token after the accepted prefix is the plain argmax of p.

Differences from the original LANTERN code (deliberate, default ``residual="exact"``): the original zeroes the
first k+1 neighbours of a rejected candidate regardless of m* and on some paths zeroes the drafter's Q instead
of the target's p, so its residual is not the speculative residual of the relaxed target it tested against.
We derive the residual from P̃ exactly as above (only N_1..N_{m*} and x are removed, from p), which makes the
relaxation-off case lossless and the relaxed case analysable. The original's shared ``--lantern_delta`` flag
(≤ 1 → δ, > 1 → λ) is kept via :meth:`AcceptConfig.from_original_flags`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from models.sampling import cast, sample_with_uniforms

from .tree import DraftTree, TreeBatch, stack_trees

__all__ = [
    "AcceptConfig",
    "VerifyResult",
    "relaxed_mass",
    "relaxed_distribution",
    "dynamic_sibling_test",
    "static_sibling_test",
    "sibling_output_law",
    "node_tvd",
    "greedy_accept",
    "verify_tree",
    "verify_trees",
    "BatchVerifyResult",
    "tree_uniforms",
]

_EPS = 1e-12  # residual mass below this is treated as empty (the branch has ~zero probability)
BUDGETS = ("sibling", "node")
RESIDUALS = ("exact", "original", "original_lumina")


@dataclass(frozen=True)
class AcceptConfig:
    """Which acceptance relaxation to use.

    Attributes:
        relax: None (exact speculative sampling), ``"lantern"`` (δ budget) or ``"lantern++"`` (λ budget).
        k: number of latent neighbours considered (``lantern_k``).
        delta: TVD budget δ in [0, 1] for ``"lantern"``.
        lam: ratio bound λ ≥ 1 for ``"lantern++"``.
        budget: ``"sibling"`` (δ per sibling test, the original) or ``"node"`` (δ for the whole node; dynamic
            trees: sibling j gets (δ − Σ_{l<j} R_l·c*_l) / R_j; static trees: each sibling's prefix is capped so
            the law given the draws stays within δ of the exact rule's, see the module docstring). With λ
            both are the same rule (it bounds the node already).
        residual: ``"exact"`` (the speculative residual of P̃), ``"original"`` / ``"original_lumina"`` (the
            original code's residuals, see the module docstring).
    """

    relax: Literal["lantern", "lantern++"] | None = None
    k: int = 0
    delta: float | None = None
    lam: float | None = None
    budget: Literal["sibling", "node"] = "sibling"
    residual: Literal["exact", "original", "original_lumina"] = "exact"

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        if self.residual not in RESIDUALS:
            raise ValueError(f"unknown residual {self.residual!r}; choose one of {', '.join(RESIDUALS)}")
        if self.relax is None:
            return
        if self.k < 1:
            raise ValueError("relaxed acceptance needs k >= 1 neighbours")
        if self.relax == "lantern":
            if self.delta is None or not 0.0 <= self.delta <= 1.0:
                raise ValueError(f"LANTERN needs 0 <= delta <= 1, got {self.delta}")
            if self.lam is not None:
                raise ValueError("LANTERN uses delta, not lam")
        elif self.relax == "lantern++":
            if self.lam is None or self.lam < 1.0:
                raise ValueError(f"LANTERN++ needs lam >= 1, got {self.lam}")
            if self.delta is not None:
                raise ValueError("LANTERN++ uses lam, not delta")
        else:
            raise ValueError(f"unknown relaxation {self.relax!r}")

    @property
    def enabled(self) -> bool:
        return self.relax is not None

    @property
    def needs_neighbours(self) -> bool:
        """Whether the rule reads the latent neighbour table (LANTERN / LANTERN++; GSD reads the target's own
        token embeddings instead, :mod:`models.drafters.grouped`)."""
        return self.enabled

    @property
    def table_columns(self) -> int:
        """Neighbour-table columns the rule reads: k, or k + 1 for the original's residuals (N_1..N_{k+1})."""
        return self.k + 1 if self.enabled and self.residual != "exact" else self.k

    @classmethod
    def from_original_flags(cls, lantern: bool, lantern_k: int, lantern_delta: float, budget: str = "sibling",
                            residual: str = "exact") -> AcceptConfig:
        """The original command line: ``--lantern`` on, ``--lantern_delta`` ≤ 1 is δ, > 1 is λ (LANTERN++)."""
        if not lantern:
            return cls()
        if lantern_delta <= 1.0:
            return cls(relax="lantern", k=int(lantern_k), delta=float(lantern_delta), budget=budget, residual=residual)
        return cls(relax="lantern++", k=int(lantern_k), lam=float(lantern_delta), budget=budget, residual=residual)


# ---------------------------------------------------------------------------------------------------------
# Relaxed mass
# ---------------------------------------------------------------------------------------------------------


def _table(neighbours: torch.Tensor, k: int, device: torch.device) -> torch.Tensor:
    """The first k neighbour columns as long ids on ``device`` (no copy when they already are)."""
    table = neighbours if neighbours.shape[1] == k else neighbours[:, :k]
    if table.dtype != torch.long or table.device != device:
        table = table.to(device=device, dtype=torch.long)
    return table


def _relax_terms(
    target_probs: torch.Tensor,
    cand: torch.Tensor,
    neighbours: torch.Tensor,
    k: int,
    delta: float | None,
    lam: float | None,
    budget: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared core: (p(x), c_{m*}, m*, neighbour ids (..., k), in-prefix mask (..., k)).

    ``budget`` (shape of ``cand``) replaces the scalar δ (the node-level budget δ_j of a sibling)."""
    if delta is not None and lam is not None:
        raise ValueError("give delta (LANTERN) or lam (LANTERN++), not both")
    cand = cand if cand.dtype == torch.long else cand.long()
    p_x = target_probs.gather(-1, cand.unsqueeze(-1)).squeeze(-1)
    if (delta is None and lam is None) or k <= 0:
        zeros = torch.zeros_like(p_x)
        nb = torch.zeros(cand.shape + (0,), dtype=torch.long, device=cand.device)
        return p_x, zeros, torch.zeros_like(cand), nb, nb.bool()
    table = _table(neighbours, k, cand.device)
    # ids past the table's last row (e.g. junk top-k children of a forced position, whose logits are -inf
    # outside the one allowed id) have no neighbours; the Chameleon tables only cover the candidate ids
    inside = cand < table.shape[0]
    nb = torch.where(inside.unsqueeze(-1), table[cand.clamp(max=table.shape[0] - 1)], -1)  # (..., k)
    valid = nb >= 0  # -1 pads a row with fewer neighbours (e.g. non-image tokens)
    nb_p = target_probs.gather(-1, nb.clamp(min=0)) * valid
    c = nb_p.cumsum(-1)  # c_m, non-decreasing
    if budget is None:
        budget = p_x.new_full(p_x.shape, float(delta)) if delta is not None else (float(lam) - 1.0) * p_x
    within = (c <= budget.unsqueeze(-1)) & valid  # a prefix, because c is non-decreasing
    m_star = within.sum(-1)
    c_star = (nb_p * within).sum(-1)
    return p_x, c_star, m_star, nb, within


def relaxed_mass(
    target_probs: torch.Tensor,
    cand: torch.Tensor,
    neighbours: torch.Tensor,
    k: int,
    delta: float | None,
    lam: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relaxed target mass p̃(x) of candidates and the number m* of aggregated neighbours.

    ``c_m = Σ_{i≤m} p(N_i(x))`` over the first k columns of ``neighbours`` (V, K) (distance order; -1 = no
    neighbour). LANTERN: m* = #{m : c_m ≤ δ}; LANTERN++: m* = #{m : c_m ≤ (λ−1)·p(x)}; both equal the largest
    qualifying m since c_m is non-decreasing. Returns ``(p̃(x) = p(x) + c_{m*}, m*)`` with shapes of ``cand``.
    Exactly one of ``delta`` / ``lam`` is used; both None (or k = 0) means no relaxation (p̃ = p, m* = 0).

    Args:
        target_probs: (..., V) target probabilities p.
        cand: (...,) candidate token ids x.
    """
    p_x, c_star, m_star, _, _ = _relax_terms(target_probs, cand, neighbours, k, delta, lam)
    return p_x + c_star, m_star


def _aggregate_mask(
    target_probs: torch.Tensor, cand: torch.Tensor, nb: torch.Tensor, within: torch.Tensor
) -> torch.Tensor:
    """(..., V) bool mask of {x} ∪ {N_1..N_{m*}}."""
    cand = (cand if cand.dtype == torch.long else cand.long()).unsqueeze(-1)
    idx = torch.where(within, nb, cand)  # out-of-prefix slots point at x itself (always in the set)
    mask = torch.zeros(target_probs.shape, dtype=torch.bool, device=target_probs.device)
    mask.scatter_(-1, idx, True)
    mask.scatter_(-1, cand, True)
    return mask


def _relaxed_for(
    target_probs: torch.Tensor, cand: torch.Tensor, cfg: AcceptConfig, neighbours: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p̃(x) (...,), aggregated mask (..., V)) under ``cfg``."""
    if hasattr(cfg, "relaxed_for"):  # a rule defined next to this module (GSD, models/drafters/grouped.py)
        return cfg.relaxed_for(target_probs, cand, neighbours)
    if cfg.enabled and neighbours is None:
        raise ValueError("relaxed acceptance needs a neighbour table")
    if not cfg.enabled:
        p_x = target_probs.gather(-1, cand.long().unsqueeze(-1)).squeeze(-1)
        mask = torch.zeros(target_probs.shape, dtype=torch.bool, device=target_probs.device)
        mask.scatter_(-1, cand.long().unsqueeze(-1), True)
        return p_x, mask
    p_x, c_star, _, nb, within = _relax_terms(target_probs, cand, neighbours, cfg.k, cfg.delta, cfg.lam)
    return p_x + c_star, _aggregate_mask(target_probs, cand, nb, within)


def relaxed_distribution(
    target_probs: torch.Tensor,
    cand: torch.Tensor,
    neighbours: torch.Tensor,
    k: int,
    delta: float | None,
    lam: float | None,
) -> torch.Tensor:
    """The relaxed target P̃_x (..., V): the mass of N_1(x)..N_{m*}(x) moved onto x.

    ``P̃_x(x) = p̃(x)``, ``P̃_x(N_i) = 0`` for i ≤ m*, ``P̃_x(y) = p(y)`` otherwise; TVD(p, P̃_x) = c_{m*}.
    """
    p_x, c_star, _, nb, within = _relax_terms(target_probs, cand, neighbours, k, delta, lam)
    mask = _aggregate_mask(target_probs, cand, nb, within)
    out = target_probs.masked_fill(mask, 0.0)
    return out.scatter(-1, cand.long().unsqueeze(-1), (p_x + c_star).unsqueeze(-1))


# ---------------------------------------------------------------------------------------------------------
# Sibling tests (batched over leading dims; the loop runs over sibling rank only)
# ---------------------------------------------------------------------------------------------------------


def _normalise_or(res: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    s = res.sum(-1, keepdim=True)
    return torch.where(s > _EPS, res / s.clamp(min=_EPS), fallback)


def _original_neighbour_mask(target_probs: torch.Tensor, cand: torch.Tensor, cfg: AcceptConfig,
                             neighbours: torch.Tensor) -> torch.Tensor:
    """(..., V) bool mask of N_1(x)..N_{k+1}(x), the set the original code removes (x itself excluded)."""
    if neighbours.shape[1] < cfg.k + 1:
        raise ValueError(f"residual={cfg.residual!r} removes k+1 = {cfg.k + 1} neighbours but the neighbour table "
                         f"has {neighbours.shape[1]} columns; load it with k+1 columns (AcceptConfig.table_columns)")
    nb = neighbours[:, : cfg.k + 1].to(device=cand.device, dtype=torch.long)[cand.long()]
    mask = torch.zeros(target_probs.shape, dtype=torch.bool, device=target_probs.device)
    mask.scatter_(-1, nb.clamp(min=0), nb >= 0)
    return mask


def _static_node_caps(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    children: torch.Tensor,
    cfg: AcceptConfig,
    neighbours: torch.Tensor,
    child_mask: torch.Tensor,
) -> torch.Tensor:
    """Static tree, ``budget="node"``: the prefix length m_j ≤ m*_j(δ) each sibling may aggregate (..., c).

    Given the drawn children D, let O_exact(·|D) be the exact rule's output law and O_m the law with
    relaxations m_1..m_j on siblings 1..j and none after. Greedy over j: m_j = the largest m ≤ m*_j(δ)
    (LANTERN's prefix on the residual r_j of the chain with m_1..m_{j-1}) with TVD(O_m, O_exact(·|D)) ≤ δ.
    m_j = 0 gives the previous step's law, which satisfied the bound (at j = 1: O_exact itself), so the
    choice always exists, and after the last sibling TVD(O(·|D), O_exact(·|D)) ≤ δ for every D. All k + 1
    candidate m's run through the rest of the chain at once (a leading dimension), so a node costs O(c²)
    chain steps on (k + 1)-times larger tensors, sync-free.
    """
    dt, dev = target_probs.dtype, target_probs.device
    k, delta = cfg.k, float(cfg.delta)
    lead, c = children.shape[:-1], children.shape[-1]
    ref = _sibling_chain(target_probs, draft_probs, children, AcceptConfig(), None, None, child_mask,
                         sample=False, want_law=True)[2]

    def step(r, q_rem, reach, law, x, valid, p_tilde, agg):
        # one exact static step (as in _sibling_chain): accept min(1, p̃/q_j), residual normalise(max(0, P̃ − q_j))
        q_j = _normalise_or(q_rem, q_rem)
        q_x = q_j.gather(-1, x.unsqueeze(-1)).squeeze(-1)
        a = torch.where(q_x > 0, (p_tilde / q_x.clamp(min=_EPS)).clamp(max=1.0), (p_tilde > 0).to(dt))
        relaxed = r.masked_fill(agg, 0.0).scatter(-1, x.unsqueeze(-1), p_tilde.unsqueeze(-1))
        nxt = _normalise_or((relaxed - q_j).clamp(min=0.0), relaxed)
        vr = valid.to(dt)
        law = law.scatter_add(-1, x.unsqueeze(-1), (reach * a * vr).unsqueeze(-1))
        reach = reach * (1.0 - a * vr)
        r = torch.where(valid.unsqueeze(-1), nxt, r)
        q_rem = torch.where(valid.unsqueeze(-1), q_rem.scatter(-1, x.unsqueeze(-1), 0.0), q_rem)
        return r, q_rem, reach, law

    def exact_step(r, q_rem, reach, law, x, valid):
        p_x = r.gather(-1, x.unsqueeze(-1)).squeeze(-1)
        agg = torch.zeros(r.shape, dtype=torch.bool, device=dev).scatter_(-1, x.unsqueeze(-1), True)
        return step(r, q_rem, reach, law, x, valid, p_x, agg)

    ms = torch.arange(k + 1, device=dev).view((k + 1,) + (1,) * len(lead))  # candidate m's, leading dim
    slot = torch.arange(k, device=dev)
    caps = torch.zeros(children.shape, dtype=torch.long, device=dev)
    r, q_rem = target_probs, cast(draft_probs, dt)
    reach = torch.ones(lead, dtype=dt, device=dev)
    law = torch.zeros_like(target_probs)
    for j in range(c):
        x, valid = children[..., j].long(), child_mask[..., j]
        p_x, _, _, nb, within = _relax_terms(r, x, neighbours, k, delta, None)  # LANTERN's prefix m*_j(δ)
        nb_p = r.gather(-1, nb.clamp(min=0)) * (nb >= 0)
        within_m = within & (slot < ms.unsqueeze(-1))  # (k+1, ..., k): prefix of length min(m, m*_j)
        p_tilde = p_x + (nb_p * within_m).sum(-1)
        expand = (k + 1,) + tuple(r.shape)
        x_m, valid_m = x.expand((k + 1,) + tuple(lead)), valid.expand((k + 1,) + tuple(lead))
        agg = _aggregate_mask(r.expand(expand), x_m, nb.expand((k + 1,) + tuple(nb.shape)), within_m)
        state = step(r.expand(expand), q_rem.expand(expand), reach.expand((k + 1,) + tuple(lead)), law.expand(expand),
                     x_m, valid_m, p_tilde, agg)
        r_m, q_m, reach_m, law_m = state
        for i in range(j + 1, c):  # the rest of the chain without relaxation, for every candidate at once
            xi = children[..., i].long().expand((k + 1,) + tuple(lead))
            r_m, q_m, reach_m, law_m = exact_step(r_m, q_m, reach_m, law_m, xi, child_mask[..., i].expand_as(xi))
        tvd = 0.5 * (law_m + reach_m.unsqueeze(-1) * r_m - ref).abs().sum(-1)  # (k+1, ...)
        ok = (tvd <= delta) | (ms == 0)  # m = 0 is the previous step's law (rounding aside)
        cap = torch.where(valid, (ms * ok).amax(0), 0)
        caps[..., j] = cap
        pick = cap.unsqueeze(0)
        r, q_rem, reach, law = (v.gather(0, pick.unsqueeze(-1).expand((1,) + tuple(v.shape[1:]))).squeeze(0)
                                if v.dim() > len(lead) + 1 else v.gather(0, pick).squeeze(0) for v in state)
    return caps


def _dynamic_exact_chain(
    target_probs: torch.Tensor, children: torch.Tensor, child_mask: torch.Tensor, u: torch.Tensor | None,
    want_law: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`_sibling_chain` for deterministic drafts without relaxation, all siblings in one pass.

    Rejecting x_l only removes x_l, so r_j = p with x_1..x_{j-1} zeroed, normalised: with P_j = Σ_{l<j} p(x_l)
    (a repeated child counts once and has p = 0 on its repeat) sibling j passes with probability
    a_j = r_j(x_j) = p(x_j) / (1 − P_j), and the final residual is p with every child zeroed, normalised.
    The sampled outcome is the first j with u_j < a_j, as in the sequential chain.
    """
    dt = target_probs.dtype
    x = children.long()
    c = x.shape[-1]
    slot = torch.arange(c, device=x.device)
    repeat = ((x.unsqueeze(-1) == x.unsqueeze(-2)) & (slot[None, :] < slot[:, None]) & child_mask.unsqueeze(-2)).any(-1)
    live = child_mask & ~repeat
    p_x = target_probs.gather(-1, x) * live
    remaining = target_probs.sum(-1, keepdim=True) - (p_x.cumsum(-1) - p_x)  # 1 − P_j (Σp as normalised)
    accept_prob = torch.where(remaining > _EPS, p_x / remaining.clamp(min=_EPS), (p_x > 0).to(dt)).clamp(max=1.0)
    if u is not None:
        hit = live & (u < accept_prob)
        accepted = torch.where(hit.any(-1), hit.int().argmax(-1), -1)
    else:
        accepted = torch.full(x.shape[:-1], -1, dtype=torch.long, device=x.device)
    vocab = target_probs.shape[-1]
    drop = torch.zeros(target_probs.shape[:-1] + (vocab + 1,), dtype=torch.bool, device=target_probs.device)
    drop = drop.scatter_(-1, torch.where(live, x, vocab), True)[..., :vocab]  # masked slots hit column V
    res = _normalise_or(target_probs.masked_fill(drop, 0.0), target_probs)
    law = None
    if want_law:  # Σ_j R_j·a_j·δ_{x_j} + R_{c+1}·r_{c+1}, R_j = Π_{l<j}(1 − a_l)
        keep = 1.0 - accept_prob * live
        reach = torch.cumprod(torch.cat([torch.ones_like(keep[..., :1]), keep], -1), -1)
        law = torch.zeros_like(target_probs).scatter_add(-1, x, reach[..., :-1] * accept_prob * live)
        law = law + reach[..., -1:] * res
    return accepted, res, law


def _sibling_chain(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    children: torch.Tensor,
    cfg: AcceptConfig,
    neighbours: torch.Tensor | None,
    generator: torch.Generator | None,
    child_mask: torch.Tensor | None,
    sample: bool = True,
    want_law: bool = False,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The sibling process of one node, shared by the dynamic (``draft_probs`` None, q_j = δ_{x_j}) and the
    static rule. Returns ``(accepted_rank, final residual, exact output law or None)``.

    The residual chain r_1, r_2, … given the children is deterministic, so it is advanced on every valid slot
    whatever the uniforms say; the sampled outcome is the first j with u_j < a_j. The same chain gives the
    node's exact output law  Σ_j R_j·a_j·δ_{x_j} + R_{c+1}·r_{c+1}  with R_j = Π_{l<j}(1 − a_l) (for static
    trees conditional on the drawn children). ``cfg.budget == "node"`` gives sibling j the TVD budget
    δ_j = (δ − Σ_{l<j} R_l·c*_l) / R_j, so Σ_j R_j·c*_j ≤ δ; on static trees with the exact residual it
    instead caps sibling j's prefix at m_j from :func:`_static_node_caps` (the budget δ per sibling, then
    the cap), so the law given the children is within δ of the exact rule's. ``uniforms`` (shape of
    ``children``): pre-drawn acceptance uniforms (then ``generator`` is not used).
    """
    static = draft_probs is not None
    r = target_probs
    dt, dev = target_probs.dtype, target_probs.device
    vocab = target_probs.shape[-1]
    if child_mask is None:
        child_mask = torch.ones(children.shape, dtype=torch.bool, device=children.device)
    if cfg.needs_neighbours and neighbours is None:
        raise ValueError("relaxed acceptance needs a neighbour table")
    group_rule = hasattr(cfg, "group_mask")  # GSD (models/drafters/grouped.py)
    lead = children.shape[:-1]
    if not sample:
        u = None
    elif uniforms is not None:
        u = cast(uniforms, dt)
    else:
        u = torch.rand(children.shape, generator=generator, device=dev, dtype=dt)
    if not static and not cfg.enabled:  # the exact dynamic rule has a closed form: every sibling at once
        return _dynamic_exact_chain(target_probs, children, child_mask, u, want_law)
    accepted = torch.full(lead, -1, dtype=torch.long, device=children.device)
    reach = torch.ones(lead, dtype=dt, device=dev)  # R_j: probability that sibling j is tested
    law = torch.zeros_like(target_probs) if want_law else None
    node_budget = cfg.relax == "lantern" and cfg.budget == "node"
    original = cfg.enabled and cfg.residual != "exact"
    # (allocated only for the rules that read them)
    spent = torch.zeros(lead, dtype=dt, device=dev) if node_budget else None  # Σ_{l<j} R_l·c*_l
    uniform = torch.full_like(target_probs, 1.0 / vocab) if original else None
    q_rem = cast(draft_probs, dt) if static else None
    caps = None
    if static and node_budget and not original:  # the static node budget caps each sibling's prefix instead
        caps = _static_node_caps(target_probs, draft_probs, children, cfg, neighbours, child_mask)
        node_budget = False
    children = children if children.dtype == torch.long else children.long()
    for j in range(children.shape[-1]):
        x = children[..., j]
        x1 = x.unsqueeze(-1)
        valid = child_mask[..., j]
        if not cfg.enabled:
            p_tilde = r.gather(-1, x1).squeeze(-1)
            agg = torch.zeros(r.shape, dtype=torch.bool, device=dev).scatter_(-1, x1, True)
            m_star = torch.zeros_like(x)
        elif group_rule:  # GSD: the group G(x_j) built on r_j; p_tilde = r_j(G), agg = G
            agg = cfg.group_mask(r, x)
            p_tilde = (r * agg).sum(-1)
            m_star = agg.sum(-1) - 1
        else:
            budget = None
            if node_budget:
                budget = torch.where(reach > _EPS, (cfg.delta - spent).clamp(min=0.0) / reach.clamp(min=_EPS),
                                     torch.full_like(reach, float(cfg.delta)))
            p_x, c_star, m_star, nb, within = _relax_terms(r, x, neighbours, cfg.k, cfg.delta, cfg.lam, budget)
            if caps is not None:  # static, budget="node": at most the prefix _static_node_caps allows
                within = within & (torch.arange(cfg.k, device=dev) < caps[..., j, None])
                c_star = (r.gather(-1, nb.clamp(min=0)) * (nb >= 0) * within).sum(-1)
            p_tilde = p_x + c_star
            agg = _aggregate_mask(r, x, nb, within)
        if static:
            q_j = _normalise_or(q_rem, q_rem)  # = Q / (1 − Σ_{l<j} Q(x_l)) for a normalised Q
            q_x = q_j.gather(-1, x1).squeeze(-1)
            if group_rule:  # GSD: min(1, p(G) / q(G))
                q_x = (q_j * agg).sum(-1)
            accept_prob = torch.where(q_x > 0, (p_tilde / q_x.clamp(min=_EPS)).clamp(max=1.0), (p_tilde > 0).to(dt))
        else:
            accept_prob = p_tilde.clamp(max=1.0)  # q = δ_x (GSD: q(G) = 1)
        if u is not None:
            acc = valid & (accepted < 0) & (u[..., j] < accept_prob)
            accepted = torch.where(acc, j, accepted)
        # the residual r_{j+1} the process continues with if x_j is rejected
        if group_rule:  # GSD's residual is the plain speculative one, normalise(max(0, r_j − q_j))
            q_res = q_j if static else torch.zeros_like(r).scatter_(-1, x1, 1.0)
            nxt = _normalise_or((r - q_res).clamp(min=0.0), r)
            if static:
                q_rem = torch.where(valid[..., None], q_rem.scatter(-1, x1, 0.0), q_rem)
        elif not static:
            if original:  # the original: x and N_1..N_{k+1} leave whenever m* >= 1, empty -> uniform
                zero = agg.scatter(-1, x1, True)
                zero = torch.where((m_star >= 1).unsqueeze(-1), zero | _original_neighbour_mask(r, x, cfg, neighbours),
                                   zero)
                nxt = _normalise_or(r.masked_fill(zero, 0.0), uniform)
            else:  # normalise(max(0, P̃_x − δ_x)) = r with x and N_1..N_{m*} zeroed
                nxt = _normalise_or(r.masked_fill(agg, 0.0), r)
        else:
            if original and cfg.residual == "original":  # LlamaGen/Anole: r − q_j with N_1..N_{k+1} zeroed in q
                q_prime = q_j.masked_fill(_original_neighbour_mask(r, x, cfg, neighbours), 0.0)
                nxt = _normalise_or((r - q_prime).clamp(min=0.0), uniform)
            elif original:  # Lumina-mGPT: p zeroed on N_1..N_{k+1}, then q_j subtracted
                r_zeroed = r.masked_fill(_original_neighbour_mask(r, x, cfg, neighbours), 0.0)
                nxt = _normalise_or((r_zeroed - q_j).clamp(min=0.0), uniform)
            else:  # SpecInfer-style: normalise(max(0, P̃_x − q_j))
                relaxed = r.masked_fill(agg, 0.0).scatter(-1, x1, p_tilde.unsqueeze(-1))
                nxt = _normalise_or((relaxed - q_j).clamp(min=0.0), relaxed)
            q_rem = torch.where(valid[..., None], q_rem.scatter(-1, x1, 0.0), q_rem)
        accept_valid = accept_prob * valid.to(dt)
        if law is not None:
            law = law.scatter_add(-1, x1, (reach * accept_valid).unsqueeze(-1))
        if node_budget:  # Σ_{l<j} R_l·c*_l, c*_j = p̃_j(x_j) − r_j(x_j) (the relaxed mass moved onto x_j)
            spent = spent + reach * (p_tilde - p_x).clamp(min=0.0) * valid.to(dt)
        reach = reach * (1.0 - accept_valid)
        r = torch.where(valid.unsqueeze(-1), nxt, r)
    if law is not None:
        law = law + reach.unsqueeze(-1) * r
    return accepted, r, law


def dynamic_sibling_test(
    target_probs: torch.Tensor,
    children: torch.Tensor,
    cfg: AcceptConfig,
    neighbours: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    child_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential test of deterministic drafts (q(x) = 1) against the target p, with relaxation.

    For j = 1..c with r_1 = p: accept x_j with probability p̃_j(x_j) (relaxation on the residual r_j, budget
    δ or δ_j by ``cfg.budget``); on rejection r_{j+1} = normalise(r_j with x_j and N_1..N_{m*_j}(x_j) zeroed)
    (``cfg.residual == "exact"``; see the module docstring for the original's rule). Lossless when ``cfg`` is
    off.

    With relaxation the loop over sibling rank is inherent (the set removed after rejecting x_j depends on
    m*_j, which is computed on r_j); each iteration is vectorised over the leading dims and V, and nothing
    syncs. Without it r_j is p with x_1..x_{j-1} removed, and every sibling is tested in one closed-form pass.

    Args:
        target_probs: (..., V) target p at the parent node(s).
        children: (..., c) drafted children in drafting order.
        child_mask: (..., c) bool, False for padding slots (default: all valid).
        generator: source of the uniform draws (one per sibling slot).

    Returns:
        ``(accepted_rank (...,) long, -1 if none, residual (..., V))``; the residual is the distribution to
        sample the next token from when nothing was accepted (for rows that accepted it is meaningless).
    """
    accepted, r, _ = _sibling_chain(target_probs, None, children, cfg, neighbours, generator, child_mask)
    return accepted, r


def static_sibling_test(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    children: torch.Tensor,
    cfg: AcceptConfig,
    neighbours: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    child_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recursive rejection sampling of children drawn without replacement from the drafter's Q.

    With r_1 = p: q_j(x) = Q(x) / (1 − Σ_{l<j} Q(x_l)) on the not-yet-drawn support (0 on x_1..x_{j-1});
    P̃_j = relaxed target of x_j built on r_j; accept x_j with probability min(1, P̃_j(x_j) / q_j(x_j));
    on rejection r_{j+1} = normalise(max(0, P̃_j − q_j)) (``cfg.residual == "exact"``; the original's rules
    are in the module docstring). Lossless when ``cfg`` is off. ``budget="node"`` (LANTERN δ) caps each
    sibling's aggregated prefix so the node's law given these children is within δ of the exact rule's
    (hence its marginal TVD from p ≤ δ; module docstring).

    A short loop over sibling rank (each step depends on the previous residual); vectorised over the leading
    dims and V, sync-free (the node budget adds O(c²) batched steps, see :func:`_static_node_caps`).

    Args:
        target_probs: (..., V) target p at the parent node(s).
        draft_probs: (..., V) drafter distribution Q the children were sampled from (without replacement).
        children: (..., c) the draws, in sampling order.
        child_mask: (..., c) bool, False for padding slots (default: all valid).

    Returns:
        ``(accepted_rank (...,) long, -1 if none, residual (..., V))`` as in :func:`dynamic_sibling_test`.
    """
    accepted, r, _ = _sibling_chain(target_probs, draft_probs, children, cfg, neighbours, generator, child_mask)
    return accepted, r


def sibling_output_law(
    target_probs: torch.Tensor,
    children: torch.Tensor,
    cfg: AcceptConfig,
    neighbours: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    child_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact law (..., V) of the token a node emits: its sibling test, then the residual if nothing passed.

    ``Σ_j R_j·a_j·δ_{x_j} + R_{c+1}·r_{c+1}`` with a_j the acceptance probability of sibling j and
    R_j = Π_{l<j}(1 − a_l). Dynamic rule when ``draft_probs`` is None (the law of the node's output); static
    rule otherwise, *conditional on the drawn children* (the marginal over the draws of an exact static test
    is p; a relaxed one's marginal would need every ordered draw).
    """
    return _sibling_chain(target_probs, draft_probs, children, cfg, neighbours, None, child_mask,
                          sample=False, want_law=True)[2]


def node_tvd(
    target_probs: torch.Tensor,
    children: torch.Tensor,
    cfg: AcceptConfig,
    neighbours: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    child_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Realised distribution shift (...,) of a node's emitted token, computed exactly (no sampling).

    Dynamic rule: TVD(law, p), the exact shift of the node's output law from the target. Static rule:
    TVD(law, law₀), the relaxed and the exact rule's laws given the same drawn children (≤ δ with LANTERN's
    ``budget="node"``); since the exact rule's law averages to p over the draws, its mean over draws bounds
    the node's marginal TVD from p from above (convexity), and it is 0 with relaxation off.
    """
    law = sibling_output_law(target_probs, children, cfg, neighbours, draft_probs, child_mask)
    return _shift(law, target_probs, draft_probs, children, child_mask)


def _shift(law: torch.Tensor, target_probs: torch.Tensor, draft_probs: torch.Tensor | None, children: torch.Tensor,
           child_mask: torch.Tensor | None) -> torch.Tensor:
    """TVD (...,) of a node's output ``law`` from the exact rule's: p (dynamic), or the exact static test's law
    given the same drawn children (see :func:`node_tvd`)."""
    ref = target_probs if draft_probs is None else _sibling_chain(
        target_probs, draft_probs, children, AcceptConfig(), None, None, child_mask, sample=False, want_law=True)[2]
    return 0.5 * (law - ref).abs().sum(-1)


def greedy_accept(
    target_probs: torch.Tensor,
    cand: torch.Tensor,
    cfg: AcceptConfig,
    neighbours: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy (temperature 0) test, vectorised over candidates: (...,) bool.

    x passes iff ``argmax(p with p(x) replaced by p̃(x)) == x`` (``torch.argmax``: ties → lowest index).
    Relaxation off: x passes iff x == argmax p.
    """
    p_tilde, _ = _relaxed_for(target_probs, cand, cfg, neighbours)
    lifted = target_probs.scatter(-1, cand.long().unsqueeze(-1), p_tilde.unsqueeze(-1).to(target_probs.dtype))
    return lifted.argmax(-1) == cand


# ---------------------------------------------------------------------------------------------------------
# Tree verification
# ---------------------------------------------------------------------------------------------------------


@dataclass
class VerifyResult:
    """Outcome of verifying one draft tree.

    Attributes:
        path: (accept_len + 1,) node indices root..last accepted node.
        next_token: () the token after the accepted prefix (sampled from the final residual, or argmax).
        accept_len: number of accepted drafted tokens.
        attempted_per_depth: (max_depth,) 1 where a sibling test of the children at depth d + 1 was run.
        accepted_per_depth: (max_depth,) 1 where a child at depth d + 1 was accepted.
        node_tvd: (accept_len + 1,) the realised shift of each emitted token, one per node of ``path`` (the
            node whose sibling test emitted it), computed exactly by :func:`node_tvd` (0 with relaxation
            off and at a leaf, which samples from p). Greedy: 1 where the emitted token is not argmax p.
    """

    path: torch.Tensor
    next_token: torch.Tensor
    accept_len: int
    attempted_per_depth: torch.Tensor
    accepted_per_depth: torch.Tensor
    node_tvd: torch.Tensor | None = None

    def accepted_tokens(self, tree: DraftTree) -> torch.Tensor:
        """(accept_len,) the accepted drafted tokens."""
        return tree.tokens[self.path[1:]]


@dataclass
class BatchVerifyResult:
    """Outcome of verifying the B trees of a :class:`~models.drafters.tree.TreeBatch` at once (all tensors,
    nothing synced; D = ``trees.max_depth``).

    Attributes:
        path: (B, D + 1) node indices root..last accepted node, right-padded by repeating the last node.
        emitted: (B, D + 1) the emitted tokens: the accepted drafts, then the next token, right-padded by
            repeating the next token (what the engine commits and feeds the drafter).
        next_token: (B,) the token after the accepted prefix.
        accept_len: (B,) number of accepted drafted tokens.
        attempted_per_depth, accepted_per_depth: (B, D) as in :class:`VerifyResult`.
        node_tvd: (B, D + 1) the realised shift of each emitted token (0 past ``accept_len``).
    """

    path: torch.Tensor
    emitted: torch.Tensor
    next_token: torch.Tensor
    accept_len: torch.Tensor
    attempted_per_depth: torch.Tensor
    accepted_per_depth: torch.Tensor
    node_tvd: torch.Tensor

    def result(self, b: int, accept_len: int | None = None) -> VerifyResult:
        """Prompt b's outcome as a :class:`VerifyResult` (``accept_len``: the host value, if already synced)."""
        a = int(self.accept_len[b]) if accept_len is None else accept_len
        return VerifyResult(path=self.path[b, : a + 1], next_token=self.next_token[b], accept_len=a,
                            attempted_per_depth=self.attempted_per_depth[b],
                            accepted_per_depth=self.accepted_per_depth[b], node_tvd=self.node_tvd[b, : a + 1])


def tree_uniforms(trees: TreeBatch, generators, device: torch.device | str, dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every random draw of one verification: (B, n, C) sibling uniforms (node i's j-th child uses [b, i, j])
    and (B,) the uniform that samples the next token.

    Prompt b draws ``num_nodes[b]·C + 1`` uniforms in one call from its own generator (``generators[b]``;
    a single generator or None is shared, in prompt order); ``C`` is fixed by the tree shape, so a prompt's
    draws do not depend on the batch it runs in (per-image seeds stay exact for any batch composition).
    """
    _, n, width = trees.children.shape
    return sibling_uniforms(trees.num_nodes, n, width, generators, device, dtype)


def sibling_uniforms(sizes: list[int], n: int, width: int, generators, device: torch.device | str,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`tree_uniforms` for trees of ``sizes`` nodes (padded to ``n``) with ``width`` sibling slots per
    node (the fused round draws them before its call: models/drafters/fused_round.py)."""
    batch = len(sizes)
    per_prompt = not (generators is None or isinstance(generators, torch.Generator))
    if not per_prompt and all(s == n for s in sizes):  # one call for the whole batch
        flat = torch.rand(batch, n * width + 1, generator=generators, device=device, dtype=dtype)
        return flat[:, :-1].view(batch, n, width), flat[:, -1]
    draws = [torch.rand(sizes[b] * width + 1, generator=generators[b] if per_prompt else generators,
                        device=device, dtype=dtype) for b in range(batch)]
    if all(s == n for s in sizes):
        flat = torch.stack(draws)
        return flat[:, :-1].view(batch, n, width), flat[:, -1]
    sib = torch.zeros(batch, n, width, device=device, dtype=dtype)
    for b, d in enumerate(draws):  # unequal sizes (SJD windows near the end): pad each prompt's draws
        sib[b, : sizes[b]] = d[:-1].view(sizes[b], width)
    return sib, torch.stack([d[-1] for d in draws])


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b]] for x (B, n, ...) and index (B,)."""
    return x[torch.arange(x.shape[0], device=x.device), index]


def _finish(trees: TreeBatch, path: torch.Tensor, accept_len: torch.Tensor, next_token: torch.Tensor,
            node_tvd: torch.Tensor, attempted: torch.Tensor | None = None) -> BatchVerifyResult:
    """Assemble the batched result from the padded path (B, D + 1) and the accepted lengths (B,)."""
    depth = torch.arange(trees.max_depth + 1, device=path.device)
    nxt_node = torch.cat([path[:, 1:], path[:, -1:]], 1)  # node emitted at step d (d < accept_len)
    drafted = trees.tokens.gather(1, nxt_node)
    emitted = torch.where(depth < accept_len[:, None], drafted, next_token[:, None])
    d = depth[:-1]
    if attempted is None:
        has_child = (trees.children >= 0).any(-1)
        attempted = (d <= accept_len[:, None]) & has_child.gather(1, path[:, :-1])
    return BatchVerifyResult(path=path, emitted=emitted, next_token=next_token, accept_len=accept_len,
                             attempted_per_depth=attempted.long(),
                             accepted_per_depth=(d < accept_len[:, None]).long(),
                             node_tvd=torch.where(depth <= accept_len[:, None], node_tvd, 0.0))


def _path_from_mask(trees: TreeBatch, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The accepted root path from ``ok`` (B, n) (node i is its parent's accepted child; root True): a node is
    on the path iff it and all its ancestors are ok. -> (path (B, D + 1) padded, accept_len (B,), last (B,))."""
    n, depth_bound = trees.tokens.shape[1], trees.max_depth
    on_path = ~(trees.tree_mask & ~ok[:, None, :]).any(-1)
    depth_on = torch.where(on_path, trees.depths, -1)
    accept_len, last = depth_on.max(-1)
    slot = torch.where(on_path, trees.depths, depth_bound + 1)  # off-path nodes go to a dummy column
    buf = torch.zeros(ok.shape[0], depth_bound + 2, dtype=torch.long, device=ok.device)
    buf.scatter_(1, slot, torch.arange(n, device=ok.device).expand_as(slot))
    depth = torch.arange(depth_bound + 1, device=ok.device)
    path = torch.where(depth <= accept_len[:, None], buf[:, :-1], last[:, None])
    return path, accept_len, last


def _verify_greedy_batch(trees: TreeBatch, probs: torch.Tensor, cfg: AcceptConfig,
                         neighbours: torch.Tensor | None) -> BatchVerifyResult:
    batch, n = trees.tokens.shape
    dev = probs.device
    has_parent = trees.parents >= 0
    p_parent = probs[torch.arange(batch, device=dev)[:, None], trees.parents.clamp(min=0)]  # (B, n, V)
    passes = greedy_accept(p_parent, trees.tokens, cfg, neighbours) & has_parent
    # keep only the first passing child of each node (sibling order = index order)
    idx = torch.arange(n, device=dev)
    earlier = ((trees.parents[:, :, None] == trees.parents[:, None, :]) & (idx[None, :] < idx[:, None])
               & passes[:, None, :])
    ok = (passes & ~earlier.any(-1)) | (idx == 0)
    path, accept_len, last = _path_from_mask(trees, ok)
    next_token = _rows(probs, last).argmax(-1)
    res = _finish(trees, path, accept_len, next_token, torch.zeros(path.shape, dtype=probs.dtype, device=dev))
    # greedy "shift": 1 where the emitted token is not argmax p at its node
    tvd = (res.emitted != probs.gather(1, path[..., None].expand(-1, -1, probs.shape[-1])).argmax(-1))
    res.node_tvd = torch.where(torch.arange(path.shape[1], device=dev) <= accept_len[:, None],
                               tvd.to(probs.dtype), 0.0)
    return res


def _verify_all_nodes(trees: TreeBatch, probs: torch.Tensor, cfg: AcceptConfig, neighbours: torch.Tensor | None,
                      u_sib: torch.Tensor, u_next: torch.Tensor, measure_shift: bool) -> BatchVerifyResult:
    """Every internal node's sibling test at once (each against its own pre-drawn uniforms), then the accepted
    root path by one ancestry reduction: a fixed number of ops whatever the batch, tree size or depth."""
    batch, n, _ = trees.children.shape
    dev = probs.device
    rows = trees.internal
    draft = cast(trees.draft_probs, probs.dtype) if trees.draft_probs is not None else None
    if rows is None:
        ch, p, q, u = trees.children, probs, draft, u_sib
    else:
        ch, p, u = trees.children[:, rows], probs[:, rows], u_sib[:, rows]
        q = draft[:, rows] if draft is not None else None
    cmask = ch >= 0
    toks = trees.tokens.gather(1, ch.clamp(min=0).flatten(1)).view(ch.shape)
    want_law = cfg.enabled and measure_shift
    rank, res, law = _sibling_chain(p, q, toks, cfg, neighbours, None, cmask, want_law=want_law, uniforms=u)
    if rows is None:
        acc_rank, res_of = rank, None
    else:
        acc_rank = torch.full((batch, n), -1, dtype=torch.long, device=dev).index_copy_(1, rows, rank)
        res_of = torch.full((n,), -1, dtype=torch.long, device=dev).index_copy_(
            0, rows, torch.arange(rows.numel(), device=dev))  # node -> row of the tested block
    ok = ((trees.parents >= 0) & (acc_rank.gather(1, trees.parents.clamp(min=0)) == trees.child_rank)
          | (torch.arange(n, device=dev) == 0))
    path, accept_len, last = _path_from_mask(trees, ok)
    if res_of is None:
        final = _rows(res, last)  # a leaf's row was never advanced: it is p
    else:
        row = res_of[last]
        final = torch.where((row >= 0)[:, None], _rows(res, row.clamp(min=0)), _rows(probs, last))
    next_token = sample_with_uniforms(final, u_next)
    tvd_nodes = torch.zeros(batch, n, dtype=probs.dtype, device=dev)
    if law is not None:  # the realised shift of every node's emitted token (see node_tvd)
        tvd_rows = torch.where(cmask.any(-1), _shift(law, p, q, toks, cmask), 0.0)
        tvd_nodes = tvd_rows if rows is None else tvd_nodes.index_copy_(1, rows, tvd_rows)
    return _finish(trees, path, accept_len, next_token, tvd_nodes.gather(1, path))


def _verify_by_level(trees: TreeBatch, probs: torch.Tensor, cfg: AcceptConfig, neighbours: torch.Tensor | None,
                     u_sib: torch.Tensor, u_next: torch.Tensor, measure_shift: bool) -> BatchVerifyResult:
    """The walk from the root, one depth level per step, every prompt's sibling test of the level in one call."""
    batch = trees.batch_size
    dev = probs.device
    draft = cast(trees.draft_probs, probs.dtype) if trees.draft_probs is not None else None
    want_law = cfg.enabled and measure_shift
    cur = torch.zeros(batch, dtype=torch.long, device=dev)
    alive = torch.ones(batch, dtype=torch.bool, device=dev)
    final = probs[:, 0]
    path, attempted, accepted, tvds = [cur], [], [], []
    for _ in range(trees.max_depth):
        ch = _rows(trees.children, cur)  # (B, C)
        cmask = ch >= 0
        toks = trees.tokens.gather(1, ch.clamp(min=0))
        p_cur = _rows(probs, cur)
        q_cur = _rows(draft, cur) if draft is not None else None
        rank, res, law = _sibling_chain(p_cur, q_cur, toks, cfg, neighbours, None, cmask, want_law=want_law,
                                        uniforms=_rows(u_sib, cur))
        tested = alive & cmask.any(-1)
        if law is not None:
            tvds.append(torch.where(tested, _shift(law, p_cur, q_cur, toks, cmask), 0.0))
        acc = tested & (rank >= 0)
        stop_res = torch.where(tested[:, None], res, p_cur)  # a leaf samples from p
        final = torch.where((alive & ~acc)[:, None], stop_res, final)
        cur = torch.where(acc, ch.gather(1, rank.clamp(min=0)[:, None]).squeeze(1), cur)
        path.append(cur)  # a stopped prompt repeats its last node: the padded path
        attempted.append(tested)
        accepted.append(acc)
        alive = acc
    final = torch.where(alive[:, None], _rows(probs, cur), final)  # reached max depth: a leaf
    next_token = sample_with_uniforms(final, u_next)
    path = torch.stack(path, 1)
    if trees.max_depth:
        accept_len = torch.stack(accepted, 1).long().sum(1)
        attempted = torch.stack(attempted, 1)
    else:
        accept_len = torch.zeros(batch, dtype=torch.long, device=dev)
        attempted = torch.zeros(batch, 0, dtype=torch.bool, device=dev)
    tvd = torch.zeros(path.shape, dtype=probs.dtype, device=dev)
    if tvds:
        tvd[:, :-1] = torch.stack(tvds, 1)
    return _finish(trees, path, accept_len, next_token, tvd, attempted)


def verify_trees(
    trees: TreeBatch,
    target_probs: torch.Tensor,
    cfg: AcceptConfig,
    neighbours: torch.Tensor | None = None,
    greedy: bool = False,
    generators=None,
    measure_shift: bool = True,
    all_nodes: bool = True,
) -> BatchVerifyResult:
    """Verify every prompt's tree of the batch in one call: the rule of :func:`verify_tree`, batched.

    ``target_probs[b, i]`` (B, n, V) is the processed target p for the children of node i of prompt b.
    Node i's sibling test (static: :func:`static_sibling_test`, children sampled without replacement from
    ``draft_probs[b, i]``; dynamic: :func:`dynamic_sibling_test`) reads the uniforms ``u[b, i, :]`` drawn up
    front by :func:`tree_uniforms` from prompt b's own generator; the next token is drawn by inverting the CDF
    of the final distribution at one more uniform of that prompt. Because a node's test depends only on its
    own p, q, children and uniforms, two schedules give the same outcome for the same draws:

    * ``all_nodes`` (default): every internal node's sibling test in one batched computation, then the
      accepted path from the root as one ancestry reduction (no loop over depth): a fixed number of ops;
    * per depth level (``all_nodes=False``): the walk from the root, all prompts' tests of the level in one
      call — depth times more ops but only the visited nodes' work, for a vocabulary so large that the
      (internal nodes × V) tensors of the all-nodes test cost more than the dispatch they save. On the demo
      (V = 1,024, CPU, one thread) all-nodes is faster for the EAGLE-2 tree too (issue 8 report).

    Greedy: :func:`greedy_accept` for every node at once, the longest chain of first-passing children, argmax.
    Half-precision probabilities are upcast to float32. ``measure_shift``: the realised per-node TVD.
    """
    if target_probs.dtype in (torch.float16, torch.bfloat16):
        target_probs = target_probs.float()
    if target_probs.shape[:2] != trees.tokens.shape:
        raise ValueError(f"target_probs has shape {tuple(target_probs.shape)} for trees of {tuple(trees.tokens.shape)}")
    if cfg.needs_neighbours and neighbours is None:
        raise ValueError("relaxed acceptance needs a neighbour table")
    if greedy:
        return _verify_greedy_batch(trees, target_probs, cfg, neighbours)
    u_sib, u_next = tree_uniforms(trees, generators, target_probs.device, target_probs.dtype)
    if trees.internal is None:  # trees of this round only (dynamic, chains): one host look at their shape
        n_child = (trees.children >= 0).sum(-1)  # (B, n)
        width, depth = torch.stack([n_child.max(), trees.depths.max()]).tolist()
        internal = (n_child > 0).any(0).nonzero().squeeze(1) if all_nodes else None
        # sibling slots no node uses and rows without children are skipped (the draws stay as drawn)
        trees = replace(trees, children=trees.children[..., :width], max_depth=min(trees.max_depth, depth),
                        internal=internal if internal is not None and 0 < internal.numel() < n_child.shape[1]
                        else None)
        u_sib = u_sib[..., :width]
    run = _verify_all_nodes if all_nodes else _verify_by_level
    return run(trees, target_probs, cfg, neighbours, u_sib, u_next, measure_shift)


def verify_tree(
    tree: DraftTree,
    target_probs: torch.Tensor,
    cfg: AcceptConfig,
    neighbours: torch.Tensor | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    measure_shift: bool = True,
) -> VerifyResult:
    """Walk the tree from the root, accepting at most one child per level, and pick the next token.

    ``target_probs[i]`` (n, V) is the processed target distribution p for the children of node i (what the
    target predicts at node i). At the current node the children are tested in drafting order with
    :func:`static_sibling_test` (``tree.draft_probs`` given: children were sampled without replacement from
    ``draft_probs[node]``) or :func:`dynamic_sibling_test` (deterministic drafts); the walk moves to the
    accepted child. Where no child is accepted the next token is drawn from the final residual; at a leaf
    (or the node reached at max depth) from p. Greedy: :func:`greedy_accept` for all nodes at once, then the
    longest chain of first-passing children; the next token is argmax p at its end.

    One tree of :func:`verify_trees` (the same code and the same draws from ``generator``: n·C + 1 uniforms,
    C the widest node). Half-precision probabilities are upcast to float32. ``measure_shift`` computes
    ``VerifyResult.node_tvd`` (exact laws per node on the path; with relaxation off it is 0 without work).
    """
    if target_probs.shape[0] != tree.num_nodes:
        raise ValueError(f"target_probs has {target_probs.shape[0]} rows for a tree of {tree.num_nodes} nodes")
    res = verify_trees(stack_trees([tree]), target_probs[None], cfg, neighbours, greedy, generator, measure_shift)
    return res.result(0)
