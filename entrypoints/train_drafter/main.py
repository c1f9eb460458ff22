"""train_drafter: train an EAGLE drafter on a target's hidden states (``generate_train_data`` output).

Loss (EAGLE / LANTERN, SPEC §6), averaged over the image positions p = T−1 .. T+N−3 of every sample::

    SmoothL1(f̂_{p+1}, f_{p+1}) + p_w · soft-CE(lm_head(f̂_{p+1}), softmax(lm_head(f_{p+1})))

with f = the target's last hidden states, f̂ = the drafter's prediction from (f_p + noise, x_{p+1}), lm_head =
the target's frozen output layer. The drafter's token embedding is copied from the target and frozen.
AdamW (betas 0.9, 0.95), linear warm-up then cosine decay to 0 (or constant after warm-up), gradient clipping
by value as in EAGLE (or by norm), uniform noise on the input features, a fraction of samples on the uncond
(CFG) stream.

Runs alone (``python -m entrypoints.train_drafter.main``, ``python main.py train_drafter``) or under
``accelerate launch -m entrypoints.train_drafter.main`` on several devices; ``--bs`` is per process, so one
optimizer step sees ``bs × processes × gradient_accumulation_steps`` samples. Gradient accumulation is real:
the optimizer steps every k micro-batches with the loss averaged over the k (the original stepped every batch).
Without a GPU the processes run on CPU with gloo (``accelerate launch --multi_gpu --num_processes 2``).

Outputs in ``--save_dir``: ``state_{epoch}/`` after every ``--save_every`` epochs (and ``state_step{step}/``
when a run stops mid-epoch) holding ``config.json`` + ``model.safetensors`` (load with
``generate_images --model_type eagle --drafter_path <save_dir>/state_{epoch}``) and ``training_state.pt``
(optimizer, scheduler, position, RNG) for ``--resume``; ``latest`` names the newest state; ``metrics.jsonl``
has one JSON line per log (train loss, lr) and per evaluation (held-out loss, top-1/2/3 agreement with the
target's argmax).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from entrypoints.common import PRECISIONS, UserError, add_threads_arg, apply_threads, run_cli, set_seed
from entrypoints.train_drafter.data_utils import EpochShuffleSampler, feature_noise, make_drafter_batch, split_indices
from entrypoints.validation import validate_train_args
from models.checkpoints import CheckpointError
from models.distributed import check_process_count, needs_cpu_flag
from models.drafters.cnets import INPUT_TYPES, DrafterConfig, EagleDrafter, load_drafter, save_drafter
from models.registry import MODELS, REPO_ROOT
from models.train_data import DrafterDataInfo, DrafterDataset, read_data_info

STATE_FORMAT = "lantern-drafter-train-state/1"
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
TOPK = (1, 2, 3)


def parse_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_drafter",
        description="Train an EAGLE drafter for a target model on its hidden states (see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("paths")
    g.add_argument("--model", default="demo", choices=list(MODELS), help="target model name (registry)")
    g.add_argument("--base_path", default=None, help="target checkpoint (file or folder); default: the ckpts/ layout")
    g.add_argument("--config_path", default=None,
                   help="drafter config JSON (LANTERN's data/configs/*.json or ours); default: derived from the "
                   "target (its hidden size, FFN size, heads and vocabulary, one layer)")
    g.add_argument("--data_dir", default=None, help="generate_train_data output; default data/drafter_train_data/<model>")
    g.add_argument("--save_dir", default=None, help="checkpoints and metrics; default ckpts/<model>/trained_drafters/train")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--bs", type=int, default=4, help="micro-batch size per process")
    g.add_argument("--gradient_accumulation_steps", "--gradient_accumlation_steps", dest="gradient_accumulation_steps",
                   type=int, default=1, help="micro-batches per optimizer step (the misspelt original name works too)")
    g.add_argument("--num_epochs", type=int, default=20)
    g.add_argument("--max_steps", type=int, default=None,
                   help="stop after this many optimizer steps; also the length of the lr schedule")
    g.add_argument("--warmup_steps", type=int, default=None, help="linear warm-up steps (default: warmup_steps_ratio)")
    g.add_argument("--warmup_steps_ratio", type=float, default=0.03, help="warm-up as a fraction of all steps")
    g.add_argument("--lr_schedule", default="cosine", choices=["cosine", "constant"], help="after warm-up")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (torch's default, as the original)")
    g.add_argument("--grad_clip", type=float, default=0.5, help="0 = off")
    g.add_argument("--grad_clip_mode", default="value", choices=["value", "norm"],
                   help="clip each gradient entry to ±grad_clip (EAGLE/LANTERN) or the global norm")
    g.add_argument("--p_w", type=float, default=0.1, help="weight of the soft cross-entropy term")
    g.add_argument("--uncond_prob", type=float, default=0.1, help="fraction of samples that use the uncond stream")
    g.add_argument("--data_noise", default="uniform", choices=["uniform", "gaussian", "none"],
                   help="noise added to the input features")
    g.add_argument("--noise_std", "--std", dest="noise_std", type=float, default=0.2,
                   help="uniform: U(-std, std); gaussian: standard deviation")
    g.add_argument("--mean", type=float, default=0.0, help="gaussian noise mean")

    g = p.add_argument_group("evaluation, checkpoints, run")
    g.add_argument("--eval_fraction", type=float, default=0.05, help="held-out fraction of the samples")
    g.add_argument("--train_data_ratio", type=float, default=None, help="original name: 1 - eval_fraction")
    g.add_argument("--eval_freq", type=int, default=1, help="evaluate every this many epochs (and at the end)")
    g.add_argument("--save_every", "--save_freq", dest="save_every", type=int, default=1,
                   help="save a state every this many epochs (and at the end)")
    g.add_argument("--resume", action="store_true", help="continue from the newest state in --save_dir")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in a --save_dir that holds one (its states and metrics are deleted)")
    g.add_argument("--stop_after_steps", type=int, default=None,
                   help="end this run (with a checkpoint) after this many optimizer steps, without changing the lr "
                   "schedule; continue later with --resume (for time-limited jobs)")
    g.add_argument("--log_every", type=int, default=10, help="log the training loss every this many optimizer steps")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--precision", default=None, choices=sorted(PRECISIONS),
                   help="mixed precision of the drafter's forward (master weights stay fp32); "
                   "default: accelerate's setting (fp32 unless launched with --mixed_precision)")
    g.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")
    add_threads_arg(g)
    g.add_argument("--dump_rank_weights", action="store_true",
                   help="debug: every process writes its final weights to save_dir/rank_weights/rank{i}.safetensors")
    return p


# ---------------------------------------------------------------------------------------------------
# target pieces and drafter config


def load_target_parts(model: str, base_path: str | None, info: DrafterDataInfo):
    """The target's config, frozen lm_head weight (V, H) and token embedding (V, H), in fp32 on CPU.

    The whole target is loaded once (to read every checkpoint format the same way) and dropped right after.
    """
    from models.base_models.llamagen.loading import load_llamagen_gpt
    from models.registry import get_spec, resolve_path

    spec = get_spec(model)
    path = resolve_path(spec, "model", base_path)
    if spec.family == "chameleon":  # read only the two (V, H) tables from the mmapped shards, not 7 B weights
        from models.base_models.chameleon.loading import load_chameleon_head_and_embedding

        return load_chameleon_head_and_embedding(path)
    # an original LlamaGen .pt stores no grid size: take it from the data, which the target produced
    block_size = info.num_image_tokens if path.is_file() else None
    target = load_llamagen_gpt(path, "cpu", torch.float32, block_size=block_size)
    cfg = target.config
    lm_head = target.lm_head.weight.detach().clone()
    embed = target.tok_embeddings.weight.detach().clone()
    del target
    return cfg, lm_head, embed


def default_drafter_config(target_cfg) -> DrafterConfig:
    """One Llama layer of the target's width (LANTERN's drafter = the target's config with 1 layer)."""
    if target_cfg.model_type == "chameleon":  # LANTERN's Anole drafter: one Chameleon layer (qk-norm, 1-D RoPE)
        return DrafterConfig(
            hidden_size=target_cfg.hidden_size, intermediate_size=target_cfg.intermediate_size,
            num_attention_heads=target_cfg.num_attention_heads, num_key_value_heads=target_cfg.num_key_value_heads,
            vocab_size=target_cfg.vocab_size, num_hidden_layers=1, rms_norm_eps=target_cfg.rms_norm_eps,
            rope_base=target_cfg.rope_theta, block_size=0, cls_token_num=0, family="chameleon")
    return DrafterConfig(
        hidden_size=target_cfg.dim, intermediate_size=target_cfg.ffn_hidden,
        num_attention_heads=target_cfg.n_head, num_key_value_heads=target_cfg.n_kv_head,
        vocab_size=target_cfg.vocab_size, num_hidden_layers=1, rms_norm_eps=1e-6, rope_base=target_cfg.rope_base,
        block_size=target_cfg.block_size, cls_token_num=target_cfg.cls_token_num,
    )


