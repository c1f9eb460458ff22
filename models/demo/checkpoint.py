"""Reading and (atomically) writing the demo checkpoint folders.

Layout under the output root (``ckpts/demo`` by default)::

    vq/config.json          VQConfig.to_dict()          vq/model.safetensors          VQModel state dict
    gpt/config.json         GPTConfig.to_dict()         gpt/model.safetensors         LlamaGenGPT state dict
    classifier/config.json  ClassifierConfig.to_dict()  classifier/model.safetensors  DigitClassifier state dict
    train_report.json       measured numbers of the last training / evaluation run

Every file is written to a temporary name in the same folder and moved into place with ``os.replace``, so an
interrupted run never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
from torch import nn

from models.base_models.llamagen.gpt import GPTConfig, LlamaGenGPT
from models.base_models.llamagen.vq_model import VQConfig, VQModel


def _atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)`` then move the temporary file onto ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    _atomic_write(os.fspath(path), write)


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """JSON content of ``path``, or ``default`` when the file does not exist."""
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def save_model(folder: str | os.PathLike, model: nn.Module, config: dict, dtype: torch.dtype | None = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` (state dict, optionally cast to ``dtype``) into ``folder``."""
    from safetensors.torch import save_file

    folder = os.fspath(folder)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        state[k] = v.contiguous().clone()
    _atomic_write(os.path.join(folder, "model.safetensors"), lambda tmp: save_file(state, tmp))
    write_json(os.path.join(folder, "config.json"), config)


def _load_state(folder: str, model: nn.Module, device: torch.device | str) -> None:
    from safetensors.torch import load_file

    state = load_file(os.path.join(folder, "model.safetensors"))
    # Weights may be stored in half precision to save space; compute in the model's float32.
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    model.to(device).eval()


def load_vq(folder: str | os.PathLike, device: torch.device | str = "cpu") -> VQModel:
    """The demo VQ tokenizer from ``folder`` (``config.json`` + ``model.safetensors``), in eval mode."""
    folder = os.fspath(folder)
    model = VQModel(VQConfig.from_dict(read_json(os.path.join(folder, "config.json"))))
    _load_state(folder, model, device)
    return model


def load_gpt(folder: str | os.PathLike, device: torch.device | str = "cpu") -> LlamaGenGPT:
    """The demo class-conditional GPT from ``folder`` (``config.json`` + ``model.safetensors``), in eval mode."""
    folder = os.fspath(folder)
    model = LlamaGenGPT(GPTConfig.from_dict(read_json(os.path.join(folder, "config.json"))))
    _load_state(folder, model, device)
    return model
