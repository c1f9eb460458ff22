"""The speculative decoding engine shared by every family (EAGLE-2 dynamic trees, EAGLE-1/LANTERN++ static trees).

One round:

1. the drafter catches up on the positions committed last round (true target features f_t with the next
   tokens x_{t+1}) and predicts the features after the root — the root is the last committed token, sampled
   by the target but not yet fed to it;
2. a draft tree is grown from the root: dynamic (top-k children of the best ``top_k_draft`` frontier nodes per
   level, reranked by cumulative draft log-prob, EAGLE-2) or static (a choice list; each node's children are
   sampled without replacement from the drafter's distribution Q, EAGLE-1 / LANTERN++);
3. **one** target forward runs over all tree nodes on both CFG streams (tree attention mask, position = prefix
   length + depth), the CFG-combined logits become the target distributions p per node;
4. :func:`~models.drafters.acceptance.verify_trees` verifies every prompt's tree in one call (exact, LANTERN δ
   or LANTERN++ λ rule);
5. the accepted path's KV rows move into place in the pre-allocated cache (no recomputation) and its hidden
   states feed the drafter next round.

A drafter-free proposer (Speculative Jacobi Decoding, :mod:`models.drafters.jacobi`) replaces steps 1–2 with a
chain of the previous iteration's predictions and redrafts its window after step 4; steps 3–5 are shared.

CFG runs through every stage: the drafter runs on the cond and uncond streams (same tokens, each stream's own
target features) and its logits are combined with the same scale as the target's.

Batch: B prompts at once (2B rows with CFG); batch 1 is the special case of the same loop. Every prompt has its
own tree, accepted length and position: the caches keep each row's committed entries in slots [0, length_b),
each round's tree nodes go to slots shared by the batch (after the longest committed prefix), every row
attends through its own mask at its own RoPE positions, and the accepted path is copied per row to the end of
its own prefix. A finished prompt drops out. Random draws come from one generator per prompt (or one shared).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from models.drafters.acceptance import AcceptConfig, verify_trees
from models.drafters.cnets import EagleDrafter
from models.drafters.tree import (
    StaticTreeTemplate,
    TreeBatch,
    batched_children,
    select_dynamic_trees,
    stack_trees,
)
from models.generation import (
    GenerationStats,
    Generators,
    Prefix,
    additive_mask,
    check_generators,
    key_validity,
    prefill,
    prompt_generator,
    sample_per_prompt,
    tile_rows,
)
from models.sampling import SamplingConfig, cast, cfg_combine, target_probs
from models.token_masks import PositionalTokenMask, apply_allowed_tokens, forced_positions


@dataclass(frozen=True)
class TreeConfig:
    """Draft tree shape. ``static_choices`` set → static tree; otherwise dynamic with the EAGLE-2 sizes."""

    static_choices: tuple[tuple[int, ...], ...] | None = None
    top_k_draft: int = 10
    depth: int = 4
    total_token: int = 59
    drafter_top_k: int | None = None  # static trees: restrict Q to its top-k before sampling children

    def __post_init__(self):
        if self.static_choices is None:
            if self.top_k_draft < 1 or self.depth < 1 or self.total_token < 2:
                raise ValueError("dynamic tree needs top_k_draft >= 1, depth >= 1, total_token >= 2")

    @property
    def max_nodes(self) -> int:
        if self.static_choices is not None:
            return len(self.static_choices) + 1
        return self.total_token

    @property
    def drafter_slots(self) -> int:
        """Drafter-cache slots one tree needs past the committed prefix: a dynamic tree feeds ``top_k_draft``
        frontier nodes per level for ``depth − 1`` levels, which can exceed ``total_token``."""
        if self.static_choices is not None:
            return self.max_nodes
        return max(self.total_token, self.top_k_draft * (self.depth - 1) + 1)


def _gumbel(u: torch.Tensor) -> torch.Tensor:
    """Gumbel noise from uniforms: ``topk(log Q + noise, k)`` are k draws without replacement from Q, in
    sampling order (Gumbel-top-k)."""
    return -torch.log(-torch.log(u.clamp(min=1e-20, max=1 - 1e-7)))


class SpeculativeDecoder:
    """Speculative image-token generation for one family's target with an EAGLE drafter."""

    def __init__(
        self,
        target,
        drafter: EagleDrafter | None,
        num_tokens: int,
        sampling: SamplingConfig,
        cfg_scale: float,
        accept: AcceptConfig | None = None,
        tree: TreeConfig | None = None,
        neighbours: torch.Tensor | None = None,
        allowed_tokens: torch.Tensor | None = None,
        proposer=None,
    ):
        """``proposer``: a drafter-free proposer (:class:`~models.drafters.jacobi.JacobiProposer`, SJD / MC-SJD)
        that replaces the drafter's catch-up and tree building; everything else in the round is shared."""
        if (drafter is None) == (proposer is None):
            raise ValueError("give an EAGLE drafter or a proposer (SJD), exactly one")
        self.target, self.drafter, self.num_tokens, self.proposer = target, drafter, num_tokens, proposer
        self.drafter_dtype = next(drafter.parameters()).dtype if drafter is not None else None
        if proposer is not None:
            proposer.greedy = sampling.greedy  # greedy Jacobi drafts are argmaxes; sampled ones are draws from q
        self.sampling, self.cfg_scale = sampling, cfg_scale
        self.accept = accept or AcceptConfig()
        self.tree_cfg = tree or TreeConfig()
        self.allowed_tokens = allowed_tokens
        # only a position-dependent mask reads the image-token index of a logit row (skip computing it otherwise)
        self._needs_index = isinstance(allowed_tokens, PositionalTokenMask)
        if self.accept.needs_neighbours and neighbours is None:
            raise ValueError("relaxed acceptance (--lantern) needs a neighbour table (generate_codebook)")
        self.neighbours = neighbours
        self.template = None
        self.profiler = None  # models.profiling.PhaseProfiler: phase marks for the benchmark (None = no cost)
        # the realised per-node TVD (issue 13) costs ~40 % of a relaxed verify's ops; off: same tokens, no TVD stats
        self.measure_shift = True
        # verify_trees' schedule (same draws, same outcome): True = all nodes at once, False = per depth level
        self.verify_all_nodes = True
        # the round as one fixed-shape function (models/drafters/fused_round.py): None = when the
        # target is compiled (one graph a round), True = also eagerly, False = never
        self.fused_round: bool | None = None
        self.round_observer = None  # called as (trees, results) after each verification (``--tree auto``'s statistics)
        # --compile_drafter: a compiled target made with drafter=True compiles the drafter's forward too
        make = getattr(target, "compiled_drafter", None) if drafter is not None else None
        self._compiled_drafter = make(drafter) if make is not None else None
        self._round_plans: dict = {}  # the fused round's sizes per device and tree (fused_round.round_plan)
        if self.tree_cfg.static_choices is not None:
            self.set_static_tree(self.tree_cfg.static_choices)
        else:
            self._set_q_buckets()

    def set_static_tree(self, choices) -> None:
        """Decode with the static tree ``choices`` from the next :meth:`generate` on (``--tree auto`` re-picks
        the tree between images; everything sized by the tree is derived from ``tree_cfg`` per call)."""
        self.tree_cfg = replace(self.tree_cfg, static_choices=tuple(tuple(c) for c in choices))
        self.template = StaticTreeTemplate.from_choices(self.tree_cfg.static_choices)
        widest = int(self.template.num_children.max())
        if self.tree_cfg.drafter_top_k is not None and self.tree_cfg.drafter_top_k < widest:
            raise ValueError(f"--drafter_top_k must be >= the widest node of the tree ({widest})")
        # the verifier's view of the template (children table, sibling ranks, internal nodes), built once per tree
        children, rank = batched_children(self.template.parents[None], self.template.children.shape[1])
        self._static_struct = (children[0], rank[0], (self.template.num_children > 0).nonzero().squeeze(1))
        self._static_plans: dict[str, dict] = {}  # the builder's per-level plan per device (_static_plan)
        self._set_q_buckets()

    def _set_q_buckets(self) -> None:
        """The compiled drafter's padded query counts, which follow the tree (nothing without one)."""
        if self._compiled_drafter is not None:
            from models.compiled import drafter_q_buckets

            self._q_buckets = drafter_q_buckets(self.tree_cfg, self.template)

    # ------------------------------------------------------------------------------------------ helpers
    def _combine(self, logits: torch.Tensor, index=None) -> torch.Tensor:
        """Raw (rows, ..., V) -> CFG-combined float logits with the family's token restriction.

        ``index``: image-token index each logit row predicts (needed by per-position masks, e.g. Lumina's
        forced newline/end tokens; the same mask for drafter and verifier makes a forced position a point mass).
        """
        return apply_allowed_tokens(cfg_combine(cast(logits, torch.float32), self.cfg_scale), self.allowed_tokens, index)

    def _draft_logits(self, feats: torch.Tensor, index=None) -> torch.Tensor:
        return self._combine(self.target.lm_head(cast(feats, self.target.lm_head.weight.dtype)), index)

    def _draft_q(self, logits: torch.Tensor) -> torch.Tensor:
        """Drafter distribution Q for sampled (static) drafts: the target's sampler settings, optional top-k."""
        s = self.sampling
        top_k = self.tree_cfg.drafter_top_k if self.tree_cfg.drafter_top_k is not None else s.top_k
        q = SamplingConfig(temperature=s.temperature if not s.greedy else 1.0, top_k=top_k, top_p=s.top_p)
        return target_probs(logits, q)

    def _run_drafter(self, feats, ids, rope_pos, cache, cache_pos, mask):
        rows = feats.shape[0]
        ids = ids.expand(rows, -1) if ids.shape[0] == 1 else ids
        if self._compiled_drafter is not None:
            return self._compiled_drafter(cast(feats, self.drafter_dtype), ids, rope_pos, cache, cache_pos, mask,
                                          self._q_buckets)
        return self.drafter(cast(feats, self.drafter_dtype), ids, rope_pos, cache, cache_pos, mask)

    # ------------------------------------------------------------------------------------------ trees
    # Both builders grow the trees of every prompt of the batch at once and feed each level to the drafter
    # through ``feed(feats (rows, m, H), ids (rows, m), d, slot_lo, anc)``: the level's m nodes take the tree's
    # drafter slots slot_lo .. slot_lo + m − 1 (counted from where the round's tree starts), at depth d, and
    # see their ancestors ``anc`` ((B or 1, m, T) bool over the tree slots 0 .. T − 1) besides the committed
    # prefix. The engine's loop feeds at slots shared by the batch (:meth:`_shared_slot_feed`); the fused
    # round (models/drafters/fused_round.py) at per-row slots with whole-cache masks.
    def _shared_slot_feed(self, pos_rows, slot0, dcache, prefix_keys):
        """``feed`` for the engine's loop: tree slots from ``slot0`` (the longest committed length) on, each row
        seeing its own committed slots (``prefix_keys``, (rows, slot0)) and its ancestors."""
        rows = pos_rows.shape[0]
        prefix_block = prefix_keys[:, None, None, :]

        def feed(feats, ids, d, slot_lo, anc):
            m = ids.shape[1]
            mask = torch.cat([prefix_block.expand(-1, 1, m, -1), stream_rows(anc, rows)[:, None]], dim=-1)
            rope = (pos_rows - 1 + d)[:, None].expand(-1, m)
            slots = torch.arange(slot0 + slot_lo, slot0 + slot_lo + m, device=ids.device)
            return self._run_drafter(feats, ids, rope, dcache, slots, mask)

        return feed

    def _dynamic_tree(self, roots, h_root, pos_rows, feed) -> TreeBatch:
        """EAGLE-2: expand the best ``top_k_draft`` nodes per level; keep the best ``total_token − 1`` overall."""
        cfg, dev = self.tree_cfg, h_root.device
        k, batch, rows = cfg.top_k_draft, roots.shape[0], h_root.shape[0]
        streams = rows // batch
        base = pos_rows[:batch] - self._prefix_len + 1  # (B,) image-token index of each root's children
        logp = torch.log_softmax(self._draft_logits(h_root[:, -1], base), dim=-1)  # (B, V)
        top = torch.topk(logp, k, dim=-1)
        tokens, parents, scores = [top.indices], [torch.full((batch, k), -1, device=dev)], [top.values]
        front_idx = torch.arange(k, device=dev).expand(batch, -1)  # candidate indices of the frontier
        front_tok, front_score = top.indices, top.values
        front_feat = h_root[:, -1:].expand(-1, k, -1)  # (rows, k, H) parent features of the frontier nodes
        # ancestry among the fed frontier nodes (k per level), allocated once: level d fills rows fed..fed+k
        anc = torch.zeros(batch, k * (cfg.depth - 1), k * (cfg.depth - 1), dtype=torch.bool, device=dev)
        eye = torch.eye(k, dtype=torch.bool, device=dev)
        front_anc_parent = torch.full((batch, k), -1, device=dev)  # fed-slot index of each frontier node's parent
        b_idx = torch.arange(batch, device=dev)[:, None]
        row_idx = torch.arange(rows, device=dev)[:, None]
        n_cand = k
        for d in range(1, cfg.depth):
            fed = (d - 1) * k
            # ancestry rows of the new frontier: parent's row plus itself
            new_rows = anc[:, fed : fed + k, : fed + k]
            if fed:
                new_rows[:, :, :fed] = anc[b_idx, front_anc_parent, :fed]
            new_rows[:, :, fed:] = eye
            out = feed(front_feat, tile_rows(front_tok, streams), d, fed, new_rows)  # (rows, k, H)
            logp = torch.log_softmax(self._draft_logits(out, base[:, None] + d if self._needs_index else None),
                                     dim=-1)  # (B, k, V)
            child = torch.topk(logp, k, dim=-1)  # (B, k, k)
            cum = (front_score[:, :, None] + child.values).flatten(1)
            child_tok = child.indices.flatten(1)
            tokens.append(child_tok)
            parents.append(front_idx[:, :, None].expand(-1, -1, k).flatten(1))
            scores.append(cum)
            best = torch.topk(cum, k, dim=-1).indices  # (B, k)
            par_local = best // k
            front_idx = n_cand + best
            front_tok, front_score = child_tok.gather(1, best), cum.gather(1, best)
            front_feat = out[row_idx, tile_rows(par_local, streams)]
            front_anc_parent = fed + par_local
            n_cand += k * k
        tokens, parents, scores = torch.cat(tokens, 1), torch.cat(parents, 1), torch.cat(scores, 1)
        return select_dynamic_trees(tokens, parents, scores, cfg.total_token, roots, levels=cfg.depth, width=k)

    def _static_plan(self, dev) -> dict:
        """The template's per-level index tensors on ``dev``, built once: nodes fed per level, their parents,
        their ancestry block of the drafter mask, and where each level's draws go (no per-round bookkeeping)."""
        plan = self._static_plans.get(str(dev))
        if plan is not None:
            return plan
        tmpl = self.template.to(dev)
        offsets = tmpl.depth_offsets.tolist()
        width = tmpl.children.shape[1]
        levels = []
        for d in range(tmpl.max_depth):
            lo, hi = offsets[d], offsets[d + 1]
            kids = tmpl.children[lo:hi]  # (level, C) rank order, -1 padded
            valid = (kids >= 0).flatten()
            levels.append({
                "lo": lo, "hi": hi, "parents": tmpl.parents[lo:hi],
                "sub": tmpl.tree_mask[lo:hi, 1:hi],  # ancestry among the non-root nodes fed so far
                "kid_nodes": kids.flatten()[valid], "kid_src": valid.nonzero().squeeze(1),
            })
        children, rank, internal = (t.to(dev) for t in self._static_struct)
        plan = {"tmpl": tmpl, "offsets": offsets, "width": width, "levels": levels, "children": children,
                "rank": rank, "internal": internal}
        self._static_plans[str(dev)] = plan
        return plan

    def tree_uniforms(self, batch: int, generators, device) -> torch.Tensor:
        """The static builder's uniforms of one round, (B, nodes above the deepest level, V): each prompt draws
        its block in one call from its own stream (the Gumbel noise of every level)."""
        plan = self._static_plan(device)
        expanded, vocab = plan["offsets"][plan["tmpl"].max_depth], self.target.lm_head.weight.shape[0]
        return torch.stack([torch.rand(expanded, vocab, generator=prompt_generator(generators, b), device=device)
                            for b in range(batch)])

    def _static_tree(self, roots, h_root, pos_rows, feed, generators=None, uniforms=None) -> TreeBatch:
        """Static choice list; node i's children are drawn without replacement from Q at node i (per prompt), by
        Gumbel-top-k on ``uniforms`` (:meth:`tree_uniforms`; drawn here from ``generators`` when None)."""
        dev, batch = h_root.device, roots.shape[0]
        rows = h_root.shape[0]
        plan = self._static_plan(dev)
        tmpl, offsets, width = plan["tmpl"], plan["offsets"], plan["width"]
        n = tmpl.num_nodes
        streams = rows // batch
        vocab = self.target.lm_head.weight.shape[0]
        tokens = torch.zeros(batch, n, dtype=torch.long, device=dev)
        tokens[:, 0] = roots
        q_levels = []  # Q at every node that has children, level by level (one cat at the end)
        node_out = torch.zeros(rows, n, h_root.shape[-1], device=dev, dtype=h_root.dtype)
        node_out[:, 0] = h_root[:, -1]
        base = pos_rows[:batch] - self._prefix_len + 1  # (B,) image-token index of each root's children
        if not self.sampling.greedy:  # every level's noise at once
            gumbel = _gumbel(self.tree_uniforms(batch, generators, dev) if uniforms is None else uniforms)
        for d, lv in enumerate(plan["levels"]):
            lo, hi = lv["lo"], lv["hi"]
            if d > 0:  # feed this level's nodes to get their features and Q
                node_out[:, lo:hi] = feed(node_out[:, lv["parents"]], tile_rows(tokens[:, lo:hi], streams), d, lo - 1,
                                          lv["sub"][None])
            index = base[:, None] + d if self._needs_index else None
            q_level = self._draft_q(self._draft_logits(node_out[:, lo:hi], index))
            q_levels.append(q_level)
            if self.sampling.greedy:  # greedy verification only needs the likeliest drafts
                draws = torch.topk(q_level, width, dim=-1).indices
            else:  # Gumbel-top-k: draws without replacement from Q, in sampling order
                draws = torch.topk(torch.log(q_level) + gumbel[:, lo:hi], width, dim=-1).indices  # (B, level, C)
            tokens[:, lv["kid_nodes"]] = draws.flatten(1)[:, lv["kid_src"]]
        leaves = n - offsets[tmpl.max_depth]  # the deepest level is never expanded: no Q there
        q = torch.cat(q_levels + [q_levels[0].new_zeros(batch, leaves, vocab)], 1)
        return TreeBatch(tokens=tokens, parents=tmpl.parents.expand(batch, n), depths=tmpl.depths.expand(batch, n),
                         tree_mask=tmpl.tree_mask.expand(batch, n, n), children=plan["children"].expand(batch, -1, -1),
                         child_rank=plan["rank"].expand(batch, n), num_nodes=[n] * batch, max_depth=tmpl.max_depth,
                         draft_probs=q, internal=plan["internal"])

    # ------------------------------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def generate(self, prefix: Prefix, generator: Generators = None) -> tuple[torch.Tensor, GenerationStats]:
        """Generate ``num_tokens`` image tokens for every prompt of the prefix -> ((B, N) tokens, stats).

        Batch B ≥ 1 (2B rows with CFG); batch 1 is the special case of the same loop. Every prompt has its own
        tree, accepted length and position per round; **one** target forward per round verifies all trees;
        a prompt whose image is complete drops out of the batch (its cache rows are removed). ``generator``:
        one per prompt (exact per-image streams: a prompt's tokens do not depend on the batch) or one shared.

        ``stats.extra``: ``step_compression`` (τ: per prompt the mean of accepted + 1 over its target forwards
        after the prefill; for a batch the mean over prompts), ``acceptance_by_depth`` (accepted / attempted
        sibling tests per depth, pooled over the batch), ``accept_lengths`` (the batch's, prompt by prompt)
        and ``per_prompt`` (a list of those three plus ``target_forwards`` for every prompt).
        ``target_forwards`` counts the batch's forwards (prefill + rounds).
        """
        if prefix.cfg_scale != self.cfg_scale:
            raise ValueError("prefix and decoder disagree on the CFG scale")
        if self.fused_round is not False:
            from models.drafters.fused_round import fused_supported, generate_fused

            if (self.fused_round or hasattr(self.target, "speculative_round")) and fused_supported(self, prefix):
                return generate_fused(self, prefix, generator)
        start = time.perf_counter()
        target, n_tok = self.target, self.num_tokens
        t, dev, streams, batch = prefix.length, prefix.embeddings.device, prefix.streams, prefix.batch_size
        check_generators(generator, batch)
        max_nodes = self.proposer.max_nodes if self.proposer is not None else self.tree_cfg.max_nodes
        max_len = t + n_tok + max_nodes + 1
        tcache = target.new_cache(prefix.rows, max_len)
        dcache = (self.drafter.new_cache(prefix.rows, t + n_tok + self.tree_cfg.drafter_slots + 1)
                  if self.drafter is not None else None)
        if self.proposer is not None:
            self.proposer.reset()
        keys = key_validity(prefix, max_len)  # (rows, max_len) prefix validity; generated slots True

        self._prefix_len = t
        forced = forced_positions(self.allowed_tokens, n_tok, dev)
        hidden = prefill(target, prefix, tcache)
        roots = sample_per_prompt(self._combine(target.lm_head(hidden[:, -1]), 0), self.sampling, generator)  # (B,)
        active = list(range(batch)) if n_tok > 1 else []  # original prompt index of every prompt still running
        # every prompt's tokens so far; a round writes its emitted tokens (padded) after the prompt's last one
        out_tokens = torch.zeros(batch, n_tok + max_nodes + 1, dtype=torch.long, device=dev)
        out_tokens[:, 0] = roots
        n_out = [1] * batch
        n_out_rows = torch.ones(batch, dtype=torch.long, device=dev)  # n_out of the active prompts, on device
        last_tokens = roots  # (active,) the root of the next round: the last committed token
        forced_host = forced.tolist()
        lengths = torch.full((batch,), t, dtype=torch.long, device=dev)  # committed target length = root position
        lengths_host = [t] * batch  # the same on the host (from the verdicts the round reads anyway)
        # a chain's accepted path is nodes 0..a: at the committed length already when the tree starts there
        chain = self.template is not None and self.template.num_nodes == self.template.max_depth + 1
        # drafter inputs (per row): features at positions [dlen, dlen + pend_len) with the token of the following
        # position; condition positions carry token id 0, as in LANTERN's training data
        pend_feat = hidden
        if prefix.token_ids is not None:  # token prefixes (Chameleon): f_t is paired with the real x_{t+1}
            pend_ids = torch.cat([prefix.token_ids[:, 1:], tile_rows(roots, streams)[:, None]], dim=1)
        else:
            pend_ids = tile_rows(torch.cat([torch.zeros(batch, t - 1, dtype=torch.long, device=dev),
                                            roots[:, None]], dim=1), streams)
        pend_len = torch.full((batch,), t, dtype=torch.long, device=dev)
        dlen = torch.zeros(batch, dtype=torch.long, device=dev)
        dlen_host = [0] * batch
        per = [{"accept_lengths": [], "attempted": [], "accepted": [], "image_counts": [], "node_tvd": []}
               for _ in range(batch)]
        rounds = []  # per round: (active prompts, accepted lengths, batched verify result), read after the loop
        forwards = 1
        greedy = self.sampling.greedy
        prof = self.profiler
        while active:
            if prof is not None:
                prof.mark("drafter")
            gens = generator if generator is None or isinstance(generator, torch.Generator) else [
                generator[b] for b in active]
            rows = keys.shape[0]
            slot0 = max(lengths_host)
            level = all(n == slot0 for n in lengths_host)  # every prompt's tree starts at its committed length
            pos_rows = tile_rows(lengths, streams)
            prefix_keys = keys[:, :slot0]
            if not level:
                prefix_keys = prefix_keys & (torch.arange(slot0, device=dev) < pos_rows[:, None])
            if self.proposer is not None:  # 1-2. drafter-free chains (SJD): the previous iteration's predictions
                proposals = self.proposer.propose(active, last_tokens, [n_out[b] for b in active],
                                                  [n_tok - n_out[b] for b in active], gens,
                                                  target.lm_head.weight.shape[0])
                trees = stack_trees(proposals, width=getattr(self.proposer, "tree_width", None))
            else:
                # 1. drafter catch-up, every row at its own slots/positions dlen + j (padded entries are discarded)
                m = pend_ids.shape[1]
                pos = tile_rows(dlen, streams)[:, None] + torch.arange(m, device=dev)  # (rows, m)
                h_d = self._run_drafter(pend_feat, pend_ids, pos, dcache, pos,
                                        catch_up_mask(keys, pos, max(dlen_host) + m))
                last = tile_rows(pend_len - 1, streams)
                h_root = h_d[torch.arange(rows, device=dev), last][:, None]  # (rows, 1, H)
                dlen, dlen_host = lengths, lengths_host  # (neither is changed in place)
                if prof is not None:
                    prof.mark("tree")
                # 2. trees, written from the longest committed length on (shared slots)
                feed = self._shared_slot_feed(pos_rows, slot0, dcache, prefix_keys)
                if self.template is not None:
                    trees = self._static_tree(last_tokens, h_root, pos_rows, feed, gens)
                else:
                    trees = self._dynamic_tree(last_tokens, h_root, pos_rows, feed)
            # 3. one target forward over every prompt's tree (trees padded to the largest node count)
            if prof is not None:
                prof.mark("target")
            tok, dep = trees.tokens, trees.depths
            n = tok.shape[1]
            mask = torch.cat([prefix_keys[:, None, None, :].expand(-1, 1, n, -1),
                              tile_rows(trees.tree_mask, streams)[:, None]], dim=-1)
            slots = torch.arange(slot0, slot0 + n, device=dev)
            emb = target.embed_tokens(tile_rows(tok, streams))
            h_t = target.forward_hidden(emb, pos_rows[:, None] + tile_rows(dep, streams), tcache, slots,
                                        additive_mask(mask, emb.dtype))
            forwards += 1
            # (B, n) image-token index of every node
            index = (pos_rows[: len(active)] - t + 1)[:, None] + dep if self._needs_index else None
            probs = target_probs(self._combine(target.lm_head(h_t), index), self.sampling)  # (B, n, V)
            # 4. verify every prompt's tree in one call, each prompt with its own random stream
            if prof is not None:
                prof.mark("verify")
            res = verify_trees(trees, probs, self.accept, self.neighbours, greedy, gens, self.measure_shift,
                               self.verify_all_nodes)
            accept_host = res.accept_len.tolist()  # the round's one host sync of the verdict
            if self.proposer is not None or self.round_observer is not None:
                results = [res.result(i, a) for i, a in enumerate(accept_host)]
                if self.proposer is not None:  # redraft the rest of every window
                    self.proposer.update(active, proposals, results, probs, gens)
                if self.round_observer is not None:
                    self.round_observer(proposals if self.proposer is not None else trees, results)
            # 5. commit: each prompt's accepted path moves to the end of its own committed prefix
            if prof is not None:
                prof.mark("commit")
            a_max = max(accept_host) + 1
            path = res.path[:, :a_max]  # (B, a_max), padded by repeating the last node
            new_ids = res.emitted[:, :a_max]  # accepted drafts + next token, padded by repeating the next token
            if not (chain and level):  # (a chain's path at the committed length is in place: nothing moves)
                steps = torch.minimum(torch.arange(a_max, device=dev), res.accept_len[:, None])
                tcache.commit_rows(tile_rows(slot0 + path, streams), tile_rows(lengths[:, None] + steps, streams))
            act = torch.tensor(active, device=dev) if len(active) < batch else torch.arange(batch, device=dev)
            # the padding past a prompt's new tokens lands where its next round writes (the buffer has room)
            out_tokens[act[:, None], n_out_rows[:, None] + torch.arange(a_max, device=dev)] = new_ids
            rounds.append((active, accept_host, res))
            for b, a in zip(active, accept_host):
                per[b]["image_counts"].append(a + 1 - sum(forced_host[n_out[b] : n_out[b] + a + 1]))
                n_out[b] += a + 1
            pend_feat = h_t[torch.arange(rows, device=dev)[:, None], tile_rows(path, streams)]
            pend_ids = tile_rows(new_ids, streams)
            pend_len = res.accept_len + 1
            lengths = lengths + pend_len
            lengths_host = [n + a + 1 for n, a in zip(lengths_host, accept_host)]
            n_out_rows = n_out_rows + pend_len
            last_tokens = res.next_token
            # finished prompts drop out: their rows leave the caches and every per-row tensor
            keep = [i for i, b in enumerate(active) if n_out[b] < n_tok]
            if len(keep) < len(active):
                kb = torch.tensor(keep, dtype=torch.long, device=dev)
                krows = torch.cat([kb + s * len(active) for s in range(streams)])
                for cache in (tcache, dcache):
                    if cache is not None:
                        cache.select_batch(krows)
                keys, pend_feat = keys[krows], pend_feat[krows]
                pend_ids, pend_len, lengths, dlen = pend_ids[krows], pend_len[kb], lengths[kb], dlen[kb]
                lengths_host = [lengths_host[i] for i in keep]
                dlen_host = [dlen_host[i] for i in keep]
                n_out_rows, last_tokens = n_out_rows[kb], last_tokens[kb]
                active = [active[i] for i in keep]
        if prof is not None:
            prof.mark(None)
        tokens = out_tokens[:, :n_tok]
        for active_r, accept_r, res in rounds:  # per-prompt statistics, out of the loop
            for i, (b, a) in enumerate(zip(active_r, accept_r)):
                st = per[b]
                st["accept_lengths"].append(a)
                st["node_tvd"].append(res.node_tvd[i, : a + 1] if self.measure_shift else None)
                st["attempted"].append(res.attempted_per_depth[i])
                st["accepted"].append(res.accepted_per_depth[i])
        if tokens.is_cuda:
            torch.cuda.synchronize(tokens.device)
        latency = time.perf_counter() - start
        extra = round_statistics(per, n_tok)
        return tokens, GenerationStats(latency, n_tok * batch, forwards, extra)


