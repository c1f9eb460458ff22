r"""Grouped acceptance (GSD, So et al., arXiv 2508.07747, ICCV 2025) as an acceptance option of the one verifier.

Notation as everywhere here: **p = target**, **q = drafter** (for Jacobi drafts q is the target's distribution
from the previous Jacobi iteration, see :mod:`models.drafters.jacobi`).

The paper's idea (facts from its abstract and summaries; its full method section could not be retrieved with
the search tool in this session, so the exact group definition below is *our reading* and says so): image
tokens are redundant and diverse — many codes are visually valid next tokens — so a draft x should be judged
against the target mass of a **group of visually valid tokens** around x, not against p(x) alone; a static
group from embedding distance alone works poorly, which motivates a *dynamic* group that also depends on the
current target distribution. Our rule::

    G_p        = the ``group`` most probable tokens under p (the dynamic part: it changes with p)
    C(x)       = {x} ∪ {N_i(x) : i ≤ k, N_i(x) ∈ G_p}      (N_i = latent neighbours in distance order)
    p̃(x)       = p(C(x)) = p(x) + Σ_{y ∈ C(x) \ {x}} p(y)
    accept x with probability min(1, p̃(x) / q(x));   on rejection r = normalise(max(0, P̃_x − q))

P̃_x moves the mass of C(x) \ {x} onto x, exactly like LANTERN's P̃ (SPEC §3), so the existing sibling tests
(:func:`~models.drafters.acceptance.static_sibling_test`, dynamic and greedy) run unchanged: this module only
supplies (p̃(x), aggregated set). Unlike LANTERN there is no TVD budget: TVD(p, P̃_x) = p(C(x) \ {x}) is
bounded only by the group (≤ the mass of the ``group`` most likely tokens other than x); the method is relaxed
(lossy) and ``tests/test_sjd.py`` measures its TVD from p on a small case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .acceptance import AcceptConfig

__all__ = ["GroupedAcceptConfig", "grouped_relaxed"]


def grouped_relaxed(
    target_probs: torch.Tensor, cand: torch.Tensor, neighbours: torch.Tensor, k: int, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """GSD's relaxed mass and group, vectorised over candidates.

    Args:
        target_probs: (..., V) target (or residual) distribution p.
        cand: (...,) candidate tokens x.
        neighbours: (V, K) latent neighbour table (distance order, -1 = none); the first ``k`` columns are used.
        k: neighbours of x that may join its group.
        group: size of the dynamic set G_p (the ``group`` most probable tokens of p).

    Returns:
        ``(p̃(x) (...,), mask (..., V))`` with mask = C(x) (always contains x).
    """
    cand = cand.long()
    table = neighbours[:, :k].to(device=cand.device, dtype=torch.long)
    inside = cand < table.shape[0]  # ids past the table (e.g. Chameleon's non-candidate ids) have no neighbours
    nb = torch.where(inside.unsqueeze(-1), table[cand.clamp(max=table.shape[0] - 1)], -1)  # (..., k)
    valid = nb >= 0
    top = torch.topk(target_probs, min(group, target_probs.shape[-1]), dim=-1).indices  # (..., G)
    in_top = torch.zeros(target_probs.shape, dtype=torch.bool, device=target_probs.device).scatter(-1, top, True)
    member = valid & in_top.gather(-1, nb.clamp(min=0)) & (target_probs.gather(-1, nb.clamp(min=0)) > 0)
    mask = torch.zeros(target_probs.shape, dtype=torch.bool, device=target_probs.device)
    mask.scatter_(-1, torch.where(member, nb, cand.unsqueeze(-1)), True)
    mask.scatter_(-1, cand.unsqueeze(-1), True)
    return (target_probs * mask).sum(-1), mask


@dataclass(frozen=True)
class GroupedAcceptConfig(AcceptConfig):
    """GSD acceptance: ``group`` = |G_p|, ``k`` = neighbours of x considered. Used wherever an
    :class:`AcceptConfig` is (the verifier calls :meth:`relaxed_for`)."""

    group: int = 10

    def __post_init__(self) -> None:
        if self.k < 1 or self.group < 1:
            raise ValueError(f"GSD needs k >= 1 neighbours and group >= 1, got k={self.k}, group={self.group}")

    @property
    def enabled(self) -> bool:
        return True

    def relaxed_for(
        self, target_probs: torch.Tensor, cand: torch.Tensor, neighbours: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if neighbours is None:
            raise ValueError("GSD needs a neighbour table (generate_codebook)")
        return grouped_relaxed(target_probs, cand, neighbours, self.k, self.group)