def read_drafter_config(path: str | Path, target_cfg) -> DrafterConfig:
    """A drafter config file (LANTERN's LlamaConfig + ``input_type``, or ours); the layout comes from the
    target when the file does not state it (as :func:`load_drafter` does)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config_path {path}: file not found (e.g. data/configs/llamagen_t2i_config.json)")
    raw = json.loads(path.read_text())
    if target_cfg.model_type == "chameleon" and raw.get("model_type") != "chameleon":
        raw = {**raw, "family": "chameleon", "block_size": 0, "cls_token_num": 0}
    if "block_size" not in raw and raw.get("input_type") not in INPUT_TYPES and raw.get("model_type") != "chameleon":
        raw = {**raw, "block_size": target_cfg.block_size, "cls_token_num": target_cfg.cls_token_num}
    return DrafterConfig.from_dict(raw)


def check_layout(cfg: DrafterConfig, target_cfg, info: DrafterDataInfo) -> None:
    """Drafter, target and data must agree on widths and on the sequence layout (RoPE rows depend on it)."""
    problems = []
    width = target_cfg.hidden_size if target_cfg.model_type == "chameleon" else target_cfg.dim
    if (cfg.family == "chameleon") != (target_cfg.model_type == "chameleon"):
        problems.append(f"drafter family {cfg.family!r} does not fit a {target_cfg.model_type} target")
    if cfg.hidden_size != width:
        problems.append(f"drafter hidden_size {cfg.hidden_size} != target dim {width}")
    if cfg.vocab_size != target_cfg.vocab_size:
        problems.append(f"drafter vocab_size {cfg.vocab_size} != target vocab {target_cfg.vocab_size}")
    if info.hidden_size != width:
        problems.append(f"data hidden_size {info.hidden_size} != target dim {width}")
    if info.vocab_size is not None and info.vocab_size != target_cfg.vocab_size:
        problems.append(f"data vocab_size {info.vocab_size} != target vocab {target_cfg.vocab_size}")
    # (a Chameleon drafter's 1-D RoPE does not depend on the layout)
    if cfg.family != "chameleon" and (cfg.cls_token_num, cfg.block_size) != (info.prefix_len, info.num_image_tokens):
        problems.append(f"drafter layout (condition {cfg.cls_token_num}, image tokens {cfg.block_size}) != data's "
                        f"({info.prefix_len}, {info.num_image_tokens})")
    if problems:
        raise UserError("drafter / target / data mismatch: " + "; ".join(problems))


def build_drafter(args, save_dir: Path, target_cfg, embed: torch.Tensor, info: DrafterDataInfo, say=print):
    """-> (drafter, training state or None, state folder or None): the newest checkpoint with ``--resume``,
    else a new drafter (``--config_path`` or the target-derived config) whose embedding is the target's."""
    resume_dir = latest_checkpoint(save_dir) if args.resume and save_dir.exists() else None
    if args.resume and resume_dir is None:
        say(f"--resume: no checkpoint in {save_dir}; starting a new run")
    if resume_dir is not None:
        state = load_training_state(resume_dir / "training_state.pt")
        if state.get("format") != STATE_FORMAT:
            raise UserError(f"{resume_dir}/training_state.pt: unknown format {state.get('format')!r}")
        model = load_drafter(resume_dir, "cpu", torch.float32, target_cfg)
        check_layout(model.config, target_cfg, info)
        return model, state, resume_dir
    cfg = read_drafter_config(args.config_path, target_cfg) if args.config_path else default_drafter_config(target_cfg)
    check_layout(cfg, target_cfg, info)
    model = EagleDrafter(cfg)
    model.embed_tokens.weight.data.copy_(embed)
    return model, None, None


