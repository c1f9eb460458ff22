"""eval_hpsv2: Human Preference Score v2.1 of generated images against their prompts (the original's flags).

The HPSv2.1 checkpoint ``HPS_v2.1_compressed.pt`` (``--hps_path``, default ``ckpts/eval/``) is loaded into
open_clip's ``ViT-H-14``; images get HPS's transform (bicubic resize of the long side to 224, zero-pad to a
square) and the score is the cosine of the normalised image and text features. Image ``prompt_{idx}.png`` is
paired with prompt ``idx`` of ``--prompt_path`` (a .tsv/.csv 'Prompt' column, a .json list, a text file, or a
generate_images global_statistics JSON). The ``hpsv2`` package is not needed and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from entrypoints.common import UserError, add_threads_arg, apply_threads, resolve_device, run_cli
from entrypoints.validation import check_counts


def parse_args() -> argparse.ArgumentParser:
    from models.clip_eval import HPS_MODEL, HPS_WEIGHTS

    p = argparse.ArgumentParser(prog="eval_hpsv2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_path", required=True, help="folder of generated images (prompt_{idx}.png)")
    p.add_argument("--prompt_path", required=True, help="prompts (prompt file or global_statistics JSON)")
    p.add_argument("--hps_path", default=None, help=f"HPSv2.1 checkpoint (default ckpts/eval/{HPS_WEIGHTS.filename})")
    p.add_argument("--hps_model", default=HPS_MODEL, help="open_clip architecture: a built-in name or a JSON config")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--output", default=None, help="JSON report (default: <image_path>/eval_hpsv2.json)")
    p.add_argument("--device", default=None)
    add_threads_arg(p)
    return p


def run_eval_hpsv2(args: argparse.Namespace) -> dict:
    """Score every image, print the mean HPSv2.1 and write a JSON report with the per-image scores."""
    from models import clip_eval as ce
    from models import evaluation as ev

    if args.batch_size < 1:
        raise UserError("--batch_size must be positive")
    device = resolve_device(args.device)
    paths = ev.list_images(args.image_path)
    prompts = ev.load_captions(args.prompt_path, paths, flag="--prompt_path")
    model = ce.load_hps(args.hps_path, device, args.hps_model)
    scores = ce.hps_scores(model, paths, prompts, args.batch_size)
    report = {"hpsv2.1": float(scores.mean()), "num_images": len(paths), "image_path": str(args.image_path),
              "prompt_path": str(args.prompt_path), "hps_path": str(ev.require_file(ce.HPS_WEIGHTS, args.hps_path)),
              "per_image": {p.name: float(s) for p, s in zip(paths, scores)}}
    out = Path(args.output) if args.output else Path(args.image_path) / "eval_hpsv2.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print("Image Path:", args.image_path)
    print(f"HPSv2.1: {report['hpsv2.1']:.4f}  ({len(paths)} images)")
    print(f"report: {out}")
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args().parse_args(argv)
    check_counts(args, {"batch_size": 1})  # before any weights or images are read
    apply_threads(args.threads)
    run_eval_hpsv2(args)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
