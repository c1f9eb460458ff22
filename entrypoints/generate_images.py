"""generate_images: text/class prompts -> PNG images with plain AR (base), speculative decoding (eagle) or
Speculative Jacobi Decoding (sjd, no drafter).

Outputs in ``--output_dir`` (as the original): ``prompt_{idx}.png``, ``global_statistics_{start}_{end}.json``
(per prompt: ``prompt``, ``latency``, ``step_compression`` and more) and ``generation_configs.json``.
Finished images are kept: rerunning the same command resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from entrypoints.common import (
    UserError,
    add_device_args,
    apply_threads,
    load_prompts,
    resolve_device,
    resolve_dtype,
    run_cli,
)
from entrypoints.outputs import OutputLock, check_output_dir, check_same_settings, finished_from_other_ranges
from entrypoints.validation import validate_generate_args
from models.checkpoints import write_json_atomic
from models.distributed import ProcessContext
from models.registry import MODELS
from models.sampling import SamplingConfig


def parse_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate_images",
        description="Generate images with plain autoregressive decoding (--model_type base) or speculative "
        "decoding (--model_type eagle; exact EAGLE-2, LANTERN with --lantern, LANTERN++ with --static_tree).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, choices=list(MODELS),
                   help="model family / checkpoint set (default: demo; with neither --model nor --model_type the "
                   "demo runs with --model_type eagle --lantern)")
    g.add_argument("--model_type", default=None, choices=["base", "eagle", "sjd", "vllm"],
                   help="decoding engine (default: base, see --model)")
    g.add_argument("--model_path", default=None, help="target checkpoint (file or folder); default: the ckpts/ layout")
    g.add_argument("--vq_path", default=None, help="VQ tokenizer checkpoint; default: the ckpts/ layout")
    g.add_argument("--t5_path", default=None, help="local FLAN-T5 folder for LlamaGen T2I")
    g.add_argument("--drafter_path", default=None, help="EAGLE drafter folder (config.json + weights)")
    g.add_argument("--image_size", type=int, default=None, help="image size: LlamaGen C2I .pt checkpoints (256/384); Anole / Lumina-mGPT (default 512 / 768)")
    add_device_args(g)
    from models.compiled import add_compile_args

    add_compile_args(g)

    g = p.add_argument_group("prompts and outputs")
    g.add_argument("--prompt", default=None,
                   help="a named set (PartiPrompts, SJDPrompts, MSCOCO2017Val, MSCOCO2014Val, MSCOCO2017Train), "
                   "a prompt file (.txt one per line, .tsv with a Prompt column, .json list) or a literal prompt; "
                   "default: the model's own prompt file (demo: the ten digits)")
    g.add_argument("--prompt_dir", default=None, help="folder holding the named prompt sets (default data/prompts)")
    g.add_argument("--num_images", type=int, default=None,
                   help="number of prompts to use (a literal prompt is repeated this many times); default all / 10")
    g.add_argument("--slice", default=None, help="range of the prompt list, 'start-end'")
    g.add_argument("--output_dir", default="generated_images", help="where images and statistics go")
    g.add_argument("--save_tokens", action="store_true", help="also save the generated token ids (prompt_{idx}_tokens.npy)")
    g.add_argument("--overwrite", action="store_true", help="regenerate images that already exist")
    g.add_argument("--batch_size", type=int, default=1,
                   help="prompts decoded together (2x rows with CFG), for base, eagle and sjd; with --set_seed an image's "
                   "tokens do not depend on it")

    g = p.add_argument_group("sampling")
    g.add_argument("--set_seed", action="store_true", help="make the run reproducible (image idx uses seed random_seed+idx)")
    g.add_argument("--random_seed", type=int, default=42)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy; default: the model's")
    g.add_argument("--top_k", type=int, default=None, help="0 = off; default: the model's")
    g.add_argument("--top_p", type=float, default=None, help="1 = off; default: the model's")
    g.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale; <= 1 = off (as in LlamaGen); default: the model's")

    g = p.add_argument_group("speculative decoding (--model_type eagle)")
    g.add_argument("--lantern", action="store_true", help="relaxed acceptance over latent neighbourhoods (LANTERN / LANTERN++)")
    g.add_argument("--lantern_k", type=int, default=None, help="neighbourhood size k (default: the model's; original 1000)")
    g.add_argument("--lantern_delta", type=float, default=None,
                   help="original shared flag: <= 1 is LANTERN's TVD budget delta, > 1 is LANTERN++'s lambda "
                   "(default: the model's; original 0.1)")
    g.add_argument("--lantern_tvd", type=float, default=None,
                   help="unambiguous LANTERN: TVD budget delta in [0, 1] (implies --lantern)")
    g.add_argument("--lantern_lambda", type=float, default=None,
                   help="unambiguous LANTERN++: ratio bound lambda >= 1 (implies --lantern)")
    g.add_argument("--lantern_budget", default="node", choices=["sibling", "node"],
                   help="LANTERN's delta per node (sibling j gets (delta - shift spent by earlier siblings) / "
                   "P(reach j), so a node's TVD stays <= delta on dynamic trees) or per sibling test (the paper's "
                   "and the original's rule; a node with c children shifts up to c*delta)")
    g.add_argument("--lantern_residual", default="exact", choices=["exact", "original", "original_lumina"],
                   help="residual after a relaxed rejection: the exact speculative one, or the original code's "
                   "(LlamaGen/Anole; original_lumina: its Lumina-mGPT static-tree variant) to compare with the paper")
    g.add_argument("--static_tree", action="store_true", help="static tree of sampled drafts (EAGLE-1 style, LANTERN++)")
    g.add_argument("--tree_choices", default=None,
                   help="static tree: a named choice list (mc_sim_7b_63, naive_extend_57, chain_<n>) or a JSON list of "
                   "paths (default mc_sim_7b_63)")
    from models.drafters.auto_tree import add_tree_arg

    add_tree_arg(g)
    g.add_argument("--eagle_version", type=int, default=2, choices=[1, 2], help="1 = static tree, 2 = dynamic tree")
    g.add_argument("--cfg_mode", default="parallel", choices=["sequential", "parallel"],
                   help="Chameleon (Anole / Lumina-mGPT) CFG layout: one padded batch (parallel) or two caches "
                   "(sequential, as the original)")
    g.add_argument("--top_k_draft", type=int, default=10, help="dynamic tree: children per expanded node")
    g.add_argument("--depth", type=int, default=None, help="dynamic tree: draft depth (default: the model's; "
                   "4, Lumina-mGPT 5, as the original)")
    g.add_argument("--total_token", type=int, default=59, help="dynamic tree: nodes kept per tree (incl. the root)")
    g.add_argument("--drafter_top_k", type=int, default=None, help="restrict the drafter's distribution to its top-k")
    g.add_argument("--codebook_path", default=None, help="neighbour table for --lantern (generate_codebook output)")

    g = p.add_argument_group("Speculative Jacobi Decoding (--model_type sjd; no drafter; --lantern flags apply too)")
    g.add_argument("--sjd_window", type=int, default=16, help="Jacobi window: draft tokens verified per forward")
    g.add_argument("--sjd_coupling", action="store_true", help="MC-SJD: maximal coupling of drafts across iterations")
    g.add_argument("--gsd", action="store_true", help="GSD grouped acceptance (relaxed; accept x with "
                   "min(1, p(G)/q(G)), G = tokens near x in p's ranking, in p and in the target's token embeddings)")
    g.add_argument("--gsd_rank_window", type=int, default=7, help="GSD: the group's candidates are x's rank "
                   "neighbours in p, w-1 likelier and w less likely (the authors' 7)")
    g.add_argument("--gsd_prob_gap", type=float, default=0.15, help="GSD: a candidate y joins if |p(y) - p(x)| < this "
                   "(the authors' 0.15)")
    g.add_argument("--gsd_dist", type=float, default=0.5, help="GSD: ... and if the squared distance of the target's "
                   "input embeddings of y and x is < this (the authors' 0.5, for Lumina-mGPT's embedding scale)")
    return p


def _sampling(args: argparse.Namespace, defaults) -> tuple[SamplingConfig, float]:
    sampling = SamplingConfig(
        temperature=defaults.temperature if args.temperature is None else args.temperature,
        top_k=defaults.top_k if args.top_k is None else args.top_k,
        top_p=defaults.top_p if args.top_p is None else args.top_p,
    )
    return sampling, defaults.cfg if args.cfg is None else args.cfg


# generation_configs.json entries that change what an image is: a resumed run must match them
RESUME_KEYS = ["model", "model_type", "model_path", "vq_path", "t5_path", "drafter_path", "codebook_path", "image_size",
               "prompt", "prompt_dir", "set_seed", "random_seed", "resolved_temperature", "resolved_top_k",
               "resolved_top_p", "resolved_cfg", "resolved_precision", "lantern", "lantern_k", "lantern_delta",
               "lantern_tvd", "lantern_lambda", "static_tree", "tree_choices", "eagle_version", "cfg_mode",
               "top_k_draft", "depth", "total_token", "drafter_top_k", "tree", "lantern_budget", "lantern_residual",
               "sjd_window", "sjd_coupling", "gsd", "gsd_rank_window", "gsd_prob_gap", "gsd_dist"]


def _validate_sjd_args(args: argparse.Namespace) -> None:
    """The Jacobi and GSD flags (``--model_type sjd``; GSD also works on EAGLE trees)."""
    from entrypoints.validation import check_number, validate_gsd

    check_number("--sjd_window", args.sjd_window, lo=1)
    validate_gsd(args.gsd_rank_window, args.gsd_prob_gap, args.gsd_dist)
    if args.gsd and args.model_type == "base":
        raise UserError("--gsd (grouped acceptance) needs speculative decoding: add --model_type sjd")
    if args.gsd and (args.lantern or args.lantern_tvd is not None or args.lantern_lambda is not None):
        raise UserError("give --gsd or --lantern (LANTERN / LANTERN++), not both")

DEFAULT_PROMPT_FILES = {"demo": "demo_digits.txt", "llamagen_c2i": "imagenet_classes.txt"}


def default_prompt(model: str) -> tuple[str, int | None]:
    """The project's own small prompt files (the public sets are read from --prompt_dir, never copied)."""
    from models.registry import REPO_ROOT

    return str(REPO_ROOT / "data" / "prompts" / DEFAULT_PROMPT_FILES.get(model, "sample_prompts.txt")), None


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the model-dependent defaults. The bare command (no --model, no --model_type) is the showcase:
    the demo with ``--model_type eagle --lantern`` (LANTERN++ on a chain of drafts, see ``DEMO_SHOWCASE``);
    otherwise the engine defaults to plain AR and relaxation stays off unless asked for."""
    from models.registry import MODELS

    bare = args.model is None and args.model_type is None
    args.model = args.model or "demo"
    args.model_type = args.model_type or ("eagle" if bare else "base")
    if bare:
        args.lantern = True
        for key, value in MODELS[args.model].showcase.items():  # only where the user left the flag unset
            if getattr(args, key) in (None, False):
                setattr(args, key, value)
    args.tree_choices = args.tree_choices or "mc_sim_7b_63"
    args.depth = MODELS[args.model].depth if args.depth is None else args.depth
    if args.lantern_tvd is not None and args.lantern_lambda is not None:
        raise UserError("give either --lantern_tvd (LANTERN) or --lantern_lambda (LANTERN++), not both")
    if args.lantern_tvd is not None or args.lantern_lambda is not None:
        args.lantern = True
    k, delta = MODELS[args.model].lantern
    args.lantern_k = k if args.lantern_k is None else args.lantern_k
    args.lantern_delta = delta if args.lantern_delta is None else args.lantern_delta
    return args


def run_generate_image(args: argparse.Namespace) -> dict:
    """Generate every selected prompt; returns the statistics dict that is also written to disk."""
    explicit_tree = args.tree_choices is not None
    args = resolve_defaults(args)
    from models.drafters.auto_tree import check_tree_args

    check_tree_args(args, explicit_tree)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.model_type == "vllm":
        raise UserError("--model_type vllm is not supported in this version (it needs the patched vLLM 0.6.3 of the "
                        "original); use base or eagle")
    validate_generate_args(args)
    _validate_sjd_args(args)
    check_output_dir(args.output_dir)
    apply_threads(args.threads)
    from models.registry import load_family

    ctx = ProcessContext.current(args.device)
    device = ctx.device(resolve_device(args.device) if args.device else None) or resolve_device(None)
    dtype = resolve_dtype(args.precision, device)
    prompt, default_n = (args.prompt, None) if args.prompt else default_prompt(args.model)
    all_items = load_prompts(prompt, args.prompt_dir, args.num_images if args.num_images is not None else default_n,
                             args.slice)
    items = all_items[ctx.rank :: ctx.world]  # round-robin over processes; indices stay global

    family = load_family(args.model, device, dtype, args.model_path, args.vq_path, args.t5_path, args.image_size,
                         cfg_mode=args.cfg_mode)
    sampling, cfg_scale = _sampling(args, family.defaults)
    if args.compile:
        from models.compiled import compile_target

        compile_target(family, args.compile_mode, drafter=args.compile_drafter, gemm=args.compile_gemm)
    decoder = None
    if args.model_type in ("eagle", "sjd"):
        from models.ea_model import build_speculative_decoder

        decoder = build_speculative_decoder(family, args, sampling, cfg_scale)
        if args.tree == "auto" and items:  # measure every candidate's round here, on the first batch
            from models.drafters.auto_tree import auto_tree_for_run

            decoder = auto_tree_for_run(decoder, family, [p for _, p in items[: args.batch_size]], cfg_scale)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start, end = all_items[0][0], all_items[-1][0] + 1
    final_path = out / f"global_statistics_{start}_{end}.json"
    stats_path = final_path if ctx.world == 1 else out / f"global_statistics_{start}_{end}.rank{ctx.rank}.json"
    stats: dict = json.loads(stats_path.read_text()) if stats_path.exists() and not args.overwrite else {}
    config = {k: v for k, v in vars(args).items()}
    config.update(resolved_temperature=sampling.temperature, resolved_top_k=sampling.top_k,
                  resolved_top_p=sampling.top_p, resolved_cfg=cfg_scale, resolved_device=str(device),
                  resolved_precision=str(dtype).replace("torch.", ""))
    if getattr(decoder, "calibration", None) is not None:  # --tree auto: round costs and the first choice
        config["auto_tree"] = decoder.report()
    check_same_settings(out / "generation_configs.json", config, RESUME_KEYS, args.overwrite)
    lock = OutputLock(out, f"generate_images.rank{ctx.rank}").acquire()
    if ctx.is_main:
        write_json_atomic(config, out / "generation_configs.json")
    if ctx.world > 1 and final_path.exists() and not args.overwrite:  # resume a sharded run
        done = json.loads(final_path.read_text())
        stats.update({k: v for k, v in done.items() if k in {f"prompt_{i}" for i, _ in items}})

    if not args.overwrite:  # images finished by an earlier run over another range keep their statistics
        stats.update({k: v for k, v in finished_from_other_ranges(out, final_path, {f"prompt_{i}" for i, _ in items}).items()
                      if k not in stats})
    todo = [(i, p) for i, p in items if args.overwrite or f"prompt_{i}" not in stats or not (out / f"prompt_{i}.png").exists()]
    if len(todo) < len(items):
        print(f"resuming: {len(items) - len(todo)} of {len(items)} images already in {out}")
    from torchvision.utils import save_image

    bar = tqdm(total=len(todo), desc=f"{args.model}/{args.model_type}" + (f" [rank {ctx.rank}]" if ctx.world > 1 else ""),
               unit="img", position=ctx.rank)
    try:  # the bar ends its line even when an error stops the run, so the error line stands alone
        for chunk in (todo[i : i + args.batch_size] for i in range(0, len(todo), args.batch_size)):
            # one generator per image (seed random_seed + idx), consumed by that image only: batch-invariant
            generators = [torch.Generator(device=device).manual_seed(
                args.random_seed + idx if args.set_seed else int(torch.randint(0, 2**62, (1,)))) for idx, _ in chunk]
            prefix = family.build_prefix([p for _, p in chunk], cfg_scale)
            if decoder is None:
                from models.generation import generate_ar

                tokens, gstats = generate_ar(family.target, prefix, family.num_image_tokens, sampling, generators,
                                             family.allowed_tokens)
                per_prompt = [{"step_compression": 1.0, "target_forwards": gstats.target_forwards}] * len(chunk)
            else:
                tokens, gstats = decoder.generate(prefix, generators)
                per_prompt = gstats.extra["per_prompt"]
            images = family.decode_images(tokens)
            for j, ((idx, prompt_text), pstats) in enumerate(zip(chunk, per_prompt)):
                tmp = out / f"prompt_{idx}.tmp{os.getpid()}.png"  # unique: another writer never shares it
                save_image(images[j : j + 1], tmp)
                tmp.replace(out / f"prompt_{idx}.png")
                if args.save_tokens:
                    np.save(out / f"prompt_{idx}_tokens.npy", tokens[j].cpu().numpy())
                # latency and tokens/s per image are the batch's, amortised over its images
                stats[f"prompt_{idx}"] = {"prompt": prompt_text, "latency": gstats.latency / len(chunk), **pstats,
                                          "tokens_per_second": gstats.tokens_per_second,
                                          "num_tokens": family.num_image_tokens, "batch_size": len(chunk),
                                          "batch_latency": gstats.latency}
            write_json_atomic(stats, stats_path)
            bar.update(len(chunk))
            bar.set_postfix(latency=f"{gstats.latency / len(chunk):.2f}s/img",
                            tau=f"{sum(p['step_compression'] for p in per_prompt) / len(chunk):.2f}")
    finally:
        bar.close()
    if ctx.is_main and hasattr(decoder, "report"):  # --tree auto: every change of tree, with its reason
        config["auto_tree"] = decoder.report()
        write_json_atomic(config, out / "generation_configs.json")
    if args.compile and todo:
        from models.compiled import compile_report

        print(compile_report(family.target) + " (inside the first batch's latency)")
    if ctx.world > 1:
        stats = merge_rank_stats(ctx, final_path)
        items = all_items
    if ctx.is_main:
        _print_summary(stats, items)
    lock.release()
    return stats


def merge_rank_stats(ctx: ProcessContext, final_path: Path) -> dict:
    """Wait for every rank, then rank 0 merges the per-rank statistics into the run's single JSON."""
    ctx.wait()
    merged: dict = json.loads(final_path.read_text()) if final_path.exists() else {}
    if ctx.is_main:
        for part in sorted(final_path.parent.glob(final_path.stem + ".rank*.json")):
            merged.update(json.loads(part.read_text()))
        merged = dict(sorted(merged.items(), key=lambda kv: int(kv[0].split("_")[1])))
        write_json_atomic(merged, final_path)
        for part in final_path.parent.glob(final_path.stem + ".rank*.json"):
            part.unlink()
    ctx.wait()
    return json.loads(final_path.read_text())


