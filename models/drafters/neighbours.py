"""Latent neighbourhoods of VQ codes (SPEC §2): for every code, the other codes by ascending distance.

Only the order matters (LANTERN aggregates the target mass of the first m* neighbours). The table is
``(N, K)`` int64 in memory: row i lists the K nearest codes to code i, self excluded, ties broken by the lower
index. Metrics:

* ``"l2"`` (default, the reference): Euclidean distance between the raw codebook rows, as the original
  ``generate_codebook`` computes it.
* ``"cosine"``: Euclidean distance between L2-normalised rows (equivalently, descending cosine similarity),
  which is what LlamaGen's quantiser uses when it looks codes up.

Files: ours are ``.safetensors`` (tensor ``"neighbours"``) or ``.npy``, stored as int16 / uint16 / int32
(whichever fits), plus a JSON sidecar ``<path>.json`` with metadata. :func:`load_neighbour_table` also reads
the original's dense ``top_{N-1}_indices.npy`` (uint16, (N, N−1)) and can keep only the first K columns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "build_neighbour_table",
    "save_neighbour_table",
    "load_neighbour_table",
    "chameleon_to_token_ids",
]

TABLE_KEY = "neighbours"
FORMAT_TAG = "lantern-neighbours-v1"


def _sq_dists(rows: torch.Tensor, codebook: torch.Tensor, cb_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (chunk, N) via ‖a‖² + ‖b‖² − 2ab (clamped at 0)."""
    d = rows.pow(2).sum(-1, keepdim=True) + cb_sq[None, :] - 2.0 * rows @ codebook.T
    return d.clamp_(min=0.0)


