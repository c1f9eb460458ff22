"""LlamaGen family (C2I, T2I Stage I/II, and the built-in demo, which is a small C2I model)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.base_models.llamagen.gpt import LlamaGenGPT
from models.base_models.llamagen.t5 import T5Embedder, to_left_padding
from models.base_models.llamagen.vq_model import VQModel
from models.families.base import ImageFamily, SamplerDefaults
from models.generation import Prefix


def parse_class_prompt(prompt: str, num_classes: int) -> int:
    """A C2I prompt is a class index such as ``"207"``."""
    try:
        label = int(prompt.strip())
    except ValueError:
        raise ValueError(f"class-conditional models take class indices as prompts (0..{num_classes - 1}), got {prompt!r}") from None
    if not 0 <= label < num_classes:
        raise ValueError(f"class index {label} out of range 0..{num_classes - 1}")
    return label


class LlamaGenFamily(ImageFamily):
    """LlamaGen GPT + VQ; T2I adds a FLAN-T5 encoder, C2I maps prompts to class ids."""

    def __init__(
        self,
        name: str,
        target: LlamaGenGPT,
        vq: VQModel,
        defaults: SamplerDefaults,
        text_encoder: T5Embedder | None = None,
        class_parser: Callable[[str], int] | None = None,
    ):
        self.name, self.target, self.vq, self.defaults = name, target, vq, defaults
        self.text_encoder = text_encoder
        cfg = target.config
        self.class_parser = class_parser or (lambda p: parse_class_prompt(p, cfg.num_classes))
        if cfg.model_type == "t2i" and text_encoder is None:
            raise ValueError("a text-conditional LlamaGen model needs a T5 text encoder")

    @property
    def num_image_tokens(self) -> int:
        return self.target.config.block_size

    @property
    def num_codes(self) -> int:
        """VQ codebook size = the rows a neighbour table must have (LlamaGen's token id is the VQ index)."""
        return self.vq.config.codebook_size

    @property
    def device(self) -> torch.device:
        return self.target.tok_embeddings.weight.device

    def conditions(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (cond_idx, validity of the condition positions) in LlamaGen's layout."""
        cfg = self.target.config
        if cfg.model_type == "c2i":
            labels = torch.tensor([self.class_parser(p) for p in prompts], device=self.device)
            return labels, torch.ones(len(prompts), cfg.cls_token_num, dtype=torch.bool, device=self.device)
        embs, masks = self.text_encoder.get_text_embeddings(prompts)
        dtype = self.target.tok_embeddings.weight.dtype
        cond, masks = to_left_padding(embs.to(self.device, dtype), masks.to(self.device))
        return cond, masks.bool()

    def prefix_from_conditions(self, cond: torch.Tensor, valid: torch.Tensor, cfg_scale: float) -> Prefix:
        """Condition tensors -> prefix; the uncond rows (null class / null caption) share the cond rows' padding."""
        if cfg_scale != 1.0:
            cond = torch.cat([cond, self.target.null_condition(cond)])
            valid = torch.cat([valid, valid])
        return Prefix(self.target.embed_condition(cond), valid, cfg_scale)

    @torch.no_grad()
    def build_prefix(self, prompts: list[str], cfg_scale: float) -> Prefix:
        return self.prefix_from_conditions(*self.conditions(prompts), cfg_scale)

    @torch.no_grad()
    def decode_images(self, tokens: torch.Tensor) -> torch.Tensor:
        vq_dtype = next(self.vq.parameters()).dtype
        images = self.vq.decode_codes(tokens.to(next(self.vq.parameters()).device)).to(vq_dtype)
        return ((images.float() + 1) / 2).clamp(0, 1)
