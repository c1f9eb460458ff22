r"""Speculative Jacobi Decoding (SJD) and its maximal-coupling variant (MC-SJD) as a *proposer* of the one engine.

Notation: **p = target**, **q = draft distribution** (the papers use other letters).

SJD (Teng et al., arXiv 2410.01699, ICLR 2025). No drafter: the drafts are the target's own predictions from
the previous Jacobi iteration. A window of L draft tokens x_1..x_L follows the last committed token; each x_i
was sampled from a distribution q_i (its draft distribution). One target forward over prefix + window gives
p_i = p(· | prefix, x_{<i}) at every window position. Tokens are accepted left to right with the speculative
rule ``accept x_i with probability min(1, p_i(x_i) / q_i(x_i))``; at the first rejection the token is resampled
from ``normalise(max(0, p_i − q_i))`` and the iteration ends (all accepted: the next token is sampled from the
last p). The unaccepted rest of the window is **redrafted from the new predictions**: the position j after the
resampled token gets x_j ~ p_j^{(t)} (computed in this forward, in a context that held the old drafts) and
q_j := p_j^{(t)}; positions that enter the window for the first time are **initialised at random** (the
paper's default initialisation; q = uniform over the family's image vocabulary). Exactness holds for any q_i
that is fixed before x_i is drawn and from which x_i is drawn, so SJD is lossless.

In this engine an iteration is exactly one round of :class:`~models.ea_model.SpeculativeDecoder`: the "tree" is
a chain root → x_1 → … → x_L with ``draft_probs[i] = q_{i+1}``, verified by the static-tree rule of
:func:`~models.drafters.acceptance.verify_tree` (one child per node = the rule above); target forward, KV
commit, CFG (p is the CFG-combined processed distribution, so the next q is too), statistics and batching are
the engine's. This module only keeps each prompt's window between rounds.

MC-SJD (So et al., arXiv 2510.24211): independent redrafting makes drafts unstable across iterations (a
position's token changes even when its distribution barely does), which lowers acceptance. MC-SJD couples the
redraft of a position with its previous draft by **maximal coupling**: with previous draft x ~ q_old and new
distribution q_new, keep x with probability ``min(1, q_new(x) / q_old(x))``, otherwise draw from
``normalise(max(0, q_new − q_old))``. The new draft is still distributed as q_new (so verification against
q_new stays lossless) and equals the old one with the largest possible probability, 1 − TVD(q_old, q_new);
if the distribution did not change the draft is kept. Switch: ``coupling=True`` (``--sjd_coupling``).

Relaxed variants reuse the verifier's options: LANTERN / LANTERN++ (``AcceptConfig``) or GSD
(:mod:`models.drafters.grouped`) change only the acceptance test of the Jacobi drafts.

Window default 16 (SJD's Jacobi window length as we recall it from the paper's experiments; the method section
could not be re-read with the search tool this session — the flag ``--sjd_window`` sets it).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from models.generation import prompt_generator

from .acceptance import AcceptConfig, VerifyResult, verify_trees
from .tree import DraftTree, build_tree, stack_trees

__all__ = ["JacobiProposer", "maximal_coupling", "verify_chain", "SJD_DEFAULT_WINDOW"]

SJD_DEFAULT_WINDOW = 16


def maximal_coupling(old_tokens: torch.Tensor, old_q: torch.Tensor, new_q: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw x' ~ new_q coupled with x ~ old_q so that P(x' = x) = 1 − TVD(old_q, new_q) (maximal coupling).

    Keep x with probability min(1, new_q(x) / old_q(x)); otherwise draw from normalise(max(0, new_q − old_q)).
    Vectorised over leading dims: old_tokens (m,), old_q and new_q (m, V) -> (m,).
    """
    q_old_x = old_q.gather(-1, old_tokens[:, None]).squeeze(-1)
    q_new_x = new_q.gather(-1, old_tokens[:, None]).squeeze(-1)
    keep_prob = torch.where(q_old_x > 0, (q_new_x / q_old_x.clamp(min=1e-30)).clamp(max=1.0), torch.zeros_like(q_old_x))
    u = torch.rand(old_tokens.shape, generator=generator, device=old_tokens.device)
    residual = (new_q - old_q).clamp(min=0.0)
    mass = residual.sum(-1, keepdim=True)
    # keep_prob < 1 implies mass > 0; where mass ~ 0 the old token is kept anyway, new_q is a safe placeholder
    residual = torch.where(mass > 1e-12, residual / mass.clamp(min=1e-30), new_q)
    fresh = torch.multinomial(residual, 1, generator=generator).squeeze(-1)
    return torch.where(u < keep_prob, old_tokens, fresh)


def verify_chain(tree: DraftTree, target_probs: torch.Tensor, cfg: AcceptConfig, neighbours: torch.Tensor | None = None,
                 greedy: bool = False, generator: torch.Generator | None = None) -> VerifyResult:
    """:func:`~models.drafters.acceptance.verify_tree` for a chain, with the sibling tests of all positions in one
    vectorised call.

    On a chain every node has one child, so the test at node i (accept x_{i+1} with min(1, P̃_i(x_{i+1}) /
    q_i(x_{i+1})), residual normalise(max(0, P̃_i − q_i))) starts from r = p_i and does not depend on the other
    positions: :func:`~models.drafters.acceptance.verify_trees` runs the L tests at once (each against its own
    pre-drawn uniform), the accepted length is the run of passes before the first failure, and the next token is
    drawn from that node's residual (or from the last p when all pass). It is the engine's batched verifier on
    one chain of width 1 (the width every Jacobi chain has, so a prompt's draws do not depend on its batch).
    """
    trees = stack_trees([tree], width=1)
    return verify_trees(trees, target_probs[None], cfg, neighbours, greedy, generator).result(0)


