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
