"""Reading drafter training data (``generate_train_data`` output) and turning it into drafter batches.

Format ``lantern-drafter-data/1``: a folder with ``manifest.json`` and shards ``hidden_r{rank}_{index:05d}.safetensors``.
Per shard (n samples; T = condition length, N = image tokens, H = hidden size):

- ``hidden`` (n, T+N−1, H): the target's last hidden states after the final norm (the lm_head input), cond
  stream, at positions 0..T+N−2 of s = [condition (T); x_0 .. x_{N−2}];
- ``hidden_uncond`` (n, T+N−1, H), optional: the same for the unconditional (CFG) stream;
- ``tokens`` (n, N) int64: the image tokens x_0 .. x_{N−1};
- ``prefix_valid`` (n, T) uint8: 1 at real condition positions (T2I captions are left-padded);
- ``sample_id`` (n,) int64.

Without ``manifest.json`` the shards are globbed and the layout is read from their tensor shapes, so a folder
of shards alone (e.g. copied from several machines) is enough.

Pairing (EAGLE, SPEC §4): drafter position p reads (f_p, s_{p+1}) and predicts f_{p+1}. The input ids are
``[0]*(T−1) + tokens[:N−1]`` (condition positions carry id 0, as in LANTERN), inputs ``hidden[:, :-1]``,
targets ``hidden[:, 1:]``; the loss positions are p = T−1 .. T+N−3 (targets f_T .. f_{T+N−2}, which
predict x_1 .. x_{N−1}). Padded condition positions are hidden as keys, exactly as at inference.

Samples are read lazily from memory-mapped shards (one sample at a time), so data sets larger than RAM work.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from models.generation import prefix_attention_mask

DATA_FORMAT = "lantern-drafter-data/1"
SHARD_PATTERN = re.compile(r"hidden_r(\d+)_(\d+)\.safetensors$")
# The held-out split is drawn with a fixed seed so runs with different --seed values are evaluated on the same
# samples (and a resumed run keeps its split).
SPLIT_SEED = 20241003


class DrafterDataError(ValueError):
    """The training-data folder is missing, malformed or inconsistent; the message says which file and why."""


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    num_samples: int


@dataclass
class DrafterDataInfo:
    """Layout of a training-data folder (from ``manifest.json`` or, without one, from the shards' shapes)."""

    root: Path
    prefix_len: int  # T: condition positions
    num_image_tokens: int  # N
    hidden_size: int  # H
    shards: list[ShardInfo]
    has_uncond: bool
    vocab_size: int | None = None
    model: str | None = None
    model_path: str | None = None
    manifest: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def seq_len(self) -> int:
        """Length of the stored hidden sequences: T + N − 1."""
        return self.prefix_len + self.num_image_tokens - 1


def _shard_sort_key(path: Path) -> tuple[int, int, str]:
    m = SHARD_PATTERN.search(path.name)
    return (int(m.group(1)), int(m.group(2)), path.name) if m else (1 << 30, 0, path.name)


def _shard_shapes(path: Path) -> dict[str, tuple[list[int], str]]:
    """Tensor name -> (shape, dtype) from a shard's header (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any header problem is reported with the file name
        raise DrafterDataError(f"{path}: not a readable safetensors shard ({e})") from e


def _check_shard(path: Path, shapes: dict[str, tuple[list[int], str]]) -> tuple[int, int, int, int, bool]:
    """Validate one shard's tensors against each other -> (n, T, N, H, has_uncond)."""
    for name in ("hidden", "tokens", "prefix_valid"):
        if name not in shapes:
            raise DrafterDataError(f"{path}: missing tensor {name!r} (has {sorted(shapes)}); expected {DATA_FORMAT}")
    hidden, tokens, valid = shapes["hidden"][0], shapes["tokens"][0], shapes["prefix_valid"][0]
    if len(hidden) != 3 or len(tokens) != 2 or len(valid) != 2:
        raise DrafterDataError(f"{path}: expected hidden (n, T+N-1, H), tokens (n, N), prefix_valid (n, T); "
                               f"got {hidden}, {tokens}, {valid}")
    n, (_, t), (_, num_tok) = hidden[0], valid, tokens
    if tokens[0] != n or valid[0] != n or hidden[1] != t + num_tok - 1:
        raise DrafterDataError(f"{path}: inconsistent shapes hidden {hidden}, tokens {tokens}, prefix_valid {valid} "
                               f"(hidden must be (n, T+N-1, H))")
    has_uncond = "hidden_uncond" in shapes
    if has_uncond and shapes["hidden_uncond"][0] != hidden:
        raise DrafterDataError(f"{path}: hidden_uncond {shapes['hidden_uncond'][0]} differs from hidden {hidden}")
    return n, t, num_tok, hidden[2], has_uncond


def read_data_info(data_dir: str | Path) -> DrafterDataInfo:
    """Read and validate a training-data folder: manifest (if any) and every shard's header.

    The manifest's numbers are checked against the shards, so a stale or hand-edited manifest is caught here
    rather than as a shape error mid-training.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DrafterDataError(f"training data folder not found: {root} (run generate_train_data first)")
    manifest: dict = {}
    if (root / "manifest.json").exists():
        try:
            manifest = json.loads((root / "manifest.json").read_text())
        except json.JSONDecodeError as e:
            raise DrafterDataError(f"{root / 'manifest.json'}: not valid JSON ({e})") from e
        fmt = manifest.get("format", DATA_FORMAT)
        if not str(fmt).startswith("lantern-drafter-data/"):
            raise DrafterDataError(f"{root / 'manifest.json'}: unknown format {fmt!r}; expected {DATA_FORMAT}")
        if fmt != DATA_FORMAT:
            raise DrafterDataError(f"{root / 'manifest.json'}: format {fmt!r} is newer than this reader ({DATA_FORMAT})")
    if manifest.get("shards"):
        paths = [root / s["file"] for s in manifest["shards"]]
        for p in paths:
            if not p.exists():
                raise DrafterDataError(f"{root / 'manifest.json'} lists {p.name}, which is missing")
    else:
        paths = sorted((p for p in root.glob("*.safetensors") if SHARD_PATTERN.search(p.name)), key=_shard_sort_key)
    if not paths:
        raise DrafterDataError(f"{root}: no shards (expected hidden_r{{rank}}_{{index:05d}}.safetensors and manifest.json)")

    shards: list[ShardInfo] = []
    layout: tuple[int, int, int] | None = None
    uncond_flags = []
    listed = {s["file"]: s.get("num_samples") for s in manifest.get("shards", [])}
    for p in paths:
        n, t, num_tok, h, has_uncond = _check_shard(p, _shard_shapes(p))
        if layout is None:
            layout = (t, num_tok, h)
        elif (t, num_tok, h) != layout:
            raise DrafterDataError(f"{p}: layout (T, N, H) = {(t, num_tok, h)} differs from the first shard's {layout}")
        if listed.get(p.name) is not None and listed[p.name] != n:
            raise DrafterDataError(f"{p}: holds {n} samples, manifest.json says {listed[p.name]}")
        uncond_flags.append(has_uncond)
        if n > 0:
            shards.append(ShardInfo(p, n))
    t, num_tok, h = layout
    for key, value in (("prefix_len", t), ("num_image_tokens", num_tok), ("hidden_size", h)):
        if key in manifest and manifest[key] != value:
            raise DrafterDataError(f"{root / 'manifest.json'}: {key} = {manifest[key]}, but the shards have {value}")
    if num_tok < 2:
        raise DrafterDataError(f"{root}: need at least 2 image tokens per sample, got {num_tok}")
    streams = manifest.get("streams")
    has_uncond = all(uncond_flags)
    if streams is not None and ("uncond" in streams) != has_uncond:
        raise DrafterDataError(f"{root}: manifest streams {streams} but hidden_uncond is "
                               f"{'present' if has_uncond else 'missing'} in {'all' if has_uncond else 'some'} shards")
    info = DrafterDataInfo(root, t, num_tok, h, shards, has_uncond, manifest.get("vocab_size"),
                           manifest.get("model"), manifest.get("model_path"), manifest)
    if info.num_samples == 0:
        raise DrafterDataError(f"{root}: the shards hold no samples")
    return info


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


class DrafterDataset(Dataset):
    """Samples of a training-data folder (optionally a subset), one stream per sample.

    With ``uncond_prob`` > 0 and an uncond stream in the data, each sample uses ``hidden_uncond`` in that
    fraction of epochs: the choice is drawn per (epoch, sample) from ``seed``, so it does not depend on the
    batch size, the number of processes or on where a resumed run restarted. Call :meth:`set_epoch` before
    each epoch (the training loop and accelerate's data loader both do).
    """

    def __init__(self, info: DrafterDataInfo, indices: np.ndarray | None = None, uncond_prob: float = 0.0,
                 seed: int = 0):
        self.info = info
        self.indices = np.arange(info.num_samples) if indices is None else np.asarray(indices, dtype=np.int64)
        self.uncond_prob = uncond_prob if info.has_uncond else 0.0
        self.seed = seed
        self._starts = np.cumsum([0] + [s.num_samples for s in info.shards])
        self._handles: dict[int, object] = {}
        self._use_uncond = np.zeros(info.num_samples, dtype=bool)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.uncond_prob > 0:
            rng = np.random.default_rng([self.seed, epoch, 7])
            self._use_uncond = rng.random(self.info.num_samples) < self.uncond_prob

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict:
        # open shard handles are per process (they cannot be pickled into DataLoader workers)
        return {**self.__dict__, "_handles": {}}

    def _shard(self, k: int):
        from safetensors import safe_open

        if k not in self._handles:
            self._handles[k] = safe_open(str(self.info.shards[k].path), framework="pt")
        return self._handles[k]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = int(self.indices[i])
        k = int(np.searchsorted(self._starts, g, side="right") - 1)
        j = g - int(self._starts[k])
        f = self._shard(k)
        uncond = bool(self._use_uncond[g])
        hidden = f.get_slice("hidden_uncond" if uncond else "hidden")[j]
        return {
            "hidden": hidden,
            "tokens": f.get_slice("tokens")[j].long(),
            "prefix_valid": f.get_slice("prefix_valid")[j].bool(),
            "uncond": torch.tensor(uncond),
            "index": torch.tensor(g),
        }


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
    ids = torch.cat([torch.zeros(b, t - 1, dtype=torch.long, device=tokens.device), tokens[:, : n - 1]], dim=1)
    keys_valid = torch.cat([valid, torch.ones(b, n - 2, dtype=torch.bool, device=valid.device)], dim=1)
    length = t + n - 2
    return DrafterBatch(
        inputs=hidden[:, :-1],
        input_ids=ids,
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