# ---------------------------------------------------------------------------------------------------
# loss and metrics


def drafter_losses(pred: torch.Tensor, target: torch.Tensor, lm_head: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample loss terms at the loss positions, computed in fp32.

    pred, target: (B, P, H) predicted and true next features; lm_head: (V, H). Returns ``smooth_l1`` and
    ``soft_ce`` (B,) (means over positions; SmoothL1 also over H, as EAGLE's) and the logits (B, P, V).
    """
    pred, target, w = pred.float(), target.float(), lm_head.float()
    smooth_l1 = F.smooth_l1_loss(pred, target, reduction="none").mean(dim=(1, 2))
    pred_logits = F.linear(pred, w)
    with torch.no_grad():
        target_logits = F.linear(target, w)
        target_probs = target_logits.softmax(-1)
    soft_ce = -(target_probs * pred_logits.log_softmax(-1)).sum(-1).mean(1)
    return {"smooth_l1": smooth_l1, "soft_ce": soft_ce, "pred_logits": pred_logits, "target_logits": target_logits}


def topk_agreement(pred_logits: torch.Tensor, target_logits: torch.Tensor, ks=TOPK) -> torch.Tensor:
    """(B, len(ks)): per sample, the fraction of positions whose target argmax is in the drafter's top-k."""
    target_tok = target_logits.argmax(-1, keepdim=True)
    top = pred_logits.topk(max(ks), dim=-1).indices
    return torch.stack([(top[..., :k] == target_tok).any(-1).float().mean(1) for k in ks], dim=1)


class WarmupSchedule:
    """LR factor for optimizer step s (0-based): linear warm-up (s+1)/W, then cosine to 0 at ``total`` or 1."""

    def __init__(self, warmup: int, total: int, kind: str = "cosine"):
        self.warmup, self.total, self.kind = warmup, total, kind

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------------
# checkpoints


def rng_state() -> dict:
    """Python, NumPy and torch RNG states in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(save_dir: Path, name: str, model: EagleDrafter, training_state: dict) -> Path:
    """Write ``save_dir/name`` (drafter folder + training_state.pt) via a temporary folder, then point
    ``latest`` at it; an interrupted save never leaves a half-written state behind."""
    final, tmp, old = save_dir / name, save_dir / f".tmp_{name}", save_dir / f".old_{name}"
    for d in (tmp, old):
        if d.exists():
            shutil.rmtree(d)
    save_drafter(model, tmp)
    torch.save(training_state, tmp / "training_state.pt")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    _write_text_atomic(save_dir / "latest", name + "\n")
    return final


def load_training_state(path: Path) -> dict:
    """``training_state.pt`` of a checkpoint; an empty, truncated or foreign file names itself."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors of any kind: name the file
        raise CheckpointError(f"{path} is not a readable training state ({type(e).__name__}: {e}); delete its "
                              f"folder to resume from an older state, or start over with --overwrite") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path}: not a train_drafter training state (format {STATE_FORMAT})")
    return state


RUN_FILES = ("latest", "metrics.jsonl", "train_args.json")


def existing_run(save_dir: Path) -> list[str]:
    """The checkpoints of an earlier run in ``save_dir`` (``latest`` and ``state_*``); metrics without a
    checkpoint (a run stopped before its first save) belong to no run and are replaced by a new one."""
    if not save_dir.is_dir():
        return []
    found = ["latest"] if (save_dir / "latest").exists() else []
    return found + sorted(d.name for d in save_dir.glob("state_*") if d.is_dir())


def clear_run(save_dir: Path) -> None:
    """--overwrite: remove an earlier run's states and metrics (nothing else in the folder)."""
    for name in [*existing_run(save_dir), *(n for n in RUN_FILES[1:] if (save_dir / n).exists())]:
        target = save_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    for extra in [*save_dir.glob(".tmp_state_*"), *save_dir.glob(".old_state_*"), save_dir / "rank_weights"]:
        if extra.exists():
            shutil.rmtree(extra)


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: the same flags without --overwrite, plus --resume."""
    flags = [a for a in argv if a != "--overwrite"]
    if "--resume" not in flags:
        flags.append("--resume")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    head = (f"accelerate launch --num_processes {world} -m entrypoints.train_drafter.main" if world > 1
            else "python main.py train_drafter")
    return " ".join([head, *flags])


def truncate_metrics(path: Path, records: int | None, step: int) -> None:
    """Keep the first ``records`` lines of ``metrics.jsonl`` (what the resumed state had logged), so records
    written after that checkpoint by an interrupted run are not duplicated. Older states without the count:
    keep the records up to ``step``."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    if records is not None:
        kept = lines[:records]
    else:
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line cut by a kill
    if len(kept) != len(lines):
        _write_text_atomic(path, "".join(line + "\n" for line in kept))


def check_resume_compatible(state: dict, micro_per_epoch: int, schedule_steps: int, warmup: int, lr_schedule: str,
                            resume_dir: Path) -> None:
    """Refuse a --resume whose changed settings would not continue the saved run correctly, with the reason."""
    saved_micro = state.get("micro_per_epoch")
    if state.get("batches_done") and saved_micro is not None and saved_micro != micro_per_epoch:
        raise UserError(
            f"--resume: {resume_dir} stopped inside epoch {state['epoch'] + 1} after {state['batches_done']} of "
            f"{saved_micro} micro-batches per process; with the new --bs / process count an epoch has "
            f"{micro_per_epoch}, so the position in the epoch would mean other samples. Resume with the saved "
            f"--bs {state.get('args', {}).get('bs')} and the same number of processes")
    saved = (state.get("schedule_steps"), state.get("warmup_steps"))
    if saved[0] is not None and saved != (schedule_steps, warmup):
        past_warmup = state["step"] >= max(warmup, saved[1] or 0)
        if lr_schedule != "constant" or not past_warmup:
            raise UserError(
                f"--resume: the learning-rate schedule of {resume_dir} was planned for {saved[0]} steps with "
                f"{saved[1]} warm-up steps; the new flags (--num_epochs / --max_steps / --bs / "
                f"--gradient_accumulation_steps / warm-up) plan {schedule_steps} and {warmup}, so the lr would jump. "
                f"Resume with the saved settings, or use --lr_schedule constant past the warm-up, or a new --save_dir")


def latest_checkpoint(save_dir: Path) -> Path | None:
    """The state folder named by ``save_dir/latest`` (or the highest-numbered ``state_*``), if any."""
    marker = save_dir / "latest"
    if marker.exists():
        d = save_dir / marker.read_text().strip()
        if (d / "training_state.pt").exists():
            return d
    states = [d for d in save_dir.glob("state_*") if (d / "training_state.pt").exists()]
    if not states:
        return None
    return max(states, key=lambda d: load_training_state(d / "training_state.pt")["step"])


# ---------------------------------------------------------------------------------------------------
# training


class InterruptFlag:
    """SIGINT during training: finish the current optimizer step, save a checkpoint, then stop.

    The first Ctrl-C only sets a flag (a second one interrupts at once, without saving). With several
    processes the flag is all-reduced at every optimizer step, so all of them stop after the same step
    (stopping one alone would leave the others waiting in an all-reduce)."""

    def __init__(self, num_processes: int, device: torch.device | str = "cpu"):
        # device: where the all-reduced flag lives (the process's own device; NCCL reduces device tensors only)
        self.num_processes, self.device = num_processes, torch.device(device)
        self.seen, self._flag, self._previous = False, False, None
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self._flag = True
        print("\ninterrupt: saving a checkpoint after this step (Ctrl-C again quits without saving)", file=sys.stderr)
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)

    def local_only_requested(self) -> bool:
        """Single process: stop at the next micro-batch."""
        self.seen |= self._flag and self.num_processes == 1
        return self._flag and self.num_processes == 1

    def requested(self) -> bool:
        """At an optimizer step boundary: did any process get SIGINT?"""
        flag = self._flag
        if self.num_processes > 1:
            import torch.distributed as dist

            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(t)
            flag = bool(t.item() > 0)
        self.seen |= flag
        return flag

    def restore(self) -> None:
        if self._previous is not None:
            try:
                signal.signal(signal.SIGINT, self._previous)
            except ValueError:
                pass
            self._previous = None


