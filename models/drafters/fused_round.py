"""A speculative round as one function of fixed shapes (issue 8): compiled once, one graph a round.

Why: on a small model the round of :meth:`SpeculativeDecoder.generate` is bound by the dispatch of ~1,200–1,300
small operators (drafter levels, the tree builder, the verifier, the commit), and under ``--compile`` it stayed
a dozen graphs with eager bookkeeping between them. With a static tree (a chain is one) or EAGLE-2's dynamic
tree every shape of a round is known before decoding starts — the node count, the levels and the bound D on the
accepted path are fixed by the tree setting — so the whole round can be written as one function of tensors
whose shapes never change:

1. the tree: the engine's own builder (:meth:`SpeculativeDecoder._static_tree` with uniforms drawn before the
   call, or :meth:`~SpeculativeDecoder._dynamic_tree`), each level fed to the drafter at per-row slots and RoPE
   positions, its mask built from the row's committed length and the tree's ancestry, over the whole cache;
2. one target forward over every prompt's tree, ``p`` per node;
3. :func:`~models.drafters.acceptance.verify_trees`' all-nodes rule (the same code, against uniforms drawn
   before the call, so the draws are the eager engine's);
4. the commit of the accepted path in the target cache, the emitted tokens written after each prompt's last
   one, and the drafter's catch-up on the accepted path (padded to D + 1 queries), which gives the next
   round's root feature — the catch-up ends the round instead of starting it, so the prefix catch-up (its
   length is the prompt's) runs once, eagerly, before the first round.

Every position is a tensor (per-row committed lengths: batches need no host value), every mask spans the whole
cache, so one compiled graph serves every round of every image (``--compile``; the round's kernel launches are
what the op counter reports). A finished prompt keeps its rows but stops advancing (its length and output count
freeze; its outputs are ignored and it draws no random numbers), so the batch keeps its shape. The only host work
per round is drawing the round's uniforms from each prompt's generator (the same draws, in the same order, as the
eager engine's) and one read of the accepted lengths.

The function runs eagerly too (:attr:`SpeculativeDecoder.fused_round` = True); the tests check that it gives the
eager engine's tokens and statistics in float32 (greedy and seeded sampling, batch 1 and B; in half precision the
whole-cache masks change the rounding of attention, so sampled tokens may differ) and that compiled equals eager.
Not covered (the engine's general loop runs instead): drafter-free proposers, token-prefix families (Chameleon's
caches), position-dependent token masks, ``--tree auto``'s round observer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from models.drafters.acceptance import _verify_all_nodes, _verify_greedy_batch, sibling_uniforms
from models.generation import GenerationStats, additive_mask, tile_rows
from models.sampling import target_probs


@dataclass
class RoundPlan:
    """A tree setting's fixed sizes and index constants on one device (built once per decoder and device)."""

    n: int  # tree nodes, root included
    depth: int  # D, the deepest node (accepted paths are at most D drafts)
    width: int  # C, the children-table width (the verifier's uniforms per node)
    static: bool
    expanded: int  # static: the nodes above the deepest level (whose children are drawn: uniforms per round)
    node_idx: torch.Tensor  # arange(n)
    path_idx: torch.Tensor  # arange(D + 1)


def round_plan(dec, device) -> RoundPlan:
    """:class:`RoundPlan` of the decoder's tree (cached on the decoder per device and tree)."""
    key = ("fused", str(device), dec.tree_cfg)
    plan = dec._round_plans.get(key)
    if plan is None:
        cfg = dec.tree_cfg
        if dec.template is not None:
            n, depth, width = dec.template.num_nodes, dec.template.max_depth, int(dec.template.children.shape[1])
        else:
            n, depth, width = cfg.total_token, cfg.depth, cfg.top_k_draft
        expanded = dec._static_plan(device)["offsets"][depth] if dec.template is not None else 0
        plan = RoundPlan(n=n, depth=depth, width=width, static=dec.template is not None, expanded=expanded,
                         node_idx=torch.arange(n, device=device), path_idx=torch.arange(depth + 1, device=device))
        dec._round_plans[key] = plan
    return plan