class JacobiProposer:
    """Keeps every prompt's Jacobi window (draft tokens and their q) between rounds and builds the chains.

    The engine calls :meth:`propose` (one chain per active prompt) before its target forward and
    :meth:`update` (redraft from the new p) after verification; state is keyed by the prompt's index in the
    batch, so prompts that finish simply stop being asked for.
    """

    def __init__(self, window: int = SJD_DEFAULT_WINDOW, coupling: bool = False, greedy: bool = False,
                 vocab_size: int | None = None, allowed_tokens: torch.Tensor | None = None):
        if window < 1:
            raise ValueError(f"--sjd_window must be >= 1, got {window}")
        self.window, self.coupling, self.greedy = window, coupling, greedy
        self.vocab_size, self.allowed_tokens = vocab_size, allowed_tokens
        self._state: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._chains: dict[tuple[int, str], DraftTree] = {}  # chain structure per length (masks, paths)

    @property
    def max_nodes(self) -> int:
        return self.window + 1

    def reset(self) -> None:
        self._state = {}

    tree_width = 1  # every proposal is a chain: the verifier's children tables have one column

    def _chain(self, length: int, tokens: torch.Tensor) -> DraftTree:
        key = (length, str(tokens.device))
        if key not in self._chains:
            self._chains[key] = build_tree(tokens, torch.arange(-1, length, device=tokens.device))
        return self._chains[key]

    def _init_q(self, vocab: int, device, index: torch.Tensor, prompt: int) -> torch.Tensor:
        """Random initialisation of new window positions (image-token indices ``index`` (n,)): uniform over the
        tokens the family allows there -> (n, V). A position-dependent mask (e.g. Lumina's forced
        newlines) gives a point mass at a forced position, so its draft is always right."""
        allowed = self.allowed_tokens
        if allowed is None:
            return torch.full((index.numel(), vocab), 1.0 / vocab, device=device)
        if hasattr(allowed, "position_class"):  # per position (PositionalTokenMask; one row shared or per prompt)
            pc = allowed.position_class
            mask = allowed.classes[pc[prompt if pc.shape[0] > 1 else 0][index.clamp(0, pc.shape[-1] - 1)]]
        else:
            mask = allowed.expand(index.numel(), -1)
        mask = mask.to(device).float()
        return mask / mask.sum(-1, keepdim=True)

    def _draw(self, q: torch.Tensor, generator) -> torch.Tensor:
        if self.greedy:  # Jacobi decoding: the likeliest token (greedy verification ignores q)
            return q.argmax(-1)
        return torch.multinomial(q, 1, generator=generator).squeeze(-1)

    def propose(self, active: list[int], roots: torch.Tensor, produced: list[int], remaining: list[int], generators,
                vocab: int) -> list[DraftTree]:
        """One chain per active prompt: root (last committed token, image-token index ``produced − 1``) → its
        window, at most ``remaining − 1`` drafts (the round also yields one token of its own). New window
        positions are initialised at random."""
        trees = []
        dev = roots.device
        for i, b in enumerate(active):
            length = max(0, min(self.window, remaining[i] - 1))
            toks, q = self._state.get(b, (roots.new_zeros(0), torch.zeros(0, vocab, device=dev)))
            toks, q = toks[:length], q[:length]
            if toks.numel() < length:
                index = torch.arange(produced[i] + toks.numel(), produced[i] + length, device=dev)
                q_init = self._init_q(vocab, dev, index, b)
                gen = prompt_generator(generators, i)
                toks = torch.cat([toks, self._draw(q_init, gen)])
                q = torch.cat([q, q_init])
            self._state[b] = (toks, q)
            tokens = torch.cat([roots[i : i + 1], toks])
            # draft_probs[i] = q of node i's child; the last node is a leaf (no child), its row is unused
            draft_probs = torch.cat([q, torch.zeros(1, vocab, device=dev)])
            trees.append(replace(self._chain(length, tokens), tokens=tokens, draft_probs=draft_probs))
        return trees

    def update(self, active: list[int], trees: list[DraftTree], results, probs: torch.Tensor, generators) -> None:
        """Redraft after verification. With a accepted of L drafts, nodes a+1..L of this round's forward predicted
        the positions after the new token: those distributions are the new q, drafts are drawn from them
        (independently, or coupled with the old draft of the same position for MC-SJD)."""
        for i, (b, tr, res) in enumerate(zip(active, trees, results)):
            a, length = res.accept_len, tr.num_nodes - 1
            new_q = probs[i, a + 1 : length + 1].float()  # (L − a, V)
            if new_q.shape[0] == 0:
                self._state[b] = (tr.tokens.new_zeros(0), new_q)
                continue
            gen = prompt_generator(generators, i)
            if self.greedy:
                new_tok = new_q.argmax(-1)
            else:
                new_tok = torch.multinomial(new_q, 1, generator=gen).squeeze(-1) if not self.coupling else None
                if self.coupling:
                    # positions a+2..L held old drafts (nodes a+2..L, drawn from draft_probs rows a+1..L−1);
                    # the last new position (predicted by the leaf) is new to the window
                    old_tok, old_q = tr.tokens[a + 2 : length + 1], tr.draft_probs[a + 1 : length].float()
                    m = old_tok.numel()
                    coupled = maximal_coupling(old_tok, old_q, new_q[:m], gen) if m else old_tok
                    last = torch.multinomial(new_q[m:], 1, generator=gen).squeeze(-1)
                    new_tok = torch.cat([coupled, last])
            self._state[b] = (new_tok, new_q)
