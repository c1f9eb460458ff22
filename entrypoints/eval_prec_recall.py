"""eval_prec_recall: improved precision / recall (VGG16 fc2 features, k = 3) of generated vs. reference images."""

from __future__ import annotations

import argparse
import sys

from entrypoints.common import not_built, run_cli


def parse_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_prec_recall", description=__doc__)
    p.add_argument("--fake_dir", required=True, help="folder of generated images")
    p.add_argument("--ref_dir", required=True, help="folder of reference images")
    p.add_argument("--vgg_path", default=None, help="local VGG16 weights (never downloaded)")
    p.add_argument("--k", type=int, default=3, help="k of the k-NN manifold estimate")
    p.add_argument("--device", default=None)
    return p


run_eval_prec_recall = not_built("eval_prec_recall", "precision/recall evaluation")


def main(argv: list[str] | None = None) -> None:
    run_eval_prec_recall(parse_args().parse_args(argv))


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
