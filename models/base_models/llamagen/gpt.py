"""LlamaGen GPT (``autoregressive/models/gpt.py`` architecture), class- and text-conditional.

Parameter names match the original checkpoints (``c2i_*.pt`` / ``t2i_*.pt`` store them under ``"model"``),
so real weights load as they are. Facts reproduced from the original:

* fused ``wqkv`` rows ordered [q; k; v], no biases anywhere, RMSNorm in float32;
* FFN hidden = ``find_multiple(int(2·4·dim/3), multiple_of)`` (or ``intermediate_size`` when given, as in the
  HF-converted LANTERN folders);
* 2-D RoPE on interleaved pairs: the first head_dim/4 pairs rotate with the grid row, the rest with the
  column; the ``cls_token_num`` condition positions get (cos, sin) = (0, 0), i.e. their q and k are zeroed;
* class-conditional: ``LabelEmbedder`` with ``num_classes + 1`` rows, the null class is ``num_classes``;
  text-conditional: ``CaptionEmbedder`` = Linear → GELU(tanh) → Linear (no biases) over T5 features, with the
  learned ``uncond_embedding`` buffer (120 × caption_dim) as the unconditional caption.

Beyond the original, :meth:`LlamaGenGPT.forward_hidden` runs any set of query positions against a
:class:`~models.drafters.kv_cache.KVCache` with an explicit boolean mask and explicit RoPE positions, which is
what plain decoding, tree verification and drafter-data generation all use.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from models.base_models.merged_linear import merge_linears
from models.drafters.kv_cache import KVCache
from models.sampling import cast

# Sizes as LlamaGen names them (n_layer, n_head, dim).
GPT_SIZES: dict[str, dict[str, int]] = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),
    "GPT-1B": dict(n_layer=22, n_head=32, dim=2048),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
    "GPT-7B": dict(n_layer=32, n_head=32, dim=4096),
}


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class GPTConfig:
    """LlamaGen ``ModelArgs`` (same field names) plus ``intermediate_size`` for HF-converted folders."""

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    intermediate_size: int | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    caption_dim: int = 2048
    class_dropout_prob: float = 0.1
    model_type: str = "c2i"
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.model_type not in ("c2i", "t2i"):
            raise ValueError(f"model_type must be 'c2i' or 't2i', got {self.model_type!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid_size(self) -> int:
        return int(round(self.block_size**0.5))

    @property
    def ffn_hidden(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Accept our own dict, LlamaGen ``ModelArgs``, or the conformance layout ``{"ModelArgs": {...}}``."""
        if "ModelArgs" in d:
            d = d["ModelArgs"]
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the same arithmetic (bitwise), without two no-op conversions, in one call
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def precompute_freqs_cis_2d(
    grid_size: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 120, extra_rows: int = 0
) -> torch.Tensor:
    """(cls_token_num + grid² + extra_rows, head_dim/2, 2) table of (cos, sin); condition and extra rows are 0."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    t = torch.arange(grid_size, dtype=torch.float32)
    f = torch.outer(t, freqs)  # (grid, head_dim/4)
    grid = torch.cat([f[:, None, :].expand(-1, grid_size, -1), f[None, :, :].expand(grid_size, -1, -1)], dim=-1)
    cache = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)
    zeros_front = torch.zeros(cls_token_num, half, 2)
    zeros_back = torch.zeros(extra_rows, half, 2)
    return torch.cat([zeros_front, cache, zeros_back])


def apply_rotary_emb(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, S, H, D) by freqs (S, D/2, 2) = (cos, sin), in float32.

    (x0 + i·x1)·(cos + i·sin) as one complex product: the same arithmetic as LlamaGen's stacked form
    (bitwise equal), several times faster for multi-token calls. ``freqs`` may also be per row (B, S, D/2, 2)
    (explicit per-row positions: batched speculative decoding, where every prompt sits at its own position).
    Under ``torch.compile`` (``--compile``) the product is written out on (cos, sin) pairs instead: inductor
    fuses that into the surrounding kernels, whereas complex views and products are aten fallbacks (~10
    extra launches per layer and step). ``freqs`` may also be :func:`rotary_freqs`' complex form, which a
    model computes once per forward for all its layers.
    """
    if torch.compiler.is_compiling():
        xs = x.float().reshape(*x.shape[:-1], -1, 2)
        f = freqs.float().unsqueeze(-3)  # (S, 1, D/2, 2) or (B, S, 1, D/2, 2): broadcast over heads
        re, im = xs[..., 0], xs[..., 1]
        cos, sin = f[..., 0], f[..., 1]
        return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(3).type_as(x)
    fc = freqs if freqs.is_complex() else rotary_freqs(freqs)
    xc = torch.view_as_complex(cast(x, torch.float32).reshape(*x.shape[:-1], -1, 2).contiguous())
    return cast(torch.view_as_real(xc * fc).flatten(3), x.dtype)


