"""eval_fid_clip: FID / KID / Inception Score against reference images and the CLIP score, as the original.

FID: torch-fidelity's FID Inception (``weights-inception-2015-12-05-6726825d.pth``, ``--inception_path``) on
images preprocessed as the original (long-edge centre crop, LANCZOS to ``--eval_res`` 256, clean-fid "clean"
resize to 299), generated and reference alike. ``--ref_dir`` is a folder (e.g. MS-COCO val2017, used whole as in
the original) or a ``.npz`` written by ``--save_ref_stats`` (``mu``, ``sigma``; ``features`` for KID), so a COCO
reference is extracted once. CLIP score (with ``--caption_path``): OpenAI CLIP ViT-B/32 from ``--clip_path``
(``ViT-B-32.pt``, an open_clip state dict, or a Hugging Face CLIP folder), mean cosine between each image and
"A photo depicts " + its prompt. ``--feature_extractor demo`` measures the built-in demo instead: demo-FID in the
digit classifier's feature space against ``--ref_dir digits`` (the bundled digits), and class accuracy as the
prompt-alignment score. Nothing is ever downloaded; a missing weight file stops before any feature extraction.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from entrypoints.common import UserError, add_threads_arg, apply_threads, resolve_device, run_cli
from entrypoints.validation import check_counts

DIGITS = "digits"  # --ref_dir keyword: scikit-learn's bundled digits (the demo's reference set)


def parse_args() -> argparse.ArgumentParser:
    from models.clip_eval import CLIP_MODEL, CLIP_WEIGHTS
    from models.evaluation import EVAL_RES, INCEPTION_WEIGHTS

    p = argparse.ArgumentParser(prog="eval_fid_clip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fake_dir", required=True, help="folder of generated images (prompt_{idx}.png)")
    p.add_argument("--ref_dir", required=True,
                   help="folder of reference images (e.g. MS-COCO val2017), a .npz with 'mu' and 'sigma' (from "
                        f"--save_ref_stats), or '{DIGITS}' (with --feature_extractor demo)")
    p.add_argument("--caption_path", default=None,
                   help="prompts of the generated images for the CLIP score: a generate_images global_statistics "
                        "JSON, or a prompt file (.json list, .tsv/.csv 'Prompt' column, text) indexed by prompt_{idx}")
    p.add_argument("--how_many", type=int, default=None, help="number of generated images to evaluate (default all)")
    p.add_argument("--eval_res", type=int, default=EVAL_RES,
                   help="side of the LANCZOS resize after the centre crop, as the original (0: crop only)")
    p.add_argument("--feature_extractor", default="inception", choices=["inception", "demo"],
                   help="inception: the paper's FID; demo: the demo classifier's features (demo-FID)")
    p.add_argument("--inception_path", default=None,
                   help=f"FID Inception weights (default ckpts/eval/{INCEPTION_WEIGHTS.filename})")
    p.add_argument("--classifier_path", default=None, help="demo classifier folder (default ckpts/demo/classifier)")
    p.add_argument("--clip_path", default=None,
                   help=f"CLIP weights: file or HF folder (default ckpts/eval/{CLIP_WEIGHTS.filename})")
    p.add_argument("--clip_model", default=CLIP_MODEL,
                   help="open_clip architecture of a --clip_path file: a built-in name or a JSON config")
    p.add_argument("--save_ref_stats", default=None, help="write the reference statistics to this .npz")
    p.add_argument("--kid_subset_size", type=int, default=1000, help="KID subset size (capped at the set sizes)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--output", default=None, help="JSON report (default: <fake_dir>/eval_fid_clip.json)")
    p.add_argument("--device", default=None)
    add_threads_arg(p)
    return p


def run_eval_fid_clip(args: argparse.Namespace) -> dict:
    """Compute FID, KID, IS (and the CLIP score or class accuracy with --caption_path); print; write JSON."""
    import numpy as np

    from models import clip_eval as ce
    from models import evaluation as ev

    if args.how_many is not None and args.how_many < 2:
        raise UserError("--how_many must be at least 2 (FID needs a covariance)")
    if args.batch_size < 1:
        raise UserError("--batch_size must be positive")
    if args.eval_res < 0:
        raise UserError("--eval_res must be 0 (no resize) or a positive size")
    demo = args.feature_extractor == "demo"
    ref = Path(args.ref_dir)
    if args.ref_dir == DIGITS and not demo:
        raise UserError(f"--ref_dir {DIGITS} (the bundled digits) goes with --feature_extractor demo")
    device = resolve_device(args.device)
    fake_paths = ev.list_images(args.fake_dir, args.how_many)
    captions = ev.load_captions(args.caption_path, fake_paths) if args.caption_path else None
    meta = {"feature_extractor": args.feature_extractor, "eval_res": args.eval_res}
    ref_paths = ref_stats = None
    if ref.suffix == ".npz":
        if not ref.is_file():
            raise FileNotFoundError(f"--ref_dir {ref}: reference statistics file not found")
        ref_stats = ev.load_reference_stats(ref, expect=meta)
    elif args.ref_dir != DIGITS:
        ref_paths = ev.list_images(ref)
    # Every weight file is checked before any feature extraction starts.
    if demo:
        extractor = ev.load_demo_features(args.classifier_path, device)
    else:
        ev.require_file(ev.INCEPTION_WEIGHTS, args.inception_path)
        clip_path = ce.check_clip_path(args.clip_path) if captions is not None else None
        extractor = ev.load_inception(args.inception_path, device)
    eval_res = args.eval_res or None

    if ref_stats is not None:
        mu_ref, sigma_ref, ref_feats = ref_stats
    elif ref_paths is None:
        ref_feats = ev.digit_reference_features(extractor)
    else:
        ref_feats = ev.extract_features(extractor, ref_paths, args.batch_size, device, eval_res)[extractor.primary]
    num_ref = None if ref_feats is None else len(ref_feats)
    if args.save_ref_stats and ref_feats is not None:
        ev.save_reference_stats(args.save_ref_stats, ref_feats, meta)

    fake = ev.extract_features(extractor, fake_paths, args.batch_size, device, eval_res)
    fake_feats = fake[extractor.primary]
    if ref_feats is not None:
        fid = ev.fid_from_features(fake_feats, ref_feats)
    else:
        fid = ev.frechet_distance(*ev.feature_statistics(fake_feats), mu_ref, sigma_ref)
    key = "demo_fid" if demo else "fid"
    report: dict = {key: fid, "num_fake": len(fake_paths), "num_ref": num_ref}
    if ref_feats is not None and not demo:
        report["kid_mean"], report["kid_std"] = ev.kernel_inception_distance(ref_feats, fake_feats,
                                                                             args.kid_subset_size)
    if "logits_unbiased" in fake:
        report["inception_score_mean"], report["inception_score_std"] = ev.inception_score(fake["logits_unbiased"])
    if captions is not None and demo:
        from models.demo.data import prompt_to_class

        labels = np.array([prompt_to_class(c) for c in captions])
        report["class_accuracy"] = float((fake["logits"].argmax(axis=1) == labels).mean())
    elif captions is not None:
        scorer = ce.load_clip_scorer(clip_path, device, args.clip_model)
        report["clip_score"] = ce.clip_score(scorer, fake_paths, captions, args.batch_size, eval_res)
        report["clip_score_x100"] = 100.0 * report["clip_score"]
        report["clip_backend"] = scorer.backend
    report.update(fake_dir=str(args.fake_dir), ref_dir=str(args.ref_dir), caption_path=args.caption_path,
                  feature_extractor=args.feature_extractor, eval_res=args.eval_res,
                  inception_path=None if demo else str(ev.require_file(ev.INCEPTION_WEIGHTS, args.inception_path)),
                  clip_path=args.clip_path, device=str(device))

    out = Path(args.output) if args.output else Path(args.fake_dir) / "eval_fid_clip.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    line = f"{'demo-FID' if demo else f'FID_{args.eval_res}px'}: {fid:.4f}  ({len(fake_paths)} generated vs " \
           f"{num_ref if num_ref else 'precomputed'} reference)"
    if "kid_mean" in report:
        line += f"   KID: {report['kid_mean']:.5f} ± {report['kid_std']:.5f}"
    if "inception_score_mean" in report:
        line += f"   IS: {report['inception_score_mean']:.3f}"
    if "clip_score" in report:
        line += f"   CLIP score: {report['clip_score']:.4f} (×100: {report['clip_score_x100']:.2f})"
    if "class_accuracy" in report:
        line += f"   class accuracy: {100 * report['class_accuracy']:.1f} %"
    print(line)
    print(f"report: {out}")
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args().parse_args(argv)
    check_counts(args, {"how_many": 1, "eval_res": 16, "kid_subset_size": 2, "batch_size": 1})  # before any weights or images are read
    apply_threads(args.threads)
    run_eval_fid_clip(args)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
