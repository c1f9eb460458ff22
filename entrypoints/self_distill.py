"""self_distill: the target samples its own images (as tokens) -> code shards for drafter training.

The LANTERN paper trains drafters on self-distilled data: token sequences the target itself generated with
its usual sampler, so the drafter learns the distribution it will have to guess at decoding time. The original
ships no script for it; this is ours. Plain autoregressive decoding with CFG and the model's default sampler
(``--cfg --temperature --top_k --top_p`` override it), batched.

Samples: ``--prompt`` (a prompt set, a prompt file or a literal prompt, as in generate_images) with
``--samples_per_prompt K`` -> sample_id = prompt index · K + j; or, for class-conditional models,
``--classes 0-9 --samples_per_class K`` -> sample_id = class · K + j. Sample ``i`` draws its tokens with its
own random stream, seeded with ``--random_seed + i``, so its tokens do not depend on the batch it ran in, on
the number of processes or on interruptions: a resumed or parallel run gives the same data as one straight run
(up to floating-point differences between batch sizes, which can only flip a draw that lands on a boundary).

Output (``--output_dir``): code shards ``codes_r{rank}_{index:05d}.safetensors`` + ``manifest.json``
(:mod:`models.train_data`), ``source: "self_distill"``. For T2I the shards hold the T5 features the tokens
were generated from (stored in float16; generation uses the same float16-rounded features, so the later
hidden states match the generating condition exactly).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from entrypoints.common import UserError, add_device_args, load_prompts, resolve_device, resolve_dtype, run_cli
from models.distributed import ProcessContext
from models.generation import Prefix, generate_ar
from models.registry import MODELS
from models.sampling import SamplingConfig
from models.train_data import (
    CODES_FORMAT,
    CODES_PREFIX,
    ShardWriter,
    check_resume_settings,
    finish_shards,
    finished_metadata,
    finished_sample_ids,
    timed_main,
)


def parse_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="self_distill",
        description="Generate the target's own token sequences (plain AR, CFG, its default sampler) as code "
        "shards for generate_train_data: the paper's self-distilled drafter data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default="demo", choices=list(MODELS), help="model family / checkpoint set")
    g.add_argument("--model_path", default=None, help="target checkpoint (file or folder); default: the ckpts/ layout")
    g.add_argument("--vq_path", default=None,
                   help="VQ tokenizer checkpoint (Chameleon: the tokenizer folder); default: the ckpts/ layout")
    g.add_argument("--t5_path", default=None, help="FLAN-T5 folder or caption-feature cache (.safetensors), T2I only")
    g.add_argument("--image_size", type=int, default=None, help="image size for LlamaGen C2I .pt checkpoints (256/384)")
    add_device_args(g)

    g = p.add_argument_group("samples")
    g.add_argument("--prompt", default=None,
                   help="a named prompt set, a prompt file (.txt/.tsv/.json) or a literal prompt")
    g.add_argument("--prompt_dir", default=None, help="folder holding the named prompt sets (default data/prompts)")
    g.add_argument("--num_prompts", "--num_images", dest="num_prompts", type=int, default=None,
                   help="number of prompts to use (a literal prompt is repeated this many times)")
    g.add_argument("--slice", default=None, help="range of the prompt list, 'start-end'")
    g.add_argument("--samples_per_prompt", type=int, default=1, help="samples per prompt")
    g.add_argument("--classes", default=None, help="class-conditional models: class ids, e.g. '0-9' or '1,5,7-9'")
    g.add_argument("--samples_per_class", type=int, default=1, help="samples per class with --classes")
    g.add_argument("--output_dir", required=True, help="where the code shards and manifest.json go")
    g.add_argument("--batch_size", type=int, default=16)
    g.add_argument("--shard_size", type=int, default=256, help="samples per shard file")

    g = p.add_argument_group("sampling (default: the model's)")
    g.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top_k", type=int, default=None, help="0 = off")
    g.add_argument("--top_p", type=float, default=None, help="1 = off")
    g.add_argument("--random_seed", type=int, default=0, help="sample i is drawn with seed random_seed + i")
    return p


def parse_classes(text: str) -> list[int]:
    """'0-9' / '1,5,7-9' -> sorted unique class ids."""
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UserError(f"--classes {text!r}: expected ids and ranges such as '0-9' or '1,5,7-9'")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise UserError(f"--classes {text!r}: range {lo}-{hi} is empty")
        out.update(range(lo, hi + 1))
    return sorted(out)


def sample_plan(args: argparse.Namespace) -> list[tuple[int, str]]:
    """The requested samples as (sample_id, prompt), sorted by id."""
    if (args.prompt is None) == (args.classes is None):
        raise UserError("give exactly one of --prompt (prompts) or --classes (class-conditional models)")
    if args.classes is not None:
        k = args.samples_per_class
        if k < 1:
            raise UserError("--samples_per_class must be >= 1")
        return [(c * k + j, str(c)) for c in parse_classes(args.classes) for j in range(k)]
    k = args.samples_per_prompt
    if k < 1:
        raise UserError("--samples_per_prompt must be >= 1")
    items = load_prompts(args.prompt, args.prompt_dir, args.num_prompts, args.slice)
    return [(idx * k + j, text) for idx, text in items for j in range(k)]


def sample_uniforms(seeds: list[int], num_tokens: int) -> torch.Tensor:
    """(B, num_tokens) uniforms in [0, 1), row b from its own CPU generator seeded with ``seeds[b]``.

    Drawn on the CPU so a sample's stream is the same on every device.
    """
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        rows.append(torch.rand(num_tokens, generator=g))
    return torch.stack(rows)


@torch.no_grad()
def generate_seeded(
    target,
    prefix: Prefix,
    num_tokens: int,
    sampling: SamplingConfig,
    uniforms: torch.Tensor,
    allowed_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain AR decoding with one random stream per sample (step t of sample b uses ``uniforms[b, t]``).

    A sample's tokens then do not depend on the batch it ran in, so resumed and re-batched runs agree.
    """
    return generate_ar(target, prefix, num_tokens, sampling, allowed_tokens=allowed_tokens, uniforms=uniforms)[0]


