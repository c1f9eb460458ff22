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
4. :func:`~models.drafters.acceptance.verify_tree` walks the tree (exact, LANTERN δ or LANTERN++ λ rule);
5. the accepted path's KV rows move into place in the pre-allocated cache (no recomputation) and its hidden
   states feed the drafter next round.

CFG runs through every stage: the drafter runs on the cond and uncond streams (same tokens, each stream's own
target features) and its logits are combined with the same scale as the target's. Batch: one prompt at a time
(two rows with CFG), as in the original.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from models.drafters.acceptance import AcceptConfig, verify_tree
from models.drafters.cnets import EagleDrafter
from models.drafters.tree import DraftTree, StaticTreeTemplate, select_dynamic_tree
from models.generation import GenerationStats, Prefix, key_validity, prefill
from models.sampling import SamplingConfig, cfg_combine, sample_token, target_probs


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


def _gumbel_topk(log_q: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k draws without replacement from softmax-normalised ``log_q`` (rows), in sampling order (Gumbel-top-k)."""
    u = torch.rand(log_q.shape, generator=generator, device=log_q.device, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(u.clamp(min=1e-20, max=1 - 1e-7)))
    return torch.topk(log_q.float() + gumbel, k, dim=-1).indices


class SpeculativeDecoder:
    """Speculative image-token generation for one family's target with an EAGLE drafter."""

    def __init__(
        self,
        target,
        drafter: EagleDrafter,
        num_tokens: int,
        sampling: SamplingConfig,
        cfg_scale: float,
        accept: AcceptConfig | None = None,
        tree: TreeConfig | None = None,
        neighbours: torch.Tensor | None = None,
        allowed_tokens: torch.Tensor | None = None,
    ):
        self.target, self.drafter, self.num_tokens = target, drafter, num_tokens
        self.drafter_dtype = next(drafter.parameters()).dtype
        self.sampling, self.cfg_scale = sampling, cfg_scale
        self.accept = accept or AcceptConfig()
        self.tree_cfg = tree or TreeConfig()
        self.allowed_tokens = allowed_tokens
        if self.accept.enabled and neighbours is None:
            raise ValueError("relaxed acceptance (--lantern) needs a neighbour table (generate_codebook)")
        self.neighbours = neighbours
        self.template = None
        if self.tree_cfg.static_choices is not None:
            self.template = StaticTreeTemplate.from_choices(self.tree_cfg.static_choices)
            widest = int(self.template.num_children.max())
            if self.tree_cfg.drafter_top_k is not None and self.tree_cfg.drafter_top_k < widest:
                raise ValueError(f"--drafter_top_k must be >= the widest node of the tree ({widest})")

    # ------------------------------------------------------------------------------------------ helpers
    def _combine(self, logits: torch.Tensor) -> torch.Tensor:
        """Raw (rows, ..., V) -> CFG-combined float logits with the family's vocabulary restriction."""
        out = cfg_combine(logits.float(), self.cfg_scale)
        if self.allowed_tokens is not None:
            out = out.masked_fill(~self.allowed_tokens, float("-inf"))
        return out

    def _draft_logits(self, feats: torch.Tensor) -> torch.Tensor:
        return self._combine(self.target.lm_head(feats.to(self.target.lm_head.weight.dtype)))

    def _draft_q(self, logits: torch.Tensor) -> torch.Tensor:
        """Drafter distribution Q for sampled (static) drafts: the target's sampler settings, optional top-k."""
        s = self.sampling
        top_k = self.tree_cfg.drafter_top_k if self.tree_cfg.drafter_top_k is not None else s.top_k
        q = SamplingConfig(temperature=s.temperature if not s.greedy else 1.0, top_k=top_k, top_p=s.top_p)
        return target_probs(logits, q)

    def _run_drafter(self, feats, ids, rope_pos, cache, cache_pos, mask):
        rows = feats.shape[0]
        ids = ids.expand(rows, -1) if ids.shape[0] == 1 else ids
        return self.drafter(feats.to(self.drafter_dtype), ids, rope_pos, cache, cache_pos, mask)

    # ------------------------------------------------------------------------------------------ trees
    def _dynamic_tree(self, root: torch.Tensor, h_root, r: int, dcache, prefix_keys, generator) -> DraftTree:
        """EAGLE-2: expand the best ``top_k_draft`` nodes per level; keep the best ``total_token − 1`` overall."""
        cfg, dev = self.tree_cfg, h_root.device
        k = cfg.top_k_draft
        logp = torch.log_softmax(self._draft_logits(h_root[:, -1]), dim=-1).squeeze(0)  # (V,)
        top = torch.topk(logp, k)
        tokens, parents, scores = [top.indices], [torch.full((k,), -1, device=dev)], [top.values]
        front_idx = torch.arange(k, device=dev)  # candidate indices of the frontier
        front_tok, front_score = top.indices, top.values
        front_feat = h_root[:, -1:].expand(-1, k, -1)  # parent features of the frontier nodes
        anc = torch.zeros(0, 0, dtype=torch.bool, device=dev)  # ancestry among fed frontier nodes
        front_anc_parent = torch.full((k,), -1, device=dev)  # fed-slot index of each frontier node's parent
        n_cand = k
        for d in range(1, cfg.depth):
            fed = anc.shape[0]
            # ancestry rows of the new frontier: parent's row plus itself
            rows = torch.zeros(k, fed + k, dtype=torch.bool, device=dev)
            has_parent = front_anc_parent >= 0
            if fed:
                rows[:, :fed] = torch.where(has_parent[:, None], anc[front_anc_parent.clamp(min=0)],
                                            torch.zeros(k, fed, dtype=torch.bool, device=dev))
            rows[:, fed:] = torch.eye(k, dtype=torch.bool, device=dev)
            anc = torch.cat([torch.cat([anc, torch.zeros(fed, k, dtype=torch.bool, device=dev)], 1), rows], 0)
            mask = torch.cat([prefix_keys[:, None, None, :].expand(-1, 1, k, -1), rows[None, None].expand(
                prefix_keys.shape[0], 1, -1, -1)], dim=-1)
            slots = torch.arange(r + fed, r + fed + k, device=dev)
            rope = torch.full((k,), r - 1 + d, device=dev)
            out = self._run_drafter(front_feat, front_tok[None], rope, dcache, slots, mask)  # (rows, k, H)
            logp = torch.log_softmax(self._draft_logits(out), dim=-1).reshape(k, -1)
            child = torch.topk(logp, k, dim=-1)  # (k, k)
            cum = front_score[:, None] + child.values
            tokens.append(child.indices.flatten())
            parents.append(front_idx[:, None].expand(-1, k).flatten())
            scores.append(cum.flatten())
            best = torch.topk(cum.flatten(), k).indices
            par_local = best // k
            front_idx = n_cand + best
            front_tok, front_score = child.indices.flatten()[best], cum.flatten()[best]
            front_feat = out[:, par_local]
            front_anc_parent = fed + par_local
            n_cand += k * k
        return select_dynamic_tree(torch.cat(tokens), torch.cat(parents), torch.cat(scores), cfg.total_token, root)

    def _static_tree(self, root: torch.Tensor, h_root, r: int, dcache, prefix_keys, generator) -> DraftTree:
        """Static choice list; node i's children are drawn without replacement from Q at node i."""
        tmpl = self.template.to(h_root.device) if self.template.parents.device != h_root.device else self.template
        n, dev, rows = tmpl.num_nodes, h_root.device, h_root.shape[0]
        vocab = self.target.lm_head.weight.shape[0]
        tokens = torch.zeros(n, dtype=torch.long, device=dev)
        tokens[0] = root
        q = torch.zeros(n, vocab, device=dev)
        node_out = torch.zeros(rows, n, h_root.shape[-1], device=dev, dtype=h_root.dtype)
        node_out[:, 0] = h_root[:, -1]
        offsets = tmpl.depth_offsets.tolist()
        widest = int(tmpl.num_children.max())
        for d in range(tmpl.max_depth):
            lo, hi = offsets[d], offsets[d + 1]
            if d > 0:  # feed this level's nodes to get their features and Q
                idx = torch.arange(lo, hi, device=dev)
                sub = tmpl.tree_mask[lo:hi, 1:hi]  # ancestry among non-root nodes fed so far
                mask = torch.cat([prefix_keys[:, None, None, :].expand(-1, 1, hi - lo, -1),
                                  sub[None, None].expand(rows, 1, -1, -1)], dim=-1)
                out = self._run_drafter(node_out[:, tmpl.parents[idx]], tokens[idx][None],
                                        torch.full((hi - lo,), r - 1 + d, device=dev), dcache, r + idx - 1, mask)
                node_out[:, lo:hi] = out
            q[lo:hi] = self._draft_q(self._draft_logits(node_out[:, lo:hi]).reshape(hi - lo, -1))
            if self.sampling.greedy:  # greedy verification only needs the likeliest drafts
                draws = torch.topk(q[lo:hi], widest, dim=-1).indices
            else:
                draws = _gumbel_topk(torch.log(q[lo:hi]), widest, generator)  # (level, widest)
            kids = tmpl.children[lo:hi]  # (level, C) rank order, -1 padded
            valid = kids >= 0
            tokens[kids[valid]] = draws[:, : kids.shape[1]][valid]
        return tmpl.make_tree(tokens, q)

    # ------------------------------------------------------------------------------------------ decoding
    @torch.no_grad()
    def generate(self, prefix: Prefix, generator: torch.Generator | None = None) -> tuple[torch.Tensor, GenerationStats]:
        """Generate ``num_tokens`` image tokens for a one-prompt prefix -> ((1, N) tokens, stats).

        ``stats.extra``: ``step_compression`` (τ, mean of accepted + 1 over target forwards after the
        prefill), ``acceptance_by_depth`` (accepted / attempted sibling tests per depth), ``accept_lengths``.
        """
        if prefix.cfg_scale != self.cfg_scale:
            raise ValueError("prefix and decoder disagree on the CFG scale")
        rows_expected = 2 if self.cfg_scale != 1.0 else 1
        if prefix.rows != rows_expected:
            raise ValueError("speculative decoding runs one prompt at a time")
        start = time.perf_counter()
        target, drafter, n_tok = self.target, self.drafter, self.num_tokens
        t, rows, dev = prefix.length, prefix.rows, prefix.embeddings.device
        max_len = t + n_tok + self.tree_cfg.max_nodes + 1
        tcache, dcache = target.new_cache(rows, max_len), drafter.new_cache(rows, max_len)
        keys = key_validity(prefix, max_len)

        hidden = prefill(target, prefix, tcache)
        root = sample_token(self._combine(target.lm_head(hidden[:, -1])), self.sampling, generator).squeeze(0)
        out = [root.view(1)]
        n_out = 1
        # drafter inputs: features at positions [dlen, r) with the token of the following position; condition
        # positions carry token id 0, as in LANTERN's training data
        pend_feat = hidden
        pend_ids = torch.cat([torch.zeros(t - 1, dtype=torch.long, device=dev), root.view(1)])[None]
        dlen = 0
        accept_lengths, attempted, accepted, tvds = [], None, None, []
        forwards = 1
        greedy = self.sampling.greedy
        while n_out < n_tok:
            r = tcache.length  # position of the root
            m = pend_ids.shape[1]
            pos = torch.arange(dlen, dlen + m, device=dev)
            causal = torch.ones(m, r, dtype=torch.bool, device=dev).tril(dlen)
            dmask = (keys[:, None, :r] & causal[None]) | (torch.arange(r, device=dev)[None, None] == pos[None, :, None])
            h_d = self._run_drafter(pend_feat, pend_ids, pos, dcache, pos, dmask[:, None])
            dlen = r
            prefix_keys = keys[:, :r]
            build = self._static_tree if self.template is not None else self._dynamic_tree
            tree = build(root, h_d[:, -1:], r, dcache, prefix_keys, generator)

            n = tree.num_nodes
            mask = torch.cat([prefix_keys[:, None, None, :].expand(-1, 1, n, -1),
                              tree.tree_mask[None, None].expand(rows, 1, -1, -1)], dim=-1)
            slots = torch.arange(r, r + n, device=dev)
            h_t = target.forward_hidden(target.embed_tokens(tree.tokens[None].expand(rows, -1)), r + tree.depths,
                                        tcache, slots, mask)
            forwards += 1
            probs = target_probs(self._combine(target.lm_head(h_t)).reshape(n, -1), self.sampling)
            res = verify_tree(tree, probs, self.accept, self.neighbours, greedy, generator)
            tcache.commit(r + res.path, r)
            new = torch.cat([tree.tokens[res.path[1:]], res.next_token.view(1)])
            out.append(new)
            n_out += new.numel()
            accept_lengths.append(res.accept_len)
            tvds.append(res.node_tvd)
            attempted = res.attempted_per_depth if attempted is None else _add_padded(attempted, res.attempted_per_depth)
            accepted = res.accepted_per_depth if accepted is None else _add_padded(accepted, res.accepted_per_depth)
            pend_feat, pend_ids = h_t[:, res.path], new[None]
            root = res.next_token
        tokens = torch.cat(out)[:n_tok][None]
        if tokens.is_cuda:
            torch.cuda.synchronize(tokens.device)
        latency = time.perf_counter() - start
        taus = [a + 1 for a in accept_lengths]
        by_depth = [] if attempted is None else [
            (float(a) / float(b) if b > 0 else float("nan")) for a, b in zip(accepted.tolist(), attempted.tolist())]
        extra = {
            "step_compression": float(sum(taus) / len(taus)) if taus else 1.0,
            "acceptance_by_depth": by_depth,
            "accept_lengths": accept_lengths,
            **_tvd_summary(tvds, n_tok - 1),
        }
        return tokens, GenerationStats(latency, n_tok, forwards, extra)


def _tvd_summary(tvds: list, n: int) -> dict:
    """Mean / max realised per-node TVD (``VerifyResult.node_tvd``) over the first n verified tokens."""
    vals = torch.cat([t for t in tvds if t is not None])[:n] if any(t is not None for t in tvds) else None
    if vals is None or vals.numel() == 0:
        return {}
    return {"node_tvd_mean": float(vals.double().mean()), "node_tvd_max": float(vals.max())}


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = max(a.numel(), b.numel())
    out = torch.zeros(n, dtype=a.dtype, device=a.device)
    out[: a.numel()] += a
    out[: b.numel()] += b
    return out


def build_speculative_decoder(family, args, sampling: SamplingConfig, cfg_scale: float) -> SpeculativeDecoder:
    """The decoder the ``generate_images --model_type eagle`` flags describe."""
    from models.drafters.choices import get_tree_choices
    from models.drafters.cnets import load_drafter
    from models.drafters.neighbours import load_neighbour_table
    from models.registry import get_spec, resolve_path

    spec = get_spec(args.model)
    target = family.target
    param = target.lm_head.weight
    drafter = load_drafter(resolve_path(spec, "drafter", args.drafter_path), param.device, param.dtype, target.config)
    if getattr(args, "lantern_tvd", None) is not None:
        accept = AcceptConfig(relax="lantern", k=args.lantern_k, delta=args.lantern_tvd)
    elif getattr(args, "lantern_lambda", None) is not None:
        accept = AcceptConfig(relax="lantern++", k=args.lantern_k, lam=args.lantern_lambda)
    else:
        accept = AcceptConfig.from_original_flags(args.lantern, args.lantern_k, args.lantern_delta)
    if accept.enabled:  # --lantern_budget / --lantern_residual (issue 13)
        accept = replace(accept, budget=getattr(args, "lantern_budget", "sibling"),
                         residual=getattr(args, "lantern_residual", "exact"))
    neighbours = None
    if accept.enabled:
        neighbours = load_neighbour_table(resolve_path(spec, "codebook", args.codebook_path),
                                          k=accept.table_columns).to(param.device)
    static = args.static_tree or args.eagle_version == 1
    choices = tuple(tuple(c) for c in get_tree_choices(args.tree_choices)) if static else None
    tree = TreeConfig(static_choices=choices, top_k_draft=args.top_k_draft, depth=args.depth,
                      total_token=args.total_token, drafter_top_k=args.drafter_top_k)
    return SpeculativeDecoder(target, drafter, family.num_image_tokens, sampling, cfg_scale, accept, tree, neighbours,
                              family.allowed_tokens)
