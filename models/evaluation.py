"""Image-quality metrics of the paper (SPEC §8): FID, CLIP score and improved precision / recall.

Every feature extractor is built from LOCAL weights only; nothing here ever downloads anything.

* FID: torchvision Inception-v3 (pool3, 2048-d, inputs resized bilinearly to 299 px and scaled to [-1, 1]) loaded
  from a state-dict file (``--inception_path``) in torchvision's ``inception_v3`` layout. FID values are
  comparable to published numbers (the paper's included) only with the standard pytorch-fid / TF "pt_inception"
  FID weights; their conversion to torchvision's layout is NOT provided here. With torchvision's ImageNet
  Inception weights the metric is well defined and useful for relative comparisons, but the absolute values differ.
* Improved precision / recall (Kynkäänniemi et al., 2019): VGG16 fc2 features (4096-d, pre-ReLU, as in the
  common PyTorch port) at 224 px with ImageNet normalisation, from a torchvision ``vgg16`` state dict
  (``--vgg_path``); k-NN manifolds with k = 3.
* CLIP score: ``transformers.CLIPModel`` + ``CLIPProcessor`` from a local folder (``--clip_path``), mean cosine
  similarity x 100 between each image and "A photo depicts " + its caption.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from torch import nn

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CLIP_PREFIX = "A photo depicts "
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PROMPT_RE = re.compile(r"prompt_(\d+)")


# ----------------------------------------------------------------------------------------------- image folders
def list_images(folder: str | Path, how_many: int | None = None) -> list[Path]:
    """Image files (png/jpg) of ``folder``, in a stable order, the first ``how_many`` of them.

    A generated folder (every file named ``prompt_{idx}.*``) is ordered by ``idx`` numerically, so that
    ``prompt_10`` follows ``prompt_9``; any other folder is ordered by file name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if files and all(_PROMPT_RE.fullmatch(p.stem) for p in files):
        files.sort(key=lambda p: int(_PROMPT_RE.fullmatch(p.stem).group(1)))
    else:
        files.sort(key=lambda p: p.name)
    if how_many is not None:
        files = files[:how_many]
    if not files:
        raise ValueError(f"no .png/.jpg images found in {folder}")
    return files


def load_image_batch(paths: Sequence[Path], size: int) -> torch.Tensor:
    """RGB images as a float tensor [B, 3, size, size] in [0, 1] (bilinear resize, no antialiasing, as pytorch-fid)."""
    batch = []
    for p in paths:
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        batch.append(x)
    return torch.cat(batch).clamp_(0.0, 1.0)


# ------------------------------------------------------------------------------------------------ weights
def _read_state_dict(path: str | Path | None, flag: str, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a local .pt/.pth/.bin/.safetensors file; unwraps {'state_dict'|'model': ...}."""
    if path is None:
        raise FileNotFoundError(f"{flag} is required: a local {what} state-dict file (weights are never downloaded)")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: file not found. Expected a local {what} state-dict file "
                                "(.pt/.pth/.safetensors); weights are never downloaded")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{flag} {path}: expected a state dict, got {type(state).__name__}")
    return state


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], flag: str, path: str | Path,
                 optional_prefixes: tuple[str, ...] = ()) -> None:
    """Load ``state``; any missing (other than ``optional_prefixes``) or unexpected key is a clear error."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(optional_prefixes)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{flag} {path}: not a torchvision {type(model).__name__} state dict "
                         f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {result.unexpected_keys[:3]}{'...' if len(result.unexpected_keys) > 3 else ''})")


class InceptionPool3(nn.Module):
    """torchvision Inception-v3 returning the 2048-d pool3 features of [0, 1] images at 299 px."""

    size = 299

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        self.net = inception_v3(weights=None, aux_logits=True, init_weights=False)
        self.net.fc = nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2.0 - 1.0)  # Inception's native input range is [-1, 1]


class VGG16Fc2(nn.Module):
    """torchvision VGG16 returning the 4096-d fc2 features (pre-ReLU) of [0, 1] images at 224 px."""

    size = 224

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import vgg16

        self.net = vgg16(weights=None)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.net.avgpool(self.net.features((images - self.mean) / self.std)).flatten(1)
        return self.net.classifier[:4](x)  # fc1, ReLU, Dropout (identity in eval), fc2


def load_inception(path: str | Path | None, device: torch.device) -> InceptionPool3:
    """Inception-v3 pool3 extractor from a local torchvision-layout state dict (``--inception_path``)."""
    state = _read_state_dict(path, "--inception_path", "torchvision inception_v3")
    model = InceptionPool3()
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # classifier head is not used
    _load_strict(model.net, state, "--inception_path", path, optional_prefixes=("AuxLogits.",))
    return model.eval().to(device)


def load_vgg16(path: str | Path | None, device: torch.device) -> VGG16Fc2:
    """VGG16 fc2 extractor from a local torchvision-layout state dict (``--vgg_path``)."""
    state = _read_state_dict(path, "--vgg_path", "torchvision vgg16")
    model = VGG16Fc2()
    _load_strict(model.net, state, "--vgg_path", path, optional_prefixes=("classifier.6.",))
    return model.eval().to(device)


@torch.no_grad()
def extract_features(model: nn.Module, paths: Sequence[Path], batch_size: int, device: torch.device) -> np.ndarray:
    """Features [N, D] (float64) of the images at ``paths``; ``model`` takes [0, 1] images at ``model.size`` px."""
    feats = []
    for i in range(0, len(paths), batch_size):
        x = load_image_batch(paths[i : i + batch_size], model.size).to(device)
        feats.append(model(x).double().cpu())
    return torch.cat(feats).numpy()


