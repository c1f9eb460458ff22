"""The batched verifier: one call verifies every prompt's tree, whatever the schedule or the batch.

``verify_trees`` draws every uniform of a round up front, per prompt from its own generator and indexed by
(node, sibling slot), so a node's sibling test depends only on its own p, q, children and draws. Hence (1) the
all-nodes schedule (every internal node at once, then the accepted path by an ancestry reduction) and the
per-depth walk give the same outcome draw for draw, and (2) a prompt's outcome does not depend on the batch
it is verified in. The law of the outcome is proven in ``tests/test_verify_law.py`` (through ``verify_tree``,
which is ``verify_trees`` on one tree); batched dynamic-tree selection equals the per-prompt one here.
"""

from __future__ import annotations

import pytest
import torch

from models.drafters.acceptance import AcceptConfig, verify_tree, verify_trees
from models.drafters.grouped import GroupedAcceptConfig
from models.drafters.tree import build_tree, select_dynamic_tree, select_dynamic_trees, stack_trees
from models.profiling import OpCounter

V = 12
NEIGHBOURS = torch.stack([torch.roll(torch.arange(V), -s) for s in (1, 2, 3, 4)], 1)  # (V, 4), distinct ids
CONFIGS = {
    "exact": AcceptConfig(),
    "lantern_sibling": AcceptConfig(relax="lantern", k=3, delta=0.3),
    "lantern_node": AcceptConfig(relax="lantern", k=3, delta=0.3, budget="node"),
    "lantern++": AcceptConfig(relax="lantern++", k=3, lam=4.0),
    "original": AcceptConfig(relax="lantern", k=3, delta=0.3, residual="original"),
    "original_lumina": AcceptConfig(relax="lantern", k=3, delta=0.3, residual="original_lumina"),
    "gsd": GroupedAcceptConfig(rank_window=2, prob_gap=0.3, max_dist=1.0,
                               embeddings=torch.randn(V, 2, generator=torch.Generator().manual_seed(0))),
}


def _random_tree(gen: torch.Generator, n: int, static: bool, width: int = 3):
    """A random tree of n nodes (at most ``width`` children per node), children drawn without replacement from
    each parent's Q (static) or distinct ids (dynamic), and target probabilities that often agree with them."""
    parents = [-1]
    for i in range(1, n):
        while True:
            par = int(torch.randint(0, i, (1,), generator=gen))
            if parents.count(par) < width:
                break
        parents.append(par)
    parents_t = torch.tensor(parents)
    q = torch.softmax(2 * torch.randn(n, V, generator=gen), -1)
    tokens = torch.zeros(n, dtype=torch.long)
    tokens[0] = int(torch.randint(0, V, (1,), generator=gen))
    for i in range(n):
        kids = (parents_t == i).nonzero().squeeze(1)
        if kids.numel():
            tokens[kids] = torch.multinomial(q[i], kids.numel(), replacement=False, generator=gen)
    p = torch.softmax(2 * torch.randn(n, V, generator=gen), -1)
    p = 0.5 * p + 0.5 * q  # the drafter is often right, so paths get long
    return build_tree(tokens, parents_t, q if static else None), p


def _batch(gen, sizes, static):
    trees, probs = zip(*[_random_tree(gen, n, static) for n in sizes])
    n = max(sizes)
    padded = torch.zeros(len(sizes), n, V)
    for b, pr in enumerate(probs):
        padded[b, : pr.shape[0]] = pr
        padded[b, pr.shape[0]:] = 1.0 / V  # padding rows are never read; any distribution will do
    return list(trees), padded


def _same(a, b):
    assert torch.equal(a.accept_len, b.accept_len) and torch.equal(a.next_token, b.next_token)
    assert torch.equal(a.path, b.path) and torch.equal(a.emitted, b.emitted)
    assert torch.equal(a.attempted_per_depth, b.attempted_per_depth)
    assert torch.equal(a.accepted_per_depth, b.accepted_per_depth)
    assert torch.allclose(a.node_tvd, b.node_tvd, atol=1e-6)


@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_all_nodes_and_per_level_schedules_agree_draw_for_draw(static, name):
    gen = torch.Generator().manual_seed(1)
    cfg = CONFIGS[name]
    accepted = 0
    for trial in range(12):
        trees, probs = _batch(gen, [9, 9, 9], static)
        batch = stack_trees(trees, width=3)
        out = {}
        for all_nodes in (True, False):
            gens = [torch.Generator().manual_seed(10 * trial + b) for b in range(3)]
            out[all_nodes] = verify_trees(batch, probs, cfg, NEIGHBOURS, generators=gens, all_nodes=all_nodes)
        _same(out[True], out[False])
        accepted += int(out[True].accept_len.sum())
    assert accepted > 0  # the paths are not all empty: the comparison covers accepted children


