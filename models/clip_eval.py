"""CLIP score and HPSv2.1 as the original computes them, from LOCAL weights only (SPEC §8).

* **CLIP score**: OpenAI CLIP ViT-B/32 (open_clip's ``ViT-B-32-quickgelu``) from a local weights file — OpenAI's
  ``ViT-B-32.pt`` (a TorchScript archive) or an open_clip state dict — or a local Hugging Face ``CLIPModel``
  folder. Both backends share the original's image path (centre-crop the long edge, LANCZOS to 256, the
  [-1, 1] round trip back to uint8, then CLIP's own resize-224-bicubic / centre-crop / normalise) and
  tokenisation (CLIP's BPE, ``"A photo depicts "`` + caption, 77 tokens, truncated with end-of-text last), so the
  same weights give the same score. The score is the mean cosine of image and text embeddings (not ×100).
* **HPSv2.1**: ``HPS_v2.1_compressed.pt`` loaded into open_clip's ``ViT-H-14``; HPS's image transform (bicubic
  resize of the long side to 224, zero-pad to a square, OpenAI normalisation) and score (cosine of the
  normalised image and text features, no logit scale).

The ``hpsv2`` and ``clip`` packages are not used: the first pins old pytest/protobuf and downloads 4 GB at run
time; open_clip's tokenizer ships its BPE vocabulary inside the package, so nothing is ever downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models.evaluation import EVAL_RES, WeightFile, load_rgb, original_eval_resize, require_file

CLIP_PREFIX = "A photo depicts "
CONTEXT_LENGTH = 77
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_MODEL = "ViT-B-32-quickgelu"  # OpenAI's ViT-B/32 (QuickGELU) in open_clip's naming
HPS_MODEL = "ViT-H-14"

CLIP_WEIGHTS = WeightFile("--clip_path", "ViT-B-32.pt",
                          "OpenAI's CLIP ViT-B/32 weights (ViT-B-32.pt, or an open_clip state dict, or a local "
                          "Hugging Face CLIPModel folder)")
HPS_WEIGHTS = WeightFile("--hps_path", "HPS_v2.1_compressed.pt", "the HPSv2.1 checkpoint")


# ------------------------------------------------------------------------------------------------ open_clip
def open_clip_config(model: str) -> dict:
    """An open_clip model config: a built-in name (e.g. ``ViT-B-32-quickgelu``) or a JSON file with the config
    (open_clip's ``open_clip_config.json`` layout ``{"model_cfg": {...}}`` or the bare config)."""
    import open_clip

    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"open_clip model config {path}: file not found")
        cfg = json.loads(path.read_text())
        return dict(cfg.get("model_cfg", cfg))
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model!r}; give a built-in name (e.g. {CLIP_MODEL}, {HPS_MODEL}) "
                         "or a JSON config file")
    return dict(cfg)


def build_open_clip(model: str, device: torch.device | str = "cpu") -> nn.Module:
    """An open_clip ``CLIP`` of architecture ``model`` with random weights (on ``device``; "meta" builds no memory)."""
    from open_clip.model import CLIP

    cfg = open_clip_config(model)
    cfg.pop("custom_text", None)
    with torch.device(device):
        return CLIP(**cfg)


