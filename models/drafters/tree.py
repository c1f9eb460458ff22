"""One draft-tree description shared by the static (choice-list) and dynamic (EAGLE-2) builders.

Node 0 is the root: the last committed token, sampled by the target (p) but not yet fed to it. Nodes 1..n-1
are drafted tokens (from the drafter, q). Parents always have a smaller index than their children, and the
children of one node are ordered by node index, which is their drafting order (top-k rank for dynamic trees,
sampling order for static trees). The verifier consumes :class:`DraftTree` (one tree,
:func:`models.drafters.acceptance.verify_tree`) or :class:`TreeBatch` (every prompt's tree of a round, padded,
:func:`models.drafters.acceptance.verify_trees`); how the trees were built does not matter to it.

Everything here is structure-only tensor code: per decoding step nothing loops over nodes or prompts in Python;
the loops that remain run over depth levels (≤ max depth, typically 4–6), with a fixed count in the batched
functions (:func:`select_dynamic_trees`, :func:`batched_ancestry_mask`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .choices import validate_tree_choices

__all__ = [
    "DraftTree",
    "StaticTreeTemplate",
    "TreeBatch",
    "batched_ancestry_mask",
    "batched_children",
    "build_tree",
    "children_table",
    "select_dynamic_tree",
    "select_dynamic_trees",
    "stack_trees",
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


@dataclass
class TreeBatch:
    """The draft trees of B prompts, padded to n nodes: what the target forward and the verifier consume.

    Padding nodes (past a prompt's ``num_nodes``) are isolated: token 0, parent -1, depth 0, attend only to
    themselves, no children; nothing reads their outputs.

    Attributes:
        tokens, parents, depths: (B, n) as in :class:`DraftTree`.
        tree_mask: (B, n, n) bool, ancestry incl. self.
        children: (B, n, C) children per node in sibling order, -1 padded. C is fixed by the tree shape
            (the static template's widest node, the dynamic builder's top-k, 1 for chains), not by the batch,
            so a prompt's random draws (``C`` per node) do not depend on the batch it runs in.
        child_rank: (B, n) a node's rank among its siblings (root and padding: -1).
        num_nodes: real node count per prompt (host ints).
        max_depth: a bound on every tree's depth (host int).
        draft_probs: static trees: (B, n, V) drafter distribution Q at each node; None for dynamic trees.
        internal: optional (m,) node indices that may have children in any tree of the batch (a static
            template's internal nodes); the all-nodes verifier tests only these rows. None: every row.
        source_index: dynamic trees: (B, n) candidate index of each node (root -1).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    tree_mask: torch.Tensor
    children: torch.Tensor
    child_rank: torch.Tensor
    num_nodes: list[int]
    max_depth: int
    draft_probs: torch.Tensor | None = None
    internal: torch.Tensor | None = None
    source_index: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def width(self) -> int:
        return int(self.children.shape[-1])

    def tree(self, b: int) -> DraftTree:
        """Prompt b's tree as a :class:`DraftTree` (unpadded)."""
        m = self.num_nodes[b]
        parents, depths, tree_mask = self.parents[b, :m], self.depths[b, :m], self.tree_mask[b, :m, :m]
        return DraftTree(
            tokens=self.tokens[b, :m],
            parents=parents,
            depths=depths,
            tree_mask=tree_mask,
            retrieve_paths=_retrieve_paths(parents, depths, tree_mask),
            draft_probs=None if self.draft_probs is None else self.draft_probs[b, :m],
            source_index=None if self.source_index is None else self.source_index[b, :m],
        )


def batched_ancestry_mask(parents: torch.Tensor, levels: int) -> torch.Tensor:
    """(B, n, n) tree masks (ancestors incl. self) of parent tables (B, n), by ``levels`` pointer steps."""
    batch, n = parents.shape
    dev = parents.device
    self_idx = torch.arange(n, device=dev).expand(batch, n)
    tree_mask = torch.eye(n, dtype=torch.bool, device=dev).repeat(batch, 1, 1)
    tree_mask[:, :, 0] |= parents >= 0  # every node with a parent descends from the root: one step less
    anc = torch.where(parents > 0, parents, -1)
    for _ in range(max(levels - 1, 0)):
        has = anc >= 0
        # a node without a further ancestor marks itself again (already True)
        tree_mask.scatter_(2, torch.where(has, anc, self_idx).unsqueeze(-1), True)
        anc = torch.where(has, parents.gather(1, anc.clamp(min=0)), anc)
    return tree_mask


def batched_children(parents: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Children tables (B, n, width) in sibling (= index) order, -1 padded, and each node's sibling rank (B, n)
    (-1 for nodes without a parent). ``width`` None: the widest node of the batch (one host sync)."""
    batch, n = parents.shape
    dev = parents.device
    idx = torch.arange(n, device=dev)
    has = parents >= 0
    same = (parents[:, :, None] == parents[:, None, :]) & (idx[None, None, :] < idx[None, :, None])
    rank = torch.where(has, same.sum(-1), -1)
    if width is None:
        width = max(int(rank.max()) + 1, 0) if n > 1 else 0
    flat = torch.where(has & (rank < width), parents * width + rank, n * width)  # the dummy slot n·width
    table = torch.full((batch, n * width + 1), -1, dtype=torch.long, device=dev)
    table.scatter_(1, flat, idx.expand(batch, n))
    return table[:, : n * width].view(batch, n, width), rank


def stack_trees(trees: Sequence[DraftTree], width: int | None = None) -> TreeBatch:
    """A :class:`TreeBatch` of single trees (padded to the largest). ``width`` fixes the children-table width
    (None: the widest node over the batch)."""
    n = max(tr.num_nodes for tr in trees)
    dev = trees[0].device
    batch = len(trees)
    sizes = [tr.num_nodes for tr in trees]
    static = trees[0].draft_probs is not None
    if all(s == n for s in sizes):
        tokens = torch.stack([tr.tokens for tr in trees])
        parents = torch.stack([tr.parents for tr in trees])
        depths = torch.stack([tr.depths for tr in trees])
        tree_mask = torch.stack([tr.tree_mask for tr in trees])
        draft_probs = torch.stack([tr.draft_probs for tr in trees]) if static else None
    else:
        tokens = torch.zeros(batch, n, dtype=torch.long, device=dev)
        parents = torch.full((batch, n), -1, dtype=torch.long, device=dev)
        depths = torch.zeros(batch, n, dtype=torch.long, device=dev)
        tree_mask = torch.eye(n, dtype=torch.bool, device=dev).repeat(batch, 1, 1)
        draft_probs = (torch.zeros(batch, n, trees[0].draft_probs.shape[-1], device=dev,
                                   dtype=trees[0].draft_probs.dtype) if static else None)
        for i, tr in enumerate(trees):
            m = tr.num_nodes
            tokens[i, :m], parents[i, :m], depths[i, :m], tree_mask[i, :m, :m] = (
                tr.tokens, tr.parents, tr.depths, tr.tree_mask)
            if static:
                draft_probs[i, :m] = tr.draft_probs
    children, child_rank = batched_children(parents, width)
    return TreeBatch(tokens=tokens, parents=parents, depths=depths, tree_mask=tree_mask, children=children,
                     child_rank=child_rank, num_nodes=sizes, max_depth=max(tr.max_depth for tr in trees),
                     draft_probs=draft_probs)


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
    """(n, max_children) children of each node in sibling (= index) order, right-padded with -1 (one tree of
    :func:`batched_children`)."""
    return batched_children(parents[None])[0][0]


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
    One prompt of :func:`select_dynamic_trees`.
    """
    dev = cand_tokens.device
    root = torch.full((1,), -1, dtype=torch.long, device=dev) if root_token is None else (
        torch.as_tensor(root_token, dtype=torch.long, device=dev).reshape(1))
    batch = select_dynamic_trees(cand_tokens[None], cand_parents.to(dev)[None], cand_scores.to(dev)[None],
                                 total_token, root)
    return batch.tree(0)


def select_dynamic_trees(
    cand_tokens: torch.Tensor,
    cand_parents: torch.Tensor,
    cand_scores: torch.Tensor,
    total_token: int,
    root_tokens: torch.Tensor,
    levels: int | None = None,
    width: int | None = None,
) -> TreeBatch:
    """:func:`select_dynamic_tree` for B prompts at once: (B, M) candidates -> a :class:`TreeBatch` of B trees.

    The same selection and numbering, as a fixed number of batched ops: ranks by one stable sort, effective
    ranks and depths by ``levels`` pointer steps (the candidates' depth bound; None: walk until no ancestor is
    left, one host check per step), the kept set by one sort of the packed key, the tree mask by ``levels``
    more pointer steps. ``width`` is the children-table width (the builder's top-k, so it does not depend on
    the batch; None: the widest node).
    """
    dev = cand_tokens.device
    cand_parents = cand_parents.to(device=dev, dtype=torch.long)
    batch, m = cand_tokens.shape
    keep = max(0, min(int(total_token) - 1, m))
    arange_m = torch.arange(m, device=dev).expand(batch, m)
    order = torch.sort(cand_scores, dim=1, descending=True, stable=True).indices
    own_rank = torch.empty_like(order).scatter_(1, order, arange_m)

    eff_rank = own_rank
    depth = torch.ones(batch, m, dtype=torch.long, device=dev)  # depth in the final tree (root = 0)
    anc = cand_parents
    steps = range(levels - 1) if levels is not None else range(m)  # depth ≤ levels: ≤ levels − 1 ancestors
    for _ in steps:  # one step per depth level
        has = anc >= 0
        if levels is None and not bool(has.any()):
            break
        a = anc.clamp(min=0)
        eff_rank = torch.where(has, torch.maximum(eff_rank, own_rank.gather(1, a)), eff_rank)
        depth = depth + has.long()
        anc = torch.where(has, cand_parents.gather(1, a), anc)
    else:
        if levels is None and m and bool((anc >= 0).any()):
            raise ValueError("cand_parents contains a cycle")

    # lexicographic (eff_rank, depth, own_rank) packed into one int64 key; every field is < m + 1
    base = m + 1
    key = (eff_rank * base + depth) * base + own_rank
    chosen = torch.sort(key, dim=1).indices[:, :keep]
    renumber = torch.sort(depth.gather(1, chosen) * base + chosen, dim=1).indices  # (depth, candidate index)
    chosen = chosen.gather(1, renumber)

    new_index = torch.full((batch, m), -1, dtype=torch.long, device=dev)
    new_index.scatter_(1, chosen, torch.arange(1, keep + 1, device=dev).expand(batch, keep))
    cp = cand_parents.gather(1, chosen)
    new_parents = torch.where(cp >= 0, new_index.gather(1, cp.clamp(min=0)), 0)
    n = keep + 1
    head = torch.full((batch, 1), -1, dtype=torch.long, device=dev)
    tokens = torch.cat([root_tokens.to(dev).long().reshape(batch, 1), cand_tokens.gather(1, chosen).long()], 1)
    parents = torch.cat([head, new_parents], 1)
    depths = torch.cat([torch.zeros_like(head), depth.gather(1, chosen)], 1)
    tree_mask = batched_ancestry_mask(parents, levels if levels is not None else int(depths.max()))
    children, child_rank = batched_children(parents, width)
    return TreeBatch(tokens=tokens, parents=parents, depths=depths, tree_mask=tree_mask, children=children,
                     child_rank=child_rank, num_nodes=[n] * batch,
                     max_depth=levels if levels is not None else int(depths.max()),
                     source_index=torch.cat([head, chosen], 1))