def stream_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """A per-prompt tensor (B, ...) for every row of the caches (rows = streams·B, [cond; uncond]); a leading 1 is
    shared by every row (expanded, not copied)."""
    return tile_rows(x, rows // x.shape[0]) if x.shape[0] > 1 else x.expand(rows, *x.shape[1:])


def catch_up_mask(keys: torch.Tensor, pos: torch.Tensor, kv: int | None = None) -> torch.Tensor:
    """The drafter catch-up's mask (rows, 1, m, kv): query j of a row (at slot ``pos[r, j]``) sees the row's valid
    slots up to its own, and always itself (a padded prefix position has nothing else); kv = the last slot + 1
    (given by a caller that knows it on the host; otherwise read from ``pos``, a host sync)."""
    kv = int(pos.max()) + 1 if kv is None else kv
    slot = torch.arange(kv, device=pos.device)
    return ((keys[:, None, :kv] & (slot <= pos[:, :, None])) | (slot == pos[:, :, None]))[:, None]


def round_statistics(per: list[dict], n_tok: int) -> dict:
    """``GenerationStats.extra`` from every prompt's per-round records (accepted lengths, sibling tests attempted /
    accepted by depth, emitted tokens per forward, realised TVD): τ, acceptance by depth, per-prompt summaries."""
    batch = len(per)
    per_prompt = [{**_prompt_stats(st), **_tvd_summary(st["node_tvd"], n_tok - 1)} for st in per]
    extra = {
        "step_compression": sum(p["step_compression"] for p in per_prompt) / batch,
        "acceptance_by_depth": _by_depth([a for st in per for a in st["accepted"]],
                                         [a for st in per for a in st["attempted"]]),
        "accept_lengths": [a for p in per_prompt for a in p["accept_lengths"]],
        "per_prompt": per_prompt,
        # free (forced) tokens such as Lumina's newlines excluded: image tokens per target forward
        "step_compression_image": sum(p["step_compression_image"] for p in per_prompt) / batch,
    }
    if per_prompt and "node_tvd_mean" in per_prompt[0]:  # the realised shift per emitted token (issue 13)
        extra["node_tvd_mean"] = sum(p["node_tvd_mean"] for p in per_prompt) / len(per_prompt)
        extra["node_tvd_max"] = max(p["node_tvd_max"] for p in per_prompt)
    return extra


def _by_depth(accepted: list[torch.Tensor], attempted: list[torch.Tensor]) -> list[float]:
    """Accepted / attempted sibling tests per depth, summed over rounds (tensors of varying length)."""
    if not attempted:
        return []
    acc = att = None
    for a, b in zip(accepted, attempted):
        acc, att = _add_padded(acc, a), _add_padded(att, b)
    return [(float(a) / float(b) if b > 0 else float("nan")) for a, b in zip(acc.tolist(), att.tolist())]


def _tvd_summary(tvds: list, n: int) -> dict:
    """Mean / max realised per-node TVD (``VerifyResult.node_tvd``) over the first n verified tokens."""
    vals = [t for t in tvds if t is not None]
    vals = torch.cat(vals)[:n] if vals else None
    if vals is None or vals.numel() == 0:
        return {}
    return {"node_tvd_mean": float(vals.double().mean()), "node_tvd_max": float(vals.max())}


def _prompt_stats(st: dict) -> dict:
    taus = [a + 1 for a in st["accept_lengths"]]
    return {"step_compression": float(sum(taus) / len(taus)) if taus else 1.0,
            "acceptance_by_depth": _by_depth(st["accepted"], st["attempted"]),
            "accept_lengths": st["accept_lengths"], "target_forwards": 1 + len(taus),
            "step_compression_image": (float(sum(st["image_counts"]) / len(st["image_counts"]))
                                       if st["image_counts"] else 1.0)}


def _add_padded(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    if a is None:
        return b.clone()
    n = max(a.numel(), b.numel())
    out = torch.zeros(n, dtype=a.dtype, device=a.device)
    out[: a.numel()] += a
    out[: b.numel()] += b
    return out


def accept_from_args(args, spec, device, family=None) -> tuple[AcceptConfig, torch.Tensor | None]:
    """The acceptance rule the command line describes (exact, LANTERN δ, LANTERN++ λ, or GSD with ``--gsd``)
    and the neighbour table it needs (None for the exact rule and GSD)."""
    from models.registry import resolve_path

    if getattr(args, "gsd", False):
        from models.drafters.grouped import gsd_config_for

        accept = gsd_config_for(family, args.gsd_rank_window, args.gsd_prob_gap, args.gsd_dist)
    elif getattr(args, "lantern_tvd", None) is not None:
        accept = AcceptConfig(relax="lantern", k=args.lantern_k, delta=args.lantern_tvd)
    elif getattr(args, "lantern_lambda", None) is not None:
        accept = AcceptConfig(relax="lantern++", k=args.lantern_k, lam=args.lantern_lambda)
    else:
        accept = AcceptConfig.from_original_flags(args.lantern, args.lantern_k, args.lantern_delta)
    if accept.relax is not None:  # --lantern_budget / --lantern_residual (issue 13); not for GSD
        accept = replace(accept, budget=getattr(args, "lantern_budget", "sibling"),
                         residual=getattr(args, "lantern_residual", "exact"))
    neighbours = None
    if accept.needs_neighbours:  # LANTERN's table (GSD uses the target's own token embeddings)
        neighbours = engine_neighbours(family, resolve_path(spec, "codebook", args.codebook_path),
                                       accept.table_columns, device)
    return accept, neighbours


def engine_neighbours(family, path, k: int, device) -> torch.Tensor:
    """The neighbour table the verifier reads: ``k`` columns, rows checked against the family's codebook, and
    indexed by the family's token ids (tables are in VQ indices; Chameleon's image tokens are not)."""
    from models.drafters.neighbours import load_neighbour_table

    neighbours = load_neighbour_table(path, k=k, num_codes=getattr(family, "num_codes", None)).to(device)
    if hasattr(family, "neighbours_for_engine"):
        neighbours = family.neighbours_for_engine(neighbours)
    return neighbours


def build_speculative_decoder(family, args, sampling: SamplingConfig, cfg_scale: float) -> SpeculativeDecoder:
    """The decoder the ``generate_images --model_type eagle`` (or ``sjd``: no drafter) flags describe."""
    from models.drafters.choices import get_tree_choices
    from models.drafters.cnets import load_drafter
    from models.registry import get_spec, resolve_path

    spec = get_spec(args.model)
    target = family.target
    param = target.lm_head.weight
    accept, neighbours = accept_from_args(args, spec, param.device, family)
    if args.model_type == "sjd":  # Speculative Jacobi Decoding: the same round with a drafter-free proposer
        from models.drafters.jacobi import JacobiProposer

        proposer = JacobiProposer(args.sjd_window, args.sjd_coupling, sampling.greedy, allowed_tokens=family.allowed_tokens)
        return SpeculativeDecoder(target, None, family.num_image_tokens, sampling, cfg_scale, accept,
                                  neighbours=neighbours, allowed_tokens=family.allowed_tokens, proposer=proposer)
    drafter = load_drafter(resolve_path(spec, "drafter", args.drafter_path), param.device, param.dtype, target.config)
    static = args.static_tree or args.eagle_version == 1
    choices = tuple(tuple(c) for c in get_tree_choices(args.tree_choices)) if static else None
    tree = TreeConfig(static_choices=choices, top_k_draft=args.top_k_draft, depth=args.depth,
                      total_token=args.total_token, drafter_top_k=args.drafter_top_k)
    return SpeculativeDecoder(target, drafter, family.num_image_tokens, sampling, cfg_scale, accept, tree, neighbours,
                              family.allowed_tokens)
