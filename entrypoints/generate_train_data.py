"""generate_train_data: code shards -> the target's hidden states, the drafter's training data.

Reads the code shards of ``extract_code`` or ``self_distill`` (``--data_path``) and runs the target once per
batch over [condition; x_0 .. x_{N-2}] (no cache; LlamaGen's training mask: causal, padded condition columns
hidden) for the conditional stream and, unless ``--no_uncond``, the unconditional one (null class / null
caption, same tokens and mask). Writes hidden-state shards ``hidden_r{rank}_{index:05d}.safetensors`` +
``manifest.json``, the format (and the drafter's f_t <-> x_{t+1} pairing) documented in
:mod:`models.train_data`. Only the GPT is loaded (no VQ, no T5: T2I captions come as stored T5 features).
Rerunning the command resumes; under ``accelerate launch`` every process handles its own share of samples.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from entrypoints.common import UserError, add_device_args, resolve_device, resolve_dtype, run_cli
from models.distributed import ProcessContext
from models.generation import prefix_attention_mask
from models.registry import MODELS
from models.train_data import (
    CODES_FORMAT,
    DRAFTER_FORMAT,
    HIDDEN_PREFIX,
    ShardWriter,
    check_resume_settings,
    finish_shards,
    finished_sample_ids,
    read_manifest,
    read_shard,
    shard_sample_ids,
    timed_main,
)


def parse_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate_train_data",
        description="Run the target over code shards (extract_code / self_distill output) and store its last "
        "hidden states for the conditional and unconditional streams: the drafter's training data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="demo", choices=list(MODELS), help="model family / checkpoint set")
    p.add_argument("--model_path", default=None, help="target checkpoint (file or folder); default: the ckpts/ layout")
    p.add_argument("--data_path", required=True, help="code-shard folder (extract_code / self_distill output)")
    p.add_argument("--output_dir", required=True, help="where the hidden-state shards and manifest.json go")
    p.add_argument("--num_samples", type=int, default=None, help="use the N smallest sample ids; default all")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--shard_size", type=int, default=256, help="samples per shard file")
    p.add_argument("--no_uncond", action="store_true", help="store the conditional stream only")
    p.add_argument("--vq_path", default=None, help="Chameleon: the tokenizer folder (text tokenizer); default: ckpts/")
    p.add_argument("--prefix_len", type=int, default=128,
                   help="Chameleon: prompt-token prefix length T (prompts are left-padded to it)")
    add_device_args(p)
    return p


@torch.no_grad()
def target_hidden_states(
    target,
    cond: torch.Tensor,
    prefix_valid: torch.Tensor,
    tokens: torch.Tensor,
    with_uncond: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Last hidden states (after the final norm) over s = [condition; tokens[:, :-1]], one forward.

    ``cond`` is the model's condition input (labels (B,) or left-padded caption features (B, T, C)),
    ``prefix_valid`` (B, T) bool, ``tokens`` (B, N). Returns ``(hidden, hidden_uncond)``, each (B, T+N-1, H)
    (``hidden_uncond`` None without ``with_uncond``); both streams run as one batch [cond; uncond].
    """
    prefix = target.embed_condition(cond)
    valid = prefix_valid.bool()
    if with_uncond:
        prefix = torch.cat([prefix, target.embed_condition(target.null_condition(cond))])
        valid = torch.cat([valid, valid])
    ids = tokens[:, :-1].repeat(prefix.shape[0] // tokens.shape[0], 1)
    seq = torch.cat([prefix, target.embed_tokens(ids)], dim=1)
    keys_valid = torch.cat([valid, valid.new_ones(valid.shape[0], ids.shape[1])], dim=1)
    pos = torch.arange(seq.shape[1], device=seq.device)
    hidden = target.forward_hidden(seq, pos, attn_mask=prefix_attention_mask(keys_valid))
    if not with_uncond:
        return hidden, None
    return tuple(hidden.chunk(2))


def code_batches(
    data_path: Path, manifest: dict, wanted: set[int], batch_size: int, keys: list[str], lists: tuple[str, ...] = ()
) -> Iterator[dict[str, torch.Tensor]]:
    """Rows of the code shards whose sample id is in ``wanted``, in batches of ``batch_size`` (shard by shard).

    ``lists`` names per-sample metadata lists (e.g. ``prompts``) to carry along with the tensors.
    """
    keys = [*keys, *lists]
    pending: list[dict[str, torch.Tensor]] = []
    count = 0
    for entry in manifest["shards"]:
        path = data_path / entry["file"]
        ids = shard_sample_ids(path).tolist()
        rows = [r for r, i in enumerate(ids) if i in wanted]
        if not rows:
            continue
        tensors, meta = read_shard(path, [k for k in keys if k not in lists])
        tensors.update({k: meta[k] for k in lists if k in meta})
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ValueError(f"{path} has no {missing} tensor(s) / metadata")
        sel = torch.tensor(rows)
        pending.append({k: ([v[r] for r in rows] if k in lists else v[sel]) for k, v in tensors.items()})
        count += len(rows)
        while count >= batch_size:
            merged = {k: _cat([p[k] for p in pending]) for k in keys}
            yield {k: v[:batch_size] for k, v in merged.items()}
            count -= batch_size
            pending = [{k: v[batch_size:] for k, v in merged.items()}] if count else []
    if count:
        yield {k: _cat([p[k] for p in pending]) for k in keys}


def _cat(parts: list) -> torch.Tensor | list:
    return sum(parts, []) if isinstance(parts[0], list) else torch.cat(parts)


def run_generate_train_data(args: argparse.Namespace) -> dict:
    """Compute and store the hidden states of every selected, not yet finished sample of this process's share."""
    from entrypoints.validation import validate_common_args

    validate_common_args(args)  # every number in range and the output folder writable, before any work
    from models.base_models.llamagen.loading import load_llamagen_gpt
    from models.base_models.llamagen.t5 import to_left_padding
    from models.registry import get_spec, resolve_path

    ctx = ProcessContext.current(args.device)
    device = ctx.device(resolve_device(args.device) if args.device else None) or resolve_device(None)
    dtype = resolve_dtype(args.precision, device)
    if args.batch_size < 1:
        raise UserError("--batch_size must be >= 1")
    data_path, out = Path(args.data_path), Path(args.output_dir)
    codes = read_manifest(data_path, CODES_FORMAT)
    n_tokens, model_type = int(codes["num_image_tokens"]), codes["model_type"]

    all_ids = sorted(i for e in codes["shards"] for i in shard_sample_ids(data_path / e["file"]).tolist())
    selected = all_ids[: args.num_samples] if args.num_samples is not None else all_ids
    spec = get_spec(args.model)
    model_path = resolve_path(spec, "model", args.model_path)
    family = None
    if spec.family == "chameleon":  # token prefixes: the family builds them (tokenizer), the target runs them
        from models.registry import load_family

        family = load_family(args.model, device, dtype, args.model_path, args.vq_path,
                             image_size=codes.get("image_size"))
        target = family.target
        if family.num_image_tokens != n_tokens:
            raise UserError(f"{data_path} holds {n_tokens} tokens per image, {args.model} at "
                            f"{family.image_size} px makes {family.num_image_tokens}")
    else:
        target = load_llamagen_gpt(model_path, device, dtype, block_size=n_tokens)
    cfg = target.config
    if cfg.model_type != model_type:
        raise UserError(f"{data_path} holds {model_type} codes but {model_path} is a {cfg.model_type} model")
    streams = ["cond"] if args.no_uncond else ["cond", "uncond"]
    prefix_len = args.prefix_len if family is not None else cfg.cls_token_num
    hidden_size = cfg.hidden_size if family is not None else cfg.dim
    settings = {"model": args.model, "model_type": model_type, "prefix_len": prefix_len,
                "num_image_tokens": n_tokens, "hidden_size": hidden_size, "streams": streams}
    header = {"format": DRAFTER_FORMAT, **settings, "vocab_size": cfg.vocab_size, "dtype": "float16",
              "model_path": str(model_path), "codes": str(args.data_path), "num_processes": ctx.world}
    check_resume_settings(out, HIDDEN_PREFIX, settings)
    done = finished_sample_ids(out, HIDDEN_PREFIX)
    todo = {i for i in selected if i not in done and ctx.owns(i)}
    if done and ctx.is_main:
        print(f"resuming: {len(done & set(selected))} of {len(selected)} samples already in {out}")

    cond_keys = {"c2i": ["labels"], "chameleon": []}.get(model_type, ["caption_embs", "emb_masks"])
    lists = ("prompts",) if family is not None else ()
    writer = ShardWriter(out, HIDDEN_PREFIX, ctx.rank, args.shard_size, settings)
    bar = tqdm(total=len(todo), desc=f"generate_train_data r{ctx.rank}", unit="sample", disable=not ctx.is_main)
    try:
        for batch in code_batches(data_path, codes, todo, args.batch_size, ["tokens", "sample_id", *cond_keys], lists):
            tokens = batch["tokens"].to(device)
            if family is not None:  # Chameleon: prompt token prefixes, left-padded to --prefix_len
                from models.families.chameleon_data import chameleon_hidden_states

                res = chameleon_hidden_states(family, batch["prompts"], tokens, prefix_len, not args.no_uncond)
                tensors = {k: (v.to(torch.float16).cpu() if k.startswith("hidden") else
                               v.to(torch.uint8) if "valid" in k else v) for k, v in res.items()}
                tensors.update(tokens=batch["tokens"], sample_id=batch["sample_id"])
                writer.add(tensors)
                bar.update(len(tokens))
                continue
            if model_type == "c2i":
                cond = batch["labels"].to(device)
                valid = torch.ones(len(tokens), cfg.cls_token_num, dtype=torch.bool, device=device)
            else:
                if batch["caption_embs"].shape[1] != cfg.cls_token_num:
                    raise ValueError(f"caption length {batch['caption_embs'].shape[1]} != the model's "
                                     f"cls_token_num {cfg.cls_token_num}")
                cond, valid = to_left_padding(batch["caption_embs"].to(device, dtype), batch["emb_masks"].to(device))
                valid = valid.bool()
            hidden, hidden_uncond = target_hidden_states(target, cond, valid, tokens, not args.no_uncond)
            tensors = {"hidden": hidden.to(torch.float16), "tokens": batch["tokens"],
                       "prefix_valid": valid.to(torch.uint8), "sample_id": batch["sample_id"]}
            if hidden_uncond is not None:
                tensors["hidden_uncond"] = hidden_uncond.to(torch.float16)
            writer.add(tensors)
            bar.update(len(tokens))
    except BaseException:  # keep every finished sample, then report the interruption
        finish_shards(ctx, writer, out, HIDDEN_PREFIX, header, interrupted=True)
        raise
    bar.close()
    manifest = finish_shards(ctx, writer, out, HIDDEN_PREFIX, header)
    if ctx.is_main:
        print(f"{manifest['num_samples']} samples in {out} ({len(manifest['shards'])} shards)")
    return manifest


def main(argv: list[str] | None = None) -> None:
    timed_main(run_generate_train_data, parse_args(), argv)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
