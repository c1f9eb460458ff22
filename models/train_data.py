"""Shard formats of the drafter-training pipeline, their writer, and the reader ``train_drafter`` uses.

Pipeline: ``extract_code`` (real images) or ``self_distill`` (the target's own samples) write **code shards**;
``generate_train_data`` runs the target over them and writes **hidden-state shards**; ``train_drafter`` reads
those through :class:`DrafterDataset`.

Common layout
-------------
A folder of ``{prefix}_r{rank}_{index:05d}.safetensors`` files plus ``manifest.json``. Every process (rank) of a
run writes only its own ``_r{rank}_`` files, so parallel writers never collide; each file is written under a
temporary name and renamed, so a file that exists is complete. ``sample_id`` (int64) is global and unique over the
folder. Runs are resumable: samples whose id is already in a shard are skipped. Under ``accelerate launch`` a
sample belongs to rank ``sample_id % num_processes`` (:meth:`models.distributed.ProcessContext.owns`: a rule every
rank applies identically without talking to the others). ``manifest.json`` is rebuilt from the shard files at the
end of every run (and after an interruption); ``shards`` lists ``{"file", "num_samples", "first_sample_id",
"rank"}`` in (rank, index) order, and ``num_samples`` is the total. Shard metadata (safetensors string metadata,
JSON-encoded): ``settings`` (the producing run's settings, checked on resume) and per-sample string lists such as
``prompts``.

1. Code shards (``codes_r{rank}_{index:05d}.safetensors``, format ``"lantern-codes/1"``)
   ========================================================================================
   tensors:
     ``tokens``        (n, N) int64   image tokens, row-major over the latent grid
     ``sample_id``     (n,)   int64   global, unique
     C2I only: ``labels``       (n,) int64  class ids
     T2I only: ``caption_embs`` (n, 120, C) float16  T5 ``last_hidden_state``, **right-padded as T5 returns it**
               ``emb_masks``    (n, 120) uint8      T5 attention mask (1 = real token); the model side converts
                                                     with :func:`models.base_models.llamagen.t5.to_left_padding`
   metadata: ``prompts`` = JSON list, one string per row (T2I captions; C2I prompt / class strings);
             ``extract_code`` adds ``names`` (the image file name of each row).
   manifest: ``{"format": "lantern-codes/1", "model", "num_image_tokens": N, "model_type": "c2i"|"t2i",
   "source": "extract_code"|"self_distill", "shards": [...], "num_samples", ...the run's settings}``.

2. Hidden-state shards (``hidden_r{rank}_{index:05d}.safetensors``, format ``"lantern-drafter-data/1"``)
   ====================================================================================================
   With T = condition length (``cls_token_num``: C2I 1, LlamaGen T2I 120) and N image tokens, the target reads
   the sequence ``s = [condition (T positions); x_0 .. x_{N-2}]`` (length L = T + N - 1: all image tokens
   but the last) in one forward; f_p is its last hidden state (after the final norm, the lm_head input) at
   position p, so f_p predicts s_{p+1} (f_{T-1} predicts x_0, f_{T+N-2} predicts x_{N-1}).
   tensors:
     ``hidden``        (n, L, H) float16  f_0 .. f_{L-1} of the conditional stream
     ``hidden_uncond`` (n, L, H) float16  the same for the unconditional stream (null class / null caption,
                                          same tokens, same padding mask); absent with ``--no_uncond``
     ``tokens``        (n, N) int64       x_0 .. x_{N-1}
     ``prefix_valid``  (n, T) uint8       1 = real condition position (T2I is left-padded: padding first)
     ``sample_id``     (n,) int64
     token-prefix families (Chameleon, see :mod:`models.families.chameleon_data`): ``prefix_ids`` (n, T) int64
     and, with the uncond stream, ``prefix_ids_uncond`` (n, T) int64 / ``prefix_valid_uncond`` (n, T) uint8
   manifest: ``{"format": "lantern-drafter-data/1", "model", "model_type", "prefix_len": T,
   "num_image_tokens": N, "hidden_size": H, "vocab_size", "streams": ["cond", "uncond"] or ["cond"],
   "dtype": "float16", "model_path", "codes", "shards": [...], "num_samples"}``. :func:`read_data_info` validates
   a folder (without ``manifest.json`` it globs the shards and takes the layout from their shapes).

Drafter pairing (EAGLE; LANTERN)
--------------------------------
Drafter position p reads (f_p, s_{p+1}) and predicts f_{p+1}. The id sequence s_1 .. s_{T+N-2} is
``[0] * (T - 1) + tokens[:N-1]`` (condition positions carry token id 0, as in LANTERN); :func:`drafter_input_ids`
returns it at positions 0 .. L-2 and pads position L-1 with 0. Training positions are p in [T-1, T+N-3]
(:func:`drafter_loss_mask`), whose targets f_T .. f_{T+N-2} are the hidden states that predict x_1 .. x_{N-1};
so a trainer uses ``hidden[:, :-1]`` and ``input_ids[:, :-1]`` as inputs, ``hidden[:, 1:]`` as targets and
``loss_mask[:, :-1]`` as the mask. This is the f_t <-> x_{t+1} pairing of §4 of the spec; the original's
Anole / Lumina-mGPT data paired f_t with x_t (off by one), which is not reproduced.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models.checkpoints import save_safetensors_atomic, write_json_atomic

if TYPE_CHECKING:
    from models.distributed import ProcessContext

CODES_FORMAT = "lantern-codes/1"
DRAFTER_FORMAT = "lantern-drafter-data/1"
CODES_PREFIX = "codes"
HIDDEN_PREFIX = "hidden"
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------------
# file names and shard reading


def shard_file_name(prefix: str, rank: int, index: int) -> str:
    """``{prefix}_r{rank}_{index:05d}.safetensors``."""
    return f"{prefix}_r{rank}_{index:05d}.safetensors"


def _shard_pattern(prefix: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(prefix)}_r(\d+)_(\d+)\.safetensors$")


def list_shard_files(folder: str | os.PathLike, prefix: str) -> list[tuple[int, int, Path]]:
    """Finished shard files of ``folder`` as (rank, index, path), sorted; temporary files are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pat = _shard_pattern(prefix)
    found = [(int(m.group(1)), int(m.group(2)), p) for p in folder.iterdir() if (m := pat.match(p.name))]
    return sorted(found)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_shard(path: str | os.PathLike, keys: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One shard -> (tensors, metadata with JSON values decoded). ``keys`` limits which tensors are read.

    A truncated or foreign file raises :class:`DrafterDataError` naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys()) if keys is None else [k for k in keys if k in f.keys()]
            tensors = {k: f.get_tensor(k) for k in names}
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except Exception as e:  # noqa: BLE001 - SafetensorError, bad JSON metadata: name the file
        raise DrafterDataError(f"{path}: not a readable safetensors shard ({e}); it may be truncated - delete it "
                               f"and rerun the command that wrote it (finished shards are kept)") from None
    if "sample_id" in (keys or []) and "sample_id" not in tensors:
        raise DrafterDataError(f"{path}: shard without a 'sample_id' tensor; not written by this project")
    return tensors, meta


