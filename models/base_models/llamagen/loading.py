"""Load LlamaGen GPT / VQ weights from every format in use.

GPT: (a) an original LlamaGen ``.pt`` (``c2i_B_256.pt``, ``t2i_XL_stage1_256.pt``; weights under ``model``;
no config inside: sizes are inferred from tensor shapes, the image grid from ``block_size``);
(b) an HF-converted LANTERN folder (``config.json`` with LlamaConfig fields + LlamaGen extras, safetensors or
``pytorch_model.bin``; keys ``model.layers.i.self_attn.q_proj.weight`` ...); (c) this project's folder
(``config.json`` = :class:`GPTConfig` + ``model.safetensors``).
VQ: an original ``vq_ds16_*.pt`` (weights under ``model``) or this project's folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from models.base_models.llamagen.gpt import GPT_SIZES, GPTConfig, LlamaGenGPT
from models.base_models.llamagen.vq_model import VQConfig, VQModel
from models.checkpoints import (
    CheckpointError,
    check_shapes_before_allocating,
    load_folder_weights,
    load_weight_file,
    read_json,
    require_fields,
)

GPT_FIELDS = ("dim", "n_layer", "n_head", "vocab_size")
HF_GPT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
VQ_FIELDS = ("codebook_size", "codebook_embed_dim")


def _checked_config(cls, raw: dict, path: Path, required: tuple[str, ...], what: str, kind: str):
    """``cls.from_dict(raw)`` once the size fields are there (no 6.6 B default model for a wrong file); a bad
    value names the file."""
    require_fields(raw.get("ModelArgs", raw), required, path, what)
    try:
        return cls.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid {kind} config ({e})") from None


def _gpt_config(raw: dict, path: Path) -> GPTConfig:
    return _checked_config(GPTConfig, raw, path, GPT_FIELDS, "LlamaGen GPT", "GPT")


def _vq_config(raw: dict, path: Path) -> VQConfig:
    return _checked_config(VQConfig, raw, path, VQ_FIELDS, "LlamaGen VQ tokenizer", "VQ")


def _needs(sd: dict, names: tuple[str, ...], path: Path, what: str) -> None:
    missing = [n for n in names if n not in sd]
    if missing:
        raise CheckpointError(f"{path}: not a {what} checkpoint (no {', '.join(missing)}; it holds "
                              f"{', '.join(sorted(sd)[:6])}{' ...' if len(sd) > 6 else ''})")

# ---------------------------------------------------------------------------------------------------
# HF (LANTERN ``modeling_llamagen_kv.LlamaForCausalLM``) <-> LlamaGen names


def hf_to_llamagen_state_dict(sd: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """Map LANTERN's HF-converted key names onto LlamaGen's (q/k/v projections re-fused into ``wqkv``)."""
    out = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for k, v in sd.items():
        if k.startswith("model.cls_embedding."):
            out[k[len("model.") :]] = v
    for i in range(n_layer):
        p = f"model.layers.{i}."
        out[f"layers.{i}.attention.wqkv.weight"] = torch.cat(
            [sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.v_proj.weight"]]
        )
        out[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[f"layers.{i}.feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    return out


def llamagen_to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_llamagen_state_dict` (used to write LANTERN-style folders)."""
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["output.weight"],
    }
    for k, v in sd.items():
        if k.startswith("cls_embedding."):
            out["model." + k] = v
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        wq, wk, wv = sd[f"layers.{i}.attention.wqkv.weight"].split([q, kv, kv])
        out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"], out[p + "self_attn.v_proj.weight"] = wq, wk, wv
        out[p + "self_attn.o_proj.weight"] = sd[f"layers.{i}.attention.wo.weight"]
        out[p + "mlp.gate_proj.weight"] = sd[f"layers.{i}.feed_forward.w1.weight"]
        out[p + "mlp.up_proj.weight"] = sd[f"layers.{i}.feed_forward.w3.weight"]
        out[p + "mlp.down_proj.weight"] = sd[f"layers.{i}.feed_forward.w2.weight"]
        out[p + "input_layernorm.weight"] = sd[f"layers.{i}.attention_norm.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[f"layers.{i}.ffn_norm.weight"]
    return out


def gpt_config_from_hf(hf: dict) -> GPTConfig:
    """LlamaConfig fields + LlamaGen extras (``block_size``, ``cls_token_num``, ``input_type`` ...) -> GPTConfig."""
    return GPTConfig(
        dim=hf["hidden_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        vocab_size=hf["vocab_size"],
        block_size=hf.get("block_size", 256),
        cls_token_num=hf.get("cls_token_num", 120),
        caption_dim=hf.get("caption_dim", 2048),
        model_type=hf.get("input_type", "t2i"),
        num_classes=hf.get("num_classes", 1000),
        rope_base=hf.get("rope_base", 10000),
        class_dropout_prob=hf.get("class_dropout_p", 0.1),
        token_dropout_p=hf.get("token_dropout_p", 0.0),
        resid_dropout_p=hf.get("resid_dropout_p", 0.0),
        ffn_dropout_p=hf.get("ffn_dropout_p", 0.0),
    )


def infer_gpt_config(sd: dict[str, torch.Tensor], block_size: int = 256, cls_token_num: int | None = None) -> GPTConfig:
    """Sizes of an original LlamaGen ``.pt`` (which stores no config) from its tensor shapes.

    The head count is not visible in the shapes; it comes from LlamaGen's named sizes (``GPT_SIZES``).
    """
    vocab, dim = sd["tok_embeddings.weight"].shape
    n_layer = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
    match = [name for name, s in GPT_SIZES.items() if s["dim"] == dim and s["n_layer"] == n_layer]
    if not match:
        raise CheckpointError(
            f"cannot infer the head count of a GPT with dim={dim}, n_layer={n_layer} (not a LlamaGen size: "
            f"{', '.join(GPT_SIZES)}); put its LlamaGen ModelArgs in a JSON file with the same name as the "
            f"checkpoint (e.g. c2i_custom.json beside c2i_custom.pt)"
        )
    qkv = sd["layers.0.attention.wqkv.weight"].shape[0]
    n_head = GPT_SIZES[match[0]]["n_head"]
    head_dim = dim // n_head
    n_kv_head = (qkv // head_dim - n_head) // 2
    kw = dict(dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, vocab_size=vocab, block_size=block_size,
              intermediate_size=sd["layers.0.feed_forward.w1.weight"].shape[0])
    if "cls_embedding.embedding_table.weight" in sd:
        rows = sd["cls_embedding.embedding_table.weight"].shape[0]
        kw.update(model_type="c2i", num_classes=rows - 1, class_dropout_prob=0.1, cls_token_num=cls_token_num or 1)
    else:
        kw.update(model_type="t2i", caption_dim=sd["cls_embedding.cap_proj.fc1.weight"].shape[1],
                  cls_token_num=cls_token_num or 120)
    return GPTConfig(**kw)


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP/compile prefixes (``module.``, ``_orig_mod.``) and cache buffers some checkpoints carry."""
    out = {}
    for k, v in sd.items():
        for p in ("module.", "_orig_mod."):
            if k.startswith(p):
                k = k[len(p) :]
        if ".kv_cache." in k or k in ("freqs_cis", "causal_mask"):
            continue
        out[k] = v
    return out


GPT_LAYOUT_HINT = (
    "  an original LlamaGen checkpoint file (c2i_B_256.pt, t2i_XL_stage1_256.pt: weights under 'model'),\n"
    "  or a folder with config.json + model.safetensors / pytorch_model.bin, e.g.\n"
    "  ckpts/llamagen/LlamaGen-T2I/{config.json, model.safetensors}"
)


def load_llamagen_gpt(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    block_size: int | None = None,
) -> LlamaGenGPT:
    """Load a LlamaGen GPT from an original ``.pt``, an HF-converted LANTERN folder or this project's folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"GPT checkpoint not found: {path}\nExpected one of:\n{GPT_LAYOUT_HINT}")
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise CheckpointError(f"{path} has no config.json\nExpected one of:\n{GPT_LAYOUT_HINT}")
        raw = read_json(cfg_path)
        if "hidden_size" in raw:  # HF-converted (LANTERN) folder
            require_fields(raw, HF_GPT_FIELDS, cfg_path, "LlamaGen GPT (HF-converted)")
            cfg = gpt_config_from_hf(raw)
        else:
            cfg = _gpt_config(raw, cfg_path)
        sd = _strip_prefixes(load_folder_weights(path))
        if "hidden_size" in raw and "model.embed_tokens.weight" in sd:
            try:
                sd = hf_to_llamagen_state_dict(sd, cfg.n_layer)
            except KeyError as e:
                raise CheckpointError(f"{path}: HF-converted weights lack {e} (config.json says "
                                      f"{cfg.n_layer} layers)") from None
    else:
        sidecar = path.with_suffix(".json")
        # LlamaGen ModelArgs for sizes that are not one of the named GPT sizes
        cfg = _gpt_config(read_json(sidecar), sidecar) if sidecar.exists() else None
        sd = _strip_prefixes(load_weight_file(path))
        if cfg is None:
            _needs(sd, ("tok_embeddings.weight", "layers.0.attention.wqkv.weight", "layers.0.feed_forward.w1.weight"),
                   path, "LlamaGen GPT")
            cfg = infer_gpt_config(sd, block_size or 256)
    if block_size is not None and path.is_dir() and "block_size" in raw and raw["block_size"] != block_size:
        g = int(round(raw["block_size"] ** 0.5))
        raise CheckpointError(f"{path} generates {raw['block_size']} image tokens ({g}x{g}); the requested image size "
                              f"implies {block_size}: drop --image_size or give the model's own size")
    if block_size is not None:
        cfg.block_size = block_size
    model = check_shapes_before_allocating(lambda: LlamaGenGPT(cfg), sd, str(path))
    model.load_state_dict(sd, strict=False)  # non-persistent RoPE table is not in files
    return model.to(device=device, dtype=dtype).eval()


VQ_LAYOUT_HINT = (
    "  an original LlamaGen VQ checkpoint (vq_ds16_c2i.pt / vq_ds16_t2i.pt: weights under 'model'),\n"
    "  or a folder with config.json (VQConfig fields) + model.safetensors"
)


def load_llamagen_vq(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> VQModel:
    """Load the LlamaGen VQ tokenizer (original ``vq_ds16_*.pt`` → VQ-16 sizes, or a folder with its config)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"VQ checkpoint not found: {path}\nExpected one of:\n{VQ_LAYOUT_HINT}")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} has no config.json\nExpected one of:\n{VQ_LAYOUT_HINT}")
        cfg = _vq_config(read_json(path / "config.json"), path / "config.json")
        sd = load_folder_weights(path)
    else:
        sidecar = path.with_suffix(".json")
        cfg = _vq_config(read_json(sidecar), sidecar) if sidecar.exists() else None  # sizes other than VQ-16
        sd = _strip_prefixes(load_weight_file(path))
        if cfg is None:
            _needs(sd, ("quantize.embedding.weight",), path, "LlamaGen VQ")
            n, d = sd["quantize.embedding.weight"].shape
            cfg = VQConfig(codebook_size=n, codebook_embed_dim=d)  # VQ_16: ch 128, ch_mult [1,1,2,2,4], z 256
    model = check_shapes_before_allocating(lambda: VQModel(cfg), sd, str(path))
    model.load_state_dict(sd, strict=True)
    return model.to(device=device, dtype=dtype).eval()
