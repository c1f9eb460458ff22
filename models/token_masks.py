"""Which token ids may be sampled at each image-token position: ONE mechanism for plain AR, drafter and verifier.

A family restricts sampling either with a static vocabulary mask (``(V,)`` bool, e.g. LlamaGen's full
vocabulary or Anole's image ids 4..8195) or with a :class:`PositionalTokenMask`, whose allowed set depends on
the image-token index (Lumina-mGPT: a newline after every row of codes and an end-of-image token at the end).
A position whose allowed set has one token is *forced*: the CFG-combined logits become a point mass there, so
plain AR emits it, the drafter drafts it deterministically and the verifier (p = q = 1) always accepts it —
no special case anywhere in the engine.

"Image-token index" i counts generated tokens from 0 (the token right after the prefix); logits at sequence
position ``prefix_len + i − 1`` predict index i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PositionalTokenMask:
    """Allowed ids per image-token index, stored compactly as a few classes of positions.

    classes: (C, V) bool, the allowed ids of each class of positions.
    position_class: (B or 1, N) long, the class of every image-token index (leading batch/row dimension so
        that rows of one batch can differ; 1 = shared by every row). Indices >= N (draft nodes past the end,
        discarded anyway) use the class of index N − 1.
    """

    classes: torch.Tensor
    position_class: torch.Tensor

    @property
    def num_positions(self) -> int:
        return int(self.position_class.shape[-1])

    def mask_at(self, index: int | torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """Allowed ids at image-token ``index`` -> (*index.shape, V) bool.

        ``index`` (int or tensor) holds, per logit row, the image-token index it predicts; in a batch every row
        may be at its own index (batched speculative decoding), so ``index`` is broadcastable to the logits'
        leading shape. With one row of classes the rows share it; with one row per prompt, ``index``'s leading
        dimension is the prompt (``rows`` of them).
        """
        idx = torch.as_tensor(index, device=self.position_class.device).clamp(0, self.num_positions - 1)
        if self.position_class.shape[0] == 1:
            return self.classes[self.position_class[0][idx]]
        if rows is None or idx.dim() == 0 or idx.shape[0] != self.position_class.shape[0]:
            raise ValueError("a per-prompt token mask needs the image-token index of every prompt (leading dim)")
        b = torch.arange(idx.shape[0], device=idx.device).view(-1, *([1] * (idx.dim() - 1)))
        return self.classes[self.position_class[b, idx]]

    @property
    def forced(self) -> torch.Tensor:
        """(B or 1, N) bool: positions with exactly one allowed id (point masses)."""
        return self.classes.sum(-1)[self.position_class] == 1

    def to(self, device) -> PositionalTokenMask:
        return PositionalTokenMask(self.classes.to(device), self.position_class.to(device))


def apply_allowed_tokens(logits: torch.Tensor, allowed, index: int | torch.Tensor | None = None) -> torch.Tensor:
    """Set the logits of disallowed ids to -inf.

    ``allowed``: None (everything allowed), a static (V,) bool mask, or a :class:`PositionalTokenMask` — then
    ``index`` gives the image-token index predicted by each logit row: a scalar, or a tensor broadcastable to
    ``logits.shape[:-1]`` (e.g. (n,) for one tree over (rows, n, V), or (B, n) with one index per prompt row).
    """
    if allowed is None:
        return logits
    if isinstance(allowed, PositionalTokenMask):
        if index is None:
            raise ValueError("a position-dependent token mask needs the image-token index of the logits")
        index = torch.as_tensor(index, device=allowed.position_class.device)
        mask = allowed.mask_at(index, rows=index.shape[0] if index.dim() else None)  # (*index.shape, V)
    else:
        mask = allowed
    return logits.masked_fill(~mask.to(logits.device), float("-inf"))


def forced_positions(allowed, num_tokens: int, device=None) -> torch.Tensor:
    """(num_tokens,) bool: the image-token indices whose token is forced (never for a static mask)."""
    if isinstance(allowed, PositionalTokenMask):
        return allowed.forced[0, :num_tokens].to(device)
    return torch.zeros(num_tokens, dtype=torch.bool, device=device)
