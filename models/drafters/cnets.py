"""The EAGLE drafter shared by the families (SPEC §4).

At position t it reads the target's last hidden state f_t (after the final norm, i.e. the lm_head input) and
the embedding of the *next* token x_{t+1}: ``h = fc(concat(emb(x_{t+1}), f_t))``, then one (or more) decoder
layers of the target family, and predicts f̂_{t+1}; the target's frozen ``lm_head`` turns that into draft
logits. Layer 0 has no input norm and there is no final norm (EAGLE). Key names follow LANTERN's released
drafters (``embed_tokens``, ``fc``, ``layers.0.self_attn.q_proj`` ...), so ``pytorch_model.bin`` files load.

LlamaGen specifics: the decoder layer uses LlamaGen's 2-D RoPE on interleaved pairs. Drafter position t
carries token x_{t+1}, so its RoPE row is the target's row t+1: the table has ``cls_token_num − 1`` leading
zero rows (119 for T2I).

Chameleon specifics (``family="chameleon"``, LANTERN's Anole/Lumina drafter, ``jadohu/anole_drafter``): every
layer has ``input_layernorm``; q and k are layer-normed over head_dim and scaled/shifted by per-head
``q_norm``/``k_norm`` ([num_heads, head_dim]) as in the Chameleon target, then rotated by 1-D rotate-half RoPE
(``rope_theta``) at the sequence positions (RoPE is relative, so position t vs t+1 makes no difference).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from models.base_models.llamagen.gpt import (
    RMSNorm,
    attend,
    cache_window,
    precompute_freqs_cis_2d,
    rotary_freqs,
    rotate_qk,
)
from models.base_models.merged_linear import merge_linears
from models.drafters.kv_cache import KVCache
from models.sampling import cast

# LANTERN's drafter configs name the target by ``input_type``; these are the grid and prefix it implies.
INPUT_TYPES = {"t2i": (256, 120), "t2i2": (1024, 120), "c2i": (576, 1)}


@dataclass
class DrafterConfig:
    """Drafter sizes (LlamaConfig field names, as in LANTERN's ``config.json``) plus the target's layout."""

    hidden_size: int = 1280
    intermediate_size: int = 3584
    num_attention_heads: int = 20
    num_key_value_heads: int | None = None
    vocab_size: int = 16384
    num_hidden_layers: int = 1
    rms_norm_eps: float = 1e-6
    rope_base: float = 10000.0
    block_size: int = 256  # image tokens of the target (grid²)
    cls_token_num: int = 120  # condition positions of the target
    bias: bool = True  # fc bias (LANTERN builds Model(config, bias=True))
    family: str = "llamagen"  # "llamagen" (2-D RoPE Llama layer) or "chameleon" (qk-norm, rotate-half RoPE)
    input_type: str | None = None
    qk_norm_rows: int | None = None  # chameleon: rows of q_norm/k_norm (heads; 1 in Lumina-layout weights)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> DrafterConfig:
        """Our config.json, or LANTERN's (layout derived from ``input_type`` as its ``Model.__init__`` does)."""
        d = dict(d.get("config_json", d))
        if d.get("model_type") == "chameleon":  # LANTERN's Anole/Lumina drafter config (a ChameleonConfig)
            d.setdefault("family", "chameleon")
            d.setdefault("rope_base", d.get("rope_theta", 10000.0))
            d.setdefault("block_size", 0)
            d.setdefault("cls_token_num", 0)
        if "block_size" not in d and d.get("input_type") in INPUT_TYPES:
            d["block_size"], d["cls_token_num"] = INPUT_TYPES[d["input_type"]]
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


class DrafterAttention(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, kv = self.n_head * self.head_dim, self.n_kv * self.head_dim
        merge_linears(self, "qkv_proj", cfg.hidden_size, {"q_proj": q, "k_proj": kv, "v_proj": kv})
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, freqs, mask, cache, layer, cache_pos, kv_len):
        b, s, _ = x.shape
        qk, v = self.qkv_proj.fused(x, 2)  # q and k rotate together (rotate_qk)
        q, k = rotate_qk(qk.view(b, s, self.n_head + self.n_kv, self.head_dim), freqs, self.n_head)
        v = v.view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        out = attend(q, k, v, mask, cache, layer, cache_pos, kv_len)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class ChameleonDrafterAttention(DrafterAttention):
    """Chameleon attention: per-head qk-norm before rotate-half RoPE (freqs = (cos, sin) tables)."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__(cfg)
        from models.base_models.chameleon.model import QKNorm

        rows = cfg.qk_norm_rows or self.n_head
        self.q_norm = QKNorm(rows, self.head_dim, self.n_head)
        self.k_norm = QKNorm(self.n_kv if rows == self.n_head else rows, self.head_dim, self.n_kv)

    def forward(self, x, freqs, mask, cache, layer, cache_pos, kv_len):
        from models.base_models.chameleon.model import apply_rope

        b, s, _ = x.shape
        cos, sin = freqs
        q, k, v = self.qkv_proj(x)
        q = self.q_norm(q.view(b, s, self.n_head, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(b, s, self.n_kv, self.head_dim)).transpose(1, 2)
        v = v.view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        out = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask, cache, layer, cache_pos, kv_len)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class DrafterMLP(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        merge_linears(self, "gate_up_proj", cfg.hidden_size,
                      {"gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size})
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DrafterLayer(nn.Module):
    """Llama decoder layer; the first layer of the drafter has no input norm (its input is ``fc``'s output)."""

    def __init__(self, cfg: DrafterConfig, index: int):
        super().__init__()
        chameleon = cfg.family == "chameleon"
        self.self_attn = ChameleonDrafterAttention(cfg) if chameleon else DrafterAttention(cfg)
        self.mlp = DrafterMLP(cfg)
        if index != 0 or chameleon:  # LANTERN's Chameleon drafter keeps the input norm in layer 0 too
            self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, freqs, mask, cache, layer, cache_pos, kv_len):
        h = self.input_layernorm(x) if hasattr(self, "input_layernorm") else x
        x = x + self.self_attn(h, freqs, mask, cache, layer, cache_pos, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class EagleDrafter(nn.Module):
    """fc([emb(x_{t+1}); f_t]) -> decoder layer(s) -> f̂_{t+1}. Call ``lm_head`` of the target on the output."""

    ROPE_EXTRA_ROWS = 64  # positions past the last image token (draft nodes beyond the end), zero rotation

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DrafterLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=cfg.bias)
        if cfg.family == "chameleon":
            return  # 1-D RoPE computed from the positions at each call
        grid = int(round(cfg.block_size**0.5))
        freqs = precompute_freqs_cis_2d(grid, cfg.head_dim, cfg.rope_base, max(cfg.cls_token_num - 1, 0),
                                        self.ROPE_EXTRA_ROWS)
        self.register_buffer("freqs_cis", freqs, persistent=False)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        c, w = self.config, self.fc.weight
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim,
                       device or w.device, dtype or w.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.Tensor,
        rope_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cache_pos: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """f (B, q, H) and next tokens (B, q) -> predicted next features (B, q, H).

        Positions, cache and mask work as in :meth:`LlamaGenGPT.forward_hidden`; without them the call is
        causal over the q inputs at positions 0..q−1 (the original's training/conformance call).
        """
        if rope_pos is None:
            rope_pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.fc(torch.cat([cast(self.embed_tokens(input_ids), hidden_states.dtype), hidden_states], dim=-1))
        cache_pos, kv_len = cache_window(h.shape[1], rope_pos, cache, cache_pos, attn_mask)
        if self.config.family == "chameleon":
            from models.base_models.chameleon.model import rope_cos_sin

            freqs = rope_cos_sin(rope_pos, self.config.head_dim, self.config.rope_base, h.dtype)
            if attn_mask is not None and attn_mask.dtype == torch.bool:  # additive, in the activations' dtype
                attn_mask = torch.zeros(attn_mask.shape, dtype=h.dtype, device=h.device).masked_fill(
                    ~attn_mask, torch.finfo(h.dtype).min)
        else:
            freqs = rotary_freqs(self.freqs_cis[rope_pos])
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs, attn_mask, cache, i, cache_pos, kv_len)
        return h


