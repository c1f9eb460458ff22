"""Logit processing shared by plain and speculative decoding.

Classifier-free guidance (CFG) runs on raw logits of the batch layout [cond; uncond]:
``l = l_u + s·(l_c − l_u)``; then temperature, top-k and top-p filter the combined logits, as in LlamaGen.
``target_probs`` is the one function that turns logits into the distribution p that both the sampler and the
speculative verifier use, so plain and speculative decoding agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """Sampler settings. ``temperature == 0`` means greedy (argmax)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, without the call when x already has it (a no-op conversion still costs its dispatch, and
    a decoding round makes dozens of them)."""
    return x if x.dtype == dtype else x.to(dtype)


def cfg_combine(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """[cond; uncond] (2B, ...) -> uncond + s·(cond − uncond) (B, ...). Without CFG (s == 1) the batch is cond only."""
    if cfg_scale == 1.0:
        return logits
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + cfg_scale * (cond - uncond)


def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) to -inf (keeps at least one token).

    top-p keeps the smallest prefix of the sorted distribution whose mass reaches ``top_p`` (the token that
    crosses the threshold is kept), as in LlamaGen / HF ``top_k_top_p_filtering``.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


def target_probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Processed distribution p (float32) from CFG-combined logits: temperature, top-k, top-p, softmax.

    For greedy decoding the temperature-1 distribution is returned (relaxed greedy acceptance compares
    masses); the token choice itself is the argmax.
    """
    logits = cast(logits, torch.float32)
    if not sampling.greedy and sampling.temperature != 1.0:  # (x / 1 is x: no op to dispatch)
        logits = logits / sampling.temperature
    logits = top_k_top_p_filter(logits, sampling.top_k, sampling.top_p)
    return torch.softmax(logits, dim=-1)


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of probs (..., V) -> (...,)."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def sample_with_uniforms(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs (B, V), uniforms (B,) in [0, 1) -> tokens (B,).

    Token v is returned iff cdf(v-1) <= u·total < cdf(v), so P(v) = p(v) exactly for u ~ U[0, 1); tokens with
    zero probability are never returned (also when rounding pushes u·total onto the total).
    """
    cdf = probs.cumsum(dim=-1)
    u = (cast(uniforms, cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    token = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    last_positive = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(token, last_positive)


def sample_token(
    logits: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """CFG-combined logits (B, V) -> tokens (B,): argmax when greedy, else a draw from ``target_probs``.

    With ``uniforms`` (B,) the draw is an inverse-CDF lookup (one random stream per row) instead of ``generator``.
    """
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = target_probs(logits, sampling)
    if uniforms is not None:
        return sample_with_uniforms(probs, uniforms)
    return sample_from_probs(probs, generator)
