"""The Chameleon transformer (Anole-7B, Lumina-mGPT-7B) as a target of the speculative engine.

Parameter names are transformers' ``ChameleonForConditionalGeneration`` names (``model.embed_tokens``,
``model.layers.N.self_attn.{q,k,v,o}_proj``, ``...self_attn.{q,k}_norm.{weight,bias}``, ``model.norm``,
``lm_head``, optionally ``model.vqmodel.*``), so the HF-converted Anole folder and Lumina-mGPT's folder load
as they are. Facts reproduced from transformers' classes (the numerical reference):

* RMSNorm in float32 (``weight · (x·rsqrt(mean x² + eps)).to(dtype)``), pre-norm layers (``swin_norm`` puts
  the norms after attention / MLP instead);
* qk-norm: q and k are layer-normed over head_dim (eps 1e-5, no affine), then multiplied / shifted by the
  per-head ``q_norm`` / ``k_norm`` weight and bias. transformers and Anole store them as
  ``[num_heads, head_dim]``; Lumina-mGPT stores ``[model_parallel_size, head_dim]`` (``[1, head_dim]``) and
  repeats each row over ``num_heads / rows`` heads at use — ``qk_norm_rows`` says which layout a model has;
* rotate-half RoPE, ``inv_freq = θ^(−2i/d)``, cos/sin computed in float32 and cast to the activations' dtype;
* transformers' class sets image-token logits to ``finfo.min`` (it only generates text); here logits are the
  plain ``lm_head`` of the final hidden state and the family decides which ids may be sampled.

:meth:`ChameleonCausalLM.forward_hidden` has the engine's interface (the same as
:meth:`models.base_models.llamagen.gpt.LlamaGenGPT.forward_hidden`): explicit RoPE positions, the project's
pre-allocated :class:`~models.drafters.kv_cache.KVCache` and a boolean tree/prefix mask, which is turned into an
additive float mask in the model dtype once per call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from models.base_models.chameleon.vqgan import Encoder, VectorQuantizer, VQGANConfig
from models.base_models.llamagen.gpt import RMSNorm, attend, cache_window
from models.drafters.kv_cache import KVCache


@dataclass
class ChameleonTargetConfig:
    """The ``ChameleonConfig`` fields the transformer needs (same names as ``config.json``)."""

    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    attention_bias: bool = False
    mlp_bias: bool = False
    swin_norm: bool = False
    model_parallel_size: int = 1
    qk_norm_rows: int | None = None  # rows of the stored q_norm/k_norm: num_heads (HF/Anole) or parallel size (Lumina)
    vq_config: dict | None = None  # present -> the model holds ``model.vqmodel`` (encoder side only, as HF)
    extra: dict = field(default_factory=dict)  # other config.json entries, kept for the family adapter

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.qk_norm_rows is None:
            self.qk_norm_rows = self.num_attention_heads
        if self.num_attention_heads % self.qk_norm_rows:
            raise ValueError(f"qk_norm_rows {self.qk_norm_rows} must divide num_attention_heads {self.num_attention_heads}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (Chameleon uses silu)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def model_type(self) -> str:
        """The condition kind the pipeline stages branch on (LlamaGen: c2i / t2i): a token prefix."""
        return "chameleon"

    @classmethod
    def from_dict(cls, d: dict, qk_norm_rows: int | None = None) -> ChameleonTargetConfig:
        """From a ``config.json`` of transformers 4.x/5.x (``rope_theta`` or ``rope_parameters``) or our own dict."""
        names = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: v for k, v in d.items() if k in names}
        rope = d.get("rope_parameters") or {}
        if "rope_theta" not in kw and isinstance(rope, dict) and "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        if d.get("rope_scaling") not in (None, {}) or (isinstance(rope, dict) and rope.get("rope_type", "default") != "default"):
            raise ValueError("RoPE scaling is not supported for Chameleon checkpoints")
        if qk_norm_rows is not None:
            kw["qk_norm_rows"] = qk_norm_rows
        kw["extra"] = {k: v for k, v in d.items() if k not in names and k not in ("vocabulary_map",)}
        return cls(**kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


def vqgan_config_from_hf(vq: dict) -> VQGANConfig:
    """transformers' ``ChameleonVQVAEConfig`` names -> the taming names of :class:`VQGANConfig`."""
    return VQGANConfig(
        embed_dim=vq.get("embed_dim", 256), n_embed=vq.get("num_embeddings", 8192),
        double_z=vq.get("double_latent", False), z_channels=vq.get("latent_channels", 256),
        resolution=vq.get("resolution", 512), in_channels=vq.get("in_channels", 3),
        ch=vq.get("base_channels", 128), ch_mult=list(vq.get("channel_multiplier", [1, 1, 2, 2, 4])),
        num_res_blocks=vq.get("num_res_blocks", 2), attn_resolutions=list(vq.get("attn_resolutions") or []),
        dropout=vq.get("dropout", 0.0),
    )