# --------------------------------------------------------------------------------------------------- FID
def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, rows = samples) of features [N, D]."""
    if len(features) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2).

    d² = ||mu1 - mu2||² + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}).
    As pytorch-fid: if the product's square root is singular, ``eps`` is added to both diagonals; a small imaginary
    part left by ``sqrtm`` (numerical noise) is dropped, a large one is an error.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ---------------------------------------------------------------------------------------- precision / recall
def _pairwise_distances(a: torch.Tensor, b: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Euclidean distances [len(a), len(b)], computed in row blocks of ``batch_size``."""
    return torch.cat([torch.cdist(a[i : i + batch_size], b) for i in range(0, len(a), batch_size)])


def knn_radii(features: torch.Tensor, k: int, batch_size: int = 1024) -> torch.Tensor:
    """Distance of each sample to its k-th nearest neighbour in the same set (itself excluded)."""
    if len(features) <= k:
        raise ValueError(f"k-NN manifold with k={k} needs more than {k} samples, got {len(features)}")
    radii = []
    for i in range(0, len(features), batch_size):
        d = torch.cdist(features[i : i + batch_size], features)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the smallest distance (0) is the sample itself
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of ``queries`` inside at least one ball (support[j], radii[j])."""
    inside = []
    for i in range(0, len(queries), batch_size):
        d = torch.cdist(queries[i : i + batch_size], support)
        inside.append((d <= radii.unsqueeze(0)).any(dim=1))
    return torch.cat(inside).double().mean().item()


def improved_precision_recall(real_features: np.ndarray | torch.Tensor, fake_features: np.ndarray | torch.Tensor,
                              k: int = 3, batch_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019).

    Each set's manifold is the union of balls around its samples with radius = distance to the k-th nearest
    neighbour in that set. precision = fraction of fake samples inside the real manifold; recall = fraction of
    real samples inside the fake manifold. Distances are computed in blocks of ``batch_size`` rows.
    """
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64)
    precision = _coverage(fake, real, knn_radii(real, k, batch_size), batch_size)
    recall = _coverage(real, fake, knn_radii(fake, k, batch_size), batch_size)
    return precision, recall


# ------------------------------------------------------------------------------------------------ CLIP score
def load_clip(path: str | Path | None, device: torch.device):
    """``(CLIPModel, CLIPProcessor)`` from a local folder (``--clip_path``, a save_pretrained/hub snapshot folder)."""
    if path is None:
        raise FileNotFoundError("--clip_path is required for the CLIP score: a local CLIP ViT-B/32 folder "
                                "(config.json, weights, tokenizer and preprocessor files); never downloaded")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--clip_path {folder}: expected a local folder with config.json, model weights, "
                                "tokenizer and preprocessor files (as saved by CLIPModel/CLIPProcessor.save_pretrained)")
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval().to(device)
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    return model, processor


def clip_score_from_embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """Mean over pairs of 100 x cos(image_i, text_i)."""
    cos = F.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return (100.0 * cos).mean().item()


@torch.no_grad()
def clip_embeddings(model, processor, paths: Sequence[Path], captions: Sequence[str], batch_size: int,
                    device: torch.device, prefix: str = CLIP_PREFIX) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected CLIP image and text embeddings [N, D] of (image, prefix + caption) pairs."""
    if len(paths) != len(captions):
        raise ValueError(f"{len(paths)} images but {len(captions)} captions")
    image_embeds, text_embeds = [], []
    for i in range(0, len(paths), batch_size):
        images = []
        for p in paths[i : i + batch_size]:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        texts = [prefix + c for c in captions[i : i + batch_size]]
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True, truncation=True)
        out = model(**{k: v.to(device) for k, v in inputs.items()})
        image_embeds.append(out.image_embeds.float().cpu())
        text_embeds.append(out.text_embeds.float().cpu())
    return torch.cat(image_embeds), torch.cat(text_embeds)


def clip_score(model, processor, paths: Sequence[Path], captions: Sequence[str], batch_size: int,
               device: torch.device) -> float:
    """CLIP score: mean cosine similarity x 100 between each image and "A photo depicts " + its caption."""
    return clip_score_from_embeddings(*clip_embeddings(model, processor, paths, captions, batch_size, device))


# -------------------------------------------------------------------------------------------------- captions
def load_captions(caption_path: str | Path, image_paths: Sequence[Path]) -> list[str]:
    """Caption of each image.

    ``caption_path`` is a generate_images ``global_statistics_*.json`` (image ``prompt_{idx}.*`` gets entry
    ``prompt_{idx}``'s ``prompt``) or a text file with one caption per line, matching the images in order.
    """
    path = Path(caption_path)
    if not path.is_file():
        raise FileNotFoundError(f"--caption_path {path}: file not found")
    if path.suffix == ".json":
        import json

        stats = json.loads(path.read_text())
        if not isinstance(stats, dict):
            raise ValueError(f"--caption_path {path}: expected a generate_images global_statistics JSON object")
        missing = [p.name for p in image_paths if not isinstance(stats.get(p.stem), dict) or "prompt" not in stats[p.stem]]
        if missing:
            raise ValueError(f"--caption_path {path}: no prompt for {len(missing)} image(s), e.g. {missing[:3]}")
        return [str(stats[p.stem]["prompt"]) for p in image_paths]
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(lines) < len(image_paths):
        raise ValueError(f"--caption_path {path}: {len(lines)} captions for {len(image_paths)} images")
    return lines[: len(image_paths)]
