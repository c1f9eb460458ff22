"""Helpers shared by the entry points: devices, precision, seeds, prompt sets, clean error reporting."""

from __future__ import annotations

import argparse
import csv
import errno
import json
import os
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from models.registry import REPO_ROOT

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The original's named prompt sets (file names as in its data/prompts/), read from --prompt_dir.
PROMPT_SETS: dict[str, tuple[str, str]] = {
    "PartiPrompts": ("PartiPrompts.tsv", "tsv"),
    "SJDPrompts": ("SJDPrompts.tsv", "tsv"),
    "MSCOCO2017Val": ("captions_val2017_longest.json", "json"),
    "MSCOCO2014Val": ("captions_val_2014.json", "json"),
    "MSCOCO2017Train": ("captions_train2017_extracted.json", "json"),
}


def add_device_args(parser: argparse.ArgumentParser, precision_default: str | None = None) -> None:
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--precision", default=precision_default, choices=sorted(PRECISIONS),
                        help="weights/activations dtype (default: bf16 on CUDA, fp32 on CPU)")
    add_threads_arg(parser)


def default_cpu_threads() -> int:
    """Intra-op threads when neither --threads nor $OMP_NUM_THREADS says otherwise: half the usable cores, at
    least 1, at most 4. Measured on the demo on 2 cores (README, "CPU threads"): 2 threads gain at most 9 % over
    1 when a core is free, and are 10-16x slower than 1 when other processes share the cores (torch's default
    is one thread per core); half leaves room for them."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores // 2))


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op CPU threads (default: $OMP_NUM_THREADS if set, else half the cores, "
                        "1..4; see the README's 'CPU threads')")


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count: ``--threads``, else ``$OMP_NUM_THREADS``, else the default."""
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads {threads}: must be >= 1")
        n = threads
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        n = int(os.environ["OMP_NUM_THREADS"])
    else:
        n = default_cpu_threads()
    torch.set_num_threads(n)
    return n


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def resolve_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    if precision is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return PRECISIONS[precision]


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class UserError(Exception):
    """A mistake in the user's input: reported as one clear line, no traceback."""


def parse_slice(text: str | None) -> tuple[int, int | None]:
    """'start-end' -> (start, end); None -> (0, None)."""
    if text is None:
        return 0, None
    m = re.fullmatch(r"(\d+)-(\d+)", text.strip())
    if not m:
        raise UserError(f"--slice {text!r}: expected 'start-end', e.g. 0-100")
    start, end = int(m.group(1)), int(m.group(2))
    if start >= end:
        raise UserError(f"--slice {text!r}: start must be smaller than end")
    return start, end


def read_prompt_file(path: Path) -> list[str]:
    """A .tsv with a 'Prompt' column, a .json list (strings or {'caption': ...}), or a text file (one per line)."""
    try:
        if path.suffix == ".tsv":
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f, delimiter="\t"))
            if rows and "Prompt" not in rows[0]:
                raise UserError(f"{path}: TSV prompt files need a 'Prompt' column")
            prompts = [r["Prompt"] for r in rows]
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
            if not isinstance(data, list):
                raise UserError(f"{path}: a JSON prompt file must hold a list (of strings or {{'caption': ...}})")
            prompts = [d["caption"] if isinstance(d, dict) else str(d) for d in data]
        else:
            prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError) as e:
        raise UserError(f"{path}: not a readable prompt file ({type(e).__name__}: {e}); expected .txt one prompt per "
                        f"line, .tsv with a Prompt column or a .json list") from None
    if not prompts:
        raise UserError(f"{path}: the prompt file holds no prompts")
    return prompts


PROMPT_FILE_SUFFIXES = (".txt", ".tsv", ".json", ".jsonl", ".csv")


def looks_like_a_path(text: str) -> bool:
    """A ``--prompt`` that names a file rather than a prompt: a prompt-file suffix, or a path separator in a
    single word (``runs/prompts``), so a mistyped file name is an error instead of a literal prompt."""
    t = text.strip()
    return t.lower().endswith(PROMPT_FILE_SUFFIXES) or (os.sep in t and not any(c.isspace() for c in t))


def load_prompts(prompt: str, prompt_dir: str | None, num_images: int | None, slice_: str | None) -> list[tuple[int, str]]:
    """Resolve ``--prompt`` -> [(global index, prompt)].

    ``prompt`` is a named set (read from ``prompt_dir``), a path to a prompt file, or a literal prompt
    (repeated ``num_images`` times). ``--slice start-end`` selects a range of the list and the first
    ``num_images`` of that range are used, in order (the original samples them at random); indices stay
    global so the outputs of several slices never collide.
    """
    directory = Path(prompt_dir) if prompt_dir else REPO_ROOT / "data" / "prompts"
    if prompt in PROMPT_SETS:
        fname, _ = PROMPT_SETS[prompt]
        path = directory / fname
        if not path.exists():
            raise UserError(f"prompt set {prompt!r} needs {path}; pass --prompt_dir with the folder that holds {fname}")
        prompts = read_prompt_file(path)
    elif Path(prompt).is_file():
        prompts = read_prompt_file(Path(prompt))
    elif Path(prompt).is_dir():
        raise UserError(f"--prompt {prompt} is a folder; give a prompt file, a named set or a literal prompt")
    elif looks_like_a_path(prompt):
        raise UserError(f"--prompt {prompt}: file not found (a literal prompt cannot look like a file name; named "
                        f"sets: {', '.join(PROMPT_SETS)})")
    else:
        prompts = [prompt] * (num_images or 1)
    start, end = parse_slice(slice_)
    indexed = list(enumerate(prompts))[start:end]
    if num_images is not None:
        indexed = indexed[:num_images]
    if not indexed:
        raise UserError(f"no prompts selected (set has {len(prompts)}, slice {slice_!r}, num_images {num_images})")
    return indexed


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run an entry point, turning user mistakes (missing files, bad values) into one-line errors, exit code 2."""
    from models.checkpoints import CheckpointError

    try:
        main(argv)
    except (UserError, CheckpointError, NotImplementedError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # output folder is a file, not writable, disk full ...: the user's machine, not a bug
        hint = " (disk full: free space or choose another output folder)" if e.errno == errno.ENOSPC else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        message = str(e) or "finished outputs are kept; rerun the same command (without --overwrite) to resume"
        print(f"interrupted; {message}", file=sys.stderr)
        sys.exit(130)


def not_built(task: str, what: str) -> Callable[[argparse.Namespace], None]:
    """Runner for a task that this version does not implement yet: says so and exits non-zero."""

    def run(args: argparse.Namespace) -> None:
        print(f"error: task '{task}' is not built yet in this version ({what}).", file=sys.stderr)
        sys.exit(3)

    return run
