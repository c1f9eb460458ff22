"""generate_train_data: not built yet in this version (see the README for the plan)."""

from __future__ import annotations

import argparse
import sys

from entrypoints.common import not_built, run_cli


def parse_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate_train_data", description=__doc__)
    p.add_argument("--model", default="demo")
    return p


run = not_built("generate_train_data", "planned")


def main(argv: list[str] | None = None) -> None:
    run(parse_args().parse_args(argv))


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
