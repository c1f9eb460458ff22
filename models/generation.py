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

from models.sampling import (
    SamplingConfig,
    cast,
    cfg_combine,
    sample_from_probs,
    sample_token,
    sample_with_uniforms,
    target_probs,
)
from models.token_masks import apply_allowed_tokens


def tile_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x.repeat(n, 1, ...)``: n copies of ``x`` stacked along dim 0 ([x; x; ...], e.g. a per-prompt tensor for
    the cond and uncond rows of the caches), as one concatenation. Same values; on CPU ``repeat`` (a composite
    of several ops) costs about five times the dispatch of one ``cat``, and a round tiles a dozen tensors."""
    return torch.cat([x] * n) if n > 1 else x.clone()


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


def draw_noise(buf: torch.Tensor, generators: Generators) -> torch.Tensor:
    """Fill ``buf`` (B, V) float32 with the Exp(1) draws that ``torch.multinomial(probs, 1, generator)`` makes.

    Why: torch's one-sample multinomial is ``argmax(p / q)`` with ``q = empty_like(p).exponential_(1, gen)``
    (the Gumbel-max trick in exponential form, aten ``multinomial``'s fast path), preceded by validity checks
    that read values back to the host. Drawing ``q`` ourselves and taking the argmax inside the step (compiled or
    not) gives the same tokens from the same generator state, with no host sync and no graph break. With one
    generator per prompt, row b is drawn from generator b (as :func:`sample_per_prompt` draws row b alone).
    """
    if generators is None or isinstance(generators, torch.Generator):
        return buf.exponential_(1, generator=generators)
    for b, g in enumerate(generators):
        buf[b].exponential_(1, generator=g)
    return buf


def choose_tokens(logits, index, cfg_scale: float, sampling: SamplingConfig, allowed=None, noise=None,
                  uniforms=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw logits (rows, V) predicting image-token ``index`` (int or 0-/1-element tensor) -> (tokens (B,),
    CFG-combined restricted logits (B, V)).

    Greedy: argmax. Sampled: ``target_probs`` then, with ``uniforms`` (B, N), the inverse-CDF draw of column
    ``index``; otherwise ``argmax(p / noise)`` with ``noise`` from :func:`draw_noise` (= ``torch.multinomial``).
    Pure tensor code, so the compiled AR step (:func:`ar_step`) contains it.
    """
    combined = apply_allowed_tokens(cfg_combine(logits, cfg_scale), allowed, index)
    if sampling.greedy:
        return combined.argmax(dim=-1), combined
    probs = target_probs(combined, sampling)
    if uniforms is not None:
        u = uniforms[:, index] if isinstance(index, int) else uniforms.index_select(1, index.reshape(1))[:, 0]
        return sample_with_uniforms(probs, u.to(probs.device)), combined
    return (probs / noise).argmax(dim=-1), combined


def ar_step(target, token, step, cache, keys_valid, kv_len: int, prefix_len: int, cfg_scale: float,
            sampling: SamplingConfig, allowed=None, noise=None, uniforms=None):
    """One plain-AR step, token ids to the next tokens: feed ``token`` (B,), the image token of index ``step``
    ((1,) long tensor), and choose the token of index ``step + 1`` -> (tokens (B,), combined logits (B, V),
    ``step + 1``).

    The queries see the first ``kv_len`` cache slots, masked from ``keys_valid`` and the position inside the
    step (slots after the query's position are hidden), so ``kv_len`` may be the cache length: a step of fixed
    shapes whose position is a tensor, which :class:`~models.compiled.CompiledTarget` compiles as one graph
    (embedding, layers, head, CFG, token restriction, processing, choice) with no host sync.
    """
    rows = keys_valid.shape[0]
    pos = step + prefix_len
    emb = target.embed_tokens(tile_rows(token, rows // token.shape[0])[:, None])
    slots = torch.arange(kv_len, device=pos.device)
    mask = additive_mask(keys_valid[:, None, None, :kv_len] & (slots <= pos), emb.dtype)
    hidden = target.forward_hidden(emb, pos, cache, pos, mask)
    nxt = step + 1
    tokens, combined = choose_tokens(cast(target.lm_head(hidden[:, -1]), torch.float32), nxt, cfg_scale, sampling, allowed,
                                     noise, uniforms)
    return tokens, combined, nxt


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
    ``generator``: one shared generator or one per prompt (see :func:`sample_per_prompt`; the draws are the
    same, see :func:`draw_noise`).
    ``uniforms`` (B, num_tokens) replaces ``generator`` by one random stream per sample (inverse-CDF draws), so
    a sample's tokens do not depend on the batch it runs in. ``on_step(i, logits, tokens)`` sees the CFG-combined
    logits (B, V) and the chosen tokens of every step (for measurements such as next-token entropy).

    Every step after the first is :func:`ar_step`; a target that offers its own ``ar_step`` (the compiled one,
    :class:`~models.compiled.CompiledTarget`) runs it instead, with the same arguments.
    """
    start = time.perf_counter()
    rows, t = prefix.rows, prefix.length
    batch = prefix.batch_size
    check_generators(generator, batch)
    cache = target.new_cache(rows, t + num_tokens)
    keys_valid = key_validity(prefix, t + num_tokens)
    hidden = prefill(target, prefix, cache)
    if num_tokens == 0:
        return hidden.new_empty(batch, 0, dtype=torch.long), GenerationStats(time.perf_counter() - start, 0, 1)
    step_fn = getattr(target, "ar_step", None) or (lambda *args: ar_step(target, *args))
    logits = cast(target.lm_head(hidden[:, -1]), torch.float32)
    draws = not sampling.greedy and uniforms is None  # Exp(1) noise per step, drawn here: see draw_noise
    noise = draw_noise(logits.new_empty(batch, logits.shape[-1]), generator) if draws else None
    if uniforms is not None:
        uniforms = uniforms.to(hidden.device)
    token, combined = choose_tokens(logits, 0, prefix.cfg_scale, sampling, allowed_tokens, noise, uniforms)
    tokens = [token]
    if on_step is not None:
        on_step(0, combined, token)
    step = torch.zeros(1, dtype=torch.long, device=hidden.device)
    for i in range(1, num_tokens):
        if draws:
            draw_noise(noise, generator)
        token, combined, step = step_fn(token, step, cache, keys_valid, t + i, t, prefix.cfg_scale, sampling,
                                        allowed_tokens, noise, uniforms)
        tokens.append(token)
        if on_step is not None:
            on_step(i, combined, token)
    out = torch.stack(tokens, dim=1)
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    stats = GenerationStats(time.perf_counter() - start, num_tokens * batch, num_tokens)
    return out, stats
