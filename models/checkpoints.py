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
    """Load ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` into a flat state dict on CPU.

    An empty, truncated or foreign file raises a CheckpointError naming it (never a bare SafetensorError)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); expected a weight file (re-copy or re-download it)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends: name the file
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated or "
                                  f"corrupt (re-copy it)") from None
    return unwrap_state_dict(_torch_load(path), path)


def load_folder_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights of an HF-style folder: single or sharded safetensors (``*.index.json``), else ``pytorch_model*.bin``."""
    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: expected a 'weight_map' of tensor name -> shard file")
            sd: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise CheckpointError(f"{index} lists the shard {shard}, which is missing from {folder}")
                sd.update(load_weight_file(folder / shard))
            missing = sorted(set(weight_map) - set(sd))
            if missing:
                raise CheckpointError(f"{folder}: tensors listed in {index.name} are in no shard: "
                                      + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
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
    """A JSON object from ``path``; a missing, empty or malformed file raises a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); it may be truncated or corrupt") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def require_fields(config: dict, required: tuple[str, ...], path: str | os.PathLike, what: str) -> None:
    """A config that lacks the model's size fields is a wrong file, never a reason to build a default model."""
    missing = [k for k in required if k not in config]
    if missing:
        raise CheckpointError(f"{path} is not a {what} config: it lacks {', '.join(missing)} (found: "
                              f"{', '.join(sorted(config)[:12])}); check that the path points at the {what}")


def check_shapes_before_allocating(build, sd: dict[str, torch.Tensor], source: str, ignore_prefixes=()):
    """Build the module on the meta device (no memory), check ``sd`` against it, then build it for real.

    A file that cannot fit the configured model is reported before a large model is allocated."""
    with torch.device("meta"):
        check_state_dict(build(), sd, source, ignore_prefixes)
    return build()


def tmp_name(path: Path) -> Path:
    """A temporary name beside ``path`` that no other process uses (its pid is in the name)."""
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


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
    tmp = tmp_name(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def write_json_atomic(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
