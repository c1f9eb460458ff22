"""Shared test fixtures: where the conformance data lives, and small helpers to read it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
SHARED = Path(os.environ.get("LANTERN_SHARED_DIR", REPO_ROOT.parent / "shared"))
CONFORMANCE = SHARED / "conformance"

# tiny models: one thread avoids oversubscription overhead and keeps runs deterministic
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    """Entry points set torch's thread count (--threads or its default); every test starts on one thread."""
    torch.set_num_threads(1)
    yield


def conformance_dir(name: str) -> Path:
    d = CONFORMANCE / name
    if not d.exists():
        pytest.skip(f"conformance fixtures not found at {d} (set LANTERN_SHARED_DIR)")
    return d


def load_io(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def manifest_entries(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    return [(e["name"], tuple(e["shape"])) for e in read_json(path)["entries"]]


def write_checkpoints(folder: Path, kind: str) -> dict[str, torch.Tensor]:
    """Fixture GPT (``{kind}.pt``) and VQ (``vq.pt``) in LlamaGen's .pt format (weights under ``model``) with
    sidecar JSON sizes (they are not LlamaGen's named sizes); returns the GPT fixture's io tensors.

    GPT: 4x4 tokens, vocab 64; VQ: downsample 2, so images are 8 px.
    """
    g, v = conformance_dir("llamagen_gpt"), conformance_dir("llamagen_vq")
    torch.save({"model": load_io(g / f"weights_{kind}.safetensors")}, folder / f"{kind}.pt")
    (folder / f"{kind}.json").write_text(json.dumps(read_json(g / f"config_{kind}.json")["ModelArgs"]))
    torch.save({"model": load_io(v / "weights.safetensors")}, folder / "vq.pt")
    (folder / "vq.json").write_text(json.dumps(read_json(v / "config.json")))
    return load_io(g / f"io_{kind}.safetensors")
