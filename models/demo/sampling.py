"""Sampling with per-step statistics, used by the training recipe to *measure* the demo model.

Thin layer over :func:`models.generation.generate_ar` (KV cache, CFG as LlamaGen: [cond; uncond] combined as
``uncond + s · (cond − uncond)``, temperature, ``top_k = 0`` = full distribution) that records how flat the
next-token distributions are (entropy, top-1 probability, probability of the sampled token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.base_models.llamagen.gpt import LlamaGenGPT
from models.generation import Prefix, generate_ar
from models.sampling import SamplingConfig, cfg_combine


@dataclass
class SampleStats:
    """Per-step statistics of the CFG-combined next-token distribution p (temperature applied, before top-k).

    All tensors are (B, N): entropy of p in nats, max_b p, and p of the token that was sampled.
    """

    entropy: torch.Tensor
    top1_prob: torch.Tensor
    sampled_prob: torch.Tensor


def cfg_logits(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Combine stacked [cond; uncond] logits (2B, V) into (B, V) as ``uncond + s · (cond − uncond)``."""
    return cfg_combine(logits, cfg_scale)


@torch.no_grad()
def sample_codes(
    gpt: LlamaGenGPT,
    labels: torch.Tensor,
    cfg_scale: float = 4.0,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Sample image codes (B, N) for class ``labels`` (B,) with the project's AR decoder; returns codes and stats.

    The statistics describe p = softmax(CFG-combined logits / temperature) before top-k, at every step.
    """
    device = gpt.tok_embeddings.weight.device
    labels = labels.to(device)
    b, n = labels.shape[0], gpt.config.block_size
    cond = torch.cat([labels, gpt.null_condition(labels)]) if cfg_scale != 1.0 else labels
    prefix = Prefix(gpt.embed_condition(cond), torch.ones(cond.shape[0], gpt.config.cls_token_num, dtype=torch.bool,
                                                          device=device), cfg_scale)
    entropy, top1, sampled = (torch.empty(b, n, device=device) for _ in range(3))

    def record(k: int, logits: torch.Tensor, tok: torch.Tensor) -> None:
        probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
        entropy[:, k] = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        top1[:, k] = probs.max(dim=-1).values
        sampled[:, k] = probs.gather(1, tok[:, None]).squeeze(1)

    codes, _ = generate_ar(gpt, prefix, n, SamplingConfig(temperature=temperature, top_k=top_k), generator,
                           on_step=record)
    return codes, SampleStats(entropy, top1, sampled)