def shard_sample_ids(path: str | os.PathLike) -> torch.Tensor:
    """The ``sample_id`` tensor of a shard, without reading the rest."""
    return read_shard(path, ["sample_id"])[0]["sample_id"]


def finished_sample_ids(folder: str | os.PathLike, prefix: str) -> set[int]:
    """Ids already written to finished shards of ``folder`` (by any rank): what a resumed run skips."""
    done: set[int] = set()
    for _, _, path in list_shard_files(folder, prefix):
        done.update(shard_sample_ids(path).tolist())
    return done


def finished_metadata(folder: str | os.PathLike, prefix: str, key: str) -> dict[int, str]:
    """sample_id -> the per-sample metadata string ``key`` (e.g. ``prompts``) over finished shards."""
    out: dict[int, str] = {}
    for _, _, path in list_shard_files(folder, prefix):
        tensors, meta = read_shard(path, ["sample_id"])
        if key in meta:
            out.update(zip(tensors["sample_id"].tolist(), meta[key]))
    return out


def check_resume_settings(folder: str | os.PathLike, prefix: str, settings: dict[str, Any]) -> None:
    """Refuse to add samples to a folder whose shards were made with different settings (mixed data)."""
    files = list_shard_files(folder, prefix)
    if not files:
        return
    old = read_shard(files[0][2], [])[1].get("settings", {})
    diff = [f"{k}: {old[k]!r} there, {v!r} now" for k, v in settings.items() if k in old and old[k] != v]
    if diff:
        raise ValueError(
            f"{folder} already holds shards made with other settings ({'; '.join(diff)}); "
            "use another --output_dir or the same settings to resume"
        )


