"""Checks of command-line values before any work starts: every number finite and in range, flags consistent.

Every failure raises :class:`~entrypoints.common.UserError` naming the flag, the value and the valid range, so
``run_cli`` prints one line and exits with code 2 before a model is loaded or an output is written. The entry
points call these with a line or two; the checks of loaded parts against each other (drafter, neighbour
table, VQ against the target) live with the loaders (``models/registry.py``, ``models/drafters/``).

``--cfg`` below 1 follows LlamaGen: its samplers apply classifier-free guidance only when ``cfg_scale > 1``, so
any scale in [0, 1] means *no guidance* (the conditional stream alone) and is stored as 1.0; a negative scale
is rejected (it would steer away from the prompt, which LlamaGen never does).
"""

from __future__ import annotations

import argparse
import math

from entrypoints.common import UserError

MAX_SEED = 2**63 - 2**32  # seeds are offset by the image index; keep seed + idx inside torch's int64 range


def check_number(flag: str, value: float | int | None, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False, hint: str = "") -> None:
    """``value`` (skipped when None) must be finite and inside [lo, hi] (open ends where asked)."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{flag} {value}: must be a finite number{hint and '; ' + hint}")
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if bad_lo or bad_hi:
        left = "-inf" if lo is None else f"{lo:g}"
        right = "inf" if hi is None else f"{hi:g}"
        interval = ("(" if lo_open or lo is None else "[") + f"{left}, {right}" + (")" if hi_open or hi is None else "]")
        raise UserError(f"{flag} {value}: must be in {interval}{hint and '; ' + hint}")


def check_counts(args: argparse.Namespace, names: dict[str, int]) -> None:
    """Integer flags with a lower bound: ``{"num_images": 1, "num_workers": 0}``; missing / None are skipped."""
    for name, lo in names.items():
        check_number(f"--{name}", getattr(args, name, None), lo=lo)


def check_seed(flag: str, value: int | None) -> None:
    check_number(flag, value, lo=0, hi=MAX_SEED)


def validate_sampling_args(args: argparse.Namespace) -> None:
    """--temperature, --top_k, --top_p, --cfg (None = the model's default, always valid)."""
    check_number("--temperature", getattr(args, "temperature", None), lo=0, hint="0 = greedy")
    check_number("--top_k", getattr(args, "top_k", None), lo=0, hint="0 = off")
    check_number("--top_p", getattr(args, "top_p", None), lo=0, hi=1, lo_open=True, hint="1 = off")
    cfg = getattr(args, "cfg", None)
    check_number("--cfg", cfg, lo=0, hint="1 = no guidance; as in LlamaGen, scales <= 1 mean no guidance")
    if cfg is not None and cfg < 1:
        print(f"note: --cfg {cfg} <= 1 means no classifier-free guidance (as in LlamaGen); using 1.0")
        args.cfg = 1.0
    if hasattr(args, "random_seed"):
        check_seed("--random_seed", args.random_seed)


def validate_lantern(k: int | None, delta: float | None = None, tvd: float | None = None,
                     lam: float | None = None, where: str = "") -> None:
    """LANTERN's k, the original shared δ/λ flag (≤ 1: δ, > 1: λ), and the unambiguous δ and λ."""
    check_number(f"{where}--lantern_k", k, lo=1)
    check_number(f"{where}--lantern_delta", delta, lo=0,
                 hint="<= 1 is LANTERN's TVD budget delta, > 1 is LANTERN++'s lambda")
    check_number(f"{where}--lantern_tvd", tvd, lo=0, hi=1)
    check_number(f"{where}--lantern_lambda", lam, lo=1)


def validate_gsd(rank_window: int | None, prob_gap: float | None, dist: float | None, where: str = "--gsd_",
                 names: tuple[str, str, str] = ("rank_window", "prob_gap", "dist")) -> None:
    """GSD's group parameters (models/drafters/grouped.py): rank window >= 0 (0 = the exact test), probability
    gap >= 0, squared embedding distance >= 0."""
    check_number(f"{where}{names[0]}", rank_window, lo=0, hint="0 = the exact speculative test")
    check_number(f"{where}{names[1]}", prob_gap, lo=0, hi=1)
    check_number(f"{where}{names[2]}", dist, lo=0)


def validate_tree_args(args: argparse.Namespace) -> None:
    """Dynamic-tree sizes and the drafter's top-k."""
    check_number("--top_k_draft", getattr(args, "top_k_draft", None), lo=1)
    check_number("--depth", getattr(args, "depth", None), lo=1)
    check_number("--total_token", getattr(args, "total_token", None), lo=2, hint="the root plus at least one draft")
    check_number("--drafter_top_k", getattr(args, "drafter_top_k", None), lo=1)


def validate_generate_args(args: argparse.Namespace) -> None:
    """Everything ``generate_images`` reads, after :func:`resolve_defaults` filled the model's defaults."""
    validate_sampling_args(args)
    validate_tree_args(args)
    check_counts(args, {"num_images": 1, "image_size": 1, "batch_size": 1})  # batch_size: where the task has it
    validate_lantern(args.lantern_k, args.lantern_delta, args.lantern_tvd, args.lantern_lambda)
    if args.lantern and args.model_type == "base":
        raise UserError("--lantern (relaxed acceptance) needs speculative decoding: add --model_type eagle")
    if args.model_type == "eagle" and (args.static_tree or args.eagle_version == 1):
        from models.drafters.choices import get_tree_choices

        try:
            get_tree_choices(args.tree_choices)
        except ValueError as e:
            raise UserError(f"--tree_choices: {e}") from None


def validate_benchmark_setting(setting: dict) -> None:
    """One parsed ``benchmark --settings`` entry (keys k, delta, lam, top_k_draft, depth, total_token)."""
    where = f"setting {setting['label']!r}: "
    validate_lantern(setting.get("k"), where=where, tvd=setting.get("delta"), lam=setting.get("lam"))
    for key, lo in (("top_k_draft", 1), ("depth", 1), ("total_token", 2)):
        check_number(f"{where}{key}", setting.get(key), lo=lo)


def parse_number(text: str, kind: type, what: str) -> float | int:
    """``int`` / ``float`` of a user's string with an error naming ``what``."""
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"{what}: {text!r} is not {'an integer' if kind is int else 'a number'}") from None


