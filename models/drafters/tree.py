"""One draft-tree description shared by the static (choice-list) and dynamic (EAGLE-2) builders.

Node 0 is the root: the last committed token, sampled by the target (p) but not yet fed to it. Nodes 1..n-1
are drafted tokens (from the drafter, q). Parents always have a smaller index than their children, and the
children of one node are ordered by node index, which is their drafting order (top-k rank for dynamic trees,
sampling order for static trees). The verifier (:func:`models.drafters.acceptance.verify_tree`) consumes
:class:`DraftTree` only; how the tree was built does not matter to it.

Everything here is structure-only tensor code: per decoding step nothing loops over nodes in Python; the loops
that remain run over depth levels (≤ max depth, typically 4–6).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .choices import validate_tree_choices

__all__ = [
    "DraftTree",
    "StaticTreeTemplate",
    "build_tree",
    "children_table",
    "select_dynamic_tree",
    "tree_position_ids",
]


@dataclass
class DraftTree:
    """A draft tree ready for verification.

    Attributes:
        tokens: (n,) token ids; node 0 = root = last committed token, nodes 1.. are drafts.
        parents: (n,) parent node index, root = -1; ``parents[i] < i``.
        depths: (n,) depth, root 0.
        tree_mask: (n, n) bool, ``[i, j]`` True iff j is i or an ancestor of i (the attention a node may use
            inside the tree, on top of the committed prefix).
        retrieve_paths: (n_leaves, max_depth + 1) node indices root..leaf for every leaf (leaves in index
            order), right-padded with -1.
        draft_probs: static trees only: (n, V) drafter distribution Q at node i from which node i's children
            were sampled *without replacement* (sibling order = sampling order). None for dynamic trees,
            whose drafts are deterministic (top-k), i.e. q(x) = 1.
        source_index: optional (n,) index of each node in the builder's candidate list (root = -1); set by
            :func:`select_dynamic_tree` so the drafter can find the hidden states of kept nodes.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    tree_mask: torch.Tensor
    retrieve_paths: torch.Tensor
    draft_probs: torch.Tensor | None = None
    source_index: torch.Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def max_depth(self) -> int:
        return int(self.retrieve_paths.shape[1]) - 1

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def to(self, device: torch.device | str) -> DraftTree:
        """A copy with every tensor on ``device``."""
        return DraftTree(
            tokens=self.tokens.to(device),
            parents=self.parents.to(device),
            depths=self.depths.to(device),
            tree_mask=self.tree_mask.to(device),
            retrieve_paths=self.retrieve_paths.to(device),
            draft_probs=None if self.draft_probs is None else self.draft_probs.to(device),
            source_index=None if self.source_index is None else self.source_index.to(device),
        )


# ---------------------------------------------------------------------------------------------------------
# Structure helpers (pure functions of ``parents``)
# ---------------------------------------------------------------------------------------------------------


def _check_parents(parents: torch.Tensor) -> None:
    if parents.ndim != 1 or parents.numel() == 0:
        raise ValueError("parents must be a non-empty 1-D tensor")
    if int(parents[0]) != -1:
        raise ValueError("node 0 must be the root (parent -1)")
    idx = torch.arange(parents.numel(), device=parents.device)
    if bool(((parents[1:] < 0) | (parents[1:] >= idx[1:])).any()):
        raise ValueError("every non-root node needs a parent with a smaller index")