# ---------------------------------------------------------------------------------------------------
# writing


class ShardWriter:
    """Buffers per-sample rows and writes them as shards of ``shard_size`` rows for one rank.

    ``add`` takes a batch of tensors whose first dimension is the sample (``sample_id`` required) plus
    optional per-sample string lists stored as JSON metadata. ``flush`` writes what is buffered (also a
    partial shard): call it at the end and on interruption so no finished sample is lost. New files continue
    this rank's numbering, so a resumed run never overwrites a shard.
    """

    def __init__(self, folder: str | os.PathLike, prefix: str, rank: int, shard_size: int, settings: dict[str, Any]):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.folder, self.prefix, self.rank, self.shard_size = Path(folder), prefix, rank, shard_size
        self.settings = settings
        self.folder.mkdir(parents=True, exist_ok=True)
        from entrypoints.outputs import OutputLock  # a second writer of this rank's shards stops, naming the first

        self.lock = OutputLock(self.folder, f"{prefix}.rank{rank}").acquire()
        for stale in self.folder.glob(f"{prefix}_r{rank}_*.safetensors.tmp*"):  # left by a killed run
            pid = stale.name.rpartition(".tmp")[2]
            if not (pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid))):
                stale.unlink(missing_ok=True)
        own = [i for r, i, _ in list_shard_files(self.folder, prefix) if r == rank]
        self._next_index = max(own, default=-1) + 1
        self._tensors: dict[str, list[torch.Tensor]] = {}
        self._lists: dict[str, list[str]] = {}
        self._pending = 0
        self.samples_written = 0
        self.files_written: list[Path] = []

    def add(self, tensors: dict[str, torch.Tensor], lists: dict[str, list[str]] | None = None) -> None:
        n = tensors["sample_id"].shape[0]
        if any(v.shape[0] != n for v in tensors.values()) or any(len(v) != n for v in (lists or {}).values()):
            raise ValueError("every tensor and list added to a shard needs one row per sample")
        if self._tensors and set(tensors) != set(self._tensors):
            raise ValueError(f"shard keys changed: {sorted(self._tensors)} -> {sorted(tensors)}")
        for k, v in tensors.items():
            self._tensors.setdefault(k, []).append(v.detach().cpu())
        for k, v in (lists or {}).items():
            self._lists.setdefault(k, []).extend(v)
        self._pending += n
        while self._pending >= self.shard_size:
            self._write(self.shard_size)

    def flush(self) -> None:
        """Write the buffered rows (if any) as one shard."""
        if self._pending:
            self._write(self._pending)

    def _write(self, n: int) -> None:
        merged = {k: torch.cat(v) for k, v in self._tensors.items()}
        meta = {"settings": json.dumps(self.settings)}
        meta.update({k: json.dumps(v[:n]) for k, v in self._lists.items()})
        path = self.folder / shard_file_name(self.prefix, self.rank, self._next_index)
        save_safetensors_atomic({k: v[:n] for k, v in merged.items()}, path, metadata=meta)
        self._next_index += 1
        self._pending -= n
        self.samples_written += n
        self.files_written.append(path)
        self._tensors = {k: [v[n:]] for k, v in merged.items()} if self._pending else {}
        self._lists = {k: v[n:] for k, v in self._lists.items()} if self._pending else {}


