"""A minimal KV-cached class-conditional AR sampler with CFG, used only to *measure* the demo model.

This is not the project's generation engine; it exists so the training recipe can check its own result
(class accuracy, next-token flatness, seconds per image) without depending on that engine. CFG follows
LlamaGen: the batch is doubled to [cond; uncond] and the logits are combined as
``uncond + s · (cond − uncond)``; the next token is drawn from ``softmax(combined / temperature)``,
optionally restricted to the ``top_k`` largest logits (``top_k = 0`` keeps the full distribution).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.base_models.llamagen.gpt import LlamaGenGPT


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
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def sample_codes(
    gpt: LlamaGenGPT,
    labels: torch.Tensor,
    cfg_scale: float = 4.0,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Sample image codes (B, N) for class ``labels`` (B,) with a static KV cache; returns codes and stats.

    The condition sits at position 0 (``cls_token_num`` must be 1); image token k is fed at position 1 + k.
    With ``cfg_scale == 1`` only the conditional stream is run.
    """
    cfg = gpt.config
    if cfg.cls_token_num != 1:
        raise ValueError("sample_codes handles class-conditional models with cls_token_num == 1 only")
    device = gpt.tok_embeddings.weight.device
    labels = labels.to(device)
    b, n = labels.shape[0], cfg.block_size
    use_cfg = cfg_scale != 1.0
    cond = torch.cat([labels, gpt.null_condition(labels)]) if use_cfg else labels
    cache = gpt.new_cache(cond.shape[0], n + 1)
    codes = torch.empty(b, n, dtype=torch.long, device=device)
    entropy, top1, sampled = (torch.empty(b, n, device=device) for _ in range(3))

    h = gpt.embed_condition(cond)
    for k in range(n):
        pos = torch.tensor([k], device=device)
        # Without a mask, a cached call attends to every slot up to cache_pos: exactly the causal prefix.
        hidden = gpt.forward_hidden(h, pos, cache=cache, cache_pos=pos)
        logits = gpt.output(hidden[:, -1]).float()
        if use_cfg:
            logits = cfg_logits(logits, cfg_scale)
        logits = logits / max(temperature, 1e-5)
        probs = torch.softmax(logits, dim=-1)
        entropy[:, k] = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        top1[:, k] = probs.max(dim=-1).values
        if top_k > 0:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            draw = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        else:
            draw = probs
        tok = torch.multinomial(draw, 1, generator=generator).squeeze(1)
        sampled[:, k] = probs.gather(1, tok[:, None]).squeeze(1)
        codes[:, k] = tok
        h = gpt.embed_tokens(torch.cat([tok, tok]) if use_cfg else tok)[:, None]
    return codes, SampleStats(entropy, top1, sampled)