def _tree_visibility(off: torch.Tensor, anc: torch.Tensor) -> torch.Tensor:
    """Which cache slots a block of tree queries sees among the round's tree slots: ``off`` (R, L) is a slot's
    offset from the row's committed length (tree slot j sits at offset j), ``anc`` (B or 1, m, T) the queries'
    ancestry over tree slots 0..T−1 (rows of a prompt's streams share it). -> (R, m, L) bool."""
    from models.ea_model import stream_rows

    rows, m, span = off.shape[0], anc.shape[1], anc.shape[2]
    anc = stream_rows(anc, rows)
    inside = (off >= 0) & (off < span)
    seen = anc.gather(2, off.clamp(0, span - 1)[:, None, :].expand(-1, m, -1))
    return seen & inside[:, None, :]


def speculative_round(dec, plan: RoundPlan, target, drafter, roots, h_root, lengths, n_out, active, keys, out_tokens,
                 tcache, dcache, u_tree, u_sib, u_next):
    """One round for every prompt of the batch, fixed shapes, no host sync (see the module docstring).

    ``roots`` (B,) last committed tokens; ``h_root`` (R, H) the drafter's feature after each root; ``lengths``
    (B,) committed target lengths (= root positions); ``n_out`` (B,) tokens emitted so far; ``active`` (B,) bool;
    ``keys`` (R, L) prefix validity; ``out_tokens`` (B, ·) written in place; ``u_tree`` (B, ·, V) the static
    builder's uniforms, ``u_sib`` (B, n, C) / ``u_next`` (B,) the verifier's (None for greedy; ``u_tree`` also
    for a dynamic tree). -> (next roots, next h_root, next lengths, next n_out, accept_len, node_tvd, attempted,
    accepted).
    """
    rows, batch = h_root.shape[0], roots.shape[0]
    streams = rows // batch
    dev = h_root.device
    length = keys.shape[1]
    ddtype = dec.drafter_dtype
    slots = torch.arange(length, device=dev)
    pos_rows = tile_rows(lengths, streams)
    committed = keys & (slots < pos_rows[:, None])  # (R, L)
    off = slots[None, :] - pos_rows[:, None]  # a slot's offset from the row's committed length

    def feed(feats, ids, d, slot_lo, anc):  # a tree level at per-row slots, masks over the whole cache
        vis = committed[:, None, :] | _tree_visibility(off, anc)
        slot = pos_rows[:, None] + slot_lo + torch.arange(ids.shape[1], device=dev)
        rope = (pos_rows - 1 + d)[:, None].expand(-1, ids.shape[1])
        return drafter(feats.to(ddtype), ids, rope, dcache, slot, additive_mask(vis[:, None], ddtype))

    # 1. the tree: the engine's builders, fed at per-row slots
    if plan.static:
        trees = dec._static_tree(roots, h_root[:, None], pos_rows, feed, uniforms=u_tree)
    else:
        trees = dec._dynamic_tree(roots, h_root[:, None], pos_rows, feed)
    tokens = trees.tokens
    # 2. one target forward over every prompt's tree
    vis = committed[:, None, :] | _tree_visibility(off, trees.tree_mask)
    emb = target.embed_tokens(tile_rows(tokens, streams))
    h_t = target.forward_hidden(emb, pos_rows[:, None] + tile_rows(trees.depths, streams), tcache,
                                pos_rows[:, None] + plan.node_idx, additive_mask(vis[:, None], emb.dtype))
    probs = target_probs(dec._combine(target.lm_head(h_t)), dec.sampling)  # (B, n, V)
    # 3. verify (the engine's all-nodes rule)
    if dec.sampling.greedy:
        res = _verify_greedy_batch(trees, probs, dec.accept, dec.neighbours)
    else:
        res = _verify_all_nodes(trees, probs, dec.accept, dec.neighbours, u_sib, u_next, dec.measure_shift)
    # 4. commit the accepted path, write the emitted tokens, catch the drafter up on them
    accept = res.accept_len
    steps = torch.minimum(plan.path_idx, accept[:, None])
    tcache.commit_rows(tile_rows(lengths[:, None] + res.path, streams), tile_rows(lengths[:, None] + steps, streams))
    out_tokens[torch.arange(batch, device=dev)[:, None], n_out[:, None] + plan.path_idx] = res.emitted
    pend_feat = h_t[torch.arange(rows, device=dev)[:, None], tile_rows(res.path, streams)]
    cpos = pos_rows[:, None] + plan.path_idx  # the drafter's committed length is the target's old one
    cmask = keys[:, None, :] & (slots <= cpos[:, :, None])
    h_d = drafter(pend_feat.to(ddtype), tile_rows(res.emitted, streams), cpos, dcache, cpos,
                  additive_mask(cmask[:, None], ddtype))
    h_next = h_d[torch.arange(rows, device=dev), tile_rows(accept, streams)].to(h_root.dtype)
    grow = torch.where(active, accept + 1, 0)
    # the deepest node of the active prompts' trees (a dynamic tree may stop short of D): the sampled
    # verifier's statistics by depth stop there, as verify_trees reports them (greedy: all D depths)
    deepest = torch.where(active[:, None], trees.depths, 0).max() if not dec.sampling.greedy else (
        torch.full((), plan.depth, device=dev))
    return (torch.where(active, res.next_token, roots), h_next, lengths + grow, n_out + grow,
            torch.cat([accept, deepest[None]]), res.node_tvd, res.attempted_per_depth, res.accepted_per_depth)