def _order_by_value_then_index(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (value, index) lexicographically."""
    by_idx = torch.sort(idx, dim=-1, stable=True)
    vals, idx = vals.gather(-1, by_idx.indices), by_idx.values
    by_val = torch.sort(vals, dim=-1, stable=True)
    return by_val.values, idx.gather(-1, by_val.indices)


def build_neighbour_table(
    codebook: torch.Tensor,
    top_k: int,
    metric: Literal["l2", "cosine"] = "l2",
    chunk_size: int = 4096,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Nearest-neighbour table (N, top_k) of a codebook (N, D), self excluded, ascending distance.

    Ties are broken by the lower code index (the order a stable argsort of the distance row gives). Rows are
    processed ``chunk_size`` at a time, so at most a (chunk_size, N) distance block exists at once
    (``chunk_size·N·8`` bytes in float64: 512 MiB for LlamaGen's 16384 codes at the default; lower it on
    small machines). Distances are computed in ``dtype`` (float64 by default, so the order matches an exact
    computation except for genuinely tied codes). Runs on ``codebook``'s device.
    """
    if codebook.ndim != 2:
        raise ValueError("codebook must be (N, D)")
    n = codebook.shape[0]
    if not 1 <= top_k <= n - 1:
        raise ValueError(f"top_k must be in [1, N-1] = [1, {n - 1}], got {top_k}")
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    cb = codebook.detach().to(dtype)
    if metric == "cosine":
        cb = torch.nn.functional.normalize(cb, dim=-1)
    cb_sq = cb.pow(2).sum(-1)
    out = torch.empty((n, top_k), dtype=torch.long, device=cb.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        rows = torch.arange(start, stop, device=cb.device)
        d = _sq_dists(cb[start:stop], cb, cb_sq)
        d[rows - start, rows] = float("inf")  # exclude self
        vals, idx = torch.topk(d, top_k, dim=-1, largest=False, sorted=True)
        vals, idx = _order_by_value_then_index(vals, idx)
        # topk may pick any of several codes tied at the cut-off distance; redo those rows with a full stable
        # sort (rare: only exactly duplicated codes).
        n_le = (d <= vals[:, -1:]).sum(-1)
        tied = (n_le > top_k).nonzero().squeeze(1)
        if tied.numel():
            idx[tied] = torch.sort(d[tied], dim=-1, stable=True).indices[:, :top_k]
        out[start:stop] = idx
    return out


def _storage_dtype(table: np.ndarray) -> np.dtype:
    lo, hi = (int(table.min()), int(table.max())) if table.size else (0, 0)
    if lo >= -(2**15) and hi < 2**15:
        return np.dtype(np.int16)
    if lo >= 0 and hi < 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def save_neighbour_table(path: str | Path, table: torch.Tensor, meta: dict[str, Any] | None = None) -> Path:
    """Write ``table`` (N, K) to ``path`` (``.safetensors`` or ``.npy``) plus a JSON sidecar ``<path>.json``.

    The smallest of int16 / uint16 / int32 that holds the values is used. ``meta`` (e.g. model, metric, K,
    codebook source) is stored in the sidecar (and in the safetensors header). Returns the path written.
    """
    path = Path(path)
    arr = table.detach().cpu().numpy()
    arr = arr.astype(_storage_dtype(arr))
    info = {
        "format": FORMAT_TAG,
        "shape": list(arr.shape),
        "dtype": str(arr.dtype),
        "order": "ascending distance, self excluded, ties by lower index",
        **(meta or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({TABLE_KEY: np.ascontiguousarray(arr)}, str(path), metadata={"meta": json.dumps(info)})
    elif path.suffix == ".npy":
        np.save(path, arr)
    else:
        raise ValueError(f"unsupported neighbour-table extension {path.suffix!r} (use .safetensors or .npy)")
    _sidecar(path).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return path


def load_neighbour_table(path: str | Path, k: int | None = None, num_codes: int | None = None) -> torch.Tensor:
    """Read a neighbour table as int64 (N, K), keeping only the first ``k`` columns if given.

    Reads our ``.safetensors`` / ``.npy`` files and the original's dense ``top_{N-1}_indices.npy`` (uint16,
    (N, N−1), memory-mapped so only the kept columns are converted). A table that still contains the code
    itself in column 0 ((N, N) with ``table[:, 0] == arange(N)``) has that column dropped.
    With ``num_codes`` (the codebook size of the model that will use it) the rows must number ``num_codes``.
    Every failure (missing, corrupt, wrong shape, ids out of range, too few columns) is a ``ValueError``
    naming the file and what was expected.
    """
    path = Path(path)
    hint = "build one with `python main.py generate_codebook`"
    if not path.is_file():
        raise ValueError(f"neighbour table not found: {path} ({hint})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            if TABLE_KEY not in tensors:
                raise ValueError(f"no tensor {TABLE_KEY!r} (has {sorted(tensors)})")
            arr = tensors[TABLE_KEY]
        elif path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r")
        else:
            raise ValueError(f"unsupported extension {path.suffix!r} (use .safetensors or .npy)")
    except Exception as e:  # noqa: BLE001 - SafetensorError, truncated .npy, pickled object arrays ...
        raise ValueError(f"{path} is not a readable neighbour table ({e}); {hint}") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: a neighbour table is a 2-D integer array, got shape {arr.shape} {arr.dtype}")
    n = arr.shape[0]
    if num_codes is not None and n != num_codes:
        raise ValueError(f"{path} has {n} rows but the model's codebook has {num_codes} codes: it belongs to another "
                         f"VQ; {hint} --model <this model>")
    if arr.shape[1] == n and n > 0 and np.array_equal(np.asarray(arr[:, 0]), np.arange(n)):
        arr = arr[:, 1:]
    if k is not None:
        if not 1 <= k <= arr.shape[1]:
            raise ValueError(f"--lantern_k {k}: {path} holds only {arr.shape[1]} neighbours per code; use "
                             f"--lantern_k <= {arr.shape[1]} or rebuild it with generate_codebook --top_k {k}")
        arr = arr[:, :k]
    table = torch.from_numpy(np.asarray(arr).astype(np.int64))
    if num_codes is not None and table.numel() and (int(table.min()) < 0 or int(table.max()) >= n):
        raise ValueError(f"{path}: neighbour ids must lie in [0, {n}), found {int(table.min())}..{int(table.max())}; "
                         f"not a neighbour table of {n} codes")
    return table


def chameleon_to_token_ids(table: torch.Tensor, offset: int = 4, vocab_size: int | None = None) -> torch.Tensor:
    """Convert a VQ-index table of a Chameleon VQGAN to token ids (image token id = VQ index + ``offset``).

    Without ``vocab_size`` only the values are shifted (rows stay indexed by VQ index). With ``vocab_size``
    the result is a (vocab_size, K) table indexed by token id, as the acceptance functions expect: rows
    ``offset .. offset+N−1`` hold the shifted neighbours, all other rows are -1 (no neighbours).
    """
    shifted = torch.where(table >= 0, table.long() + offset, torch.full_like(table, -1, dtype=torch.long))
    if vocab_size is None:
        return shifted
    n = table.shape[0]
    if offset + n > vocab_size:
        raise ValueError(f"{n} codes at offset {offset} do not fit a vocabulary of {vocab_size}")
    out = torch.full((vocab_size, table.shape[1]), -1, dtype=torch.long, device=table.device)
    out[offset : offset + n] = shifted
    return out
