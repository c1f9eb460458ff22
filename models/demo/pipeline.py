"""Rerun the whole demo pipeline from scratch: VQ → target → classifier → neighbours → self-distilled data →
drafter training data → EAGLE drafter.

    python -m models.demo.pipeline --out ckpts/demo

Every stage uses the project's own commands (``models.demo.train``, ``generate_codebook``, ``self_distill``,
``generate_train_data``, ``train_drafter``), so the demo exercises exactly what a user runs on a real model.
Intermediate data goes to ``--work_dir`` (not committed); the results land in ``--out``:
``vq/``, ``gpt/``, ``classifier/``, ``neighbours.safetensors`` and ``drafter/`` (config.json + model.safetensors,
ready for ``generate_images --model_type eagle``). ``--from_stage`` restarts at a later stage; every stage is
itself resumable.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

STAGES = ("models", "neighbours", "distill", "hidden", "drafter")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.demo.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="ckpts/demo", help="where the demo checkpoints go")
    p.add_argument("--work_dir", default="data/demo_pipeline", help="intermediate data (self-distilled codes, hidden states, drafter runs)")
    p.add_argument("--from_stage", choices=STAGES, default="models", help="skip the stages before this one")
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples_per_class", type=int, default=800, help="self-distilled sequences per digit")
    p.add_argument("--neighbours_k", type=int, default=128, help="columns of the neighbour table")
    p.add_argument("--drafter_epochs", type=int, default=20)
    p.add_argument("--drafter_bs", type=int, default=32)
    p.add_argument("--drafter_lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _run(label: str, fn, argv: list[str]) -> None:
    print(f"\n=== {label}: {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    fn(argv)
    print(f"=== {label} done in {time.perf_counter() - t0:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out, work = Path(args.out), Path(args.work_dir)
    first = STAGES.index(args.from_stage)
    common = ["--model", "demo", "--device", args.device]
    paths = ["--model_path", str(out / "gpt"), "--vq_path", str(out / "vq")]
    if first <= 0:
        from models.demo import train

        _run("VQ, GPT, classifier", train.main, ["--out", str(out), "--device", args.device, "--seed", str(args.seed)])
    if first <= 1:
        from entrypoints import generate_codebook

        _run("neighbour table", generate_codebook.main,
             ["--model", "demo", "--vq_path", str(out / "vq"), "--save_path", str(out / "neighbours.safetensors"),
              "--top_k", str(args.neighbours_k), "--overwrite"])
    if first <= 2:
        from entrypoints import self_distill

        _run("self-distilled codes", self_distill.main,
             [*common, *paths, "--classes", "0-9", "--samples_per_class", str(args.samples_per_class),
              "--batch_size", "100", "--random_seed", str(args.seed), "--output_dir", str(work / "codes")])
    if first <= 3:
        from entrypoints import generate_train_data

        _run("drafter training data", generate_train_data.main,
             [*common, "--model_path", str(out / "gpt"), "--data_path", str(work / "codes"),
              "--output_dir", str(work / "hidden"), "--batch_size", "64", "--precision", "fp32"])
    if first <= 4:
        from entrypoints.train_drafter import main as train_drafter

        runs = work / "drafter_runs"
        flags = ["--model", "demo", "--base_path", str(out / "gpt"), "--data_dir", str(work / "hidden"),
                 "--save_dir", str(runs), "--num_epochs", str(args.drafter_epochs), "--bs", str(args.drafter_bs),
                 "--lr", str(args.drafter_lr), "--seed", str(args.seed), "--resume"]
        _run("drafter", train_drafter.main, flags + (["--cpu"] if args.device == "cpu" else []))
        latest = runs / (runs / "latest").read_text().strip()
        dest = out / "drafter"
        tmp = out / "drafter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in ("config.json", "model.safetensors"):
            shutil.copy(latest / name, tmp / name)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        print(f"drafter from {latest} -> {dest}")


if __name__ == "__main__":
    main(sys.argv[1:])