def write_manifest(folder: str | os.PathLike, prefix: str, header: dict[str, Any]) -> dict[str, Any]:
    """Rebuild ``manifest.json`` from every rank's shard files; ``header`` holds format, model and settings.

    Raises if a sample id occurs twice (which would mean two runs with different sample lists wrote here).
    """
    folder = Path(folder)
    shards, seen, total = [], {}, 0
    for rank, _, path in list_shard_files(folder, prefix):
        ids = shard_sample_ids(path).tolist()
        for i in ids:
            if i in seen:
                raise ValueError(f"sample_id {i} is in both {seen[i]} and {path.name} ({folder})")
            seen[i] = path.name
        shards.append({"file": path.name, "num_samples": len(ids), "first_sample_id": ids[0] if ids else None,
                       "rank": rank})
        total += len(ids)
    manifest = {**header, "num_samples": total, "shards": shards}
    write_json_atomic(manifest, folder / MANIFEST)
    return manifest


def finish_shards(ctx: ProcessContext, writer: ShardWriter, folder: str | os.PathLike, prefix: str,
                  header: dict[str, Any], *, interrupted: bool = False) -> dict[str, Any]:
    """End a shard-writing run: flush this rank's rows, then rebuild ``manifest.json`` on the main process.

    At the normal end every process first waits for the others, so the manifest lists all their shards; returns
    the manifest on the main process and ``{}`` elsewhere. With ``interrupted`` (called from an ``except`` block
    before re-raising) nobody waits: every finished sample is kept and the main process records what is there.
    """
    writer.flush()
    if not interrupted:
        ctx.wait()
    return write_manifest(folder, prefix, header) if ctx.is_main else {}


def timed_main(run: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
               argv: list[str] | None) -> None:
    """The ``main`` of a data-pipeline entry point: parse ``argv``, run, and print the wall time."""
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    run(args)
    print(f"done in {time.perf_counter() - t0:.1f} s")


# ---------------------------------------------------------------------------------------------------
# reading


class DrafterDataError(ValueError):
    """A shard folder is missing, malformed or inconsistent; the message says which file and why."""


