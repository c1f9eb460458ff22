"""A small CNN digit classifier: the demo's quality meter.

Generated demo images are judged by whether this classifier, trained only on real (augmented) digits of the
train split, labels them as the prompted class. It is deliberately plain (three conv stages, global average
pooling, one linear layer) so that its verdict reflects the images, not a clever model.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ClassifierConfig:
    """Widths of the three conv stages; input is (B, 3, image_size, image_size) in [-1, 1]."""

    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    num_classes: int = 10
    image_size: int = 32
    dropout_p: float = 0.2

    @classmethod
    def from_dict(cls, d: dict) -> ClassifierConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


class DigitClassifier(nn.Module):
    """conv-BN-ReLU ×2 then 2×2 max-pool, per stage; global average pool; dropout; linear."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.config = cfg
        stages, c_in = [], 3
        for c in cfg.channels:
            stages += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c
        self.features = nn.Sequential(*stages)
        self.dropout = nn.Dropout(cfg.dropout_p)
        self.head = nn.Linear(c_in, cfg.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> class logits (B, num_classes)."""
        h = self.features(images).mean(dim=(2, 3))
        return self.head(self.dropout(h))

    @torch.no_grad()
    def classify(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Predicted class ids (B,) for images in [-1, 1]; resized to ``image_size`` if needed."""
        was_training = self.training
        self.eval()
        p = next(self.parameters())
        s = self.config.image_size
        preds = []
        for chunk in images.split(batch_size):
            chunk = chunk.to(device=p.device, dtype=p.dtype).clamp(-1.0, 1.0)
            if chunk.shape[1] == 1:
                chunk = chunk.expand(-1, 3, -1, -1)
            if chunk.shape[-2:] != (s, s):
                chunk = F.interpolate(chunk, size=(s, s), mode="bilinear", align_corners=False)
            preds.append(self(chunk).argmax(dim=-1))
        self.train(was_training)
        return torch.cat(preds)


def classify(classifier: DigitClassifier, images: torch.Tensor) -> torch.Tensor:
    """Predicted class ids (B,) of ``images`` in [-1, 1] (same as ``classifier.classify``)."""
    return classifier.classify(images)


def load_classifier(path: str | os.PathLike, device: torch.device | str = "cpu") -> DigitClassifier:
    """Load ``config.json`` + ``model.safetensors`` from the folder ``path`` (e.g. ``ckpts/demo/classifier``)."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        cfg = ClassifierConfig.from_dict(json.load(f))
    model = DigitClassifier(cfg)
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")), strict=True)
    return model.to(device).eval()
