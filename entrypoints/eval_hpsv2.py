"""eval_hpsv2: Human Preference Score v2.1 of generated images against their prompts."""

from __future__ import annotations

import argparse
import sys

from entrypoints.common import not_built, run_cli


def parse_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_hpsv2", description=__doc__)
    p.add_argument("--image_path", required=True, help="folder of generated images (prompt_{idx}.png)")
    p.add_argument("--prompt_path", required=True, help="prompts (global_statistics JSON or a prompt file)")
    p.add_argument("--hps_path", default=None, help="local HPSv2.1 checkpoint (never downloaded)")
    p.add_argument("--device", default=None)
    return p


run_eval_hpsv2 = not_built("eval_hpsv2", "HPSv2 evaluation")


def main(argv: list[str] | None = None) -> None:
    run_eval_hpsv2(parse_args().parse_args(argv))


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