DRAFTER_LAYOUT_HINT = (
    "  a drafter folder with config.json (LlamaConfig fields + input_type, or this project's DrafterConfig)\n"
    "  and pytorch_model.bin or model.safetensors, e.g.\n"
    "  ckpts/llamagen/trained_drafters/llamagen_drafter/{config.json, pytorch_model.bin}"
)


DRAFTER_FIELDS = ("hidden_size", "num_attention_heads", "vocab_size")


def check_drafter_matches_target(cfg: DrafterConfig, target_config, path) -> None:
    """The drafter reads the target's features and tokens and uses its lm_head and sequence layout: the
    widths, vocabulary and layout must agree (checked from the configs, before any weight is allocated)."""
    from models.checkpoints import CheckpointError

    problems = []
    width = getattr(target_config, "dim", None) or getattr(target_config, "hidden_size", None)  # LlamaGen / Chameleon
    if width is not None and cfg.hidden_size != width:
        problems.append(f"hidden_size {cfg.hidden_size} != the target's {width}")
    if cfg.vocab_size != target_config.vocab_size:
        problems.append(f"vocab_size {cfg.vocab_size} != the target's {target_config.vocab_size}")
    if hasattr(target_config, "block_size"):  # LlamaGen's fixed layout (Chameleon prefixes are token prompts)
        if cfg.block_size != target_config.block_size:
            problems.append(f"image tokens (block_size) {cfg.block_size} != the target's {target_config.block_size}")
        if cfg.cls_token_num != target_config.cls_token_num:
            problems.append(f"condition length {cfg.cls_token_num} != the target's {target_config.cls_token_num}")
    if problems:
        raise CheckpointError(f"drafter {path} was not trained for this target: {'; '.join(problems)} "
                              f"(pass the --drafter_path trained for this model)")