def draw_round_uniforms(dec, plan: RoundPlan, active: list[int], generators, device,
                        bufs: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]) -> None:
    """Fill the round's uniforms for the active prompts, drawing exactly what the eager engine draws, in its
    order: a static builder's (:meth:`SpeculativeDecoder.tree_uniforms`), then the verifier's
    (:func:`~models.drafters.acceptance.sibling_uniforms`: n·C + 1 per prompt)."""
    u_tree, u_sib, u_next = bufs
    idx = torch.tensor(active, device=device)
    if u_tree is not None:
        u_tree[idx] = dec.tree_uniforms(len(active), generators, device)
    u_sib[idx], u_next[idx] = sibling_uniforms([plan.n] * len(active), plan.n, plan.width, generators, device)


def fused_supported(dec, prefix) -> bool:
    """Whether :func:`generate_fused` can run this decoder on this prefix (else the engine's general loop)."""
    from models.drafters.kv_cache import KVCache

    return (dec.drafter is not None and dec.proposer is None
            and prefix.token_ids is None and not dec._needs_index and dec.round_observer is None
            and isinstance(dec.target.new_cache(1, 1), KVCache))


def _raw(module):
    return getattr(module, "_target", module)


@torch.inference_mode()
def generate_fused(dec, prefix, generator=None) -> tuple[torch.Tensor, GenerationStats]:
    """:meth:`SpeculativeDecoder.generate` with every round one :func:`speculative_round` call (compiled
    when the target is: :class:`~models.compiled.CompiledTarget`). Same outputs and statistics."""
    from models.ea_model import catch_up_mask, round_statistics
    from models.generation import check_generators, key_validity, prefill, sample_per_prompt
    from models.token_masks import forced_positions

    start = time.perf_counter()
    target, n_tok = dec.target, dec.num_tokens
    t, dev, streams, batch = prefix.length, prefix.embeddings.device, prefix.streams, prefix.batch_size
    check_generators(generator, batch)
    plan = round_plan(dec, dev)
    rows = prefix.rows
    # past the last token: the tree's slots (target: n; drafter: a dynamic tree feeds k per level) and the
    # padded catch-up's
    length = t + n_tok + max(plan.n, dec.tree_cfg.drafter_slots) + plan.depth + 2
    tcache = target.new_cache(rows, length)
    dcache = dec.drafter.new_cache(rows, length)
    keys = key_validity(prefix, length)
    dec._prefix_len = t
    forced = forced_positions(dec.allowed_tokens, n_tok, dev)
    hidden = prefill(target, prefix, tcache)
    roots = sample_per_prompt(dec._combine(target.lm_head(hidden[:, -1]), 0), dec.sampling, generator)
    out_tokens = torch.zeros(batch, n_tok + 2 * (plan.depth + 1), dtype=torch.long, device=dev)
    out_tokens[:, 0] = roots
    # the drafter's catch-up on the prefix (its length is the prompt's): once, eagerly
    # (condition prefixes only, fused_supported: their positions carry token id 0, the last one the root)
    ids = tile_rows(torch.cat([torch.zeros(batch, t - 1, dtype=torch.long, device=dev), roots[:, None]], 1), streams)
    pos = torch.arange(t, device=dev).expand(rows, -1)
    h_root = dec._run_drafter(hidden, ids, pos, dcache, pos, catch_up_mask(keys, pos))[:, -1]
    h_root = h_root.to(hidden.dtype).contiguous()  # the layout of the round's own output (one graph)
    lengths = torch.full((batch,), t, dtype=torch.long, device=dev)
    n_out = torch.ones(batch, dtype=torch.long, device=dev)
    n_host = [1] * batch
    active = list(range(batch)) if n_tok > 1 else []
    greedy = dec.sampling.greedy
    bufs = None
    if not greedy:
        vocab = target.lm_head.weight.shape[0]
        u_tree = torch.zeros(batch, plan.expanded, vocab, device=dev) if plan.static else None
        bufs = (u_tree, torch.zeros(batch, plan.n, plan.width, device=dev), torch.zeros(batch, device=dev))
    run = getattr(target, "speculative_round", None)
    raw_target, raw_drafter = _raw(target), dec.drafter
    forced_host = forced.tolist()
    per = [{"accept_lengths": [], "attempted": [], "accepted": [], "image_counts": [], "node_tvd": []}
           for _ in range(batch)]
    rounds, forwards = [], 1
    prof = dec.profiler
    while active:
        if prof is not None:
            prof.mark("fused")  # the whole round is one phase: uniforms, the round's call, the host read
        if bufs is not None:
            gens = generator if generator is None or isinstance(generator, torch.Generator) else [
                generator[b] for b in active]
            draw_round_uniforms(dec, plan, active, gens, dev, bufs)
        mask_active = torch.zeros(batch, dtype=torch.bool, device=dev)
        mask_active[active] = True
        args = (roots, h_root, lengths, n_out, mask_active, keys, out_tokens, tcache, dcache,
                *(bufs if bufs is not None else (None, None, None)))
        if run is not None:
            out = run(dec, plan, raw_drafter, *args)
        else:
            out = speculative_round(dec, plan, raw_target, raw_drafter, *args)
        roots, h_root, lengths, n_out, accept, tvd, attempted, accepted = out
        forwards += 1
        accept_host = accept.tolist()  # the round's one host read
        deepest = accept_host.pop()
        rounds.append((list(active), accept_host, tvd, attempted[:, :deepest], accepted[:, :deepest]))
        for b in active:
            a = accept_host[b]
            per[b]["image_counts"].append(a + 1 - sum(forced_host[n_host[b]: n_host[b] + a + 1]))
            n_host[b] += a + 1
        active = [b for b in active if n_host[b] < n_tok]
    if prof is not None:
        prof.mark(None)
    tokens = out_tokens[:, :n_tok].clone()
    for active_r, accept_r, tvd, attempted, accepted in rounds:
        for b in active_r:
            a, st = accept_r[b], per[b]
            st["accept_lengths"].append(a)
            st["node_tvd"].append(tvd[b, : a + 1] if dec.measure_shift else None)
            st["attempted"].append(attempted[b])
            st["accepted"].append(accepted[b])
    if tokens.is_cuda:
        torch.cuda.synchronize(tokens.device)
    latency = time.perf_counter() - start
    extra = round_statistics(per, n_tok)
    return tokens, GenerationStats(latency, n_tok * batch, forwards, extra)
