"""scikit-learn's bundled digits as a tiny image data set for the built-in demo model.

``load_digits()`` ships 1,797 greyscale 8×8 images (values 0..16) with labels 0..9 inside the scikit-learn
wheel, so the demo needs no download. We upsample them to 32×32 (bicubic), replicate grey to 3 channels and
scale to [-1, 1] (background -1, ink +1) so they look like the RGB images a LlamaGen VQ expects. With so few
images, random small affine jitter (shift, rotation, scale, shear) is what keeps the VQ and the GPT from
memorising the set. Everything random takes an explicit ``torch.Generator`` so runs are reproducible.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
NUM_CLASSES = 10
CLASS_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Held-out split used by every stage (GPT val loss, classifier accuracy, tests): fixed, independent of --seed.
VAL_FRACTION = 0.1
SPLIT_SEED = 1234


def load_digit_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (images (N, 3, size, size) float32 in [-1, 1], labels (N,) int64)."""
    from sklearn.datasets import load_digits  # imported here: only the demo needs scikit-learn

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    x = (x.clamp(0.0, 1.0) * 2.0 - 1.0).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    return x, labels


def train_val_split(n: int, val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train_idx, val_idx) permutation split of ``n`` items."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def load_split(split: str, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of ``split`` in {"train", "val", "all"}."""
    images, labels = load_digit_images(size)
    if split == "all":
        return images, labels
    train_idx, val_idx = train_val_split(images.shape[0])
    if split == "train":
        return images[train_idx], labels[train_idx]
    if split == "val":
        return images[val_idx], labels[val_idx]
    raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")


def augment(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    max_shift: float = 2.0,
    max_rotate_deg: float = 10.0,
    max_scale: float = 0.08,
    max_shear: float = 0.1,
) -> torch.Tensor:
    """Random small affine jitter of a batch in [-1, 1] (shift in pixels, ±scale fraction, ±shear).

    One independent transform per image; areas moved in from outside are background (-1).
    """
    b, _, h, w = images.shape

    def uniform(lim: float) -> torch.Tensor:
        return (torch.rand(b, generator=generator) * 2.0 - 1.0) * lim

    angle = uniform(math.radians(max_rotate_deg))
    scale = 1.0 + uniform(max_scale)
    shear = uniform(max_shear)
    tx, ty = uniform(2.0 * max_shift / w), uniform(2.0 * max_shift / h)  # affine_grid works in [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin + shear * cos, tx], -1), torch.stack([sin, cos + shear * sin, ty], -1)], dim=1
    ).to(images)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Sample (x + 1) with zero padding so that pixels from outside become background -1.
    out = F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    return out.clamp(-1.0, 1.0)


_PROMPT_RE = re.compile(
    r"^(?:(?:an?|the)\s+)?(?:hand-?written\s+)?(?:(?:digit|number)\s+)?(?P<what>[a-z0-9]+)$"
)

ACCEPTED_PROMPT_FORMS = (
    '"7"',
    '"seven"',
    '"digit 7"',
    '"digit seven"',
    '"a handwritten seven"',
    '"a handwritten digit 7"',
)


def prompt_to_class(prompt: str) -> int:
    """Map a prompt such as "7", "Seven", "digit 7" or "a handwritten seven" to its class id 0..9.

    Case, surrounding whitespace and a trailing full stop are ignored. Anything else raises ``ValueError``
    listing the accepted forms, so a typo never silently becomes some other class.
    """
    text = " ".join(str(prompt).strip().lower().rstrip(".!").split())
    m = _PROMPT_RE.match(text)
    if m is not None:
        what = m.group("what")
        if what.isdigit() and len(what) == 1:
            return int(what)
        if what in CLASS_NAMES:
            return CLASS_NAMES.index(what)
    raise ValueError(
        f"cannot read a digit class from prompt {prompt!r}; the demo model draws digits 0-9. Accepted forms: "
        + ", ".join(ACCEPTED_PROMPT_FORMS)
        + " (any digit 0-9 or its English name, case-insensitive)"
    )
