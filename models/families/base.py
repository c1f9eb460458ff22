"""The interface every family adapter implements; the decoding engines only talk to this."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.generation import Prefix


@dataclass(frozen=True)
class SamplerDefaults:
    """A family's default sampler settings (the original's defaults per model)."""

    cfg: float
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


class ImageFamily:
    """A target model plus what it needs around it.

    Subclasses provide ``target`` (an object with ``forward_hidden``, ``lm_head``, ``embed_tokens``,
    ``new_cache``), ``num_image_tokens``, ``build_prefix`` and ``decode_images``.
    """

    name: str = "base"
    target: torch.nn.Module
    defaults: SamplerDefaults
    allowed_tokens: torch.Tensor | None = None  # (V,) bool, None = every token may be sampled

    @property
    def num_image_tokens(self) -> int:
        raise NotImplementedError

    def build_prefix(self, prompts: list[str], cfg_scale: float) -> Prefix:
        """Prompts -> condition prefix with rows [cond; uncond] (cond only when ``cfg_scale == 1``)."""
        raise NotImplementedError

    def decode_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens (B, N) -> images (B, 3, H, W) with values in [0, 1]."""
        raise NotImplementedError