def _accelerator(args):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=needs_cpu_flag("cpu" if args.cpu else None),
                              mixed_precision=MIXED_PRECISION[args.precision] if args.precision else None,
                              step_scheduler_with_optimizer=False)
    check_process_count(accelerator.num_processes)
    return accelerator


@torch.no_grad()
def evaluate(accelerator, model, loader, lm_head: torch.Tensor, p_w: float) -> dict[str, float]:
    """Held-out loss and top-1/2/3 agreement (cond stream, no noise), averaged over samples on all processes."""
    model.eval()
    rows = []
    for batch in loader:
        db = make_drafter_batch(batch)
        pred = model(db.inputs, db.input_ids, rope_pos=db.rope_pos, attn_mask=db.attn_mask)
        terms = drafter_losses(pred[:, db.loss_start :], db.loss_targets, lm_head)
        agree = topk_agreement(terms["pred_logits"], terms["target_logits"])
        loss = terms["smooth_l1"] + p_w * terms["soft_ce"]
        rows.append(accelerator.gather_for_metrics(torch.cat(
            [torch.stack([loss, terms["smooth_l1"], terms["soft_ce"]], 1), agree], 1)))
    model.train()
    m = torch.cat(rows).mean(0).tolist()
    out = {"loss": m[0], "smooth_l1": m[1], "soft_ce": m[2]}
    out.update({f"top{k}": m[3 + i] for i, k in enumerate(TOPK)})
    out["num_samples"] = int(sum(r.shape[0] for r in rows))
    return out


