"""Measure peak resident memory while loading a >= 1 B-parameter Chameleon model from sharded safetensors.

    python -m models.base_models.chameleon.measure_loading [--dtype bf16] [--keep DIR]

Writes a random-weight model in the real HF layout (config.json, ~1 GB shards + index; a few GB) to a
temporary folder shard by shard (the writer never holds the whole model), then loads it with
:func:`load_chameleon_target` in a fresh subprocess and reports that process's peak RSS against the size of
the weights in the requested dtype. The folder is deleted afterwards unless ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from models.base_models.chameleon.model import ChameleonCausalLM, ChameleonTargetConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# 1.28 B parameters: Chameleon's vocabulary, half the 7B width, 20 layers
BIG = dict(vocab_size=65536, hidden_size=2048, intermediate_size=5504, num_hidden_layers=20, num_attention_heads=16)


def write_random_folder(folder: Path, dtype: torch.dtype, shard_bytes: int = 1 << 30) -> int:
    """Random weights in the HF sharded layout, one shard in memory at a time; returns the weights' bytes."""
    from safetensors.torch import save_file

    cfg = ChameleonTargetConfig(**BIG)
    with torch.device("meta"):
        meta = ChameleonCausalLM(cfg)
    entries = [(k, v.shape) for k, v in meta.state_dict().items()]
    shards, cur, size = [], [], 0
    esize = torch.empty((), dtype=dtype).element_size()
    for k, shape in entries:
        n = int(torch.Size(shape).numel()) * esize
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((k, shape))
        size += n
    shards.append(cur)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    folder.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: (torch.randn(shape, generator=g) * 0.02).to(dtype) for k, shape in shard}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: name for k in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    c = cfg.to_dict()
    c.pop("qk_norm_rows")
    (folder / "config.json").write_text(json.dumps({"model_type": "chameleon", **c}))
    return total


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM; ru_maxrss would include the parent's peak across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(folder: str, dtype_name: str) -> None:
    """Runs in the subprocess: load, read every parameter once, then print peak RSS and timing as JSON."""
    from models.base_models.chameleon.loading import load_chameleon_target

    before = peak_rss_bytes()
    t0 = time.perf_counter()
    model = load_chameleon_target(folder, "cpu", DTYPES[dtype_name])
    seconds = time.perf_counter() - t0
    after_load = peak_rss_bytes()
    with torch.no_grad():  # touch every weight so lazily mapped pages count as well
        checksum = float(sum(p.reshape(-1)[::512].float().sum() for p in model.parameters()))  # one read per page
    peak = peak_rss_bytes()
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak_rss_bytes": peak, "peak_rss_after_load_bytes": after_load, "rss_before_load_bytes": before,
                      "parameters": params, "model_bytes": nbytes, "seconds": seconds, "checksum": checksum}))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="dtype the shards are written in")
    p.add_argument("--load_dtype", default=None, choices=sorted(DTYPES), help="dtype to load into (default: --dtype)")
    p.add_argument("--keep", default=None, help="write the folder here and keep it")
    p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        _child(*args._child)
        return {}
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="chameleon_load_"))
    try:
        weights = write_random_folder(tmp, DTYPES[args.dtype])
        out = subprocess.run([sys.executable, "-m", "models.base_models.chameleon.measure_loading", "--_child",
                              str(tmp), args.load_dtype or args.dtype], check=True, capture_output=True, text=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    res["weights_file_bytes"] = weights
    gib = 1024**3
    print(f"{res['parameters'] / 1e9:.2f} B parameters, stored {args.dtype}, loaded {args.load_dtype or args.dtype}: "
          f"weights in the file {weights / gib:.2f} GiB, in memory {res['model_bytes'] / gib:.2f} GiB; "
          f"peak RSS {res['peak_rss_after_load_bytes'] / gib:.2f} GiB after loading, "
          f"{res['peak_rss_bytes'] / gib:.2f} GiB after reading every weight "
          f"(python + torch before loading {res['rss_before_load_bytes'] / gib:.2f} GiB) = "
          f"{res['peak_rss_bytes'] / res['model_bytes']:.2f} x the loaded weights; load took {res['seconds']:.1f} s")
    return res


if __name__ == "__main__":
    main()
