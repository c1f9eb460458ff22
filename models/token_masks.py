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

    def mask_at(self, index: int | torch.Tensor) -> torch.Tensor:
        """Allowed ids at image-token ``index`` (int or tensor of any shape S) -> (B or 1, *S, V) bool."""
        idx = torch.as_tensor(index, device=self.position_class.device).clamp(0, self.num_positions - 1)
        cls = self.position_class[:, idx.reshape(-1)].reshape(self.position_class.shape[0], *idx.shape)
        return self.classes[cls]

    @property
    def forced(self) -> torch.Tensor:
        """(B or 1, N) bool: positions with exactly one allowed id (point masses)."""
        return self.classes.sum(-1)[self.position_class] == 1

    def to(self, device) -> PositionalTokenMask:
        return PositionalTokenMask(self.classes.to(device), self.position_class.to(device))


def apply_allowed_tokens(logits: torch.Tensor, allowed, index: int | torch.Tensor | None = None) -> torch.Tensor:
    """Set the logits of disallowed ids to -inf.

    ``allowed``: None (everything allowed), a static (V,) bool mask, or a :class:`PositionalTokenMask` — then
    ``index`` gives the image-token index predicted by each logit row; logits (B, *S, V) with index of shape S
    (or a scalar / shape broadcastable to S).
    """
    if allowed is None:
        return logits
    if isinstance(allowed, PositionalTokenMask):
        if index is None:
            raise ValueError("a position-dependent token mask needs the image-token index of the logits")
        mask = allowed.mask_at(index)
        if mask.dim() < logits.dim():  # a scalar index over (B, k, V) logits
            mask = mask.view(mask.shape[0], *([1] * (logits.dim() - mask.dim())), mask.shape[-1])
    else:
        mask = allowed
    return logits.masked_fill(~mask.to(logits.device), float("-inf"))


def forced_positions(allowed, num_tokens: int, device=None) -> torch.Tensor:
    """(num_tokens,) bool: the image-token indices whose token is forced (never for a static mask)."""
    if isinstance(allowed, PositionalTokenMask):
        return allowed.forced[0, :num_tokens].to(device)
    return torch.zeros(num_tokens, dtype=torch.bool, device=device)