def train(args: argparse.Namespace) -> dict:
    """Run training as configured by the parsed flags; returns a summary (final step, state folder, metrics)."""
    from tqdm import tqdm

    if args.train_data_ratio is not None:
        args.eval_fraction = 1.0 - args.train_data_ratio
    validate_train_args(args)
    apply_threads(args.threads)
    save_dir = Path(args.save_dir) if args.save_dir else REPO_ROOT / "ckpts" / args.model / "trained_drafters" / "train"
    from entrypoints.outputs import check_output_dir

    check_output_dir(save_dir, "--save_dir")
    if args.resume and args.overwrite:
        raise UserError("give --resume (continue the run in --save_dir) or --overwrite (start it again), not both")
    earlier = existing_run(save_dir)
    if earlier and not (args.resume or args.overwrite):
        raise UserError(f"--save_dir {save_dir} already holds a run ({', '.join(earlier[:4])}); pass --resume to "
                        f"continue it, --overwrite to start again, or choose another --save_dir")
    accelerator = _accelerator(args)
    main_proc = accelerator.is_main_process
    data_dir = Path(args.data_dir) if args.data_dir else REPO_ROOT / "data" / "drafter_train_data" / args.model
    set_seed(args.seed)  # identical initial weights on every process

    info = read_data_info(data_dir)
    target_cfg, lm_head, embed = load_target_parts(args.model, args.base_path, info)
    model, state, resume_dir = build_drafter(args, save_dir, target_cfg, embed, info, accelerator.print)
    model.embed_tokens.weight.requires_grad_(False)  # the target's embedding, frozen (EAGLE)
    model.train()

    train_idx, eval_idx = split_indices(info.num_samples, args.eval_fraction)
    if info.has_uncond is False and args.uncond_prob > 0:
        accelerator.print("note: the data has no uncond stream (hidden_uncond); training on the cond stream only")
    # one stream per sample (the held-out set: always cond); shuffled reads touch every shard, so keep all open
    train_ds = DrafterDataset(info, train_idx, uncond_prob=args.uncond_prob, seed=args.seed, max_open_files=None)
    sampler = EpochShuffleSampler(len(train_ds), args.seed)
    train_loader = DataLoader(train_ds, batch_size=args.bs, sampler=sampler, num_workers=args.num_workers)
    eval_loader = None
    if len(eval_idx):
        eval_ds = DrafterDataset(info, eval_idx, uncond_prob=0.0, max_open_files=None)
        eval_loader = DataLoader(eval_ds, batch_size=args.bs, num_workers=args.num_workers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    if eval_loader is not None:
        model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    lm_head = lm_head.to(accelerator.device)

    k = args.gradient_accumulation_steps
    micro_per_epoch = len(train_loader)
    steps_per_epoch = math.ceil(micro_per_epoch / k)
    schedule_steps = args.max_steps if args.max_steps is not None else args.num_epochs * steps_per_epoch
    warmup = args.warmup_steps if args.warmup_steps is not None else int(round(args.warmup_steps_ratio * schedule_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer,
                                                  WarmupSchedule(warmup, schedule_steps, args.lr_schedule))
    scheduler = accelerator.prepare_scheduler(scheduler)

    step, start_epoch, skip = 0, 0, 0
    if state is not None:
        check_resume_compatible(state, micro_per_epoch, schedule_steps, warmup, args.lr_schedule, resume_dir)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step, start_epoch, skip = state["step"], state["epoch"], state["batches_done"]
        if skip and state.get("micro_per_epoch") != micro_per_epoch:
            # another batch size / process count: the saved position inside the epoch means something else
            accelerator.print(f"note: batches per epoch changed ({state.get('micro_per_epoch')} -> {micro_per_epoch}); "
                              f"epoch {start_epoch + 1} restarts from its beginning")
            skip = 0
        if (state.get("schedule_steps"), state.get("warmup_steps")) != (schedule_steps, warmup):
            accelerator.print(f"note: lr schedule changed (steps {state.get('schedule_steps')} -> {schedule_steps}, "
                              f"warm-up {state.get('warmup_steps')} -> {warmup})")
        accelerator.print(f"resumed from {resume_dir} at step {step} (epoch {start_epoch + 1}, batch {skip})")

    metrics_path = save_dir / "metrics.jsonl"
    metrics_records = 0  # lines in metrics.jsonl: stored with each checkpoint so a resume can drop later ones
    if main_proc:
        from entrypoints.outputs import OutputLock

        lock = OutputLock(save_dir, "train_drafter").acquire()  # a second run into this folder stops, naming us
        if args.overwrite:
            clear_run(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        if state is not None:
            truncate_metrics(metrics_path, state.get("metrics_records"), step)
        elif metrics_path.exists():  # a new run: earlier records (a run stopped before any checkpoint) are stale
            metrics_path.unlink()
        metrics_records = len(metrics_path.read_text().splitlines()) if metrics_path.exists() else 0
        _write_text_atomic(save_dir / "train_args.json", json.dumps(vars(args), indent=2, default=str))

    def log(record: dict) -> None:
        nonlocal metrics_records
        if main_proc:
            record = {**record, "time": round(time.time() - t0, 3)}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            metrics_records += 1
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def training_state(next_epoch: int, batches_done: int) -> dict:
        return {"format": STATE_FORMAT, "step": step, "epoch": next_epoch, "batches_done": batches_done,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                "schedule_steps": schedule_steps, "warmup_steps": warmup, "micro_per_epoch": micro_per_epoch,
                "num_processes": accelerator.num_processes, "metrics_records": metrics_records,
                "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}}

    def checkpoint(name: str, next_epoch: int, batches_done: int) -> Path:
        path = save_dir / name
        if main_proc:
            save_checkpoint(save_dir, name, accelerator.unwrap_model(model), training_state(next_epoch, batches_done))
        accelerator.wait_for_everyone()
        return path

    t0 = time.time()
    accelerator.print(
        f"train_drafter: {info.num_samples} samples ({len(train_idx)} train, {len(eval_idx)} held out), "
        f"T={info.prefix_len} N={info.num_image_tokens} H={info.hidden_size}; {accelerator.num_processes} process(es) "
        f"on {accelerator.device}; {micro_per_epoch} micro-batches of {args.bs} per process per epoch, "
        f"{steps_per_epoch} optimizer steps per epoch; schedule {schedule_steps} steps, warm-up {warmup}")
    last_eval: dict = {}
    if state is None and eval_loader is not None:
        last_eval = evaluate(accelerator, model, eval_loader, lm_head, args.p_w)
        log({"event": "eval", "epoch": 0, "step": 0, **last_eval})

    max_steps = args.max_steps if args.max_steps is not None else schedule_steps
    noise_gen = torch.Generator(device=accelerator.device)
    session_steps, stopped, last_dir = 0, False, None
    run_loss = torch.zeros(3, device=accelerator.device)  # loss, smooth_l1, soft_ce summed over logged steps
    run_count = 0
    if state is not None and (step >= max_steps or start_epoch >= args.num_epochs):
        accelerator.print(f"nothing to do: {resume_dir} already finished step {step} (epoch {start_epoch}); raise "
                          f"--num_epochs / --max_steps to train further")
    stop_signal = InterruptFlag(accelerator.num_processes, accelerator.device)
    bar = tqdm(total=max(0, max_steps - step), disable=not main_proc, desc="train_drafter")
    epoch = start_epoch
    for epoch in range(start_epoch, args.num_epochs):
        if step >= max_steps:
            break
        train_loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        micro = skip
        group_loss = torch.zeros(3, device=accelerator.device)
        for batch in loader:
            if stop_signal.local_only_requested():  # one process: stop before this micro-batch, drop the partial group
                micro = (micro // k) * k
                optimizer.zero_grad(set_to_none=True)
                stopped = True
                break
            group_start = (micro // k) * k
            group_size = min(k, micro_per_epoch - group_start)
            sync = micro + 1 == group_start + group_size
            db = make_drafter_batch(batch)
            inputs = db.inputs
            if args.data_noise != "none" and args.noise_std > 0:
                # keyed by (seed, process, epoch, micro-batch): reproducible after a resume, different per process
                key = [args.seed, accelerator.process_index, epoch, micro]
                noise_gen.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1))
                inputs = inputs + feature_noise(inputs.shape, args.data_noise, args.noise_std, args.mean, noise_gen,
                                                inputs.device, inputs.dtype)
            with nullcontext() if sync else accelerator.no_sync(model):
                pred = model(inputs, db.input_ids, rope_pos=db.rope_pos, attn_mask=db.attn_mask)
                terms = drafter_losses(pred[:, db.loss_start :], db.loss_targets, lm_head)
                sl1, ce = terms["smooth_l1"].mean(), terms["soft_ce"].mean()
                loss = sl1 + args.p_w * ce
                # equal-sized samples: the mean of the k micro-batch means is the mean over the whole group
                accelerator.backward(loss / group_size)
            group_loss += torch.stack([loss, sl1, ce]).detach() / group_size
            micro += 1
            if not sync:
                continue
            if args.grad_clip > 0:
                if args.grad_clip_mode == "value":
                    accelerator.clip_grad_value_(params, args.grad_clip)
                else:
                    accelerator.clip_grad_norm_(params, args.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            if not optimizer.step_was_skipped:  # fp16 overflow steps do not advance the schedule
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            session_steps += 1
            run_loss += group_loss
            run_count += 1
            group_loss = torch.zeros(3, device=accelerator.device)
            bar.update(1)
            if step % args.log_every == 0 or step >= max_steps:
                mean = (accelerator.reduce(run_loss, "mean") / run_count).tolist()
                log({"event": "train", "epoch": epoch + 1, "step": step, "lr": lr,
                     "loss": mean[0], "smooth_l1": mean[1], "soft_ce": mean[2]})
                run_loss.zero_()
                run_count = 0
            if step >= max_steps or (args.stop_after_steps is not None and session_steps >= args.stop_after_steps):
                stopped = True
                break
            if stop_signal.requested():  # every process agrees at this step boundary (SIGINT)
                stopped = True
                break
        epoch_done = micro == micro_per_epoch
        skip = 0
        final = stopped or epoch + 1 == args.num_epochs or step >= max_steps
        if eval_loader is not None and not stop_signal.seen and (not epoch_done or final or (epoch + 1) % args.eval_freq == 0):
            last_eval = evaluate(accelerator, model, eval_loader, lm_head, args.p_w)
            log({"event": "eval", "epoch": epoch + 1, "step": step, **last_eval})
        if epoch_done and (final or (epoch + 1) % args.save_every == 0):
            last_dir = checkpoint(f"state_{epoch + 1}", epoch + 1, 0)
        elif not epoch_done:
            last_dir = checkpoint(f"state_step{step}", epoch, micro)
        if stopped:
            break
    bar.close()
    stop_signal.restore()
    if stop_signal.seen:
        raise KeyboardInterrupt(f"checkpoint saved in {last_dir} (step {step}); continue with: "
                                f"{resume_command(getattr(args, 'argv', None) or sys.argv[1:])}")

    if args.dump_rank_weights:
        from models.checkpoints import save_safetensors_atomic

        save_safetensors_atomic(accelerator.unwrap_model(model).state_dict(),
                                save_dir / "rank_weights" / f"rank{accelerator.process_index}.safetensors")
    accelerator.wait_for_everyone()
    if last_dir is not None:
        accelerator.print(f"done: step {step}; drafter in {last_dir} (generate_images --model_type eagle "
                          f"--drafter_path {last_dir})")
    accelerator.end_training()
    if main_proc:
        lock.release()
    return {"step": step, "epoch": epoch + 1, "state_dir": last_dir, "eval": last_eval,
            "num_processes": accelerator.num_processes}


def main(argv: list[str] | None = None) -> None:
    args = parse_args().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the resume command of an interrupt
    train(args)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