def _ancestry(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(depths (n,), tree_mask (n, n)) by pointer walking: one vectorised step per depth level."""
    n = parents.numel()
    dev = parents.device
    rows = torch.arange(n, device=dev)
    tree_mask = torch.eye(n, dtype=torch.bool, device=dev)
    depths = torch.zeros(n, dtype=torch.long, device=dev)
    anc = parents.clone()
    for _ in range(n):  # terminates after max_depth steps
        has = anc >= 0
        if not bool(has.any()):
            break
        tree_mask[rows[has], anc[has]] = True
        depths += has.long()
        anc = torch.where(has, parents[anc.clamp(min=0)], anc)
    return depths, tree_mask


def _retrieve_paths(parents: torch.Tensor, depths: torch.Tensor, tree_mask: torch.Tensor) -> torch.Tensor:
    n = parents.numel()
    n_children = torch.bincount(parents[1:], minlength=n) if n > 1 else torch.zeros_like(parents)
    leaves = (n_children == 0).nonzero().squeeze(1)
    max_depth = int(depths.max())
    paths = torch.full((leaves.numel(), max_depth + 1), -1, dtype=torch.long, device=parents.device)
    leaf_row, node = tree_mask[leaves].nonzero(as_tuple=True)  # ancestors (incl. self) of each leaf
    paths[leaf_row, depths[node]] = node
    return paths


def children_table(parents: torch.Tensor) -> torch.Tensor:
    """(n, max_children) children of each node in sibling (= index) order, right-padded with -1."""
    n = parents.numel()
    dev = parents.device
    if n == 1:
        return torch.full((1, 0), -1, dtype=torch.long, device=dev)
    child = torch.arange(1, n, device=dev)
    par = parents[1:]
    # rank among siblings = number of earlier nodes with the same parent (n ≤ a few hundred: n² is cheap)
    same = (par[:, None] == par[None, :]) & (child[None, :] < child[:, None])
    rank = same.sum(1)
    width = int(rank.max()) + 1
    table = torch.full((n, width), -1, dtype=torch.long, device=dev)
    table[par, rank] = child
    return table


def build_tree(tokens: torch.Tensor, parents: torch.Tensor, draft_probs: torch.Tensor | None = None) -> DraftTree:
    """Build a :class:`DraftTree` from tokens (n,) and parents (n,) (root first, ``parents[i] < i``).

    Depths, ``tree_mask`` and ``retrieve_paths`` are computed with one vectorised step per depth level.
    ``draft_probs`` (n, V) marks a static (sampled) tree; leave it None for deterministic dynamic trees.
    """
    parents = parents.to(device=tokens.device, dtype=torch.long)
    if tokens.shape != parents.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and parents {tuple(parents.shape)} differ in shape")
    _check_parents(parents)
    if draft_probs is not None and draft_probs.shape[0] != tokens.shape[0]:
        raise ValueError("draft_probs must have one row per tree node")
    depths, tree_mask = _ancestry(parents)
    return DraftTree(
        tokens=tokens.long(),
        parents=parents,
        depths=depths,
        tree_mask=tree_mask,
        retrieve_paths=_retrieve_paths(parents, depths, tree_mask),
        draft_probs=draft_probs,
    )


def tree_position_ids(tree: DraftTree, prefix_len: int | torch.Tensor) -> torch.Tensor:
    """Position ids of the tree nodes for the target forward: ``prefix_len + depth`` (n,).

    ``prefix_len`` is the number of tokens already in the KV cache, so the root sits at ``prefix_len``.
    """
    return tree.depths + prefix_len


# ---------------------------------------------------------------------------------------------------------
# Static trees: structure precomputed once per choice list
# ---------------------------------------------------------------------------------------------------------

_TEMPLATE_CACHE: dict[tuple[tuple[int, ...], ...], StaticTreeTemplate] = {}


@dataclass(frozen=True)
class StaticTreeTemplate:
    """Precomputed structure of a static tree (choice list); per step only the tokens change.

    Nodes are numbered root first, then by (depth, path) so that parents precede children and siblings are
    in rank order (rank r = r-th child sampled without replacement from the drafter's Q at the parent).

    Attributes:
        choices: the paths, in node order (node i + 1 ↔ ``choices[i]``).
        parents, depths, child_rank: (n,) structure; root's child_rank is -1.
        tree_mask, retrieve_paths: as in :class:`DraftTree`.
        children: (n, max_children) children per node in rank order, padded with -1.
        num_children: (n,) number of children per node (how many tokens to sample at each node).
        depth_offsets: (max_depth + 2,) nodes of depth d are ``depth_offsets[d] : depth_offsets[d + 1]``.
    """

    choices: tuple[tuple[int, ...], ...]
    parents: torch.Tensor
    depths: torch.Tensor
    child_rank: torch.Tensor
    tree_mask: torch.Tensor
    retrieve_paths: torch.Tensor
    children: torch.Tensor
    num_children: torch.Tensor
    depth_offsets: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return int(self.parents.shape[0])

    @property
    def max_depth(self) -> int:
        return int(self.retrieve_paths.shape[1]) - 1

    @classmethod
    def from_choices(cls, choices: Sequence[Sequence[int]]) -> StaticTreeTemplate:
        """Validate ``choices`` and precompute the structure (cached per choice list, on CPU)."""
        paths = validate_tree_choices(choices)
        ordered = tuple(sorted((tuple(p) for p in paths), key=lambda p: (len(p), p)))
        cached = _TEMPLATE_CACHE.get(ordered)
        if cached is not None:
            return cached
        # One-off per template: a Python pass over the (≤ a few hundred) paths is fine here.
        index = {p: i + 1 for i, p in enumerate(ordered)}
        parents = torch.tensor([-1] + [index.get(p[:-1], 0) for p in ordered], dtype=torch.long)
        child_rank = torch.tensor([-1] + [p[-1] for p in ordered], dtype=torch.long)
        depths, tree_mask = _ancestry(parents)
        n = parents.numel()
        max_depth = int(depths.max())
        tmpl = cls(
            choices=ordered,
            parents=parents,
            depths=depths,
            child_rank=child_rank,
            tree_mask=tree_mask,
            retrieve_paths=_retrieve_paths(parents, depths, tree_mask),
            children=children_table(parents),
            num_children=torch.bincount(parents[1:], minlength=n),
            depth_offsets=torch.searchsorted(depths, torch.arange(max_depth + 2)),
        )
        _TEMPLATE_CACHE[ordered] = tmpl
        return tmpl

    def to(self, device: torch.device | str) -> StaticTreeTemplate:
        """A copy with every tensor on ``device``."""
        fields = {
            name: getattr(self, name).to(device)
            for name in (
                "parents", "depths", "child_rank", "tree_mask", "retrieve_paths", "children", "num_children",
                "depth_offsets",
            )
        }  # fmt: skip
        return replace(self, **fields)

    def make_tree(self, tokens: torch.Tensor, draft_probs: torch.Tensor | None = None) -> DraftTree:
        """Fill the template with ``tokens`` (n,) (root first, node order) and the drafter's Q rows (n, V).

        The structure follows ``tokens``' device; call :meth:`to` once so this is not a copy per step.
        """
        if tokens.shape != self.parents.shape:
            raise ValueError(f"expected {self.num_nodes} tokens, got {tuple(tokens.shape)}")
        dev = tokens.device
        return DraftTree(
            tokens=tokens.long(),
            parents=self.parents.to(dev),
            depths=self.depths.to(dev),
            tree_mask=self.tree_mask.to(dev),
            retrieve_paths=self.retrieve_paths.to(dev),
            draft_probs=draft_probs,
        )


# ---------------------------------------------------------------------------------------------------------
# Dynamic trees (EAGLE-2): rerank all expanded candidates
# ---------------------------------------------------------------------------------------------------------


def select_dynamic_tree(
    cand_tokens: torch.Tensor,
    cand_parents: torch.Tensor,
    cand_scores: torch.Tensor,
    total_token: int,
    root_token: int | torch.Tensor | None = None,
) -> DraftTree:
    """EAGLE-2 reranking: keep the best ``total_token - 1`` expanded candidates as the draft tree.

    Args:
        cand_tokens: (M,) drafted token of every expanded candidate.
        cand_parents: (M,) index of the candidate's parent in this list, -1 for children of the root.
        cand_scores: (M,) cumulative draft log-probability (log q along the path).
        total_token: tree size including the root (the original's default is 59 = 58 drafts + root).
        root_token: the root's token id (last committed token). If None, ``tokens[0]`` is -1 and the caller
            must fill it in before feeding the tree to the target.

    Selection: candidates are ranked by score (descending; ties → lower candidate index). A node may only be
    kept after all its ancestors, so each node's *effective rank* is the worst own-rank on its root path,
    and nodes are taken in (effective rank, depth, own rank) order. With log-probs ≤ 0 a child never scores
    above its parent, so this is exactly the plain top-(total_token − 1) by score, and the kept set is always
    closed under ancestors. The kept nodes are renumbered by (depth, candidate index), so parents precede
    children and siblings keep their drafting (top-k) order. ``draft_probs`` is None (deterministic drafts).
    """
    dev = cand_tokens.device
    cand_parents = cand_parents.to(device=dev, dtype=torch.long)
    m = cand_tokens.numel()
    keep = max(0, min(int(total_token) - 1, m))

    own_rank = torch.empty(m, dtype=torch.long, device=dev)
    order = torch.sort(cand_scores.to(dev), descending=True, stable=True).indices
    own_rank[order] = torch.arange(m, device=dev)

    eff_rank = own_rank.clone()
    depth = torch.ones(m, dtype=torch.long, device=dev)  # depth in the final tree (root = 0)
    anc = cand_parents.clone()
    for _ in range(m):  # one step per depth level
        has = anc >= 0
        if not bool(has.any()):
            break
        a = anc.clamp(min=0)
        eff_rank = torch.where(has, torch.maximum(eff_rank, own_rank[a]), eff_rank)
        depth += has.long()
        anc = torch.where(has, cand_parents[a], anc)
    else:
        if m and bool((anc >= 0).any()):
            raise ValueError("cand_parents contains a cycle")

    # lexicographic (eff_rank, depth, own_rank) packed into one int64 key; every field is < m + 1
    base = m + 1
    key = (eff_rank * base + depth) * base + own_rank
    chosen = torch.sort(key).indices[:keep]
    chosen = chosen[torch.sort(depth[chosen] * base + chosen).indices]  # renumber: (depth, candidate index)

    new_index = torch.full((m,), -1, dtype=torch.long, device=dev)
    new_index[chosen] = torch.arange(1, keep + 1, device=dev)
    cp = cand_parents[chosen]
    new_parents = torch.where(cp >= 0, new_index[cp.clamp(min=0)], torch.zeros_like(cp))

    if root_token is None:
        root = torch.full((1,), -1, dtype=torch.long, device=dev)
    else:
        root = torch.as_tensor(root_token, dtype=torch.long, device=dev).reshape(1)
    tokens = torch.cat([root, cand_tokens[chosen].long()])
    parents = torch.cat([torch.full((1,), -1, dtype=torch.long, device=dev), new_parents])
    depths, tree_mask = _ancestry(parents)
    return DraftTree(
        tokens=tokens,
        parents=parents,
        depths=depths,
        tree_mask=tree_mask,
        retrieve_paths=_retrieve_paths(parents, depths, tree_mask),
        draft_probs=None,
        source_index=torch.cat([torch.full((1,), -1, dtype=torch.long, device=dev), chosen]),
    )
