"""Image-quality metrics of the paper (SPEC §8), computed as the original computes them, from LOCAL weights only.

* **FID / KID / Inception Score**: torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF-compatible FID
  network: padding-excluding average pools, max-pool in Mixed_7c) loaded from the standard file
  ``weights-inception-2015-12-05-6726825d.pth`` (pt_inception-2015-12-05). Preprocessing is the original's:
  centre-crop the long edge, LANCZOS resize to ``eval_res`` (256), then clean-fid's "clean" resize (PIL bicubic
  per channel in float, no quantisation) to 299 px; pixel values in [0, 255]. pool3 (2048-d) for FID/KID, the
  unbiased logits for IS (as torch-fidelity).
* **Improved precision / recall** (Kynkäänniemi et al., 2019): torchvision VGG16 fc2 before its ReLU, images
  resized as the original (PIL bilinear to 224 × 224, no crop), ImageNet normalisation; k-NN manifolds, k = 3.
* **The demo's metrics**: the demo's digit classifier as a feature extractor (its 128-d pooled features) for a
  demo-FID and precision / recall against scikit-learn's bundled digits, and its class accuracy as the demo's
  prompt-alignment score.

CLIP score and HPSv2.1 are in ``models.clip_eval``. Nothing here ever downloads anything: a missing weight file is
a ``FileNotFoundError`` naming the flag and the expected file, raised before any feature extraction.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from torch import nn

from models.registry import REPO_ROOT

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_RES = 256  # the original's --eval_res: every image is centre-cropped and LANCZOS-resized to this first
_PROMPT_RE = re.compile(r"(?:prompt|image)_(\d+)")

# Where the README tells users to put the weight files; every flag defaults to these paths.
WEIGHTS_DIR = REPO_ROOT / "ckpts" / "eval"


@dataclass(frozen=True)
class WeightFile:
    """A weight file an evaluation needs: the flag that names it, its standard file name, what it is."""

    flag: str
    filename: str
    what: str

    @property
    def default(self) -> Path:
        return WEIGHTS_DIR / self.filename


INCEPTION_WEIGHTS = WeightFile("--inception_path", "weights-inception-2015-12-05-6726825d.pth",
                               "torch-fidelity's FID Inception weights (pt_inception-2015-12-05)")
VGG16_WEIGHTS = WeightFile("--vgg_path", "vgg16-397923af.pth", "torchvision's ImageNet VGG16 state dict")
DEMO_CLASSIFIER = WeightFile("--classifier_path", "", "the demo's digit classifier folder")


def require_file(spec: WeightFile, path: str | Path | None, folder: bool = False) -> Path:
    """``path`` (or the spec's default) as a Path, or a one-line FileNotFoundError naming the flag and the file."""
    p = Path(path) if path is not None else spec.default
    ok = p.is_dir() if folder else p.is_file()
    if not ok:
        name = f" ({spec.filename})" if spec.filename else ""
        raise FileNotFoundError(f"{spec.flag} {p}: not found. Expected {spec.what}{name}; put it there or pass "
                                f"{spec.flag} PATH (weights are never downloaded)")
    return p


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


def load_rgb(path: str | Path) -> Image.Image:
    """The image at ``path`` as an RGB PIL image (file closed)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def center_crop_long_edge(img: Image.Image) -> Image.Image:
    """Centre square crop of side min(width, height) (the original's CenterCropLongEdge)."""
    from torchvision.transforms.functional import center_crop

    return center_crop(img, min(img.size))


def original_eval_resize(img: Image.Image, eval_res: int | None = EVAL_RES) -> Image.Image:
    """The original's custom transform before clean-fid: long-edge centre crop, then LANCZOS to eval_res²."""
    img = center_crop_long_edge(img)
    if eval_res:
        img = img.resize((eval_res, eval_res), Image.LANCZOS)
    return img


def clean_resize(img: np.ndarray, size: int = 299) -> np.ndarray:
    """clean-fid's "clean" resize: each channel as a float32 PIL image, bicubic to size², clipped to [0, 255].

    The result stays float (clean mode does not quantise after resizing). ``img`` is H×W×3 uint8.
    """
    chans = []
    for c in range(img.shape[2]):
        ch = Image.fromarray(img[:, :, c].astype(np.float32), mode="F").resize((size, size), Image.BICUBIC)
        chans.append(np.asarray(ch).clip(0, 255))
    return np.stack(chans, axis=2).astype(np.float32)


# ------------------------------------------------------------------------------------------ feature extractors
def _torch_load_state(path: Path, flag: str) -> dict[str, torch.Tensor]:
    """A state dict from a .pt/.pth/.bin/.safetensors file (safe load); unwraps {'state_dict'|'model': ...}."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise ValueError(f"{flag} {path}: cannot read a state dict ({type(e).__name__}: {str(e)[:120]})") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{flag} {path}: expected a state dict, got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_state_dict(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], flag: str, path: Path,
                     what: str, optional_prefixes: tuple[str, ...] = ()) -> None:
    """Raise a one-line ValueError unless ``state`` has exactly the keys and shapes of ``expected``."""
    missing = [k for k in expected if k not in state and not k.startswith(optional_prefixes)]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        def few(keys):
            return f"{keys[:3]}{'...' if len(keys) > 3 else ''}"

        raise ValueError(f"{flag} {path}: not {what} (missing {few(missing)}, unexpected {few(unexpected)}, "
                         f"wrong shape {few(shapes)})")


class FIDInception(nn.Module):
    """torch-fidelity's FID Inception-v3 on images already preprocessed to 299 px float [0, 255].

    ``forward`` returns ``{"pool3": [B, 2048], "logits_unbiased": [B, 1008]}`` — the features torch-fidelity uses
    for FID/KID and for IS. Its own ``forward`` takes uint8 and resizes with TF-1 bilinear interpolation; clean-fid
    feeds float 299 px images straight in, so we run the same layers from the normalisation on.
    """

    size = 299
    primary = "pool3"

    def __init__(self, weights_path: str | Path) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(weights_path))

    @staticmethod
    def preprocess(img: Image.Image, eval_res: int | None = EVAL_RES) -> torch.Tensor:
        """PIL image -> [3, 299, 299] float in [0, 255], as the original's clean-fid call."""
        arr = clean_resize(np.array(original_eval_resize(img, eval_res)), FIDInception.size)
        return torch.from_numpy(arr).permute(2, 0, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (images.to(self.net.feature_extractor_internal_dtype) - 128) / 128  # as torch-fidelity / the TF graph
        for name, block in self.net.named_children():
            if name == "fc":
                break
            x = block(x)  # Conv2d_1a_3x3 ... Mixed_7c, AvgPool, in registration (= forward) order
        pool3 = torch.flatten(x, 1)
        return {"pool3": pool3.float(), "logits_unbiased": pool3.mm(self.net.fc.weight.T).float()}


class VGG16Fc2(nn.Module):
    """torchvision VGG16 returning the 4096-d fc2 features (before the ReLU) of images at 224 px."""

    size = 224
    primary = "fc2"

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import vgg16

        self.net = vgg16(weights=None)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def preprocess(img: Image.Image, eval_res: int | None = None) -> torch.Tensor:
        """As the original: PIL bilinear resize to 224 × 224 (aspect not kept, no crop), [0, 1]."""
        from torchvision.transforms.functional import pil_to_tensor

        img = img.resize((VGG16Fc2.size, VGG16Fc2.size), Image.BILINEAR)
        return pil_to_tensor(img).float() / 255.0

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.net.avgpool(self.net.features((images - self.mean) / self.std)).flatten(1)
        return {"fc2": self.net.classifier[:4](x)}  # fc1, ReLU, Dropout (identity in eval), fc2


class DemoFeatures(nn.Module):
    """The demo's digit classifier as a feature extractor: pooled conv features (128-d) and class logits."""

    primary = "features"

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.size = classifier.config.image_size

    def preprocess(self, img: Image.Image, eval_res: int | None = None) -> torch.Tensor:
        """PIL image -> [3, s, s] in [-1, 1] (bilinear to the classifier's size, as ``classify`` does)."""
        from torchvision.transforms.functional import pil_to_tensor

        x = pil_to_tensor(img).float().unsqueeze(0) / 127.5 - 1.0
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x[0]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        p = next(self.classifier.parameters())
        h = self.classifier.features(images.to(p.dtype).clamp(-1, 1)).mean(dim=(2, 3))
        return {"features": h.float(), "logits": self.classifier.head(h).float()}


def load_inception(path: str | Path | None, device: torch.device) -> FIDInception:
    """The FID Inception from a local ``weights-inception-2015-12-05-6726825d.pth`` (``--inception_path``).

    The file is first read safely (``weights_only``) and checked, so that a wrong file — torchvision's ImageNet
    Inception has the same block names but computes differently — is a clear error, not a silent wrong FID.
    torch-fidelity then loads it strictly into its own model.
    """
    p = require_file(INCEPTION_WEIGHTS, path)
    state = _torch_load_state(p, INCEPTION_WEIGHTS.flag)
    what = f"the FID Inception state dict ({INCEPTION_WEIGHTS.filename})"
    if any(k.startswith("AuxLogits.") for k in state) or tuple(state.get("fc.weight", torch.empty(0)).shape) != (1008, 2048):
        raise ValueError(f"{INCEPTION_WEIGHTS.flag} {p}: not {what}: it needs a 1008-class fc and no AuxLogits "
                         "(torchvision's ImageNet inception_v3 is a different network and gives a wrong FID)")
    try:
        model = FIDInception(p)
    except RuntimeError as e:  # strict load_state_dict: missing / unexpected keys or wrong shapes
        raise ValueError(f"{INCEPTION_WEIGHTS.flag} {p}: not {what} ({str(e).splitlines()[0][:160]})") from e
    return model.eval().to(device)


def load_vgg16(path: str | Path | None, device: torch.device) -> VGG16Fc2:
    """VGG16 fc2 extractor from a local torchvision ``vgg16`` state dict (``--vgg_path``)."""
    p = require_file(VGG16_WEIGHTS, path)
    state = _torch_load_state(p, VGG16_WEIGHTS.flag)
    model = VGG16Fc2()
    check_state_dict(model.net.state_dict(), state, VGG16_WEIGHTS.flag, p, "a torchvision vgg16 state dict",
                     optional_prefixes=("classifier.6.",))
    model.net.load_state_dict(state, strict=False)
    return model.eval().to(device)


def default_classifier_path() -> Path:
    return REPO_ROOT / "ckpts" / "demo" / "classifier"


def load_demo_features(path: str | Path | None, device: torch.device) -> DemoFeatures:
    """The demo classifier (``--classifier_path``, default the bundled ``ckpts/demo/classifier``) as extractor."""
    from models.demo.classifier import load_classifier

    p = Path(path) if path is not None else default_classifier_path()
    if not p.is_dir():
        raise FileNotFoundError(f"--classifier_path {p}: not found. Expected the demo's digit classifier folder "
                                "(ckpts/demo/classifier, built by `python -m models.demo.train`)")
    return DemoFeatures(load_classifier(p, device)).to(device)


# Feature extractors by name: (loader(path, device), the flag that names the weights).
FEATURE_EXTRACTORS: dict[str, tuple[Callable[[str | Path | None, torch.device], nn.Module], str]] = {
    "inception": (load_inception, INCEPTION_WEIGHTS.flag),
    "vgg16": (load_vgg16, VGG16_WEIGHTS.flag),
    "demo": (load_demo_features, DEMO_CLASSIFIER.flag),
}


@torch.no_grad()
def extract_features(model: nn.Module, paths: Sequence[Path], batch_size: int, device: torch.device,
                     eval_res: int | None = EVAL_RES) -> dict[str, np.ndarray]:
    """Named features (float64 arrays [N, D]) of the images at ``paths``, preprocessed by ``model.preprocess``."""
    return extract_features_from_batches(
        model, (torch.stack([model.preprocess(load_rgb(p), eval_res) for p in paths[i : i + batch_size]])
                for i in range(0, len(paths), batch_size)), device)


@torch.no_grad()
def extract_features_from_batches(model: nn.Module, batches: Iterable[torch.Tensor],
                                  device: torch.device) -> dict[str, np.ndarray]:
    """Named features of already preprocessed image batches."""
    out: dict[str, list[torch.Tensor]] = {}
    for x in batches:
        for k, v in model(x.to(device)).items():
            out.setdefault(k, []).append(v.double().cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


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
    The formula of clean-fid and pytorch-fid (scipy ``sqrtm``; the original ran clean-fid), step for step;
    torch-fidelity's eigenvalue route agrees to rounding. If the product's square root is singular, ``eps`` is added to both
    diagonals; a small imaginary part left by ``sqrtm`` (numerical noise) is dropped, a large one is an error.
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


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID of two feature sets [N1, D], [N2, D].

    With at least D + 1 samples per set this is ``frechet_distance`` of their statistics (the libraries' formula,
    bit for bit). With fewer, both covariances are rank-deficient and Tr (Σ1 Σ2)^{1/2} equals the nuclear norm of
    A1 A2ᵀ / sqrt((N1 - 1)(N2 - 1)) (A = centred features): exact, and an N×N SVD instead of a D×D ``sqrtm``
    (34 s for D = 2048 on one core) — so a few-image FID on the 2048-d Inception features is fast.
    """
    f1, f2 = np.asarray(features1, dtype=np.float64), np.asarray(features2, dtype=np.float64)
    n1, d = f1.shape
    n2 = len(f2)
    if min(n1, n2) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {n1} and {n2}")
    if min(n1, n2) > d:
        return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    a1, a2 = f1 - mu1, f2 - mu2
    tr_covmean = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return float(diff.dot(diff) + (a1 * a1).sum() / (n1 - 1) + (a2 * a2).sum() / (n2 - 1) - 2.0 * tr_covmean)


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, subset_size: int = 1000,
                              subsets: int = 100) -> tuple[float, float]:
    """KID (mean, std over subsets) with torch-fidelity's estimator (cubic polynomial kernel, unbiased MMD²).

    The subset size is capped at the smaller set, as a user with few images would otherwise get an error.
    """
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = min(subset_size, len(real), len(fake))
    out = kid_features_to_metric(torch.as_tensor(real), torch.as_tensor(fake), kid_subsets=subsets,
                                 kid_subset_size=size, verbose=False)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over splits) from unbiased Inception logits, with torch-fidelity's estimator."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    out = isc_features_to_metric(torch.as_tensor(logits), splits=min(splits, len(logits)))
    return out["inception_score_mean"], out["inception_score_std"]


def save_reference_stats(path: str | Path, features: np.ndarray, meta: dict | None = None) -> None:
    """Write ``mu``, ``sigma``, the features (float32, for KID) and how they were made (``meta``: extractor,
    eval_res, as JSON) to ``path`` (.npz), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mu, sigma = feature_statistics(features)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, features=features.astype(np.float32), meta=np.array(json.dumps(meta or {})))
    tmp.replace(path)


def load_reference_stats(path: str | Path, expect: dict | None = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(mu, sigma, features or None) from a reference .npz (``mu``/``sigma`` as pytorch-fid and clean-fid write).

    If the file records how it was made and that differs from ``expect`` (another feature extractor or
    ``--eval_res``), it is an error: such statistics would give a meaningless FID.
    """
    with np.load(path) as stats:
        if "mu" not in stats or "sigma" not in stats:
            raise ValueError(f"--ref_dir {path}: a reference .npz needs arrays 'mu' and 'sigma', has {list(stats)}")
        meta = json.loads(str(stats["meta"])) if "meta" in stats else {}
        for key, want in (expect or {}).items():
            if key in meta and meta[key] != want:
                raise ValueError(f"--ref_dir {path}: made with {key} {meta[key]}, but this run uses {want}; "
                                 "recompute it with --save_ref_stats")
        feats = stats["features"].astype(np.float64) if "features" in stats else None
        return stats["mu"], stats["sigma"], feats


# ---------------------------------------------------------------------------------------- precision / recall
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
    real samples inside the fake manifold. A point on a ball's boundary counts as inside (as the paper's code;
    the original's port uses a strict ``<``, which only matters for ties). Distances are computed in blocks.
    """
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64)
    precision = _coverage(fake, real, knn_radii(real, k, batch_size), batch_size)
    recall = _coverage(real, fake, knn_radii(fake, k, batch_size), batch_size)
    return precision, recall


# ------------------------------------------------------------------------------------------- demo metrics
_DIGIT_FEATURES: dict[tuple, np.ndarray] = {}


def _fingerprint(module: nn.Module) -> tuple:
    """Identifies a classifier's weights cheaply (so a reloaded copy of the same file hits the cache)."""
    return tuple(round(float(t.double().sum()), 6) for t in module.state_dict().values())


def digit_reference_features(extractor: DemoFeatures, batch_size: int = 256) -> np.ndarray:
    """Features of all 1,797 bundled digits (the demo's reference set), computed once per classifier."""
    key = (extractor.size, _fingerprint(extractor.classifier))
    if key not in _DIGIT_FEATURES:
        from models.demo.data import load_digit_images

        images, _ = load_digit_images(extractor.size)
        device = next(extractor.parameters()).device
        _DIGIT_FEATURES[key] = extract_features_from_batches(extractor, images.split(batch_size), device)["features"]
    return _DIGIT_FEATURES[key]


def demo_quality(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, k: int = 3) -> dict[str, float]:
    """The demo's quality figures for generated images in [-1, 1]: class accuracy (prompt alignment),
    demo-FID and improved precision / recall against the bundled digits, all in the classifier's feature space.
    """
    extractor = DemoFeatures(classifier)
    device = next(classifier.parameters()).device
    feats = extract_features_from_batches(extractor, images.split(256), device)
    pred = torch.as_tensor(feats["logits"]).argmax(dim=1)
    real = digit_reference_features(extractor)
    out = {"accuracy": float((pred == labels.cpu()).double().mean())}
    if len(images) >= 2:
        out["demo_fid"] = fid_from_features(feats["features"], real)
    if len(images) > k:
        out["precision"], out["recall"] = improved_precision_recall(real, feats["features"], k=k)
    return out


# -------------------------------------------------------------------------------------------------- captions
def _read_prompt_list(path: Path) -> list[str]:
    """Prompts of a .tsv/.csv (a 'Prompt' column), a .json list (strings or {'caption': ...}) or a text file."""
    if path.suffix in (".tsv", ".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
        if rows and "Prompt" not in rows[0]:
            raise ValueError(f"{path}: prompt tables need a 'Prompt' column")
        return [r["Prompt"] for r in rows]
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return [d["caption"] if isinstance(d, dict) else str(d) for d in data]
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_captions(caption_path: str | Path, image_paths: Sequence[Path], flag: str = "--caption_path") -> list[str]:
    """Caption of each image, paired by the index in its file name.

    ``caption_path`` is a generate_images ``global_statistics_*.json`` (image ``prompt_{idx}.*`` gets entry
    ``prompt_{idx}``'s ``prompt``, the prompt actually used) or a prompt file (.tsv/.csv 'Prompt' column, .json list,
    text lines): image ``prompt_{idx}`` gets entry ``idx``, as the original; other file names are paired in order.
    """
    path = Path(caption_path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: file not found")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            missing = [p.name for p in image_paths if not isinstance(data.get(p.stem), dict) or "prompt" not in data[p.stem]]
            if missing:
                raise ValueError(f"{flag} {path}: no prompt for {len(missing)} image(s), e.g. {missing[:3]}")
            return [str(data[p.stem]["prompt"]) for p in image_paths]
    prompts = _read_prompt_list(path)
    matches = [_PROMPT_RE.fullmatch(p.stem) for p in image_paths]
    if all(matches):
        idx = [int(m.group(1)) for m in matches]
        if max(idx) >= len(prompts):
            raise ValueError(f"{flag} {path}: {len(prompts)} prompts, but image {image_paths[idx.index(max(idx))].name} "
                             f"needs index {max(idx)}")
        return [prompts[i] for i in idx]
    if len(prompts) < len(image_paths):
        raise ValueError(f"{flag} {path}: {len(prompts)} captions for {len(image_paths)} images")
    return prompts[: len(image_paths)]
