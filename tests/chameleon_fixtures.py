"""Tiny random Chameleon checkpoints in the real on-disk formats (shared by the Chameleon tests).

* an HF-converted Anole folder: transformers' own ``ChameleonForConditionalGeneration`` saved with
  ``save_pretrained`` (config.json, sharded safetensors + index) plus a ``tokenizer.json``;
* a Lumina-mGPT folder: same names, q/k-norm ``[1, head_dim]``;
* a Chameleon tokenizer folder: ``text_tokenizer.json`` (made with ``tokenizers``), ``vqgan.yaml`` + ``vqgan.ckpt``.

Vocabulary: 8832 ids so that every special id of the real layouts exists (image ids 4..8195, 8196 end of image,
8197 start of image, 8710 separator, 8803 newline, 8804+g size tokens) while the model stays tiny.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_VOCAB = 8832
TINY_VQ = {"embed_dim": 8, "num_embeddings": 8192, "double_latent": False, "latent_channels": 8, "resolution": 16,
           "in_channels": 3, "base_channels": 32, "channel_multiplier": [1, 1], "num_res_blocks": 1,
           "attn_resolutions": [], "dropout": 0.0}


def hf_config(**over):
    from transformers import ChameleonConfig

    kw = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5, vocabulary_map={},
              vq_config=TINY_VQ, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kw.update(over)
    return ChameleonConfig(**kw)


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter (norms around 1, biases around 0) so that norm parameters are tested too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2 and ("embed" in name or "embedding" in name):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def hf_model(seed: int = 0, **over):
    from transformers import ChameleonForConditionalGeneration

    torch.manual_seed(seed)
    m = ChameleonForConditionalGeneration(hf_config(**over)).eval()
    randomise(m, seed)
    return m


def write_text_tokenizer(path: Path) -> None:
    """A word-level BPE-less tokenizer (``tokenizers``) with ids below 4 special and words at ids >= 8832 - 600."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["a", "an", "of", "the", "cat", "dog", "red", "blue", "photo", "image", "generate", "according", "to",
             "following", "prompt", "768x768", "16x16", "32x32", "48x48", "64x64", "on", "in", "with", "and"]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    base = TINY_VOCAB - 600
    for i, w in enumerate(words):
        vocab[w] = base + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


def write_vqgan(folder: Path, seed: int = 0) -> None:
    """vqgan.yaml + vqgan.ckpt (weights under state_dict, plus a loss key) with an 8192-code, 8-dim codebook."""
    import yaml

    from models.base_models.chameleon.vqgan import ChameleonVQGAN, VQGANConfig

    params = {"embed_dim": 8, "n_embed": 8192,
              "ddconfig": {"double_z": False, "z_channels": 8, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
                           "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}
    torch.manual_seed(seed)
    vq = ChameleonVQGAN(VQGANConfig.from_params(params))
    randomise(vq, seed + 1)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vqgan.yaml").write_text(yaml.safe_dump({"model": {"params": {**params, "lossconfig": {"target": "x"}}}}))
    torch.save({"state_dict": {**vq.state_dict(), "loss.logvar": torch.zeros(())}}, folder / "vqgan.ckpt")


def write_anole_folder(folder: Path, seed: int = 0) -> Path:
    """HF-converted Anole layout via transformers' save_pretrained (sharded), with tokenizer.json."""
    m = hf_model(seed)
    m.save_pretrained(folder, max_shard_size="300KB")
    write_text_tokenizer(folder / "tokenizer.json")
    return folder


def write_lumina_folder(folder: Path, seed: int = 1) -> Path:
    """Lumina-mGPT layout: q/k-norm stored as [1, head_dim]; written through our own sharded writer."""
    from models.base_models.chameleon.loading import save_chameleon_folder
    from models.base_models.chameleon.model import ChameleonCausalLM, ChameleonTargetConfig

    cfg = ChameleonTargetConfig.from_dict(json.loads(hf_config().to_json_string()), qk_norm_rows=1)
    torch.manual_seed(seed)
    m = ChameleonCausalLM(cfg)
    randomise(m, seed)
    save_chameleon_folder(m, folder, max_shard_bytes=300_000)
    return folder


def write_tokenizer_folder(folder: Path, seed: int = 0) -> Path:
    write_text_tokenizer(folder / "text_tokenizer.json")
    write_vqgan(folder, seed)
    return folder


def random_chameleon_drafter(target, seed: int = 0):
    """A random LANTERN-style Chameleon drafter sized like ``target`` (a ChameleonCausalLM)."""
    from models.drafters.cnets import DrafterConfig, EagleDrafter

    c = target.config
    torch.manual_seed(seed)
    d = EagleDrafter(DrafterConfig(family="chameleon", hidden_size=c.hidden_size, intermediate_size=2 * c.hidden_size,
                                   num_attention_heads=c.num_attention_heads, vocab_size=c.vocab_size,
                                   rms_norm_eps=1e-5, block_size=0, cls_token_num=0)).eval()
    randomise(d, seed + 7)
    return d


def write_chameleon_ckpts(root: Path, model: str) -> dict[str, Path]:
    """A tiny ckpts/ tree for ``anole`` or ``lumina_mgpt``: model folder, tokenizer folder, drafter, neighbours."""
    from models.base_models.chameleon.loading import load_chameleon_target
    from models.base_models.chameleon.vqgan import load_chameleon_vqgan
    from models.drafters.cnets import save_drafter
    from models.drafters.neighbours import build_neighbour_table, save_neighbour_table

    base = root / model
    model_dir = (write_anole_folder(base / "Anole-7b-v0.1-hf") if model == "anole"
                 else write_lumina_folder(base / "Lumina-mGPT-7B-768"))
    tok = write_tokenizer_folder(base / "chameleon" / "tokenizer")
    drafter_dir = base / "trained_drafters" / f"{model}_drafter"
    save_drafter(random_chameleon_drafter(load_chameleon_target(model_dir)), drafter_dir)
    codebook = load_chameleon_vqgan(tok).quantize.embedding.weight.detach()
    table = save_neighbour_table(base / "vq_distances" / "neighbours.safetensors", build_neighbour_table(codebook, 16, dtype=torch.float32))
    return {"model": model_dir, "vq": tok, "drafter": drafter_dir, "codebook": table}
