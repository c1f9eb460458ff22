"""LANTERN command line: ``python main.py <task> [task options]`` (same as ``python -m entrypoints.<task>``)."""

from __future__ import annotations

import importlib
import sys

TASKS: dict[str, tuple[str, str]] = {
    "generate_images": ("entrypoints.generate_images", "generate images (plain AR, EAGLE-2/1, LANTERN, LANTERN++, SJD, MC-SJD, GSD)"),
    "extract_code": ("entrypoints.extract_code", "encode an image+caption folder into VQ codes (and T5 features)"),
    "self_distill": ("entrypoints.self_distill", "the target's own samples as code shards (self-distilled drafter data)"),
    "generate_train_data": ("entrypoints.generate_train_data", "target hidden states for drafter training"),
    "train_drafter": ("entrypoints.train_drafter.main", "train an EAGLE drafter (also under accelerate launch)"),
    "generate_codebook": ("entrypoints.generate_codebook", "latent-neighbour tables of a VQ codebook for LANTERN"),
    "eval_fid_clip": ("entrypoints.eval_fid_clip", "FID, KID, IS and CLIP score of generated images"),
    "eval_prec_recall": ("entrypoints.eval_prec_recall", "improved precision / recall of generated images"),
    "eval_hpsv2": ("entrypoints.eval_hpsv2", "HPSv2.1 score of generated images"),
    "benchmark": ("entrypoints.benchmark", "speed (τ, latency, speed-up over AR) and demo quality of decoding settings"),
}


def usage() -> str:
    width = max(map(len, TASKS))
    lines = ["usage: python main.py <task> [options]   (python main.py <task> --help for a task's options)", "", "tasks:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in TASKS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    task, rest = argv[0], argv[1:]
    if task not in TASKS:
        print(f"error: unknown task {task!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(TASKS[task][0])
    from entrypoints.common import run_cli

    run_cli(module.main, rest)


if __name__ == "__main__":
    main()