class VQEncoderPart(nn.Module):
    """``model.vqmodel``: the VQGAN encoder, codebook and 1x1 convs the HF checkpoints carry (no decoder)."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        self.encoder = Encoder(c)
        self.quantize = VectorQuantizer(c.n_embed, c.embed_dim)
        self.quant_conv = nn.Conv2d(c.z_channels, c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE tables in float32 math, cast to ``dtype``: positions (q,) -> cos, sin (q, head_dim);
    per-row positions (rows, q) (batched speculative decoding) -> (rows, 1, q, head_dim), broadcast over heads."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=pos.device) / head_dim))
    freqs = pos.float()[..., None] * inv_freq
    if pos.dim() == 2:
        freqs = freqs[:, None]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, q, D) rotated by cos/sin (q, D) or per row (B, 1, q, D)."""
    return x * cos + rotate_half(x) * sin


class QKNorm(nn.Module):
    """LayerNorm over head_dim without affine, then per-head weight/bias stored as ``[rows, head_dim]``."""

    def __init__(self, rows: int, head_dim: int, heads: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(rows, head_dim))
        self.bias = nn.Parameter(torch.zeros(rows, head_dim))
        self.repeat = heads // rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., heads, head_dim)
        w, b = self.weight, self.bias
        if self.repeat > 1:  # Lumina layout: one row per model-parallel shard, shared by its heads
            w, b = w.repeat_interleave(self.repeat, dim=0), b.repeat_interleave(self.repeat, dim=0)
        return F.layer_norm(x, (x.shape[-1],), None, None, eps=1e-5) * w + b


class ChameleonAttention(nn.Module):
    def __init__(self, c: ChameleonTargetConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim, self.theta = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rope_theta
        self.q_proj = nn.Linear(c.hidden_size, self.n_head * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=c.attention_bias)
        kv_rows = c.qk_norm_rows if c.qk_norm_rows != c.num_attention_heads else self.n_kv
        self.q_norm = QKNorm(c.qk_norm_rows, self.head_dim, self.n_head)
        self.k_norm = QKNorm(kv_rows, self.head_dim, self.n_kv)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, cache_pos, kv_len):
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.n_head, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, s, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(q, k, v, mask, cache, layer, cache_pos, kv_len)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class ChameleonMLP(nn.Module):
    def __init__(self, c: ChameleonTargetConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ChameleonDecoderLayer(nn.Module):
    def __init__(self, c: ChameleonTargetConfig):
        super().__init__()
        self.swin_norm = c.swin_norm
        self.self_attn = ChameleonAttention(c)
        self.mlp = ChameleonMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, layer, cache_pos, kv_len):
        if self.swin_norm:  # Chameleon-30B style: normalise the branch outputs
            x = x + self.input_layernorm(self.self_attn(x, cos, sin, mask, cache, layer, cache_pos, kv_len))
            return x + self.post_attention_layernorm(self.mlp(x))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, cache_pos, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class ChameleonBackbone(nn.Module):
    def __init__(self, c: ChameleonTargetConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([ChameleonDecoderLayer(c) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if c.vq_config is not None:
            self.vqmodel = VQEncoderPart(vqgan_config_from_hf(c.vq_config))


class ChameleonCausalLM(nn.Module):
    """Backbone + ``lm_head``; ``forward_hidden`` is the engine's call, ``forward`` a plain causal one."""

    def __init__(self, cfg: ChameleonTargetConfig):
        super().__init__()
        self.config = cfg
        self.model = ChameleonBackbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        p, c = self.lm_head.weight, self.config
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim,
                       device or p.device, dtype or p.dtype)

    def forward_hidden(
        self,
        h: torch.Tensor,
        rope_pos: torch.Tensor,
        cache: KVCache | None = None,
        cache_pos: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings h (B, q, H) -> last hidden states after the final norm (B, q, H).

        ``rope_pos`` (q,) are the RoPE positions. With a cache, keys/values are written at ``cache_pos`` (q,)
        (default: ``rope_pos``) and the queries see the first ``attn_mask.shape[-1]`` slots; ``attn_mask``
        (B or 1, 1, q, kv_len) is boolean (True = may attend) or already additive. Without cache and mask the
        call is causal over the q inputs.
        """
        cache_pos, kv_len = cache_window(h.shape[1], rope_pos, cache, cache_pos, attn_mask)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            # additive mask in the activations' dtype: SDPA's fused kernels take it directly
            attn_mask = torch.zeros(attn_mask.shape, dtype=h.dtype, device=h.device).masked_fill(
                ~attn_mask, torch.finfo(h.dtype).min)
        cos, sin = rope_cos_sin(rope_pos, self.config.head_dim, self.config.rope_theta, h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, attn_mask, cache, i, cache_pos, kv_len)
        return self.model.norm(h)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Causal call over ``input_ids`` (B, S) -> float32 logits (B, S, V) (no image-token masking)."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.lm_head(self.forward_hidden(self.embed_tokens(input_ids), position_ids)).float()
