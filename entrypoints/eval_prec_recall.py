"""eval_prec_recall: improved precision / recall (VGG16 fc2 features, k = 3) of generated vs. reference images.

Weights are read from a local torchvision vgg16 state dict only (``--vgg_path``); see models/evaluation.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from entrypoints.common import UserError, resolve_device, run_cli


def parse_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_prec_recall", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fake_dir", required=True, help="folder of generated images")
    p.add_argument("--ref_dir", required=True, help="folder of reference images")
    p.add_argument("--vgg_path", default=None, help="local torchvision vgg16 state dict (never downloaded)")
    p.add_argument("--k", type=int, default=3, help="k of the k-NN manifold estimate")
    p.add_argument("--how_many", type=int, default=None, help="number of images to evaluate (from each folder)")
    p.add_argument("--batch_size", type=int, default=32, help="images per VGG forward pass")
    p.add_argument("--output", default=None, help="JSON report (default: <fake_dir>/eval_prec_recall.json)")
    p.add_argument("--device", default=None)
    return p


def run_eval_prec_recall(args: argparse.Namespace) -> dict:
    """Compute improved precision and recall, print them and write the JSON report."""
    from models import evaluation as ev

    if args.k < 1:
        raise UserError("--k must be positive")
    if args.batch_size < 1:
        raise UserError("--batch_size must be positive")
    device = resolve_device(args.device)
    fake_paths = ev.list_images(args.fake_dir, args.how_many)
    ref_paths = ev.list_images(args.ref_dir, args.how_many)
    vgg = ev.load_vgg16(args.vgg_path, device)
    real = ev.extract_features(vgg, ref_paths, args.batch_size, device)
    fake = ev.extract_features(vgg, fake_paths, args.batch_size, device)
    precision, recall = ev.improved_precision_recall(real, fake, k=args.k)
    report = {"precision": precision, "recall": recall, "k": args.k, "num_fake": len(fake_paths),
              "num_ref": len(ref_paths), "fake_dir": str(args.fake_dir), "ref_dir": str(args.ref_dir),
              "vgg_path": args.vgg_path, "device": str(device)}

    out = Path(args.output) if args.output else Path(args.fake_dir) / "eval_prec_recall.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"precision: {precision:.4f}   recall: {recall:.4f}   (k={args.k}, {len(fake_paths)} generated vs "
          f"{len(ref_paths)} reference)")
    print(f"report: {out}")
    return report


def main(argv: list[str] | None = None) -> None:
    run_eval_prec_recall(parse_args().parse_args(argv))


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
