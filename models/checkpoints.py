"""Reading weight files in the formats the real checkpoints use, with errors a user can act on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing or does not match what the model expects; the message says what to do."""


def require_path(path: str | os.PathLike | None, what: str, layout_hint: str) -> Path:
    """Return ``path`` if it exists, else raise a CheckpointError naming the file and the expected layout."""
    if path is None:
        raise CheckpointError(f"no path given for the {what}.\nExpected layout:\n{layout_hint}")
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{what} not found: {p}\nExpected layout:\n{layout_hint}")
    return p


def _torch_load(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unpickling problem with the file name
        raise CheckpointError(f"could not read {path} as a PyTorch checkpoint: {e}") from e
    return obj


def unwrap_state_dict(obj: dict, path: Path | str = "") -> dict[str, torch.Tensor]:
    """Original LlamaGen files keep weights under ``model`` (or ``module`` / ``state_dict``)."""
    for key in ("model", "module", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return obj[key]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointError(f"{path}: no state dict found (looked for keys 'model', 'module', 'state_dict')")


def load_weight_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` into a flat state dict on CPU."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return unwrap_state_dict(_torch_load(path), path)


def load_folder_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights of an HF-style folder: single or sharded safetensors (``*.index.json``), else ``pytorch_model*.bin``."""
    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(load_weight_file(folder / shard))
            return sd
    for name in ("model.safetensors", "pytorch_model.bin", "model.pt"):
        if (folder / name).exists():
            return load_weight_file(folder / name)
    found = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(
        f"{folder}: no weights found (expected model.safetensors, a sharded *.index.json or pytorch_model.bin; "
        f"found {found})"
    )


def read_json(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)


def check_state_dict(module: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, ignore_prefixes=()) -> None:
    """Strict name-and-shape check with a readable report instead of torch's error wall."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own and not k.startswith(tuple(ignore_prefixes))]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        lines = [f"checkpoint {source} does not match the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        raise CheckpointError("\n".join(lines))


def save_safetensors_atomic(sd: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write a safetensors file via a temporary name so an interrupted write never leaves a broken file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def write_json_atomic(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