def load_drafter(path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 target_config=None) -> EagleDrafter:
    """Load a drafter folder (LANTERN's released format or ours); strict name/shape check.

    ``target_config`` (a GPTConfig) fills in the target's layout (grid size, condition length) when the
    drafter's config does not state it.
    """
    from pathlib import Path

    from models.checkpoints import (
        CheckpointError,
        check_shapes_before_allocating,
        load_folder_weights,
        read_json,
        require_fields,
    )

    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"drafter not found at {path} (no config.json)\nExpected layout:\n{DRAFTER_LAYOUT_HINT}")
    raw = read_json(path / "config.json")
    require_fields(raw.get("config_json", raw), DRAFTER_FIELDS, path / "config.json", "EAGLE drafter")
    if (target_config is not None and hasattr(target_config, "block_size") and "block_size" not in raw
            and raw.get("input_type") not in INPUT_TYPES and raw.get("model_type") != "chameleon"):
        raw = {**raw, "block_size": target_config.block_size, "cls_token_num": target_config.cls_token_num}
    try:
        cfg = DrafterConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: invalid drafter config ({e})") from None
    if target_config is not None:
        check_drafter_matches_target(cfg, target_config, path)
    sd = load_folder_weights(path)
    qn = sd.get("layers.0.self_attn.q_norm.weight")
    if cfg.family == "chameleon" and qn is not None and cfg.qk_norm_rows is None:
        cfg.qk_norm_rows = int(qn.shape[0])  # per-head (Anole) or per-shard (Lumina layout) norm rows
    model = EagleDrafter(cfg)
    # the LANTERN drafter shares the target's embedding; some files omit it
    if "embed_tokens.weight" not in sd and target_config is not None:
        raise CheckpointError(f"{path}: drafter weights lack embed_tokens.weight")
    model = check_shapes_before_allocating(lambda: EagleDrafter(cfg), sd, str(path))
    model.load_state_dict(sd, strict=False)
    return model.to(device=device, dtype=dtype).eval()


def save_drafter(model: EagleDrafter, folder) -> None:
    """config.json + model.safetensors, ready for ``generate_images --drafter_path`` (written atomically)."""
    from models.checkpoints import save_safetensors_atomic, write_json_atomic

    save_safetensors_atomic(model.state_dict(), f"{folder}/model.safetensors")
    write_json_atomic(model.config.to_dict(), f"{folder}/config.json")