@pytest.mark.parametrize("static", [True, False])
def test_a_prompt_gets_the_same_verdict_in_any_batch(static):
    """Per-prompt generators: prompt b's outcome in a batch of trees of different sizes equals its outcome alone."""
    gen = torch.Generator().manual_seed(2)
    cfg = CONFIGS["lantern_node"]
    for trial in range(8):
        sizes = [5, 9, 7, 1]
        trees, probs = _batch(gen, sizes, static)
        seeds = [100 * trial + b for b in range(len(sizes))]
        batched = verify_trees(stack_trees(trees, width=3), probs, cfg, NEIGHBOURS,
                               generators=[torch.Generator().manual_seed(s) for s in seeds])
        for b, tr in enumerate(trees):
            alone = verify_trees(stack_trees([tr], width=3), probs[b : b + 1, : tr.num_nodes], cfg, NEIGHBOURS,
                                 generators=[torch.Generator().manual_seed(seeds[b])])
            a = int(alone.accept_len[0])
            assert int(batched.accept_len[b]) == a and int(batched.next_token[b]) == int(alone.next_token[0])
            assert torch.equal(batched.path[b, : a + 1], alone.path[0, : a + 1])
            assert torch.allclose(batched.node_tvd[b, : a + 1], alone.node_tvd[0, : a + 1], atol=1e-6)


def test_greedy_batched_is_the_longest_chain_of_argmaxes():
    gen = torch.Generator().manual_seed(3)
    trees, probs = _batch(gen, [9, 6, 9], static=False)
    batch = stack_trees(trees)
    # make every prompt's drafts the argmax along one root path, so the greedy path is that path
    for b, tr in enumerate(trees):
        node = 0
        while True:
            kids = (tr.parents == node).nonzero().squeeze(1)
            if not kids.numel():
                break
            child = int(kids[-1])  # the last sibling: the first-passing rule must still find it
            probs[b, node] = 0.01
            probs[b, node, tr.tokens[child]] = 1.0
            node = child
    res = verify_trees(batch, probs, CONFIGS["exact"], greedy=True)
    for b, tr in enumerate(trees):
        single = verify_tree(tr, probs[b, : tr.num_nodes], CONFIGS["exact"], greedy=True)
        assert int(res.accept_len[b]) == single.accept_len == int(tr.depths[single.path[-1]])
        assert res.emitted[b, single.accept_len] == single.next_token == probs[b, single.path[-1]].argmax()


def test_the_all_nodes_verifier_issues_the_same_ops_for_any_batch_size():
    gen = torch.Generator().manual_seed(4)
    cfg = CONFIGS["lantern++"]
    counts = {}
    for b in (1, 4):
        trees, probs = _batch(gen, [9] * b, static=True)
        batch = stack_trees(trees, width=3)
        gens = [torch.Generator().manual_seed(s) for s in range(b)]
        with OpCounter() as c:
            verify_trees(batch, probs, cfg, NEIGHBOURS, generators=gens)
        counts[b] = c.total - b  # one uniform draw per prompt (its own generator) is the only per-prompt op
    assert counts[1] == counts[4]


def test_batched_dynamic_selection_equals_the_single_one():
    gen = torch.Generator().manual_seed(5)
    k, m = 3, 3 + 9 + 9
    tokens, parents, scores = [], [], []
    for _ in range(4):
        par = torch.cat([torch.full((3,), -1), torch.arange(3).repeat_interleave(3),
                         3 + torch.randperm(9, generator=gen)[:3].repeat_interleave(3)])
        sc = torch.zeros(m)
        score = -torch.rand(m, generator=gen)
        for i in range(m):  # cumulative log-probs: a child never scores above its parent
            sc[i] = score[i] + (sc[par[i]] if par[i] >= 0 else 0.0)
        tokens.append(torch.randint(0, V, (m,), generator=gen))
        parents.append(par)
        scores.append(sc)
    roots = torch.arange(4)
    batch = select_dynamic_trees(torch.stack(tokens), torch.stack(parents), torch.stack(scores), 10, roots,
                                 levels=3, width=k)
    for b in range(4):
        single = select_dynamic_tree(tokens[b], parents[b], scores[b], 10, roots[b])
        mine = batch.tree(b)
        for name in ("tokens", "parents", "depths", "tree_mask", "retrieve_paths", "source_index"):
            assert torch.equal(getattr(mine, name), getattr(single, name)), name
