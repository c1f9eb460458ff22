"""Random-weight files in the REAL layouts the evaluation commands read (FID Inception, open_clip CLIP / HPS,
a Hugging Face CLIP folder mapped from the same weights), and small image folders, for the eval tests."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_images(folder: Path, names, size=16, seed=0, arrays=None) -> Path:
    """PNG/JPG files ``names`` in ``folder``: random RGB noise of ``size``² (or the given uint8 arrays)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        arr = arrays[i] if arrays is not None else rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name)
    return folder


def smooth_images(n: int, size: int, seed: int) -> list[np.ndarray]:
    """``n`` smooth random colour images (blobs): natural-ish content, unlike white noise."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 4, 4, generator=g)
    big = torch.nn.functional.interpolate(small, size=(size, size), mode="bicubic", align_corners=False)
    return [(big[i].clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy() for i in range(n)]


# --------------------------------------------------------------------------------------------- FID Inception
def write_fid_inception(path: Path, seed: int = 0) -> Path:
    """A random-weight file in the layout of ``weights-inception-2015-12-05-6726825d.pth``.

    The key names and shapes come from torch-fidelity's own ``FeatureExtractorInceptionV3``: a torchvision
    Inception-v3 state dict (1008 classes, no aux head) is loaded strictly into it, and its state dict is saved.
    Convolutions get He-normal weights and BN running variances vary, so that features differ between images
    (PyTorch's default init makes a 94-layer net collapse every image to the same features).
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torchvision.models import inception_v3

    state = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008).state_dict()
    g = torch.Generator().manual_seed(seed)
    for k, v in state.items():
        if k.endswith("conv.weight"):
            torch.nn.init.kaiming_normal_(v, nonlinearity="relu", generator=g)
        elif k.endswith("running_var"):
            v.uniform_(0.5, 1.5, generator=g)
        elif k == "fc.weight":
            v.normal_(0.0, 2048**-0.5, generator=g)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    net = FeatureExtractorInceptionV3("layout", ["2048"], feature_extractor_weights_path=str(path))
    torch.save(net.state_dict(), path)
    return path


# -------------------------------------------------------------------------------------------------- open_clip
def tiny_clip_config(kind: str = "ViT-B-32-quickgelu", width: int = 32, layers: int = 2) -> dict:
    """open_clip's built-in ``kind`` config with the widths and depths reduced (same module layout and key names;
    the full 49,408-token vocabulary and 77-token context are kept so that real BPE ids fit)."""
    import open_clip

    cfg = json.loads(json.dumps(open_clip.get_model_config(kind)))
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    v.update(layers=layers, width=width, image_size=32, patch_size=16 if "B-32" in kind else 14)
    v["head_width"] = width // 2  # 2 heads
    t.update(layers=layers, width=width, heads=2)
    cfg["embed_dim"] = 16
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model_cfg": cfg}))
    return path


def random_open_clip(cfg: dict, seed: int = 0):
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    return CLIP(**cfg).eval()


# ----------------------------------------------------------------------------------------- Hugging Face CLIP
def clip_bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's real BPE vocabulary (49,408 tokens) and merges, from the file open_clip ships in its package."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {v: i for i, v in enumerate(vocab)}, merges


def write_hf_clip(folder: Path, open_clip_model, cfg: dict) -> Path:
    """A Hugging Face CLIP folder (config.json, safetensors, tokenizer.json) with ``open_clip_model``'s weights."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    vw, tw = v["width"], t["width"]
    v_heads = vw // v.get("head_width", 64)
    config = CLIPConfig(
        text_config=dict(vocab_size=t["vocab_size"], hidden_size=tw, intermediate_size=4 * tw,
                         num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                         max_position_embeddings=t["context_length"], hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=v["layers"],
                           num_attention_heads=v_heads, image_size=v["image_size"], patch_size=v["patch_size"],
                           hidden_act="quick_gelu"),
        projection_dim=cfg["embed_dim"])
    hf = CLIPModel(config).eval()
    sd = open_clip_model.state_dict()
    new = {"logit_scale": sd["logit_scale"].reshape(hf.logit_scale.shape),
           "text_projection.weight": sd["text_projection"].T, "visual_projection.weight": sd["visual.proj"].T,
           "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
           "text_model.final_layer_norm.weight": sd["ln_final.weight"],
           "text_model.final_layer_norm.bias": sd["ln_final.bias"],
           "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
           "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
           "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
           "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
           "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
           "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
           "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"]}
    for src, dst, n in (("transformer", "text_model.encoder", t["layers"]),
                        ("visual.transformer", "vision_model.encoder", v["layers"])):
        for i in range(n):
            a, b = f"{src}.resblocks.{i}", f"{dst}.layers.{i}"
            for name, value in zip(("q", "k", "v"), sd[f"{a}.attn.in_proj_weight"].chunk(3)):
                new[f"{b}.self_attn.{name}_proj.weight"] = value
            for name, value in zip(("q", "k", "v"), sd[f"{a}.attn.in_proj_bias"].chunk(3)):
                new[f"{b}.self_attn.{name}_proj.bias"] = value
            pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                     "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
            for x, y in pairs.items():
                new[f"{b}.{y}.weight"], new[f"{b}.{y}.bias"] = sd[f"{a}.{x}.weight"], sd[f"{a}.{x}.bias"]
    missing, unexpected = hf.load_state_dict({k: v.contiguous() for k, v in new.items()}, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    hf.save_pretrained(folder)
    vocab, merges = clip_bpe_vocab()
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(folder)
    return folder
