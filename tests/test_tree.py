"""Draft-tree structure: static choice lists, the generic builder and EAGLE-2 dynamic selection."""

from __future__ import annotations

import json

import pytest
import torch

from models.drafters.choices import (
    chain_N,
    get_tree_choices,
    mc_sim_7b_63,
    naive_extend_57,
    validate_tree_choices,
)
from models.drafters.tree import (
    StaticTreeTemplate,
    build_tree,
    children_table,
    select_dynamic_tree,
    tree_position_ids,
)


def _is_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


# ---------------------------------------------------------------------------------------------------------
# Static templates
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "choices, n_drafts, max_depth, root_children, n_leaves",
    [(mc_sim_7b_63, 25, 5, 4, 15), (naive_extend_57, 57, 5, 5, 33)],
    ids=["mc_sim_7b_63", "naive_extend_57"],
)
def test_static_template_structure(choices, n_drafts, max_depth, root_children, n_leaves):
    assert len(choices) == n_drafts
    t = StaticTreeTemplate.from_choices(choices)
    n = n_drafts + 1
    assert t.num_nodes == n and t.max_depth == max_depth
    assert int(t.num_children[0]) == root_children
    assert int(t.num_children.sum()) == n_drafts

    # node i + 1 <-> t.choices[i]; the root is the empty path
    paths = [()] + list(t.choices)
    assert sorted(paths[1:]) == sorted(tuple(p) for p in choices)
    assert t.depths.tolist() == [len(p) for p in paths]
    assert t.child_rank.tolist() == [-1] + [p[-1] for p in paths[1:]]
    assert t.parents[0] == -1 and bool((t.parents[1:] < torch.arange(1, n)).all())
    assert [paths[int(t.parents[i])] for i in range(1, n)] == [p[:-1] for p in paths[1:]]

    # tree_mask[i, j] iff j is i or an ancestor of i  <=>  path_j is a prefix of path_i
    expected = torch.tensor([[_is_prefix(paths[j], paths[i]) for j in range(n)] for i in range(n)])
    assert torch.equal(t.tree_mask, expected)

    # one retrieve path per leaf, root..leaf, padded with -1
    leaves = [i for i in range(n) if not any(_is_prefix(paths[i], paths[j]) and i != j for j in range(n))]
    assert len(leaves) == n_leaves
    assert t.retrieve_paths.shape == (n_leaves, max_depth + 1)
    for row, leaf in zip(t.retrieve_paths.tolist(), leaves):
        nodes = [v for v in row if v >= 0]
        assert row[len(nodes) :] == [-1] * (max_depth + 1 - len(nodes))
        assert nodes[-1] == leaf and nodes[0] == 0
        assert [paths[v] for v in nodes] == [paths[leaf][:d] for d in range(len(paths[leaf]) + 1)]

    # nodes are grouped by depth; siblings appear in rank order
    for d in range(max_depth + 1):
        lo, hi = int(t.depth_offsets[d]), int(t.depth_offsets[d + 1])
        assert bool((t.depths[lo:hi] == d).all())
    for node in range(n):
        kids = [c for c in t.children[node].tolist() if c >= 0]
        assert [paths[c][-1] for c in kids] == list(range(len(kids)))

    # filling the template gives the same structure as the generic builder
    tokens = torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(0))
    tree = t.make_tree(tokens)
    ref = build_tree(tokens, t.parents)
    for name in ("tokens", "parents", "depths", "tree_mask", "retrieve_paths"):
        assert torch.equal(getattr(tree, name), getattr(ref, name)), name
    assert torch.equal(tree_position_ids(tree, 17), 17 + t.depths)


def test_template_is_cached_and_order_independent():
    a = StaticTreeTemplate.from_choices(mc_sim_7b_63)
    assert StaticTreeTemplate.from_choices(list(reversed(mc_sim_7b_63))) is a


def test_chain_and_named_choices():
    assert chain_N(3) == [[0], [0, 0], [0, 0, 0]]
    t = StaticTreeTemplate.from_choices(chain_N(4))
    assert t.parents.tolist() == [-1, 0, 1, 2, 3] and t.retrieve_paths.tolist() == [[0, 1, 2, 3, 4]]
    assert get_tree_choices("mc_sim_7b_63") == mc_sim_7b_63
    assert get_tree_choices("naive_extend_57") == naive_extend_57
    assert get_tree_choices("chain_2") == [[0], [0, 0]]
    assert get_tree_choices(json.dumps(mc_sim_7b_63)) == mc_sim_7b_63
    assert get_tree_choices(" [[0], [1], [0, 0]] ") == [[0], [1], [0, 0]]


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("[[0, 0]]", "parent"),  # missing [0]
        ("[[0], [2]]", "contiguous"),  # rank 1 missing
        ("[[0], [0, 1]]", "contiguous"),
        ("[[0], [0]]", "duplicate"),
        ("[[0], [-1]]", "non-negative"),
        ("[[0], []]", "non-empty"),
        ("[[0], [0.5]]", "non-negative"),
        ("[]", "non-empty"),
        ("[[0], [1]", "unknown tree choices"),  # broken JSON
        ("mc_sim_7b_64", "unknown tree choices"),
        ("chain_x", "chain"),
    ],
)
def test_invalid_choices_are_rejected(bad, reason):
    with pytest.raises(ValueError, match=reason):
        get_tree_choices(bad)


def test_validate_accepts_any_order():
    assert validate_tree_choices([[1, 0], [0], [1]]) == [[1, 0], [0], [1]]


# ---------------------------------------------------------------------------------------------------------
# Generic builder
# ---------------------------------------------------------------------------------------------------------