def read_open_clip_state(path: Path, flag: str) -> dict[str, torch.Tensor]:
    """An open_clip / OpenAI CLIP state dict from a file: safetensors, a (safe) torch pickle, or OpenAI's
    TorchScript archive; unwraps ``{"state_dict": ...}`` (HPS checkpoints) and a ``module.`` prefix."""
    import warnings

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        with warnings.catch_warnings():  # torch.jit is deprecated, but OpenAI's weights ship as TorchScript
            warnings.simplefilter("ignore")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - not a safe pickle: try a TorchScript archive before giving up
                try:
                    state = torch.jit.load(str(path), map_location="cpu")
                except Exception as e:  # noqa: BLE001
                    raise ValueError(f"{flag} {path}: neither a state dict nor a TorchScript CLIP archive "
                                     f"({type(e).__name__})") from e
        if isinstance(state, torch.jit.ScriptModule):
            state = dict(state.state_dict())
            for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
                state.pop(key, None)  # archive attributes, not weights (the causal mask is rebuilt)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{flag} {path}: expected a state dict, got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def load_open_clip(path: Path, model: str, flag: str, device: torch.device) -> nn.Module:
    """open_clip model ``model`` with the weights at ``path``; keys and shapes must match exactly."""
    from models.evaluation import check_state_dict

    state = read_open_clip_state(path, flag)
    net = build_open_clip(model, "meta")
    expected = net.state_dict()
    if "logit_scale" in state and state["logit_scale"].ndim != expected["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"].shape)
    check_state_dict(expected, state, flag, path, f"an open_clip {model} state dict")
    # Built on the meta device and filled by assignment: a 1B-parameter HPS model is never initialised twice.
    net.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    meta = [name for name, b in net.named_buffers() if b.is_meta]
    if meta != ["attn_mask"] and meta:
        raise RuntimeError(f"open_clip {model}: buffers {meta} are not rebuilt after loading")
    if meta:  # the text tower's causal mask is a non-persistent buffer, so it is not in the file
        n = net.context_length
        net.attn_mask = torch.full((n, n), float("-inf")).triu_(1)
    return net.eval().to(device)