def read_manifest(folder: str | os.PathLike, expected_format: str | None = None) -> dict[str, Any]:
    """``manifest.json`` of a shard folder (optionally checking its ``format``)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: not a shard folder, or its run was killed before writing it "
            "(rerun the producing command to rebuild it)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DrafterDataError(f"{path}: not valid JSON ({e})") from e
    fmt = manifest.get("format")
    if expected_format is not None and fmt != expected_format:
        if str(fmt).split("/")[0] == expected_format.split("/")[0]:
            raise DrafterDataError(f"{path}: format {fmt!r} is newer than this reader ({expected_format})")
        raise DrafterDataError(f"{path}: format {fmt!r}, expected {expected_format!r}")
    return manifest


@dataclass
class Shard:
    """One shard as read by :func:`iter_shards`."""

    file: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)


def iter_shards(folder: str | os.PathLike, keys: list[str] | None = None) -> Iterator[Shard]:
    """Shards of a folder in manifest order, one at a time (``keys`` limits the tensors read)."""
    folder = Path(folder)
    for entry in read_manifest(folder)["shards"]:
        tensors, meta = read_shard(folder / entry["file"], keys)
        yield Shard(folder / entry["file"], tensors, meta)


# ---------------------------------------------------------------------------------------------------
# hidden-state folders (format 2): layout, validation, pairing, per-sample reader


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    num_samples: int


@dataclass
class DrafterDataInfo:
    """Layout of a hidden-state folder (from ``manifest.json`` or, without one, from the shards' shapes)."""

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


def _shard_shapes(path: Path) -> dict[str, tuple[list[int], str]]:
    """Tensor name -> (shape, dtype) from a shard's header (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any header problem is reported with the file name
        raise DrafterDataError(f"{path}: not a readable safetensors shard ({e})") from e


def _check_hidden_shard(path: Path, shapes: dict[str, tuple[list[int], str]]) -> tuple[int, int, int, int, bool]:
    """Validate one hidden-state shard's tensors against each other -> (n, T, N, H, has_uncond)."""
    for name in ("hidden", "tokens", "prefix_valid", "sample_id"):
        if name not in shapes:
            raise DrafterDataError(f"{path}: missing tensor {name!r} (has {sorted(shapes)}); expected {DRAFTER_FORMAT}")
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


def read_data_info(folder: str | os.PathLike) -> DrafterDataInfo:
    """Read and validate a hidden-state folder: ``manifest.json`` (if any) and every shard's header.

    Without a manifest the ``hidden_r*`` shards are globbed, so a folder of shards alone (e.g. copied from
    several machines) is enough. The manifest's numbers are checked against the shards, so a stale or
    hand-edited manifest is caught here rather than as a shape error mid-training.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DrafterDataError(f"training data folder not found: {root} (run generate_train_data first)")
    manifest = read_manifest(root, DRAFTER_FORMAT) if (root / MANIFEST).exists() else {}
    if manifest.get("shards"):
        paths = [root / s["file"] for s in manifest["shards"]]
        for p in paths:
            if not p.exists():
                raise DrafterDataError(f"{root / MANIFEST} lists {p.name}, which is missing")
    else:
        paths = [p for _, _, p in list_shard_files(root, HIDDEN_PREFIX)]
    if not paths:
        raise DrafterDataError(f"{root}: no shards (expected {HIDDEN_PREFIX}_r{{rank}}_{{index:05d}}.safetensors and {MANIFEST})")

    shards: list[ShardInfo] = []
    layout: tuple[int, int, int] | None = None
    uncond_flags = []
    listed = {s["file"]: s.get("num_samples") for s in manifest.get("shards", [])}
    for p in paths:
        n, t, num_tok, h, has_uncond = _check_hidden_shard(p, _shard_shapes(p))
        if layout is None:
            layout = (t, num_tok, h)
        elif (t, num_tok, h) != layout:
            raise DrafterDataError(f"{p}: layout (T, N, H) = {(t, num_tok, h)} differs from the first shard's {layout}")
        if listed.get(p.name) is not None and listed[p.name] != n:
            raise DrafterDataError(f"{p}: holds {n} samples, {MANIFEST} says {listed[p.name]}")
        uncond_flags.append(has_uncond)
        if n > 0:
            shards.append(ShardInfo(p, n))
    t, num_tok, h = layout
    for key, value in (("prefix_len", t), ("num_image_tokens", num_tok), ("hidden_size", h)):
        if key in manifest and manifest[key] != value:
            raise DrafterDataError(f"{root / MANIFEST}: {key} = {manifest[key]}, but the shards have {value}")
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


def drafter_input_ids(tokens: torch.Tensor, prefix_len: int, prefix_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Image tokens (..., N) -> drafter input ids (..., T+N-1): ``[0]*(T-1) + tokens[:N-1] + [0]``.

    Position p holds s_{p+1}, the token that follows the hidden state f_p; the last position has no
    successor inside the sequence and is padded with 0 (it is never a training position). With
    ``prefix_ids`` (..., T) (token-prefix families, Chameleon) the condition positions hold the real next
    prefix ids ``prefix_ids[1:]`` instead of 0.
    """
    if prefix_ids is not None:
        lead = prefix_ids[..., 1:].to(tokens.dtype)
        return torch.cat([lead, tokens[..., :-1], tokens.new_zeros(*tokens.shape[:-1], 1)], dim=-1)
    lead = tokens.new_zeros(*tokens.shape[:-1], prefix_len - 1)
    tail = tokens.new_zeros(*tokens.shape[:-1], 1)
    return torch.cat([lead, tokens[..., :-1], tail], dim=-1)


def drafter_loss_mask(prefix_len: int, num_image_tokens: int) -> torch.Tensor:
    """(T+N-1,) bool, True at the training positions p = T-1 .. T+N-3 (targets f_{p+1} predict x_1 .. x_{N-1})."""
    mask = torch.zeros(prefix_len + num_image_tokens - 1, dtype=torch.bool)
    mask[prefix_len - 1 : prefix_len + num_image_tokens - 2] = True
    return mask


class DrafterDataset(torch.utils.data.Dataset):
    """Per-sample view of a hidden-state folder (format 2; optionally a subset ``indices``), read lazily.

    Item ``i`` is a dict: ``hidden`` (L, H) float16, ``input_ids`` (L,) int64, ``loss_mask`` (L,) bool,
    ``prefix_valid`` (T,) bool, ``tokens`` (N,) int64, ``sample_id`` () int64, and, for the streams:

    - ``uncond_prob=None`` (default): ``hidden`` is the cond stream and ``hidden_uncond`` (L, H) the uncond
      one (when the folder has it and ``use_uncond``);
    - ``uncond_prob=p`` (training): one stream per sample, ``hidden`` from the uncond stream in a fraction p
      of epochs and ``uncond`` () bool saying which. The choice is drawn per (epoch, sample) from ``seed``, so
      it does not depend on the batch size, the number of processes or on where a resumed run restarted; call
      :meth:`set_epoch` before each epoch (the training loop and accelerate's data loader both do).

    Rows are read from memory-mapped files, so only the requested samples are loaded; at most
    ``max_open_files`` shard files are kept open (None: all), per worker: open handles are not pickled into
    DataLoader workers.
    """

    def __init__(self, data: str | os.PathLike | DrafterDataInfo, indices: Any = None, *,
                 uncond_prob: float | None = None, seed: int = 0, use_uncond: bool = True,
                 max_open_files: int | None = 8):
        self.info = data if isinstance(data, DrafterDataInfo) else read_data_info(data)
        n = self.info.num_samples
        self.indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        self.has_uncond = use_uncond and self.info.has_uncond
        self.sampled = uncond_prob is not None
        self.uncond_prob = (uncond_prob or 0.0) if self.has_uncond else 0.0
        self.seed = seed
        self.loss_mask = drafter_loss_mask(self.prefix_len, self.num_image_tokens)
        self.max_open_files = max_open_files
        self._starts = np.cumsum([0] + [s.num_samples for s in self.info.shards])
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._use_uncond = np.zeros(n, dtype=bool)
        self.set_epoch(0)

    @property
    def prefix_len(self) -> int:
        return self.info.prefix_len

    @property
    def num_image_tokens(self) -> int:
        return self.info.num_image_tokens

    @property
    def hidden_size(self) -> int:
        return self.info.hidden_size

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's stream per sample (``uncond_prob``)."""
        self.epoch = epoch
        if self.uncond_prob > 0:
            rng = np.random.default_rng([self.seed, epoch, 7])
            self._use_uncond = rng.random(self.info.num_samples) < self.uncond_prob

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict:
        # open shard handles are per process (they cannot be pickled into DataLoader workers)
        return {**self.__dict__, "_handles": OrderedDict()}

    def _handle(self, shard: int):
        from safetensors import safe_open

        if shard in self._handles:
            self._handles.move_to_end(shard)
        else:
            self._handles[shard] = safe_open(str(self.info.shards[shard].path), framework="pt")
            if self.max_open_files is not None and len(self._handles) > self.max_open_files:
                self._handles.popitem(last=False)
        return self._handles[shard]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range (dataset has {len(self)})")
        g = int(self.indices[i])
        shard = int(np.searchsorted(self._starts, g, side="right") - 1)
        row = g - int(self._starts[shard])
        f = self._handle(shard)

        def get(key: str) -> torch.Tensor:
            return f.get_slice(key)[row : row + 1][0]

        uncond = bool(self._use_uncond[g])
        tokens = get("tokens").long()
        # token-prefix data (Chameleon) carries each stream's own prefix ids and padding
        names = f.keys()
        own = "prefix_ids" in names

        def stream(key: str, use_uncond: bool) -> str:
            return f"{key}_uncond" if use_uncond and own else key

        item = {
            "hidden": get("hidden_uncond" if uncond else "hidden"),
            "input_ids": drafter_input_ids(tokens, self.prefix_len,
                                           get(stream("prefix_ids", uncond)).long() if own else None),
            "loss_mask": self.loss_mask.clone(),
            "prefix_valid": get(stream("prefix_valid", uncond)).bool(),
            "tokens": tokens,
            "sample_id": get("sample_id"),
        }
        if self.sampled:
            item["uncond"] = torch.tensor(uncond)
        elif self.has_uncond:
            item["hidden_uncond"] = get("hidden_uncond")
            if own:
                item["input_ids_uncond"] = drafter_input_ids(tokens, self.prefix_len, get("prefix_ids_uncond").long())
                item["prefix_valid_uncond"] = get("prefix_valid_uncond").bool()
        return item