def test_build_tree_small():
    #        0
    #      /   \
    #     1     2
    #    / \     \
    #   3   4     5
    #   |
    #   6
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3])
    tree = build_tree(torch.arange(10, 17), parents)
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert tree.retrieve_paths.tolist() == [[0, 1, 4, -1], [0, 2, 5, -1], [0, 1, 3, 6]]
    assert tree.tree_mask[6].nonzero().squeeze(1).tolist() == [0, 1, 3, 6]
    assert tree.tree_mask[5].nonzero().squeeze(1).tolist() == [0, 2, 5]
    assert children_table(parents).tolist() == [[1, 2], [3, 4], [5, -1], [6, -1], [-1, -1], [-1, -1], [-1, -1]]
    assert tree.max_depth == 3 and tree.num_nodes == 7 and tree.draft_probs is None
    root_only = build_tree(torch.tensor([5]), torch.tensor([-1]))
    assert root_only.retrieve_paths.tolist() == [[0]] and root_only.max_depth == 0


@pytest.mark.parametrize("parents", [[0, 0], [-1, 1], [-1, 0, 3, 1], [-1, -1]])
def test_build_tree_rejects_bad_parents(parents):
    with pytest.raises(ValueError):
        build_tree(torch.zeros(len(parents), dtype=torch.long), torch.tensor(parents))


# ---------------------------------------------------------------------------------------------------------
# Dynamic (EAGLE-2) selection
# ---------------------------------------------------------------------------------------------------------


def _expand_candidates(gen: torch.Generator, depth: int = 4, top_k: int = 5, vocab: int = 50):
    """EAGLE-2-like expansion: each level expands the best ``top_k`` frontier nodes into ``top_k`` children."""
    tokens, parents, scores = [], [], []
    frontier = [(-1, 0.0)]  # (candidate index, cumulative log q)
    for _ in range(depth):
        new = []
        for par, s in frontier:
            logq = torch.log_softmax(torch.randn(vocab, generator=gen), -1)
            top = torch.topk(logq, top_k)
            for lp, tok in zip(top.values.tolist(), top.indices.tolist()):
                tokens.append(tok)
                parents.append(par)
                scores.append(s + lp)
                new.append((len(tokens) - 1, s + lp))
        frontier = sorted(new, key=lambda t: -t[1])[:top_k]
    return torch.tensor(tokens), torch.tensor(parents), torch.tensor(scores, dtype=torch.float64)


def _ancestors(parents: list[int], i: int) -> list[int]:
    out = []
    while parents[i] >= 0:
        i = parents[i]
        out.append(i)
    return out


def test_select_dynamic_tree_is_top_scores_and_closed_under_ancestors():
    gen = torch.Generator().manual_seed(3)
    cand_tokens, cand_parents, cand_scores = _expand_candidates(gen)
    total_token = 31
    tree = select_dynamic_tree(cand_tokens, cand_parents, cand_scores, total_token, root_token=7)
    assert tree.num_nodes == total_token and tree.tokens[0] == 7 and tree.draft_probs is None
    src = tree.source_index[1:].tolist()
    # log-probs <= 0: the kept set is exactly the top (total_token - 1) by score (scores here have no ties)
    assert sorted(src) == sorted(torch.argsort(cand_scores, descending=True)[: total_token - 1].tolist())
    kept = set(src)
    for c in src:
        assert set(_ancestors(cand_parents.tolist(), c)) <= kept
    # renumbering: parents precede children, tokens and parent links follow the candidates
    assert bool((tree.parents[1:] < torch.arange(1, total_token)).all())
    assert torch.equal(tree.tokens[1:], cand_tokens[tree.source_index[1:]])
    for node in range(1, total_token):
        cp = int(cand_parents[src[node - 1]])
        assert int(tree.parents[node]) == (0 if cp < 0 else src.index(cp) + 1)
    # depths match the candidates' depth and siblings keep the drafting order
    for node in range(1, total_token):
        assert int(tree.depths[node]) == 1 + len(_ancestors(cand_parents.tolist(), src[node - 1]))
    assert src == sorted(src, key=lambda c: (len(_ancestors(cand_parents.tolist(), c)), c))


def test_select_dynamic_tree_keeps_ancestors_of_high_scoring_children():
    # child 3 outscores its parent 1 (not a log-prob cumulative score): parent must come along
    cand_tokens = torch.tensor([10, 11, 12, 13])
    cand_parents = torch.tensor([-1, -1, 0, 1])
    cand_scores = torch.tensor([-1.0, -5.0, -2.0, -0.5])
    tree = select_dynamic_tree(cand_tokens, cand_parents, cand_scores, total_token=3, root_token=0)
    # own ranks: 3→0, 0→1, 2→2, 1→3; effective rank (worst on the root path): 0→1, 2→2, 1→3, 3→3,
    # so with room for two nodes 3 cannot be taken without 1, and {0, 2} wins
    assert sorted(tree.source_index[1:].tolist()) == [0, 2]
    tree = select_dynamic_tree(cand_tokens, cand_parents, cand_scores, total_token=5, root_token=0)
    assert tree.source_index.tolist() == [-1, 0, 1, 2, 3]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 2]


def test_select_dynamic_tree_ties_are_deterministic():
    cand_tokens = torch.arange(6)
    cand_parents = torch.tensor([-1, -1, -1, 0, 0, 1])
    cand_scores = torch.zeros(6)  # all tied: lower candidate index first, ancestors first
    tree = select_dynamic_tree(cand_tokens, cand_parents, cand_scores, total_token=5, root_token=9)
    assert tree.source_index.tolist() == [-1, 0, 1, 2, 3]
    assert tree.parents.tolist() == [-1, 0, 0, 0, 1]
    # more room than candidates: everything is kept
    tree = select_dynamic_tree(cand_tokens, cand_parents, cand_scores, total_token=60, root_token=9)
    assert tree.num_nodes == 7
