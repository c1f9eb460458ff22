"""Chameleon VQGAN (Meta's ``vqgan.yaml`` + ``vqgan.ckpt``), the image tokenizer of Anole and Lumina-mGPT.

A taming-transformers VQGAN: ``encoder.down.{level}.block.{j}`` / ``.downsample.conv``,
``encoder.mid.block_1/attn_1/block_2``, ``decoder.up.{level}.block.{j}`` / ``.upsample.conv`` (``up.0`` is the
highest resolution), ``quant_conv``, ``post_quant_conv``, ``quantize.embedding.weight``. No timestep embedding;
spatial attention only in the mid blocks and at levels listed in ``attn_resolutions`` (none in the real config).

The quantiser is a plain squared-distance argmin against the **raw** codebook rows (no normalisation, unlike
LlamaGen's). Real checkpoints keep the weights under ``state_dict`` next to loss-module keys
(``loss.*``), which are ignored, as the original's ``strict=False`` load does — but every *model* key must be
present here (a missing key is an error, not silently random weights).

The building blocks (ResnetBlock, AttnBlock, Down/Upsample, GroupNorm(32, eps 1e-6)) are the same taming
arithmetic LlamaGen's VQ uses, so they are shared from :mod:`models.base_models.llamagen.vq_model`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.base_models.llamagen.vq_model import (
    AttnBlock,
    Downsample,
    ResnetBlock,
    Upsample,
    _normalize,
    _swish,
)
from models.checkpoints import CheckpointError

# Chameleon image token id = VQ index + IMAGE_TOKEN_OFFSET (Anole's vocabulary; image ids 4..8195).
IMAGE_TOKEN_OFFSET = 4


@dataclass
class VQGANConfig:
    """``model.params`` of ``vqgan.yaml``: ``embed_dim``, ``n_embed`` and the ``ddconfig`` fields."""

    embed_dim: int = 256
    n_embed: int = 8192
    double_z: bool = False
    z_channels: int = 256
    resolution: int = 512
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    dropout: float = 0.0

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_params(cls, params: dict) -> VQGANConfig:
        """From ``vqgan.yaml``'s ``model.params`` (or the whole yaml / the conformance ``config.json``)."""
        if "model" in params and isinstance(params["model"], dict):
            params = params["model"].get("params", params["model"])
        if "model.params" in params:
            params = params["model.params"]
        dd = dict(params.get("ddconfig", {}))
        names = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in dd.items() if k in names}
        for k in ("embed_dim", "n_embed"):
            if k in params:
                kw[k] = params[k]
        return cls(**kw)

    def to_dict(self) -> dict:
        return asdict(self)