def run_self_distill(args: argparse.Namespace) -> dict:
    """Generate every requested, not yet finished sample of this process's share; returns the manifest."""
    from entrypoints.validation import validate_common_args

    validate_common_args(args)  # every number in range and the output folder writable, before any work
    from models.base_models.llamagen.t5 import to_left_padding
    from models.registry import load_family

    ctx = ProcessContext.current(args.device)
    device = ctx.device(resolve_device(args.device) if args.device else None) or resolve_device(None)
    dtype = resolve_dtype(args.precision, device)
    if args.batch_size < 1:
        raise UserError("--batch_size must be >= 1")
    plan = sample_plan(args)
    out = Path(args.output_dir)
    family = load_family(args.model, device, dtype, args.model_path, args.vq_path, args.t5_path, args.image_size)
    target, cfg = family.target, family.target.config
    if args.classes is not None and cfg.model_type != "c2i":
        raise UserError(f"--classes needs a class-conditional model; {args.model!r} is text-conditional")
    d = family.defaults
    sampling = SamplingConfig(d.temperature if args.temperature is None else args.temperature,
                              d.top_k if args.top_k is None else args.top_k,
                              d.top_p if args.top_p is None else args.top_p)
    cfg_scale = d.cfg if args.cfg is None else args.cfg
    settings = {"model": args.model, "model_type": cfg.model_type, "num_image_tokens": family.num_image_tokens,
                "cfg": cfg_scale, "temperature": sampling.temperature, "top_k": sampling.top_k,
                "top_p": sampling.top_p, "random_seed": args.random_seed}
    header = {"format": CODES_FORMAT, **settings, "source": "self_distill", "model_path": args.model_path,
              "image_size": getattr(family, "image_size", None),
              "prompt": args.prompt, "classes": args.classes, "num_processes": ctx.world}
    check_resume_settings(out, CODES_PREFIX, settings)
    done_prompts = finished_metadata(out, CODES_PREFIX, "prompts")
    changed = [(i, p) for i, p in plan if i in done_prompts and done_prompts[i] != p]
    if changed:
        i, p = changed[0]
        raise UserError(f"{out} holds sample {i} for prompt {done_prompts[i]!r}, now requested for {p!r}; "
                        "use a new --output_dir")
    done = finished_sample_ids(out, CODES_PREFIX)
    todo = [(i, p) for i, p in plan if i not in done and ctx.owns(i)]
    if done and ctx.is_main:
        print(f"resuming: {len(done & {i for i, _ in plan})} of {len(plan)} samples already in {out}")

    writer = ShardWriter(out, CODES_PREFIX, ctx.rank, args.shard_size, settings)
    bar = tqdm(total=len(todo), desc=f"self_distill r{ctx.rank}", unit="img", disable=not ctx.is_main)
    try:
        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start : start + args.batch_size]
            ids, prompts = [i for i, _ in chunk], [p for _, p in chunk]
            tensors: dict[str, torch.Tensor] = {"sample_id": torch.tensor(ids, dtype=torch.long)}
            if cfg.model_type == "c2i":
                labels = torch.tensor([family.class_parser(p) for p in prompts], dtype=torch.long, device=device)
                valid = torch.ones(len(chunk), cfg.cls_token_num, dtype=torch.bool, device=device)
                prefix = family.prefix_from_conditions(labels, valid, cfg_scale)
                tensors["labels"] = labels.cpu()
            elif cfg.model_type == "chameleon":  # the prompt's own token prefix (Anole / Lumina-mGPT)
                prefix = family.build_prefix(prompts, cfg_scale)
            else:
                embs, masks = family.text_encoder.get_text_embeddings(prompts)
                embs16, masks8 = embs.to(torch.float16), masks.to(torch.uint8)
                cond, valid = to_left_padding(embs16.to(device, target.tok_embeddings.weight.dtype), masks8.to(device))
                prefix = family.prefix_from_conditions(cond, valid.bool(), cfg_scale)
                tensors.update(caption_embs=embs16.cpu(), emb_masks=masks8.cpu())
            uniforms = sample_uniforms([args.random_seed + i for i in ids], family.num_image_tokens)
            tokens = generate_seeded(target, prefix, family.num_image_tokens, sampling, uniforms, family.allowed_tokens)
            tensors["tokens"] = tokens.cpu()
            writer.add(tensors, {"prompts": prompts})
            bar.update(len(chunk))
    except BaseException:  # keep every finished sample, then report the interruption
        finish_shards(ctx, writer, out, CODES_PREFIX, header, interrupted=True)
        raise
    bar.close()
    manifest = finish_shards(ctx, writer, out, CODES_PREFIX, header)
    if ctx.is_main:
        print(f"{manifest['num_samples']} samples in {out} ({len(manifest['shards'])} shards)")
    return manifest


def main(argv: list[str] | None = None) -> None:
    timed_main(run_self_distill, parse_args(), argv)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
