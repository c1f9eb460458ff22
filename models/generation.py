"""Plain autoregressive decoding with a pre-allocated KV cache and classifier-free guidance.

Family-agnostic: a target exposes ``forward_hidden``, ``lm_head``, ``embed_tokens`` and ``new_cache``; the
family adapter supplies the prefix (condition embeddings for [cond; uncond] rows and which prefix positions
are real, not padding). This is the baseline that speculative decoding must reproduce exactly.

Batches: a prefix holds B prompts (2B rows with CFG, [cond_0..cond_{B-1}; uncond_0..uncond_{B-1}]). Random
draws come either from one shared ``torch.Generator`` or from one generator per prompt (:data:`Generators`),
consumed by that prompt only and in the same order whatever the batch: with per-image seeds an image's tokens
do not depend on the batch it ran in.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from models.sampling import SamplingConfig, cfg_combine, sample_from_probs, sample_token, target_probs
from models.token_masks import apply_allowed_tokens

# one generator shared by the batch, one per prompt, or None (torch's default generator)
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class Prefix:
    """Condition prefix for one batch: rows [cond; uncond] when CFG is on, cond only otherwise."""

    embeddings: torch.Tensor  # (rows, T, dim)
    valid: torch.Tensor  # (rows, T) bool: False at padding positions (never attended to)
    cfg_scale: float = 1.0
    # (rows, T) prefix token ids for token-prefix families (Chameleon): the drafter then reads the real next
    # token at every prefix position; None = condition embeddings (LlamaGen), whose positions carry id 0
    token_ids: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.embeddings.shape[0]

    @property
    def length(self) -> int:
        return self.embeddings.shape[1]

    @property
    def streams(self) -> int:
        """Rows per prompt: 2 with CFG ([cond; uncond]), else 1."""
        return 2 if self.cfg_scale != 1.0 else 1

    @property
    def batch_size(self) -> int:
        """Number of prompts."""
        return self.rows // self.streams


def prompt_generator(generators: Generators, b: int) -> torch.Generator | None:
    """The generator prompt ``b`` draws from (the shared one, or its own)."""
    if generators is None or isinstance(generators, torch.Generator):
        return generators
    return generators[b]


def check_generators(generators: Generators, batch: int) -> None:
    if not (generators is None or isinstance(generators, torch.Generator)) and len(generators) != batch:
        raise ValueError(f"{len(generators)} generators for {batch} prompts: give one per prompt (or one shared)")


def sample_per_prompt(logits: torch.Tensor, sampling: SamplingConfig, generators: Generators) -> torch.Tensor:
    """CFG-combined logits (B, V) -> tokens (B,); with one generator per prompt, row b draws from its own.

    Row b's draw is exactly what :func:`~models.sampling.sample_token` gives for that row alone with the same
    generator, so batch 1 and batch B agree.
    """
    if sampling.greedy or generators is None or isinstance(generators, torch.Generator):
        return sample_token(logits, sampling, generators)
    probs = target_probs(logits, sampling)
    return torch.cat([sample_from_probs(probs[b : b + 1], g) for b, g in enumerate(generators)])


def prefix_attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """(rows, T) validity -> (rows, 1, T, T) bool mask: causal, padded columns hidden, diagonal always visible.

    The diagonal exception is LlamaGen's: a padded query attends to itself only, so no row is empty.
    """
    t = valid.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(t, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean attention mask (True = may attend) -> additive float mask (0 / -inf) in the model's dtype.

    SDPA converts a boolean mask to this form in every layer; converting once per forward saves that work
    (the result is the same). Every query row must keep at least one visible key.
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def key_validity(prefix: Prefix, total_len: int) -> torch.Tensor:
    """(rows, total_len) bool: the prefix validity followed by True for every generated position."""
    tail = torch.ones(prefix.rows, total_len - prefix.length, dtype=torch.bool, device=prefix.valid.device)
    return torch.cat([prefix.valid, tail], dim=1)


@torch.no_grad()
def prefill(target, prefix: Prefix, cache) -> torch.Tensor:
    """Run the condition prefix through the target, filling the cache; returns the last hidden states (rows, T, dim)."""
    pos = torch.arange(prefix.length, device=prefix.embeddings.device)
    hidden = target.forward_hidden(prefix.embeddings, pos, cache, pos, prefix_attention_mask(prefix.valid))
    cache.length = prefix.length
    return hidden


@dataclass
class GenerationStats:
    latency: float = 0.0
    num_tokens: int = 0
    target_forwards: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.latency if self.latency > 0 else float("nan")


@torch.inference_mode()
def generate_ar(
    target,
    prefix: Prefix,
    num_tokens: int,
    sampling: SamplingConfig,
    generator: Generators = None,
    allowed_tokens: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
    on_step=None,
) -> tuple[torch.Tensor, GenerationStats]:
    """Sample ``num_tokens`` image tokens for every prompt of the prefix -> (B, num_tokens), stats.

    One target forward per token after the prefill; the unconditional rows receive the same tokens as the
    conditional ones. ``allowed_tokens`` restricts sampling: a (V,) bool vocabulary mask or a per-position
    :class:`~models.token_masks.PositionalTokenMask` (forced tokens are point masses).
    ``generator``: one shared generator or one per prompt (see :func:`sample_per_prompt`).
    ``uniforms`` (B, num_tokens) replaces ``generator`` by one random stream per sample (inverse-CDF draws), so
    a sample's tokens do not depend on the batch it runs in. ``on_step(i, logits, tokens)`` sees the CFG-combined
    logits (B, V) and the chosen tokens of every step (for measurements such as next-token entropy).
    """
    start = time.perf_counter()
    rows, t = prefix.rows, prefix.length
    batch = prefix.batch_size
    check_generators(generator, batch)
    cache = target.new_cache(rows, t + num_tokens)
    keys_valid = key_validity(prefix, t + num_tokens)
    hidden = prefill(target, prefix, cache)
    logits = target.lm_head(hidden[:, -1]).float()
    out = torch.empty(batch, num_tokens, dtype=torch.long, device=hidden.device)
    forwards = 1
    for i in range(num_tokens):
        combined = cfg_combine(logits, prefix.cfg_scale)
        combined = apply_allowed_tokens(combined, allowed_tokens, i)  # static or per-position mask
        if uniforms is not None:
            token = sample_token(combined, sampling, None, uniforms[:, i].to(combined.device))
        else:
            token = sample_per_prompt(combined, sampling, generator)
        out[:, i] = token
        if on_step is not None:
            on_step(i, combined, token)
        if i == num_tokens - 1:
            break
        pos = torch.tensor([t + i], device=hidden.device)
        ids = token.repeat(rows // batch)[:, None]
        emb = target.embed_tokens(ids)
        h = target.forward_hidden(emb, pos, cache, pos, additive_mask(keys_valid[:, None, None, : t + i + 1], emb.dtype))
        logits = target.lm_head(h[:, -1]).float()
        forwards += 1
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    stats = GenerationStats(time.perf_counter() - start, num_tokens * batch, forwards)
    return out, stats
