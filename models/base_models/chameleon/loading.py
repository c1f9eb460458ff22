"""Load a Chameleon target from its real folders without an fp32 or second full copy in memory.

Formats: the HF-converted Anole folder (``leloy/Anole-7b-v0.1-hf``: ``config.json``,
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, q/k-norm ``[num_heads, head_dim]``)
and Lumina-mGPT's (``Alpha-VLLM/Lumina-mGPT-7B-768``: same names, q/k-norm ``[1, head_dim]``); which one a
folder holds is read from the tensor shapes, not guessed from the folder name.

Memory: the model is built on the meta device (no allocation); each shard is opened memory-mapped, every
tensor is converted straight to the requested dtype and device, one at a time, and the converted tensors
become the parameters (``load_state_dict(assign=True)``). Peak resident memory is therefore about the weights
in the requested dtype plus the pages of the shard being read (measured by
``python -m models.base_models.chameleon.measure_loading``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from models.base_models.chameleon.model import ChameleonCausalLM, ChameleonTargetConfig
from models.checkpoints import CheckpointError, check_state_dict

CHAMELEON_LAYOUT_HINT = """ckpts/anole/Anole-7b-v0.1-hf/           {config.json, model.safetensors.index.json, model-0000i-of-0000n.safetensors, tokenizer.json}
ckpts/anole/chameleon/tokenizer/         {text_tokenizer.json, vqgan.yaml, vqgan.ckpt}
ckpts/lumina_mgpt/Lumina-mGPT-7B-768/    {config.json, model.safetensors.index.json, model-0000i-of-0000n.safetensors}
ckpts/lumina_mgpt/chameleon/tokenizer/   {text_tokenizer.json, vqgan.yaml, vqgan.ckpt}"""

VQ_PREFIX = "model.vqmodel."


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the index's shards, else ``model.safetensors``."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"{folder}: no model.safetensors(.index.json) found\nExpected layout:\n{CHAMELEON_LAYOUT_HINT}")


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Names and shapes from the safetensors headers (nothing is read)."""
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = tuple(st.get_slice(k).get_shape())
    return out


def read_target_config(folder: Path, shapes: dict[str, tuple[int, ...]]) -> ChameleonTargetConfig:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: config.json not found\nExpected layout:\n{CHAMELEON_LAYOUT_HINT}")
    raw = json.loads(cfg_path.read_text())
    qn = shapes.get("model.layers.0.self_attn.q_norm.weight")
    if qn is None:
        raise CheckpointError(f"{folder}: not a Chameleon checkpoint (no model.layers.0.self_attn.q_norm.weight)")
    if not any(k.startswith(VQ_PREFIX) for k in shapes):
        raw = {**raw, "vq_config": None}
    elif raw.get("vq_config") is None:
        raw = {**raw, "vq_config": {}}
    return ChameleonTargetConfig.from_dict(raw, qk_norm_rows=qn[0])


def load_chameleon_target(
    folder: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    with_vqmodel: bool = False,
) -> ChameleonCausalLM:
    """Load an Anole / Lumina-mGPT folder into :class:`ChameleonCausalLM` in ``dtype`` on ``device``.

    ``model.vqmodel.*`` (the encoder copy HF checkpoints carry) is skipped unless ``with_vqmodel``: the family
    tokenizes and decodes images with the full VQGAN from ``vqgan.ckpt``.
    """
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Chameleon model folder not found: {folder}\nExpected layout:\n{CHAMELEON_LAYOUT_HINT}")
    files = shard_files(folder)
    shapes = tensor_shapes(files)
    cfg = read_target_config(folder, shapes)
    if not with_vqmodel:
        cfg.vq_config = None
    with torch.device("meta"):
        model = ChameleonCausalLM(cfg)
    wanted = set(model.state_dict())
    sd: dict[str, torch.Tensor] = {}
    device = torch.device(device)
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:  # memory-mapped
            for k in st.keys():
                if k not in wanted:
                    if k.startswith(VQ_PREFIX):
                        continue
                    sd[k] = torch.empty(shapes[k], device="meta")  # reported as unexpected below
                    continue
                t = st.get_tensor(k)
                # one conversion per tensor, straight to the target dtype/device (no fp32 staging copy)
                sd[k] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
                del t
    check_state_dict(model, sd, str(folder))
    model.load_state_dict(sd, strict=True, assign=True)
    model.requires_grad_(False)  # a frozen target: no autograd bookkeeping on 7 B parameters
    return model.eval()


def load_chameleon_head_and_embedding(folder: str | os.PathLike):
    """(config, lm_head weight (V, H), token embedding (V, H)) in fp32 from the mmapped shards only.

    What drafter training needs of the target (frozen head and embedding), without reading the layers.
    """
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Chameleon model folder not found: {folder}\nExpected layout:\n{CHAMELEON_LAYOUT_HINT}")
    files = shard_files(folder)
    cfg = read_target_config(folder, tensor_shapes(files))
    wanted = {"lm_head.weight": None, "model.embed_tokens.weight": None}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for k in wanted:
                if k in st.keys():
                    wanted[k] = st.get_tensor(k).float()
    missing = [k for k, v in wanted.items() if v is None]
    if missing:
        raise CheckpointError(f"{folder}: the shards lack {missing}")
    return cfg, wanted["lm_head.weight"], wanted["model.embed_tokens.weight"]


def save_chameleon_folder(
    model: ChameleonCausalLM, folder: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3, config_extra: dict | None = None
) -> None:
    """Write ``model`` in the real HF layout (config.json, sharded safetensors + index); used by tests/tools."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v.detach().contiguous()
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    c = model.config
    cfg = {"model_type": "chameleon", "architectures": ["ChameleonForConditionalGeneration"], **c.to_dict()}
    cfg.pop("qk_norm_rows", None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
    cfg.update(config_extra or {})
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
