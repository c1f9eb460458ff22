"""generate_codebook: the latent-neighbour table of a VQ codebook, which LANTERN's relaxed acceptance reads.

For every code i the table lists the other codes by ascending distance to it (self excluded, ties by the
lower index), keeping the first ``--top_k`` columns (SPEC §2). The original stores all N−1 columns as a dense
uint16 ``top_{N-1}_indices.npy`` (512 MB for LlamaGen's 16384 codes); we keep only what ``--lantern_k`` can
use, in ``.safetensors`` (or ``.npy``) with a JSON sidecar ``<save_path>.json`` recording how it was built.
``--from_dense`` converts an original dense table instead of recomputing it.

Usage (as the original): ``python main.py generate_codebook --model <model_name> --save_path <save_path>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from entrypoints.common import UserError, add_threads_arg, apply_threads, resolve_device, run_cli
from models.drafters.neighbours import build_neighbour_table, load_neighbour_table, save_neighbour_table
from models.registry import MODELS, ModelSpec, get_spec, resolve_path

DEFAULT_TOP_K = 1000  # the original's default --lantern_k; a table must have at least that many columns
DEFAULT_MODEL = "demo"
TABLE_SUFFIXES = (".safetensors", ".npy")


def parse_args() -> argparse.ArgumentParser:
    """The command line of ``generate_codebook`` (flags named as in the original where it had them)."""
    p = argparse.ArgumentParser(
        prog="generate_codebook",
        description="Latent-neighbour table of a VQ codebook for LANTERN: for every code, the other codes by "
        "ascending distance (self excluded), first --top_k columns, plus a JSON sidecar <save_path>.json.",
    )
    p.add_argument("--model", default=None, choices=list(MODELS),
                   help=f"model whose VQ codebook is used; sets the default --vq_path and --save_path "
                   f"(default: {DEFAULT_MODEL}; the Chameleon models anole / lumina_mgpt are not implemented yet)")
    p.add_argument("--vq_path", default=None,
                   help="VQ checkpoint: an original vq_ds16_*.pt (sizes other than VQ-16 in a sidecar <stem>.json) "
                   "or a folder with config.json + model.safetensors (default: the model's registry path)")
    p.add_argument("--save_path", default=None,
                   help="output table, .safetensors or .npy (default: the model's registry codebook path, "
                   "e.g. ckpts/demo/neighbours.safetensors)")
    p.add_argument("--top_k", type=int, default=None,
                   help=f"neighbour columns kept per code (default: {DEFAULT_TOP_K}, or N-1 for a codebook of N < "
                   f"{DEFAULT_TOP_K + 1} codes). Must be >= the largest --lantern_k you will generate with: "
                   "generate_images cannot use more neighbours than the table holds")
    p.add_argument("--metric", default="l2", choices=["l2", "cosine"],
                   help="'l2' (default, the original's reference): Euclidean distance between the raw codebook "
                   "rows. 'cosine': Euclidean distance between the L2-normalised rows, i.e. the rows LlamaGen's "
                   "quantiser actually looks codes up with (codebook_l2_norm=True)")
    p.add_argument("--chunk_size", type=int, default=4096,
                   help="codes processed at once; peak memory is about chunk_size x N x 8 bytes "
                   "(512 MiB for N=16384 at the default); lower it on small machines")
    p.add_argument("--device", default=None, help="torch device for the distances (default: cuda when available, else cpu)")
    p.add_argument("--from_dense", default=None, metavar="PATH",
                   help="convert an existing table instead of computing one: the original's dense "
                   "top_{N-1}_indices.npy (uint16, raw-L2 order) or one of ours; keeps its first --top_k columns; "
                   "no VQ checkpoint needed")
    p.add_argument("--overwrite", action="store_true", help="replace --save_path if it already exists")
    add_threads_arg(p)
    return p


def _check_save_path(path: Path, overwrite: bool) -> None:
    """Fail before any work if the output cannot or must not be written."""
    if path.suffix not in TABLE_SUFFIXES:
        raise UserError(f"--save_path {path}: use a .safetensors or .npy file name")
    if path.is_dir():
        raise UserError(f"--save_path {path} is a folder; give a file name such as {path / 'neighbours.safetensors'}")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it (or choose another --save_path)")


def _default_top_k(n_codes: int, top_k: int | None) -> int:
    """``top_k`` checked against the codebook size, or the default (1000, capped at N−1)."""
    if top_k is None:
        return min(DEFAULT_TOP_K, n_codes - 1)
    if not 1 <= top_k <= n_codes - 1:
        raise UserError(f"--top_k {top_k}: must be between 1 and N-1 = {n_codes - 1} for a codebook of {n_codes} codes")
    return top_k


def save_atomic(path: Path, table: torch.Tensor, meta: dict[str, Any]) -> None:
    """Write the table and its sidecar under temporary names, then rename them into place.

    An interrupted run therefore never leaves a truncated table at ``path`` (which a later ``--lantern`` run
    would otherwise load). The temporary names keep the extension, which selects the file format.
    """
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    tmp_sidecar = tmp.with_name(tmp.name + ".json")
    try:
        save_neighbour_table(tmp, table, meta)
        os.replace(tmp, path)
        os.replace(tmp_sidecar, path.with_name(path.name + ".json"))
    finally:
        tmp.unlink(missing_ok=True)
        tmp_sidecar.unlink(missing_ok=True)


def table_from_vq(spec: ModelSpec, args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, dict[str, Any]]:
    """Load the model's VQ, take its raw codebook rows (N, D) and build the neighbour table on ``device``."""
    from models.base_models.llamagen.loading import load_llamagen_vq

    vq_path = resolve_path(spec, "vq", args.vq_path)
    if spec.family == "chameleon":  # Chameleon VQGAN (8192 x 256, raw rows); the table stays in VQ indices
        from models.base_models.chameleon.vqgan import load_chameleon_vqgan

        vq = load_chameleon_vqgan(vq_path)
        l2_norm = False
    else:
        vq = load_llamagen_vq(vq_path)  # on CPU: only the (N, D) rows go to the device
        l2_norm = bool(vq.config.codebook_l2_norm)
    # Raw rows: build_neighbour_table normalises them itself for --metric cosine.
    codebook = vq.quantize.embedding.weight.detach().to(device)
    n_codes, dim = codebook.shape
    top_k = _default_top_k(n_codes, args.top_k)
    table = build_neighbour_table(codebook, top_k, metric=args.metric, chunk_size=args.chunk_size)
    meta = {
        "model": spec.name,
        "source": "vq",
        "vq_path": str(vq_path),
        "metric": args.metric,
        "top_k": top_k,
        "codebook_size": n_codes,
        "codebook_dim": dim,
        "quantiser_l2_norm": l2_norm,
        # Chameleon: rows/values are VQ indices; the engine converts them to token ids (index + 4 for Anole)
        "index_space": "vq",
    }
    return table, meta


