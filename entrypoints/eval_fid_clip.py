"""eval_fid_clip: FID (Inception, 256 px) against reference images and CLIP score ("A photo depicts " prefix).

Weights are read from local files only (see models/evaluation.py for what makes FID comparable to the paper's).
``--ref_dir`` may also be a ``.npz`` with precomputed Inception statistics (``mu``, ``sigma``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from entrypoints.common import UserError, resolve_device, run_cli


def parse_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_fid_clip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fake_dir", required=True, help="folder of generated images")
    p.add_argument("--ref_dir", required=True,
                   help="folder of reference images (e.g. MS-COCO val2017), or a .npz with 'mu' and 'sigma'")
    p.add_argument("--caption_path", default=None,
                   help="prompts of the generated images for the CLIP score: a generate_images global_statistics "
                        "JSON or a text file (one per line, in image order); without it only FID is computed")
    p.add_argument("--how_many", type=int, default=None, help="number of images to evaluate (from each folder)")
    p.add_argument("--inception_path", default=None,
                   help="local torchvision inception_v3 state dict (never downloaded)")
    p.add_argument("--clip_path", default=None, help="local CLIP ViT-B/32 folder (never downloaded)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--output", default=None, help="JSON report (default: <fake_dir>/eval_fid_clip.json)")
    p.add_argument("--device", default=None)
    return p


def run_eval_fid_clip(args: argparse.Namespace) -> dict:
    """Compute FID (and the CLIP score with --caption_path), print them and write the JSON report."""
    from models import evaluation as ev

    if args.how_many is not None and args.how_many < 2:
        raise UserError("--how_many must be at least 2 (FID needs a covariance)")
    if args.batch_size < 1:
        raise UserError("--batch_size must be positive")
    device = resolve_device(args.device)
    fake_paths = ev.list_images(args.fake_dir, args.how_many)
    captions = ev.load_captions(args.caption_path, fake_paths) if args.caption_path else None
    clip = ev.load_clip(args.clip_path, device) if captions is not None else None  # fail early on missing weights
    inception = ev.load_inception(args.inception_path, device)

    ref = Path(args.ref_dir)
    if ref.suffix == ".npz" and ref.is_file():
        with np.load(ref) as stats:
            mu_ref, sigma_ref = stats["mu"], stats["sigma"]
        num_ref = None
    else:
        ref_paths = ev.list_images(ref, args.how_many)
        mu_ref, sigma_ref = ev.feature_statistics(ev.extract_features(inception, ref_paths, args.batch_size, device))
        num_ref = len(ref_paths)
    mu_fake, sigma_fake = ev.feature_statistics(ev.extract_features(inception, fake_paths, args.batch_size, device))
    report: dict = {"fid": ev.frechet_distance(mu_fake, sigma_fake, mu_ref, sigma_ref),
                    "num_fake": len(fake_paths), "num_ref": num_ref}
    if clip is not None:
        report["clip_score"] = ev.clip_score(*clip, fake_paths, captions, args.batch_size, device)
    report.update(fake_dir=str(args.fake_dir), ref_dir=str(args.ref_dir), caption_path=args.caption_path,
                  inception_path=args.inception_path, clip_path=args.clip_path, device=str(device))

    out = Path(args.output) if args.output else Path(args.fake_dir) / "eval_fid_clip.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    line = f"FID: {report['fid']:.4f}  ({len(fake_paths)} generated vs {num_ref if num_ref else 'precomputed'} reference)"
    if "clip_score" in report:
        line += f"   CLIP score: {report['clip_score']:.4f}"
    print(line)
    print(f"report: {out}")
    return report


def main(argv: list[str] | None = None) -> None:
    run_eval_fid_clip(parse_args().parse_args(argv))


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
