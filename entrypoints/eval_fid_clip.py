"""eval_fid_clip: FID (Inception, 256 px) against reference images and CLIP score ("A photo depicts " prefix)."""

from __future__ import annotations

import argparse
import sys

from entrypoints.common import not_built, run_cli


def parse_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_fid_clip", description=__doc__)
    p.add_argument("--fake_dir", required=True, help="folder of generated images")
    p.add_argument("--ref_dir", required=True, help="folder of reference images (e.g. MS-COCO val2017)")
    p.add_argument("--caption_path", default=None, help="prompts of the generated images (for CLIP score)")
    p.add_argument("--how_many", type=int, default=None, help="number of images to evaluate")
    p.add_argument("--inception_path", default=None, help="local Inception weights (never downloaded)")
    p.add_argument("--clip_path", default=None, help="local CLIP ViT-B/32 weights (never downloaded)")
    p.add_argument("--device", default=None)
    return p


run_eval_fid_clip = not_built("eval_fid_clip", "FID/CLIP evaluation")


def main(argv: list[str] | None = None) -> None:
    run_eval_fid_clip(parse_args().parse_args(argv))


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
