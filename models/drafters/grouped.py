r"""Grouped Speculative Decoding (GSD; So, Shin, Kook, Park, arXiv 2508.07747, ICCV 2025) as an acceptance option
of the one verifier (:mod:`models.drafters.acceptance`).

Notation as everywhere here: **p = target**, **q = draft distribution** (for Jacobi drafts q is the target's
distribution from the previous Jacobi iteration, :mod:`models.drafters.jacobi`).

Idea (paper, abstract and introduction): image tokens are redundant and diverse — many codes are valid next
tokens — so a draft x is judged by the mass of a **group of visually valid tokens** around it rather than by
p(x) alone; a static group from embedding distance alone works poorly, hence a *dynamic* group that also
depends on the current target distribution.

The rule, as the authors' public code implements it (``scheduler/jacobi_iteration_lumina_mgpt.py`` of
github.com/junhyukso/GSD, ``SpeculativeSampler.__call__`` and ``_sample``; read for the facts only). For a draft
x at a position with target p and draft distribution q::

    rank          the target's processed logits sorted ascending; c = the position of x in that order
    W(x)          the tokens at sorted positions c−w … c+w−1 (w = 7: the 7 next *less* likely tokens, x, and
                  the 6 next *more* likely ones; ``logit_sort[c-7:c+7]``)
    G(x)          {y ∈ W(x) : |p(y) − p(x)| < τ_p  and  ‖e(y) − e(x)‖² < τ_d}       (τ_p = 0.15, τ_d = 0.5)
    accept x with probability  min(1, p(G(x)) / q(G(x)))
    on rejection resample from normalise(max(0, p − q))      (the plain speculative residual, not a relaxed one)

e(·) is the **target model's input token embedding** (``self.model.embed_tokens.weight``, rows 0..9999, which
cover Chameleon's image ids 4..8195) and ‖·‖² the *squared Euclidean distance* (the code names it
``head_img_sims`` but computes ‖a‖² + ‖b‖² − 2a·b; the VQ codebook is not used). x is always in G(x) (gap 0,
distance 0), so q(G) ≥ q(x) > 0 for a drawn draft. The group is built on p (ranks, gap) and its mass taken
under both p and q.

Our choices where the code has accidents (none changes a group containing only image tokens of positive p):

* ties in p (e.g. the −inf logits outside the target's top-k) are ordered by a *stable* sort (lower id first);
  the original's ``torch.sort`` leaves their order unspecified;
* the window is clipped to the vocabulary; the original's slice ``[c−7 : c+7]`` with c < 7 is empty, which
  raises inside its ``try`` and falls back to the plain min(1, p(x)/q(x)) (only x among the 7 *least* likely
  tokens of the whole vocabulary, i.e. p(x) ≈ 0);
* a token without an embedding row (ids past the candidate ids, e.g. Chameleon text tokens, p = 0 at image
  positions) never joins a group; the original instead switches the distance test off for the whole group
  when the window holds an id ≥ 10000 (possible only next to the top-k cut-off, among p = 0 ties);
* after a rejection the original passes log max(0, p − q) through its logits processors again (top-k); the
  residual's support is already inside p's, so top-k changes nothing and we skip it.

Greedy decoding (temperature 0, p and q point masses): G(x) = {x} when x = argmax p (every other token has
gap 1), and p(G(x)) = 0 otherwise (argmax p fails the gap test), so greedy GSD **is** greedy AR; the verifier's
greedy path therefore uses the exact test (:meth:`GroupedAcceptConfig.relaxed_for`).

GSD is relaxed (lossy): the token a test emits is distributed as

    O = Σ_x q(x)·a(x)·δ_x + (1 − Σ_x q(x)·a(x))·normalise(max(0, p − q)),   a(x) = min(1, p(G(x))/q(G(x)))

(the residual does not depend on x), which :func:`gsd_output_law` computes exactly; with every G(x) = {x} it is
p. There is no TVD budget: TVD(O, p) depends on p, q and the groups; ``tests/test_gsd.py`` measures it.

The thresholds are absolute numbers for the scale of Lumina-mGPT's (Chameleon 7B's) input embeddings; a model
whose embeddings have another scale needs its own ``--gsd_dist`` (with tiny random-weight models every
distance is below 0.5 and the distance test never removes anyone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .acceptance import AcceptConfig

__all__ = ["GSD_RANK_WINDOW", "GSD_PROB_GAP", "GSD_DIST", "GroupedAcceptConfig", "gsd_group_mask",
           "gsd_accept_prob", "gsd_residual", "gsd_output_law", "token_embedding_table", "gsd_config_for"]

# the authors' values (scheduler/jacobi_iteration_lumina_mgpt.py: cur_idx-7:cur_idx+7, p_thr, d_thr)
GSD_RANK_WINDOW = 7
GSD_PROB_GAP = 0.15
GSD_DIST = 0.5
_EPS = 1e-12


def gsd_group_mask(
    target_probs: torch.Tensor,
    cand: torch.Tensor,
    embeddings: torch.Tensor,
    rank_window: int = GSD_RANK_WINDOW,
    prob_gap: float = GSD_PROB_GAP,
    max_dist: float = GSD_DIST,
) -> torch.Tensor:
    """GSD's group G(x) (..., V) bool, vectorised over candidates (module docstring for the rule).

    W(x) = the tokens whose rank in p (descending, stable) is r(x) − (w − 1) … r(x) + w, i.e. w − 1 more likely
    and w less likely tokens around x (the original's ascending slice ``[c − w : c + w]``), clipped to the
    vocabulary; y ∈ W(x) joins when ``|p(y) − p(x)| < prob_gap`` and ``‖e(y) − e(x)‖² < max_dist``. x is always
    a member; w = 0 gives G(x) = {x} (the exact test).

    Args:
        target_probs: (..., V) target (or residual) distribution p.
        cand: (...,) draft tokens x.
        embeddings: (R, D) the target's input embeddings of ids 0..R−1 (R ≤ V); ids ≥ R never join a group.
    """
    cand = cand.long()
    vocab = target_probs.shape[-1]
    x = cand.unsqueeze(-1)
    mask = torch.zeros(target_probs.shape, dtype=torch.bool, device=target_probs.device).scatter_(-1, x, True)
    if rank_window <= 0:
        return mask
    order = torch.sort(target_probs, dim=-1, descending=True, stable=True).indices  # rank 0 = likeliest
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(vocab, device=order.device).expand_as(order))
    offsets = torch.arange(-(rank_window - 1), rank_window + 1, device=order.device)
    pos = rank.gather(-1, x) + offsets  # (..., 2w)
    inside = (pos >= 0) & (pos < vocab)
    members = order.gather(-1, pos.clamp(0, vocab - 1))
    p_x = target_probs.gather(-1, x)
    close_in_p = (target_probs.gather(-1, members) - p_x).abs() < prob_gap
    rows = embeddings.shape[0]
    in_table = (members < rows) & (x < rows)
    e_y = embeddings[members.clamp(max=rows - 1)].float()  # (..., 2w, D)
    e_x = embeddings[cand.clamp(max=rows - 1)].float().unsqueeze(-2)
    close_in_e = ((e_y - e_x) ** 2).sum(-1) < max_dist
    ok = inside & close_in_p & in_table & close_in_e
    return mask.scatter_(-1, torch.where(ok, members, x), True)


def gsd_accept_prob(target_probs: torch.Tensor, draft_probs: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """min(1, p(G) / q(G)) (...,); 1 where q(G) = 0 < p(G) (cannot happen for a draft drawn from q)."""
    p_g = (target_probs * group).sum(-1)
    q_g = (draft_probs * group).sum(-1)
    return torch.where(q_g > 0, (p_g / q_g.clamp(min=_EPS)).clamp(max=1.0), (p_g > 0).to(p_g.dtype))


def gsd_residual(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """normalise(max(0, p − q)); p itself where that is empty (p = q, then nothing is ever rejected)."""
    res = (target_probs - draft_probs).clamp(min=0.0)
    s = res.sum(-1, keepdim=True)
    return torch.where(s > _EPS, res / s.clamp(min=_EPS), target_probs)


def gsd_output_law(target_probs: torch.Tensor, draft_probs: torch.Tensor, cfg: GroupedAcceptConfig) -> torch.Tensor:
    """Exact law (V,) of the token one GSD test emits when the draft is x ~ q (x summed out, module docstring).

    For small vocabularies (tests, analysis): builds G(x) for every x at once ((V, V) booleans)."""
    vocab = target_probs.shape[-1]
    xs = torch.arange(vocab, device=target_probs.device)
    groups = cfg.group_mask(target_probs.expand(vocab, -1), xs)
    a = gsd_accept_prob(target_probs.expand(vocab, -1), draft_probs.expand(vocab, -1), groups)
    kept = draft_probs * a
    return kept + (1.0 - kept.sum()) * gsd_residual(target_probs, draft_probs)


@dataclass(frozen=True)
class GroupedAcceptConfig(AcceptConfig):
    """GSD's acceptance: ``rank_window`` (w, 7), ``prob_gap`` (τ_p, 0.15), ``max_dist`` (τ_d, 0.5) and the
    target's input ``embeddings`` (R, D). Used wherever an :class:`AcceptConfig` is: the verifier's sibling
    chain calls :meth:`group_mask` (acceptance min(1, p(G)/q(G)), residual normalise(max(0, p − q))), the greedy
    path :meth:`relaxed_for` (the exact test, see the module docstring). Needs no neighbour table."""

    rank_window: int = GSD_RANK_WINDOW
    prob_gap: float = GSD_PROB_GAP
    max_dist: float = GSD_DIST
    embeddings: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.rank_window < 0 or not self.prob_gap >= 0 or not self.max_dist >= 0:
            raise ValueError(f"GSD needs rank_window >= 0, prob_gap >= 0 and max_dist >= 0, got {self.rank_window}, "
                             f"{self.prob_gap}, {self.max_dist}")
        if self.embeddings is not None and self.embeddings.dim() != 2:
            raise ValueError(f"GSD's token embeddings must be (ids, dim), got shape {tuple(self.embeddings.shape)}")

    @property
    def enabled(self) -> bool:
        return True

    @property
    def needs_neighbours(self) -> bool:
        return False

    @property
    def table_columns(self) -> int:
        return 0

    def group_mask(self, target_probs: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        if self.embeddings is None:
            raise ValueError("GSD needs the target's token embeddings (GroupedAcceptConfig(embeddings=...), "
                             "models.drafters.grouped.gsd_config_for)")
        return gsd_group_mask(target_probs, cand, self.embeddings, self.rank_window, self.prob_gap, self.max_dist)

    def relaxed_for(
        self, target_probs: torch.Tensor, cand: torch.Tensor, neighbours: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy path: (p(x), {x}) — on point masses GSD's test is the exact one (module docstring)."""
        x = cand.long().unsqueeze(-1)
        mask = torch.zeros(target_probs.shape, dtype=torch.bool, device=target_probs.device).scatter_(-1, x, True)
        return target_probs.gather(-1, x).squeeze(-1), mask


def token_embedding_table(target, vocab: int, allowed_tokens=None) -> torch.Tensor:
    """The target's input embeddings of ids 0..R−1 (R, D), R = the last id the family may sample + 1 (all of
    ``vocab`` without a mask). Chameleon: ~8.8 k image / newline / end ids of the 65 k vocabulary, as the
    original's first 10000 rows."""
    rows = vocab
    if allowed_tokens is not None:
        allowed = allowed_tokens.classes.any(0) if hasattr(allowed_tokens, "classes") else allowed_tokens
        rows = int(allowed.nonzero().max()) + 1
    device = target.lm_head.weight.device
    with torch.no_grad():
        return target.embed_tokens(torch.arange(rows, device=device)).detach()


def gsd_config_for(family, rank_window: int = GSD_RANK_WINDOW, prob_gap: float = GSD_PROB_GAP,
                   max_dist: float = GSD_DIST) -> GroupedAcceptConfig:
    """GSD's acceptance for a loaded family (its target's own token embeddings)."""
    target = family.target
    vocab = target.lm_head.weight.shape[0]
    emb = token_embedding_table(target, vocab, family.allowed_tokens)
    return GroupedAcceptConfig(rank_window=rank_window, prob_gap=prob_gap, max_dist=max_dist, embeddings=emb)
