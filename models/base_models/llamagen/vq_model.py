"""LlamaGen VQ tokenizer (``tokenizer/tokenizer_image/vq_model.py`` architecture).

Images in [-1, 1] become a grid of codebook indices and back. State-dict names match the original
checkpoints (``vq_ds16_c2i.pt`` / ``vq_ds16_t2i.pt`` store them under ``"model"``), so the real weights
load with ``strict=True``. The quantiser L2-normalises both latents and codebook rows before the
nearest-neighbour search and returns normalised rows (``codebook_l2_norm=True``), as LlamaGen does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VQConfig:
    """Constructor arguments of the LlamaGen VQ model (``ModelArgs`` plus the conv base width ``ch``)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    dropout_p: float = 0.0
    ch: int = 128
    num_res_blocks: int = 2
    in_channels: int = 3

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> VQConfig:
        """Build from a dict, also accepting the conformance layout (``ModelArgs`` + ``*_kwargs_override``)."""
        if "ModelArgs" in d:
            flat = dict(d["ModelArgs"])
            flat.update(d.get("encoder_kwargs_override", {}))
            flat.update(d.get("decoder_kwargs_override", {}))
            d = flat
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


def _normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention scaled by C^-1/2."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)
        k = self.k(h).reshape(b, c, hh * ww)
        v = self.v(h).reshape(b, c, hh * ww)
        w = torch.softmax(torch.bmm(q, k) * (int(c) ** -0.5), dim=2)
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad (0, 1, 0, 1) then a 3x3 stride-2 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    """Nearest x2 (computed in float32) then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype)
        return self.conv(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, n_res = cfg.ch, cfg.encoder_ch_mult, cfg.num_res_blocks
        self.num_resolutions, self.num_res_blocks = len(mult), n_res
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, 1, 1)
        in_mult = (1, *mult)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for level in range(self.num_resolutions):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mult[level], ch * mult[level]
            for _ in range(n_res):
                block.res.append(ResnetBlock(block_in, block_out, cfg.dropout_p))
                block_in = block_out
                if level == self.num_resolutions - 1:  # attention only at the lowest resolution
                    block.attn.append(AttnBlock(block_in))
            if level != self.num_resolutions - 1:
                block.downsample = Downsample(block_in)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList(
            [ResnetBlock(block_in, block_in, cfg.dropout_p), AttnBlock(block_in), ResnetBlock(block_in, block_in, cfg.dropout_p)]
        )
        self.norm_out = _normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, block in enumerate(self.conv_blocks):
            for i in range(self.num_res_blocks):
                h = block.res[i](h)
                if len(block.attn) > 0:
                    h = block.attn[i](h)
            if level != self.num_resolutions - 1:
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """``conv_blocks.0`` is the lowest resolution level (the reverse of taming's ``up.{i}`` numbering)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, n_res = cfg.ch, cfg.decoder_ch_mult, cfg.num_res_blocks
        self.num_resolutions, self.num_res_blocks = len(mult), n_res
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = nn.ModuleList(
            [ResnetBlock(block_in, block_in, cfg.dropout_p), AttnBlock(block_in), ResnetBlock(block_in, block_in, cfg.dropout_p)]
        )
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(self.num_resolutions)):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * mult[level]
            for _ in range(n_res + 1):
                block.res.append(ResnetBlock(block_in, block_out, cfg.dropout_p))
                block_in = block_out
                if level == self.num_resolutions - 1:
                    block.attn.append(AttnBlock(block_in))
            if level != 0:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)
        self.norm_out = _normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for level, block in enumerate(self.conv_blocks):
            for i in range(self.num_res_blocks + 1):
                h = block.res[i](h)
                if len(block.attn) > 0:
                    h = block.attn[i](h)
            if level != self.num_resolutions - 1:
                h = block.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser; with ``l2_norm`` both latents and rows are unit-normalised first."""

    def __init__(self, n_e: int, e_dim: int, beta: float, l2_norm: bool, show_usage: bool):
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.l2_norm = n_e, e_dim, beta, l2_norm
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        if l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, p=2, dim=-1)
        if show_usage:
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        """The rows used for lookups (normalised when ``l2_norm``)."""
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """z (B, C, H, W) -> (straight-through z_q (B, C, H, W), losses, flat indices (B·H·W))."""
        z = z.permute(0, 2, 3, 1).contiguous()
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        flat = z.reshape(-1, self.e_dim)
        emb = self.codebook()
        d = flat.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * flat @ emb.t()
        indices = torch.argmin(d, dim=1)
        z_q = emb[indices].view(z.shape)
        losses = {}
        if self.training:
            losses["vq_loss"] = F.mse_loss(z_q, z.detach())
            losses["commit_loss"] = self.beta * F.mse_loss(z_q.detach(), z)
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2).contiguous(), losses, indices

    def get_codebook_entry(self, indices: torch.Tensor, shape=None, channel_first: bool = True) -> torch.Tensor:
        """Rows for ``indices``; ``shape`` = (B, C, H, W) when ``channel_first`` else the target view."""
        z_q = self.codebook()[indices]
        if shape is not None:
            if channel_first:
                z_q = z_q.reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2).contiguous()
            else:
                z_q = z_q.view(shape)
        return z_q


class VQModel(nn.Module):
    """LlamaGen VQ autoencoder: ``encode_to_codes`` / ``decode_codes`` are the two calls the pipeline uses."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(
            cfg.codebook_size, cfg.codebook_embed_dim, cfg.commit_loss_beta, cfg.codebook_l2_norm, cfg.codebook_show_usage
        )
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b: torch.Tensor, shape=None, channel_first: bool = True) -> torch.Tensor:
        return self.decode(self.quantize.get_codebook_entry(code_b, shape, channel_first))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        quant, losses, _ = self.encode(x)
        return self.decode(quant), losses

    @torch.no_grad()
    def encode_to_codes(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, h·w), row-major over the latent grid."""
        _, _, idx = self.encode(images)
        return idx.view(images.shape[0], -1)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, N) with N a square -> images (B, 3, H, W) in about [-1, 1]."""
        b, n = codes.shape
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"cannot decode {n} codes: not a square grid")
        return self.decode_code(codes, [b, self.config.codebook_embed_dim, side, side])