def _print_summary(stats: dict, items: list[tuple[int, str]]) -> None:
    rows = [stats[f"prompt_{i}"] for i, _ in items if f"prompt_{i}" in stats]
    if not rows:
        return
    lat = np.mean([r["latency"] for r in rows])
    tps = np.mean([r["tokens_per_second"] for r in rows])
    tau = np.mean([r["step_compression"] for r in rows])
    print(f"{len(rows)} images | mean latency {lat:.3f} s | {tps:.1f} tokens/s | mean step compression (tau) {tau:.2f}")
    tau_img = [r["step_compression_image"] for r in rows if "step_compression_image" in r]
    if tau_img and abs(float(np.mean(tau_img)) - tau) > 1e-9:  # forced tokens (Lumina's newlines) excluded
        print(f"tau over image tokens only: {np.mean(tau_img):.2f}")
    if "acceptance_by_depth" in rows[0]:
        width = max(len(r["acceptance_by_depth"]) for r in rows)
        cols = [[r["acceptance_by_depth"][d] for r in rows if d < len(r["acceptance_by_depth"])] for d in range(width)]
        rates = [np.mean([v for v in c if v == v]) if any(v == v for v in c) else float("nan") for c in cols]
        print("acceptance rate by depth: " + ", ".join(f"d{d + 1} {r:.2f}" for d, r in enumerate(rates)))
    if "node_tvd_mean" in rows[0]:  # the realised shift from the target per emitted token (exact per node)
        print(f"node TVD from the target: mean {np.mean([r['node_tvd_mean'] for r in rows]):.3f}, "
              f"max {max(r['node_tvd_max'] for r in rows):.3f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args().parse_args(argv)
    t0 = time.perf_counter()
    run_generate_image(args)
    print(f"done in {time.perf_counter() - t0:.1f} s; outputs in {args.output_dir}")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