def rotary_freqs(freqs: torch.Tensor) -> torch.Tensor:
    """The (cos, sin) rows ``freqs`` (S, D/2, 2) or (B, S, D/2, 2) as the complex factors (S, 1, D/2) or
    (B, S, 1, D/2) that :func:`apply_rotary_emb` multiplies by: converted once per forward instead of in every
    layer. Under ``torch.compile`` they stay (cos, sin) pairs (the compiled rotation works on the pairs)."""
    if torch.compiler.is_compiling():
        return freqs
    return torch.view_as_complex(cast(freqs, torch.float32).contiguous()).unsqueeze(-2)


def rotate_qk(qk: torch.Tensor, freqs: torch.Tensor, n_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on the query and key heads of one projection together: ``qk`` (B, S, n_q + n_kv, D) -> q (B, n_q, S, D)
    and k (B, n_kv, S, D). The rotation acts on every head alike, so one call over both gives the numbers of one
    call each, with half the ops."""
    q, k = apply_rotary_emb(qk, freqs).split([n_q, qk.shape[2] - n_q], dim=2)
    return q.transpose(1, 2), k.transpose(1, 2)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    cache: KVCache | None,
    layer: int,
    cache_pos: torch.Tensor | None,
    kv_len: int,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """SDPA of q (B, H, q, D) over k, v (B, H_kv, q, D), through the cache when given; GQA heads repeated.

    With a cache, k and v are written at ``cache_pos`` and the first ``kv_len`` slots are attended; without a
    cache and without a mask, attention is causal over the inputs.
    """
    if cache is not None:
        k, v = cache.update(layer, cache_pos, k, v, kv_len)
        k, v = cast(k, q.dtype), cast(v, q.dtype)
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and cache is None,
                                          dropout_p=dropout_p)


def cache_window(
    q_len: int, rope_pos: torch.Tensor, cache: KVCache | None, cache_pos: torch.Tensor | None, attn_mask
) -> tuple[torch.Tensor | None, int]:
    """Cache slots to write (default: the RoPE positions) and how many slots the queries see."""
    if cache is None:
        return None, q_len
    if cache_pos is None:
        cache_pos = rope_pos
    kv_len = attn_mask.shape[-1] if attn_mask is not None else int(cache_pos.max()) + 1
    return cache_pos, kv_len


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)
        self.attn_dropout_p = cfg.attn_dropout_p

    def forward(self, x, freqs, mask, cache: KVCache | None, layer: int, cache_pos, kv_len):
        b, s, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        qk, v = self.wqkv(x).split([q_size + kv_size, kv_size], dim=-1)
        q, k = rotate_qk(qk.view(b, s, self.n_head + self.n_kv_head, self.head_dim), freqs, self.n_head)
        v = v.view(b, s, self.n_kv_head, self.head_dim).transpose(1, 2)
        dropout = self.attn_dropout_p if self.training else 0.0
        out = self.wo(attend(q, k, v, mask, cache, layer, cache_pos, kv_len, dropout).transpose(1, 2).reshape(b, s, -1))
        return self.resid_dropout(out) if self.training else out  # (eval: dropout is the identity)


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = cfg.ffn_hidden
        merge_linears(self, "w13", cfg.dim, {"w1": hidden, "w3": hidden})  # one product; keys stay w1, w3
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x)
        out = self.w2(F.silu(gate) * up)
        return self.ffn_dropout(out) if self.training else out


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, freqs, mask, cache, layer, cache_pos, kv_len):
        h = x + self.attention(self.attention_norm(x), freqs, mask, cache, layer, cache_pos, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class labels -> (B, 1, dim); row ``num_classes`` is the null class used for CFG."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels: torch.Tensor, train: bool = False) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)

    def null(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.full_like(labels, self.num_classes)


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """T5 caption features (B, T, caption_dim) -> (B, T, dim); ``uncond_embedding`` is the null caption."""

    def __init__(self, caption_dim: int, dim: int, uncond_prob: float, token_num: int = 120):
        super().__init__()
        self.cap_proj = MLP(caption_dim, dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(token_num, caption_dim) / caption_dim**0.5)
        self.uncond_prob = uncond_prob

    def forward(self, caption: torch.Tensor, train: bool = False) -> torch.Tensor:
        if train and self.uncond_prob > 0:
            drop = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
            caption = torch.where(drop[:, None, None], self.uncond_embedding.to(caption.dtype), caption)
        return self.cap_proj(caption)

    def null(self, caption: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(caption) + self.uncond_embedding.to(caption.dtype)


class LlamaGenGPT(nn.Module):
    """The LlamaGen transformer. ``forward`` keeps the original call; ``forward_hidden`` is the engine's."""

    # RoPE rows after the image grid (zero rotation), so draft-tree nodes past the last image token
    # still have a position; they are discarded anyway.
    ROPE_EXTRA_ROWS = 32

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.model_type == "c2i":
            self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        else:
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.class_dropout_prob)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.layers = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        freqs = precompute_freqs_cis_2d(
            cfg.grid_size, cfg.head_dim, cfg.rope_base, cfg.cls_token_num, self.ROPE_EXTRA_ROWS
        )
        self.register_buffer("freqs_cis", freqs, persistent=False)

    # -- pieces the engine and the family adapter use ------------------------------------------
    @property
    def lm_head(self) -> nn.Linear:
        return self.output

    @property
    def num_image_tokens(self) -> int:
        return self.config.block_size

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(ids)

    def embed_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """Labels (B,) or caption features (B, T, C) -> condition embeddings (B, cls_token_num, dim)."""
        return self.cls_embedding(cond, train=self.training)[:, : self.config.cls_token_num]

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional counterpart of ``cond`` (null class / learned null caption)."""
        return self.cls_embedding.null(cond)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        p = self.tok_embeddings.weight
        c = self.config
        return KVCache(c.n_layer, batch, c.n_kv_head, max_len, c.head_dim, device or p.device, dtype or p.dtype)

    def forward_hidden(
        self,
        h: torch.Tensor,
        rope_pos: torch.Tensor,
        cache: KVCache | None = None,
        cache_pos: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings h (B, q, dim) -> last hidden states after the final norm (B, q, dim).

        ``rope_pos`` (q,) indexes the RoPE table (= sequence position); (B, q) gives every row its own
        positions. With a cache, keys/values are written at ``cache_pos`` (q,) (or per row, (B, q)) and queries see the first ``attn_mask.shape[-1]`` slots, filtered by
        the boolean ``attn_mask`` (B or 1, 1, q, kv_len; True = may attend). Without a cache and without a
        mask, attention is causal over the q inputs.
        """
        cache_pos, kv_len = cache_window(h.shape[1], rope_pos, cache, cache_pos, attn_mask)
        freqs = rotary_freqs(self.freqs_cis[rope_pos])
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs, attn_mask, cache, i, cache_pos, kv_len)
        return self.norm(h)

    def forward(
        self,
        idx: torch.Tensor | None,
        cond_idx: torch.Tensor | None,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Original-style call without a cache: [condition; tokens] -> logits (float32).

        In training mode the logits are sliced from position ``cls_token_num - 1`` as the original does
        (one logit row per image token).
        """
        parts = []
        if cond_idx is not None:
            parts.append(self.embed_condition(cond_idx))
        if idx is not None:
            parts.append(self.embed_tokens(idx))
        h = self.tok_dropout(torch.cat(parts, dim=1))
        if input_pos is None:
            input_pos = torch.arange(h.shape[1], device=h.device)
        hidden = self.forward_hidden(h, input_pos, attn_mask=mask)
        logits = self.output(hidden).float()
        if self.training:
            logits = logits[:, self.config.cls_token_num - 1 :].contiguous()
        return logits
