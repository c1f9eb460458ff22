"""eval_prec_recall: improved precision / recall (k-NN manifolds, k = 3) of generated vs. reference images.

Features: VGG16 fc2 before its ReLU (``--vgg_path``, torchvision's ``vgg16-397923af.pth``), images resized as the
original (PIL bilinear to 224 × 224); or, with ``--feature_extractor demo``, the demo classifier's features with
``--ref_dir digits`` (the bundled digits). Nothing is ever downloaded; a missing weight file stops at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from entrypoints.common import UserError, add_threads_arg, apply_threads, resolve_device, run_cli
from entrypoints.validation import check_counts

DIGITS = "digits"


def parse_args() -> argparse.ArgumentParser:
    from models.evaluation import VGG16_WEIGHTS

    p = argparse.ArgumentParser(prog="eval_prec_recall", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fake_dir", required=True, help="folder of generated images")
    p.add_argument("--ref_dir", required=True, help=f"folder of reference images, or '{DIGITS}' for the demo")
    p.add_argument("--feature_extractor", default="vgg16", choices=["vgg16", "demo"])
    p.add_argument("--vgg_path", default=None, help=f"VGG16 state dict (default ckpts/eval/{VGG16_WEIGHTS.filename})")
    p.add_argument("--classifier_path", default=None, help="demo classifier folder (default ckpts/demo/classifier)")
    p.add_argument("--k", type=int, default=3, help="k of the k-NN manifold estimate")
    p.add_argument("--how_many", type=int, default=None, help="number of images to evaluate (from each folder)")
    p.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    p.add_argument("--output", default=None, help="JSON report (default: <fake_dir>/eval_prec_recall.json)")
    p.add_argument("--device", default=None)
    add_threads_arg(p)
    return p


def run_eval_prec_recall(args: argparse.Namespace) -> dict:
    """Compute improved precision and recall, print them and write the JSON report."""
    from models import evaluation as ev

    if args.k < 1:
        raise UserError("--k must be positive")
    if args.batch_size < 1:
        raise UserError("--batch_size must be positive")
    demo = args.feature_extractor == "demo"
    if args.ref_dir == DIGITS and not demo:
        raise UserError(f"--ref_dir {DIGITS} (the bundled digits) goes with --feature_extractor demo")
    device = resolve_device(args.device)
    fake_paths = ev.list_images(args.fake_dir, args.how_many)
    ref_paths = None if args.ref_dir == DIGITS else ev.list_images(args.ref_dir, args.how_many)
    model = ev.load_demo_features(args.classifier_path, device) if demo else ev.load_vgg16(args.vgg_path, device)
    if ref_paths is None:
        real = ev.digit_reference_features(model)
    else:
        real = ev.extract_features(model, ref_paths, args.batch_size, device)[model.primary]
    fake = ev.extract_features(model, fake_paths, args.batch_size, device)[model.primary]
    precision, recall = ev.improved_precision_recall(real, fake, k=args.k)
    report = {"precision": precision, "recall": recall, "k": args.k, "num_fake": len(fake_paths),
              "num_ref": len(real), "fake_dir": str(args.fake_dir), "ref_dir": str(args.ref_dir),
              "feature_extractor": args.feature_extractor, "vgg_path": args.vgg_path, "device": str(device)}

    out = Path(args.output) if args.output else Path(args.fake_dir) / "eval_prec_recall.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"precision: {precision:.4f}   recall: {recall:.4f}   (k={args.k}, {len(fake_paths)} generated vs "
          f"{len(real)} reference, {args.feature_extractor} features)")
    print(f"report: {out}")
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args().parse_args(argv)
    check_counts(args, {"k": 1, "how_many": 1, "batch_size": 1})  # before any weights or images are read
    apply_threads(args.threads)
    run_eval_prec_recall(args)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