def open_clip_tokenize(texts: Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """CLIP BPE token ids [N, context_length] with open_clip's packaged vocabulary (no download)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)(list(texts))


# ------------------------------------------------------------------------------------------------ CLIP score
def clip_image_transform(img: Image.Image, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """CLIP's eval transform: resize the short side to ``size`` (bicubic), centre crop, [0, 1], normalise."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    img = TF.center_crop(TF.resize(img, size, interpolation=InterpolationMode.BICUBIC), size)
    x = TF.pil_to_tensor(img).float() / 255.0
    return TF.normalize(x, mean, std)


def original_clip_input(img: Image.Image, eval_res: int | None = EVAL_RES) -> Image.Image:
    """The image the original hands to CLIP: crop + LANCZOS to eval_res, then [-1, 1] and back to uint8.

    The round trip truncates ((x + 1) · 127.5 cast to uint8), which can move a pixel down by one level; we keep
    it so that scores match the original's exactly.
    """
    x = torch.from_numpy(np.array(original_eval_resize(img, eval_res))).permute(2, 0, 1).float().div(255)
    x = (x - 0.5) / 0.5
    arr = ((x + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


@dataclass
class ClipScorer:
    """A CLIP model behind one interface: ``encode_images`` (preprocessed pixels) and ``encode_texts``."""

    backend: str  # "open_clip" or "hf"
    model: nn.Module
    image_size: int
    tokenizer: object | None = None  # the HF tokenizer (open_clip uses its packaged BPE)
    mean: tuple = OPENAI_MEAN
    std: tuple = OPENAI_STD

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, img: Image.Image, eval_res: int | None = EVAL_RES) -> torch.Tensor:
        return clip_image_transform(original_clip_input(img, eval_res), self.image_size, self.mean, self.std)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        if self.backend == "open_clip":
            return open_clip_tokenize(texts)
        return self.tokenizer(list(texts), padding="max_length", max_length=CONTEXT_LENGTH, truncation=True,
                              return_tensors="pt")["input_ids"]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device)
        if self.backend == "open_clip":
            return self.model.encode_image(pixels).float()
        return _embeds(self.model.get_image_features(pixel_values=pixels)).float()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenize(texts).to(self.device)
        if self.backend == "open_clip":
            return self.model.encode_text(ids).float()
        return _embeds(self.model.get_text_features(input_ids=ids)).float()


def _embeds(out) -> torch.Tensor:
    """transformers 5 returns a model output from ``get_*_features``; its pooled output is the projection."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def check_clip_path(path: str | Path | None) -> Path:
    """``--clip_path`` (default ``ckpts/eval/ViT-B-32.pt``) if it is a weights file or a HF CLIP folder with a
    config; otherwise a one-line FileNotFoundError naming the flag and the expected file."""
    p = Path(path) if path is not None else CLIP_WEIGHTS.default
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"--clip_path {p}: a Hugging Face CLIP folder needs config.json, the weights and "
                                    "the tokenizer files (as saved by CLIPModel / CLIPTokenizer.save_pretrained); "
                                    "weights are never downloaded")
        return p
    return require_file(CLIP_WEIGHTS, p)


def load_clip_scorer(path: str | Path | None, device: torch.device, model: str = CLIP_MODEL) -> ClipScorer:
    """CLIP from ``--clip_path``: a weights file (open_clip architecture ``model``) or a local HF CLIPModel folder."""
    p = check_clip_path(path)
    if p.is_dir():
        from transformers import AutoTokenizer, CLIPModel

        net = CLIPModel.from_pretrained(p, local_files_only=True).eval().to(device)
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
        mean, std = OPENAI_MEAN, OPENAI_STD
        if (p / "preprocessor_config.json").is_file():
            pre = json.loads((p / "preprocessor_config.json").read_text())
            mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
        return ClipScorer("hf", net, net.config.vision_config.image_size, tokenizer, mean, std)
    net = load_open_clip(p, model, CLIP_WEIGHTS.flag, device)
    return ClipScorer("open_clip", net, _image_size(net))


def _image_size(net: nn.Module) -> int:
    size = net.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def clip_cosines(scorer: ClipScorer, paths: Sequence[Path], captions: Sequence[str], batch_size: int,
                 prefix: str = CLIP_PREFIX, eval_res: int | None = EVAL_RES) -> np.ndarray:
    """cos(image_i, prefix + caption_i) for every pair, in order."""
    if len(paths) != len(captions):
        raise ValueError(f"{len(paths)} images but {len(captions)} captions")
    cos = []
    for i in range(0, len(paths), batch_size):
        pixels = torch.stack([scorer.preprocess(load_rgb(p), eval_res) for p in paths[i : i + batch_size]])
        img = scorer.encode_images(pixels)
        txt = scorer.encode_texts([prefix + c for c in captions[i : i + batch_size]])
        cos.append(F.cosine_similarity(img.double(), txt.double(), dim=-1).cpu())
    return torch.cat(cos).numpy()


def clip_score(scorer: ClipScorer, paths: Sequence[Path], captions: Sequence[str], batch_size: int = 64,
               eval_res: int | None = EVAL_RES) -> float:
    """The original's CLIP score: the mean cosine between each image and "A photo depicts " + its caption."""
    return float(clip_cosines(scorer, paths, captions, batch_size, eval_res=eval_res).mean())


# ------------------------------------------------------------------------------------------------------ HPS
def hps_transform(img: Image.Image, size: int = 224) -> torch.Tensor:
    """HPS's image transform: bicubic resize so the long side is ``size`` (sides rounded), zero-pad to a
    centred square (extra pixel right/bottom), [0, 1], OpenAI normalisation."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    w, h = img.size
    scale = size / float(max(h, w))
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        img = TF.resize(img, [nh, nw], interpolation=InterpolationMode.BICUBIC)
    w, h = img.size
    pad_w, pad_h = size - w, size - h
    if pad_w or pad_h:
        img = TF.pad(img, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(TF.pil_to_tensor(img).float() / 255.0, OPENAI_MEAN, OPENAI_STD)


def load_hps(path: str | Path | None, device: torch.device, model: str = HPS_MODEL) -> nn.Module:
    """open_clip ``ViT-H-14`` with the HPSv2.1 weights (``--hps_path``, ``HPS_v2.1_compressed.pt``)."""
    p = require_file(HPS_WEIGHTS, path)
    return load_open_clip(p, model, HPS_WEIGHTS.flag, device)


@torch.no_grad()
def hps_scores(model: nn.Module, paths: Sequence[Path], prompts: Sequence[str], batch_size: int = 16) -> np.ndarray:
    """HPSv2.1 score of each (image, prompt): cos(normalised image features, normalised text features)."""
    if len(paths) != len(prompts):
        raise ValueError(f"{len(paths)} images but {len(prompts)} prompts")
    device = next(model.parameters()).device
    size = _image_size(model)
    scores = []
    for i in range(0, len(paths), batch_size):
        pixels = torch.stack([hps_transform(load_rgb(p), size) for p in paths[i : i + batch_size]]).to(device)
        img = F.normalize(model.encode_image(pixels).double(), dim=-1)
        txt = F.normalize(model.encode_text(open_clip_tokenize(prompts[i : i + batch_size]).to(device)).double(), dim=-1)
        scores.append((img * txt).sum(dim=-1).cpu())
    return torch.cat(scores).numpy()
