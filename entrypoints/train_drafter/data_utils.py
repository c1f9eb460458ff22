"""Training-specific handling of drafter data: held-out split, epoch sampler, batch assembly, feature noise.

The data format (``lantern-drafter-data/1``), its validation, the f_t <-> x_{t+1} pairing and the per-sample
reader (:class:`models.train_data.DrafterDataset`, one stream per sample with ``uncond_prob``) live in
:mod:`models.train_data`; this module turns its samples into the drafter's training layout.

Pairing (EAGLE, SPEC §4): drafter position p reads (f_p, s_{p+1}) and predicts f_{p+1}: inputs ``hidden[:, :-1]``
with ids :func:`models.train_data.drafter_input_ids` ``[:, :-1]``, targets ``hidden[:, 1:]``; the loss positions
are p = T−1 .. T+N−3 (targets f_T .. f_{T+N−2}, which predict x_1 .. x_{N−1}). Padded condition positions are
hidden as keys, exactly as at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Sampler

from models.generation import prefix_attention_mask
from models.train_data import DrafterDataError, drafter_input_ids

# The held-out split is drawn with a fixed seed so runs with different --seed values are evaluated on the same
# samples (and a resumed run keeps its split).
SPLIT_SEED = 20241003


def split_indices(num_samples: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train / held-out split of sample indices (round(fraction·n) held out, at least 1 if > 0)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DrafterDataError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    n_eval = int(round(eval_fraction * num_samples))
    if eval_fraction > 0 and num_samples > 1:
        n_eval = max(n_eval, 1)
    n_eval = min(n_eval, num_samples - 1)
    perm = np.random.default_rng(SPLIT_SEED).permutation(num_samples)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


class EpochShuffleSampler(Sampler[int]):
    """Permutation of ``range(n)`` drawn from (seed, epoch): reproducible across processes and resumes.

    accelerate shards the batches of this sampler between processes, so every process must draw the same
    permutation; a torch ``RandomSampler`` would need its generator synchronised instead.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        self.num_samples, self.seed, self.shuffle, self.epoch = num_samples, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_samples))
        return iter(np.random.default_rng([self.seed, self.epoch, 11]).permutation(self.num_samples).tolist())


@dataclass
class DrafterBatch:
    """One batch in the drafter's training layout (L = T + N − 2 positions)."""

    inputs: torch.Tensor  # (B, L, H) f_p
    input_ids: torch.Tensor  # (B, L) s_{p+1}; 0 at condition positions
    targets: torch.Tensor  # (B, L, H) f_{p+1}
    attn_mask: torch.Tensor  # (B, 1, L, L) bool: causal, padded condition keys hidden, diagonal visible
    rope_pos: torch.Tensor  # (L,)
    loss_start: int  # first loss position, T − 1

    @property
    def loss_targets(self) -> torch.Tensor:
        """(B, N−1, H) targets at the loss positions."""
        return self.targets[:, self.loss_start :]


def make_drafter_batch(batch: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> DrafterBatch:
    """Collated samples (``hidden``, ``tokens``, ``prefix_valid``) -> drafter inputs, targets and mask."""
    hidden = batch["hidden"].to(dtype)
    tokens, valid = batch["tokens"], batch["prefix_valid"].bool()
    b, t = valid.shape
    n = tokens.shape[1]
    if hidden.shape[1] != t + n - 1:
        raise DrafterDataError(f"hidden has {hidden.shape[1]} positions, expected T+N-1 = {t + n - 1}")
    keys_valid = torch.cat([valid, torch.ones(b, n - 2, dtype=torch.bool, device=valid.device)], dim=1)
    length = t + n - 2
    return DrafterBatch(
        inputs=hidden[:, :-1],
        # the dataset's ids (real prefix ids for Chameleon data); else LlamaGen's layout from the tokens
        input_ids=(batch["input_ids"] if "input_ids" in batch else drafter_input_ids(tokens.long(), t))[:, :-1],
        targets=hidden[:, 1:],
        attn_mask=prefix_attention_mask(keys_valid),
        rope_pos=torch.arange(length, device=hidden.device),
        loss_start=t - 1,
    )


def feature_noise(shape: torch.Size, kind: str, std: float, mean: float, generator: torch.Generator,
                  device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """EAGLE's input-feature augmentation: uniform U(−std, std) or Gaussian N(mean, std²).

    (The original scales its uniform noise by 512/L — about ±0.14 for LlamaGen's L = 375 at std 0.2; here the
    range is the flag's value, independent of the sequence length.)
    """
    if kind == "uniform":
        u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
        return ((2 * u - 1) * std).to(dtype)
    if kind == "gaussian":
        return (torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * std + mean).to(dtype)
    raise ValueError(f"unknown noise kind {kind!r} (uniform, gaussian, none)")