def table_from_dense(path: Path, args: argparse.Namespace) -> tuple[torch.Tensor, dict[str, Any]]:
    """Keep the first ``--top_k`` columns of an existing table (the original's dense npy or one of ours)."""
    if not path.is_file():
        raise UserError(f"--from_dense {path}: file not found (expected the original's top_{{N-1}}_indices.npy)")
    if path.suffix == ".npy":
        try:
            shape = np.load(path, mmap_mode="r").shape  # header only: the dense LlamaGen table is 512 MB
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"--from_dense {path}: not a readable .npy array ({e}); expected the original's "
                            f"top_{{N-1}}_indices.npy") from None
    else:
        shape = tuple(load_neighbour_table(path).shape)
    if len(shape) != 2 or shape[0] < 2:
        raise UserError(f"--from_dense {path}: expected an (N, K) neighbour table, got shape {shape}")
    n_codes = shape[0]
    top_k = _default_top_k(n_codes, args.top_k)
    if args.top_k is None:
        top_k = min(top_k, shape[1])
    table = load_neighbour_table(path, k=top_k)
    # A wrong file (another array, other N) would silently break acceptance later: check what we keep.
    if table.min() < 0 or table.max() >= n_codes:
        raise UserError(f"--from_dense {path}: indices outside [0, {n_codes}); not a neighbour table of {n_codes} codes")
    if (table == torch.arange(n_codes)[:, None]).any():
        raise UserError(f"--from_dense {path}: some rows list their own code as a neighbour; not a neighbour table")
    meta: dict[str, Any] = {
        "source": "dense",
        "converted_from": str(path),
        "metric": "l2",  # the original builds its table on the raw rows
        "top_k": top_k,
        "codebook_size": n_codes,
    }
    if args.model is not None:
        meta["model"] = args.model
    return table, meta


def _size(nbytes: int) -> str:
    """Human-readable file size."""
    if nbytes < 1024:
        return f"{nbytes} B"
    return f"{nbytes / 1024:.1f} KiB" if nbytes < 1024**2 else f"{nbytes / 1024**2:.1f} MiB"


def run(args: argparse.Namespace) -> Path:
    """Build (or convert) the table, write it atomically with its sidecar, print a summary; returns the path."""
    start = time.perf_counter()
    model = args.model or DEFAULT_MODEL
    # --from_dense with an explicit --save_path needs nothing from the registry (converts Chameleon tables too).
    spec = get_spec(model) if args.from_dense is None or args.save_path is None else None
    save_path = Path(args.save_path) if args.save_path else resolve_path(spec, "codebook", None)
    _check_save_path(save_path, args.overwrite)
    if args.chunk_size < 1:
        raise UserError(f"--chunk_size {args.chunk_size}: must be >= 1")
    from entrypoints.outputs import check_output_dir

    check_output_dir(save_path.parent, "--save_path's folder")
    apply_threads(args.threads)

    if args.from_dense is not None:
        table, meta = table_from_dense(Path(args.from_dense), args)
    else:
        table, meta = table_from_vq(spec, args, resolve_device(args.device))
    save_atomic(save_path, table, meta)

    sidecar = save_path.with_name(save_path.name + ".json")
    elapsed = time.perf_counter() - start
    source = meta.get("vq_path") or meta["converted_from"]
    print(f"neighbour table -> {save_path}  (metadata: {sidecar.name})")
    print(f"  source        {meta['source']}: {source}")
    print(f"  codebook      N={meta['codebook_size']}  D={meta.get('codebook_dim', 'n/a')}")
    print(f"  metric        {meta['metric']}" + (" (raw rows, the reference)" if meta["metric"] == "l2"
                                                 else " (L2-normalised rows, as the quantiser looks codes up)"))
    print(f"  top_k         {meta['top_k']}  (use --lantern_k <= {meta['top_k']})")
    print(f"  file size     {_size(save_path.stat().st_size)}")
    print(f"  time          {elapsed:.2f} s")
    return save_path


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python main.py generate_codebook [options]``."""
    run(parse_args().parse_args(argv))


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