COUNT_FLAGS = {"batch_size": 1, "shard_size": 1, "num_samples": 1, "num_prompts": 1, "samples_per_prompt": 1,
               "samples_per_class": 1, "num_workers": 0, "image_size": 1, "chunk_size": 1, "top_k": 0}


def validate_common_args(args: argparse.Namespace) -> None:
    """The flags the data-pipeline tasks share (counts, sampling, seeds, the output folder), then --threads.

    Each check runs only for the flags the task has, so one call fits extract_code, self_distill and
    generate_train_data."""
    from entrypoints.common import apply_threads
    from entrypoints.outputs import check_output_dir

    check_counts(args, COUNT_FLAGS)
    validate_sampling_args(args)
    if getattr(args, "shuffle_seed", None) is not None:
        check_seed("--shuffle_seed", args.shuffle_seed)
    if getattr(args, "output_dir", None):
        check_output_dir(args.output_dir)
    apply_threads(getattr(args, "threads", None))


def validate_train_args(args: argparse.Namespace) -> None:
    """Every number ``train_drafter`` reads (learning rate, sizes, fractions, noise, seeds)."""
    check_number("--lr", args.lr, lo=0, lo_open=True)
    check_counts(args, {"bs": 1, "gradient_accumulation_steps": 1, "num_epochs": 1, "max_steps": 1, "warmup_steps": 0,
                        "log_every": 1, "eval_freq": 1, "save_every": 1, "stop_after_steps": 1, "num_workers": 0})
    check_number("--warmup_steps_ratio", args.warmup_steps_ratio, lo=0, hi=1)
    check_number("--weight_decay", args.weight_decay, lo=0)
    check_number("--grad_clip", args.grad_clip, lo=0, hint="0 = off")
    check_number("--p_w", args.p_w, lo=0)
    check_number("--uncond_prob", args.uncond_prob, lo=0, hi=1)
    check_number("--noise_std", args.noise_std, lo=0)
    check_number("--mean", args.mean)
    check_number("--eval_fraction", args.eval_fraction, lo=0, hi=1, hi_open=True)
    check_number("--train_data_ratio", args.train_data_ratio, lo=0, hi=1, lo_open=True)
    check_seed("--seed", args.seed)