class Encoder(nn.Module):
    def __init__(self, c: VQGANConfig):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(c.ch_mult), c.num_res_blocks
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, 1, 1)
        in_mult = (1, *c.ch_mult)
        curr_res = c.resolution
        self.down = nn.ModuleList()
        block_in = c.ch
        for level in range(self.num_resolutions):
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = c.ch * in_mult[level], c.ch * c.ch_mult[level]
            for _ in range(c.num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, c.dropout))
                block_in = block_out
                if curr_res in c.attn_resolutions:
                    down.attn.append(AttnBlock(block_in))
            if level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, c.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, c.dropout)
        self.norm_out = _normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * c.z_channels if c.double_z else c.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for j in range(self.num_res_blocks):
                h = down.block[j](h)
                if len(down.attn) > 0:
                    h = down.attn[j](h)
            if level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """``up.{level}`` is indexed by resolution level (``up.0`` highest) and run from the lowest level up."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(c.ch_mult), c.num_res_blocks
        block_in = c.ch * c.ch_mult[-1]
        curr_res = c.resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, c.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, c.dropout)
        ups: list[nn.Module] = []
        for level in reversed(range(self.num_resolutions)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            block_out = c.ch * c.ch_mult[level]
            for _ in range(c.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, c.dropout))
                block_in = block_out
                if curr_res in c.attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = _normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, c.out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for j in range(self.num_res_blocks + 1):
                h = up.block[j](h)
                if len(up.attn) > 0:
                    h = up.attn[j](h)
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest code by squared Euclidean distance on the raw codebook; returns raw rows."""

    def __init__(self, n_e: int, e_dim: int):
        super().__init__()
        self.n_e, self.e_dim = n_e, e_dim
        self.embedding = nn.Embedding(n_e, e_dim)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, C, H, W) -> (straight-through z_q (B, C, H, W), flat indices (B·H·W), row-major over b, h, w)."""
        zp = z.permute(0, 2, 3, 1).contiguous()
        flat = zp.view(-1, self.e_dim)
        emb = self.embedding.weight
        d = flat.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * flat @ emb.t()
        indices = torch.argmin(d, dim=1)
        z_q = emb[indices].view(zp.shape)
        z_q = zp + (z_q - zp).detach()
        return z_q.permute(0, 3, 1, 2).contiguous(), indices

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
        """Rows for ``indices`` viewed as ``shape`` = (B, h, w, C), returned channel-first (B, C, h, w)."""
        return self.embedding.weight[indices.reshape(-1)].view(shape).permute(0, 3, 1, 2).contiguous()


class ChameleonVQGAN(nn.Module):
    """Encoder → quant_conv → quantiser; codebook rows → post_quant_conv → decoder."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> (quantised latents (B, C, h, w), flat indices (B·h·w))."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def encode_to_codes(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> VQ indices (B, h·w), row-major over the latent grid."""
        _, idx = self.encode(images.to(self.quant_conv.weight.dtype))
        return idx.view(images.shape[0], -1)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """VQ indices (B, h·w) -> images (B, 3, H, W) in about [-1, 1]; ``grid`` defaults to a square."""
        b, n = codes.shape
        if grid is None:
            side = int(round(n**0.5))
            if side * side != n:
                raise ValueError(f"cannot decode {n} codes as a square grid; pass grid=(h, w)")
            grid = (side, side)
        if int(codes.min()) < 0 or int(codes.max()) >= self.config.n_embed:
            raise ValueError(f"VQ indices must lie in 0..{self.config.n_embed - 1} (token ids must be converted first)")
        quant = self.quantize.get_codebook_entry(codes, (b, grid[0], grid[1], self.config.embed_dim))
        return self.decode(quant)


VQGAN_LAYOUT_HINT = (
    "  <tokenizer folder>/vqgan.yaml   (Meta's config: model.params.{embed_dim, n_embed, ddconfig})\n"
    "  <tokenizer folder>/vqgan.ckpt   (torch checkpoint, weights under 'state_dict')\n"
    "  e.g. ckpts/anole/chameleon/tokenizer/{text_tokenizer.json, vqgan.yaml, vqgan.ckpt}"
)


def read_vqgan_config(path: str | os.PathLike) -> VQGANConfig:
    """``vqgan.yaml`` (or a JSON file with the same ``model.params``) -> config."""
    import json

    import yaml

    path = Path(path)
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a VQGAN config (expected model.params with ddconfig)")
    return VQGANConfig.from_params(data)


def vqgan_state_dict_from_checkpoint(obj: dict, source: str) -> dict[str, torch.Tensor]:
    """The model's weights out of a ``vqgan.ckpt`` object (under ``state_dict``), loss keys dropped."""
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{source}: no 'state_dict' in the VQGAN checkpoint")
    return {k: v for k, v in sd.items() if not k.startswith("loss.")}


def _read_ckpt(ckpt: Path) -> dict:
    """``torch.load`` with tensors only (no arbitrary code), memory-mapped when the file format allows it."""
    import pickle

    try:
        try:
            return torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{ckpt} holds Python objects besides tensors, which are not unpickled for safety. If you trust the "
            f"file, keep only its weights once: python -c \"import torch; p='{ckpt}'; "
            f"torch.save({{'state_dict': torch.load(p, weights_only=False)['state_dict']}}, p)\"") from e
    except Exception as e:  # noqa: BLE001 - name the file in any reading problem
        raise CheckpointError(f"could not read {ckpt} as a PyTorch checkpoint: {e}") from e


def load_chameleon_vqgan(
    folder_or_yaml: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    ckpt_path: str | os.PathLike | None = None,
) -> ChameleonVQGAN:
    """Load the tokenizer folder (``vqgan.yaml`` + ``vqgan.ckpt``) or a yaml path with ``ckpt_path``.

    Model keys are checked strictly (names and shapes); keys of the training losses are ignored.
    """
    from models.checkpoints import check_state_dict, load_weight_file

    p = Path(folder_or_yaml)
    yaml_path = p if p.suffix in (".yaml", ".yml", ".json") else p / "vqgan.yaml"  # a folder, or the yaml itself
    ckpt = Path(ckpt_path) if ckpt_path is not None else yaml_path.parent / "vqgan.ckpt"
    for f, what in ((yaml_path, "VQGAN config"), (ckpt, "VQGAN weights")):
        if not f.exists():
            raise CheckpointError(f"{what} not found: {f}\nExpected layout:\n{VQGAN_LAYOUT_HINT}")
    cfg = read_vqgan_config(yaml_path)
    with torch.device("meta"):
        model = ChameleonVQGAN(cfg)
    if ckpt.suffix == ".safetensors":
        sd = load_weight_file(ckpt)
    else:
        sd = vqgan_state_dict_from_checkpoint(_read_ckpt(ckpt), str(ckpt))
    check_state_dict(model, sd, str(ckpt))
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model.to(device).eval()


def preprocess_image(image, size: int) -> torch.Tensor:
    """A PIL image -> (3, size, size) float tensor in [-1, 1], as Chameleon's tokenizer prepares it.

    Transparent pixels become white; the shorter side is resized to ``size`` (Lanczos, the other side
    rounded), then the centre ``size × size`` crop is taken; values ``x/255·2 − 1``.
    """
    from PIL import Image

    if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    image = image.convert("RGB")
    scale = size / min(image.size)
    image = image.resize((round(scale * image.size[0]), round(scale * image.size[1])), Image.LANCZOS)
    x0, y0 = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((x0, y0, x0 + size, y0 + size))
    arr = np.asarray(image, dtype=np.float64) / 255.0 * 2 - 1
    return torch.from_numpy(arr).permute(2, 0, 1).float()
