"""benchmark: plain AR vs. exact EAGLE-2 / EAGLE-1, LANTERN (δ) and LANTERN++ (λ) on the same prompts and seeds.

Reports per setting: mean τ (step compression), mean latency, wall-clock speed-up over plain AR measured in
the same run, target forwards per image and — for the built-in demo — the digit classifier's accuracy on the
samples (the quality meter). Writes ``benchmark.json`` and ``benchmark.md`` to ``--output_dir``.
``--verify_cost`` instead times one target forward over a draft tree of n nodes against one AR step.

Throughput: ``--batch_size 1 4 16`` decodes the prompts B at a time (batched AR and batched speculative decoding)
and reports images/s and tokens/s per setting and batch size, with τ per prompt. Every batch of prompts runs
each setting in turn (interleaved), so a machine whose load changes during the run affects all settings alike;
the speed-up column compares each setting with plain AR at the same batch size.

Honest timings (issue 8): ``--repeats R`` passes over the prompts, each batch running every setting in a rotated
order; latencies are medians with IQRs over every image of every pass, and the speed-up's spread is that of the
batch-by-batch ratios against the AR run beside it. On CPU the benchmark runs one intra-op thread unless
``--threads`` says otherwise. A second table (skip with ``--no_profile``) gives the aten ops per round (per step
for AR) and the per-phase time split of a round, measured by the program (:mod:`models.profiling`).

Setting syntax: ``NAME[:key=value,...]`` with NAME in ar, eagle2 (dynamic tree, exact), eagle1 (static tree,
exact), lantern (dynamic tree, δ), lantern++ (static tree, λ); keys: k, delta, lam, tree, top_k_draft, depth,
total_token, budget (node, the default | sibling), residual (exact | original | original_lumina), static=1
(lantern's δ on the static tree ``tree`` instead of a dynamic tree), compile (0 | 1: this setting on the
torch.compile-d target, so eager and compiled run interleaved in one run | 2: the drafter's forward compiled
too), gemm (cpp | aten: a compiled setting's matrix products on CPU, default ``--compile_gemm``; each value is
its own compiled target, and a setting is compared with the AR compiled the same way), tvd (1 | 0: skip measuring the realised per-node TVD, same tokens, fewer ops); tree=auto (static settings:
the tree picked by ``--tree auto``'s cost and acceptance model, calibrated in the warm-up and re-picked between
batches). Example:
``lantern:delta=0.2,k=20 lantern:delta=0.2,budget=sibling lantern++:lam=5,tree=naive_extend_57``.
The per-node TVD columns are the realised shift of the emitted tokens (``VerifyResult.node_tvd``).
Drafter-free (Speculative Jacobi Decoding, same engine): sjd, mc-sjd (maximal coupling), gsd (grouped acceptance
on SJD drafts; keys rank_window (7), prob_gap (0.15), dist (0.5) as ``--gsd_*``, coupling=1 for MC-SJD drafts),
sjd+lantern (δ), sjd+lantern++ (λ); key window (Jacobi window, default 16).
Example: ``sjd mc-sjd gsd gsd:prob_gap=0.3 sjd+lantern:delta=0.2``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

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
from entrypoints.outputs import check_output_dir
from entrypoints.validation import (
    check_counts,
    check_number,
    parse_number,
    validate_benchmark_setting,
    validate_gsd,
    validate_sampling_args,
)
from models.profiling import spread
from models.registry import MODELS, REPO_ROOT

DEFAULT_BUDGET = "node"  # LANTERN's δ bounds each node's shift (as generate_images --lantern_budget); see README
DEFAULT_SETTINGS = [
    "ar", "eagle2", "lantern:delta=0.1", "lantern:delta=0.2", "lantern:delta=0.4",
    "eagle1", "lantern++:lam=2", "lantern++:lam=5", "lantern++:lam=10", "lantern++:lam=20",
]


def parse_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", choices=list(MODELS))
    p.add_argument("--model_path", default=None)
    p.add_argument("--vq_path", default=None)
    p.add_argument("--t5_path", default=None)
    p.add_argument("--image_size", type=int, default=None, help="Anole / Lumina-mGPT image size (default 512 / 768)")
    p.add_argument("--drafter_path", default=None)
    p.add_argument("--codebook_path", default=None, help="neighbour table (default: the model's)")
    p.add_argument("--prompt", default=None, help="prompt set / file / literal (default: the model's prompt file)")
    p.add_argument("--prompt_dir", default=None)
    p.add_argument("--num_images", type=int, default=50, help="images per setting (prompts are cycled)")
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="settings to compare (see above)")
    p.add_argument("--lantern_k", type=int, default=20, help="default neighbourhood size k")
    p.add_argument("--tree_choices", default="mc_sim_7b_63", help="default static tree")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--random_seed", type=int, default=0)
    p.add_argument("--output_dir", default="runs/benchmark")
    p.add_argument("--save_images", action="store_true", help="save a PNG grid per setting")
    p.add_argument("--verify_cost", action="store_true", help="time tree verification vs one AR step instead")
    p.add_argument("--batch_size", type=int, nargs="+", default=[1],
                   help="prompts per batch; several values give one row per setting and batch size")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed passes over the prompts (medians and spreads are over every image of every pass)")
    p.add_argument("--no_profile", action="store_true",
                   help="skip the aten-ops-per-round count and the per-phase time split")
    add_device_args(p)
    from models.compiled import add_compile_args

    add_compile_args(p)
    return p


def parse_setting(text: str, default_k: int, default_tree: str) -> dict:
    name, _, rest = text.partition(":")
    if name not in ("ar", "eagle2", "eagle1", "lantern", "lantern++") + JACOBI_SETTINGS:
        raise ValueError(f"unknown setting {name!r} in {text!r}")
    bad = [kv for kv in rest.split(",") if kv and "=" not in kv]
    if bad:
        raise UserError(f"setting {text!r}: options are key=value, got {bad}")
    opts = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    what = f"setting {text!r}"
    out = {"label": text, "name": name, "k": parse_number(str(opts.pop("k", default_k)), int, f"{what} k"),
           "tree": opts.pop("tree", default_tree)}
    for key in ("delta", "lam"):
        if key in opts:
            out[key] = parse_number(opts.pop(key), float, f"{what} {key}")
    for key in ("top_k_draft", "depth", "total_token", "window", "coupling", "rank_window"):
        if key in opts:
            out[key] = parse_number(opts.pop(key), int, f"{what} {key}")
    for key in ("prob_gap", "dist"):  # GSD's group thresholds
        if key in opts:
            out[key] = parse_number(opts.pop(key), float, f"{what} {key}")
    for key in ("budget", "residual"):  # relaxation variants (models/drafters/acceptance.py)
        if key in opts:
            out[key] = opts.pop(key)
    if "gemm" in opts:  # the matrix products of a compiled setting on CPU (models/compiled.py CPU_GEMM_PATCHES)
        from models.compiled import GEMM_CHOICES

        out["gemm"] = opts.pop("gemm")
        if out["gemm"] not in GEMM_CHOICES:
            raise UserError(f"setting {text!r}: gemm is one of {', '.join(GEMM_CHOICES)}, got {out['gemm']!r}")
    for key in ("compile", "tvd"):  # compile: this setting on the compiled target; tvd=0: no per-node TVD
        if key in opts:
            flag = opts.pop(key)
            if flag not in ("0", "1") and not (key == "compile" and flag == "2"):  # compile=2: the drafter too
                raise UserError(f"setting {text!r}: {key} is 0 or 1{' (or 2)' * (key == 'compile')}, got {flag!r}")
            out[key] = 2 if flag == "2" else flag == "1"
    if "static" in opts:  # LANTERN's δ on a static tree
        if name != "lantern" or opts["static"] not in ("0", "1"):
            raise ValueError(f"{text!r}: static=0/1 applies to lantern only (lantern++ and eagle1 are static)")
        out["static"] = opts.pop("static") == "1"
    if opts:
        raise ValueError(f"unknown options {sorted(opts)} in {text!r}")
    if "gemm" in out and not out.get("compile"):
        raise UserError(f"setting {text!r}: gemm= applies to compiled settings (compile=1 or 2)")
    if name in ("lantern", "sjd+lantern") and "delta" not in out:
        raise ValueError(f"{text!r}: lantern needs delta=...")
    if name in ("lantern++", "sjd+lantern++") and "lam" not in out:
        raise ValueError(f"{text!r}: lantern++ needs lam=...")
    relaxed = name.removeprefix("sjd+") if name.removeprefix("sjd+").startswith("lantern") else None
    if ("budget" in out or "residual" in out) and relaxed is None:
        raise ValueError(f"{text!r}: budget / residual apply to lantern and lantern++ only")
    gsd_keys = [key for key in ("rank_window", "prob_gap", "dist") if key in out]
    if gsd_keys and name != "gsd":
        raise UserError(f"setting {text!r}: {', '.join(gsd_keys)} apply to gsd only")
    validate_benchmark_setting(out)
    validate_gsd(out.get("rank_window"), out.get("prob_gap"), out.get("dist"), where=f"setting {text!r}: ")
    check_number(f"setting {text!r}: window", out.get("window"), lo=1)  # the Jacobi window
    if relaxed:  # the rule's own checks of the values, before any model loads
        from models.drafters.acceptance import AcceptConfig

        AcceptConfig(relax=relaxed, k=out["k"], delta=out.get("delta"), lam=out.get("lam"),
                     budget=out.get("budget", DEFAULT_BUDGET), residual=out.get("residual", "exact"))
    return out


JACOBI_SETTINGS = ("sjd", "mc-sjd", "gsd", "sjd+lantern", "sjd+lantern++")


def needs_neighbours(name: str) -> bool:
    return name.endswith("lantern") or name.endswith("lantern++")


def build_decoder(family, drafter, setting: dict, sampling, cfg_scale: float, neighbours, target=None):
    from dataclasses import replace

    from models.drafters.acceptance import AcceptConfig
    from models.drafters.choices import get_tree_choices
    from models.ea_model import SpeculativeDecoder, TreeConfig

    name = setting["name"]
    static = name in ("eagle1", "lantern++") or setting.get("static", False)
    accept = AcceptConfig()
    if name in ("lantern", "sjd+lantern"):
        accept = AcceptConfig(relax="lantern", k=setting["k"], delta=setting["delta"])
    elif name in ("lantern++", "sjd+lantern++"):
        accept = AcceptConfig(relax="lantern++", k=setting["k"], lam=setting["lam"])
    if accept.enabled:
        accept = replace(accept, budget=setting.get("budget", DEFAULT_BUDGET), residual=setting.get("residual", "exact"))
    if name == "gsd":
        from models.drafters.grouped import GSD_DIST, GSD_PROB_GAP, GSD_RANK_WINDOW, gsd_config_for

        accept = gsd_config_for(family, setting.get("rank_window", GSD_RANK_WINDOW),
                                setting.get("prob_gap", GSD_PROB_GAP), setting.get("dist", GSD_DIST))
    nb = neighbours[:, : accept.table_columns] if accept.needs_neighbours else None
    if name in JACOBI_SETTINGS:  # drafter-free: the same round with the Jacobi proposer
        from models.drafters.jacobi import SJD_DEFAULT_WINDOW, JacobiProposer

        coupling = name == "mc-sjd" or bool(setting.get("coupling", 0))
        proposer = JacobiProposer(setting.get("window", SJD_DEFAULT_WINDOW), coupling, sampling.greedy,
                                  allowed_tokens=family.allowed_tokens)
        return SpeculativeDecoder(target or family.target, None, family.num_image_tokens, sampling, cfg_scale, accept,
                                  neighbours=nb, allowed_tokens=family.allowed_tokens, proposer=proposer)
    kw = {k: setting[k] for k in ("top_k_draft", "depth", "total_token") if k in setting}
    auto = setting["tree"] == "auto"  # tree=auto: calibrated and re-picked (models/drafters/auto_tree.py)
    if auto:
        from models.drafters.auto_tree import START_TREE, AutoTreeDecoder
    choices = tuple(tuple(c) for c in get_tree_choices(START_TREE if auto else setting["tree"])) if static else None
    tree = TreeConfig(static_choices=choices, **kw)
    dec = SpeculativeDecoder(target or family.target, drafter, family.num_image_tokens, sampling, cfg_scale, accept,
                             tree, nb, family.allowed_tokens)
    dec.measure_shift = setting.get("tvd", True)
    return AutoTreeDecoder(dec) if auto else dec  # calibrates in the (untimed) warm-up call


def _demo_classifier(device):
    from models.demo.classifier import load_classifier

    path = REPO_ROOT / "ckpts" / "demo" / "classifier"
    return load_classifier(path, device) if path.exists() else None


def run_benchmark(args: argparse.Namespace) -> dict:
    from models.drafters.cnets import load_drafter
    from models.ea_model import engine_neighbours
    from models.generation import generate_ar
    from models.registry import get_spec, load_family, resolve_path
    from models.sampling import SamplingConfig

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    family = load_family(args.model, device, dtype, args.model_path, args.vq_path, args.t5_path, args.image_size)
    spec = get_spec(args.model)
    d = family.defaults
    sampling = SamplingConfig(d.temperature if args.temperature is None else args.temperature,
                              d.top_k if args.top_k is None else args.top_k, d.top_p if args.top_p is None else args.top_p)
    cfg_scale = d.cfg if args.cfg is None else args.cfg
    if args.compile:  # every setting, AR included, runs the same compiled target
        from models.compiled import compile_target

        compile_target(family, args.compile_mode, drafter=args.compile_drafter, gemm=args.compile_gemm)
    settings = [parse_setting(s, args.lantern_k, args.tree_choices) for s in args.settings]
    drafter = neighbours = None
    if any(s["name"] != "ar" and s["name"] not in JACOBI_SETTINGS for s in settings):
        drafter = load_drafter(resolve_path(spec, "drafter", args.drafter_path), device, dtype, family.target.config)
    if any(needs_neighbours(s["name"]) for s in settings):
        k = max(s["k"] + (s.get("residual", "exact") != "exact") for s in settings)  # original: k+1 columns
        neighbours = engine_neighbours(family, resolve_path(spec, "codebook", args.codebook_path), k, device)
    from entrypoints.generate_images import default_prompt

    prompt = args.prompt or default_prompt(args.model)[0]
    prompts = [p for _, p in load_prompts(prompt, args.prompt_dir, None, None)]
    prompts = [prompts[i % len(prompts)] for i in range(args.num_images)]
    classifier = _demo_classifier(device) if args.model == "demo" else None
    labels = torch.tensor([family.class_parser(p) for p in prompts]) if classifier is not None else None

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # compile=1 settings of an eager run: one compiled target per matrix-product choice (gemm=cpp|aten)
    gemm = {s["label"]: s.get("gemm", args.compile_gemm) for s in settings}
    if args.compile and any(gemm[s["label"]] != args.compile_gemm for s in settings):
        raise UserError("a setting's gemm= needs an eager run (no --compile): give the settings compile=1 instead")
    compiled: dict = {}
    if any(s.get("compile") for s in settings) and not args.compile:
        from models.compiled import CompiledTarget, compile_target

        compile_target(family, args.compile_mode, check_only=True)
        for g in dict.fromkeys(gemm[s["label"]] for s in settings if s.get("compile")):
            compiled[g] = CompiledTarget(family.target, args.compile_mode, gemm=g)
    targets = {s["label"]: compiled[gemm[s["label"]]] if s.get("compile") and compiled else family.target
               for s in settings}
    for s in settings:  # compile=2: the same compiled target, with the drafter's forward compiled too
        if s.get("compile") == 2:
            targets[s["label"]] = targets[s["label"]].with_drafter()
    decoders = {s["label"]: None if s["name"] == "ar" else build_decoder(family, drafter, s, sampling, cfg_scale,
                                                                         neighbours, targets[s["label"]])
                for s in settings}

    def one(label: str, chunk: list[int]):
        gens = [torch.Generator(device=device).manual_seed(args.random_seed + i) for i in chunk]
        prefix = family.build_prefix([prompts[i] for i in chunk], cfg_scale)
        if decoders[label] is None:
            return generate_ar(targets[label], prefix, family.num_image_tokens, sampling, gens, family.allowed_tokens)
        return decoders[label].generate(prefix, gens)

    # whether each setting runs compiled, and the plain-AR setting with the same compile setting (if the run has one)
    comp = {s["label"]: bool(s.get("compile")) or args.compile for s in settings}
    comp_key = {label: (c, gemm[label] if c else None) for label, c in comp.items()}  # compiled the same way
    same_ar = {s["label"]: next((o["label"] for o in settings if o["name"] == "ar" and comp_key[o["label"]] == comp_key[s["label"]]),
                                None) for s in settings}
    results = []
    for bs in args.batch_size:
        chunks = [list(range(i, min(i + bs, len(prompts)))) for i in range(0, len(prompts), bs)]
        for s in settings:
            one(s["label"], chunks[0])  # warm-up, not timed (with --compile: the compilation)
        if args.compile or compiled:
            from models.compiled import compile_report

            for g, c in (compiled or {args.compile_gemm: family.target}).items():
                print(compile_report(c) + f", gemm {g} (warm-up, batch {bs}; not in the timings)", file=sys.stderr)
        acc = {s["label"]: {"time": 0.0, "taus": [], "fwd": [], "toks": [], "depth": [], "tvd_mean": [], "tvd_max": [],
                            "per_image": [], "ratio": [], "ratio_same": []} for s in settings}
        passes = [(r, c, chunk) for r in range(args.repeats) for c, chunk in enumerate(chunks)]
        for r, c, chunk in tqdm(passes, desc=f"batch {bs}", unit="batch", leave=False):
            # interleaved: every batch of prompts runs every setting, in an order rotated from batch to batch so
            # no setting always runs first (cache warmth) or right after the slowest one
            order = [settings[(j + c + r) % len(settings)] for j in range(len(settings))]
            lat = {}
            for s in order:
                tokens, st = one(s["label"], chunk)
                lat[s["label"]] = st.latency / len(chunk)
                a = acc[s["label"]]
                a["time"] += st.latency
                a["per_image"].append(lat[s["label"]])
                if r > 0:  # tokens, τ and forwards do not depend on the pass (fixed per-image seeds)
                    continue
                a["toks"].append(tokens)
                per = st.extra.get("per_prompt", [{"step_compression": 1.0, "target_forwards": st.target_forwards}]
                                   * len(chunk))
                a["taus"] += [p["step_compression"] for p in per]
                a["fwd"] += [p["target_forwards"] for p in per]
                a["depth"] += [p["acceptance_by_depth"] for p in per if "acceptance_by_depth" in p]
                a["tvd_mean"] += [p["node_tvd_mean"] for p in per if "node_tvd_mean" in p]
                a["tvd_max"] += [p["node_tvd_max"] for p in per if "node_tvd_max" in p]
            if "ar" in lat:  # the speed-up of this batch, against plain AR run beside it
                for label, v in lat.items():
                    acc[label]["ratio"].append(lat["ar"] / v)
            for label, v in lat.items():  # and against the AR run with the same compile setting
                if same_ar[label] is not None:
                    acc[label]["ratio_same"].append(lat[same_ar[label]] / v)
        for s in settings:
            a = acc[s["label"]]
            tokens = torch.cat(a["toks"])
            lat_s = spread(a["per_image"])
            total_images = len(prompts) * args.repeats
            row = {"setting": s["label"], "batch_size": bs, "tau": statistics.mean(a["taus"]),
                   "latency_s": lat_s["median"], "latency_spread": lat_s,
                   "images_per_s": total_images / a["time"],
                   "tokens_per_s": total_images * family.num_image_tokens / a["time"],
                   "target_forwards": statistics.mean(a["fwd"])}
            if a["ratio"]:
                row["speedup_spread"] = spread(a["ratio"])
            if a["ratio_same"]:
                row["speedup_same_compile_spread"] = spread(a["ratio_same"])
            if not args.no_profile and bs == args.batch_size[0]:
                row["profile"] = _profile(s, decoders[s["label"]], family, targets[s["label"]], prompts, chunks[0],
                                          cfg_scale, sampling, device, args.random_seed)
            if a["tvd_mean"]:  # every image has the same number of tokens: the mean of means is per token
                row["node_tvd_mean"], row["node_tvd_max"] = statistics.mean(a["tvd_mean"]), max(a["tvd_max"])
            if classifier is not None:
                images = family.decode_images(tokens) * 2 - 1
                pred = classifier.classify(images).cpu()
                row["accuracy"] = float((pred == labels).float().mean())
                from models.evaluation import demo_quality  # + demo-FID, precision / recall vs the bundled digits

                row.update(demo_quality(classifier, images, labels))
            if a["depth"]:
                width = max(len(d) for d in a["depth"])
                cols = [[d[j] for d in a["depth"] if j < len(d) and d[j] == d[j]] for j in range(width)]
                row["acceptance_by_depth"] = [statistics.mean(c) if c else None for c in cols]
            if hasattr(decoders[s["label"]], "report"):  # tree=auto: calibration and every change of tree
                row["auto_tree"] = decoders[s["label"]].report()
            if args.save_images:
                from torchvision.utils import save_image

                name = s["label"].replace(":", "_") + ("" if args.batch_size == [1] else f"_b{bs}")
                save_image(family.decode_images(tokens), out / f"{name}.png", nrow=10)
            results.append(row)
    ar_prof = {r["batch_size"]: r["profile"] for r in results if r["setting"] == "ar" and "profile" in r}
    for r in results:  # against the AR run with the same compile setting (when the run has one)
        r["compiled"] = comp[r["setting"]]
        base = next((b for b in results if b["setting"] == same_ar[r["setting"]] and b["batch_size"] == r["batch_size"]),
                    None)
        if base is not None:
            r["speedup_vs_ar_same_compile"] = base["latency_s"] / r["latency_s"]
            if "round_s" in r.get("profile", {}) and "step_s" in base.get("profile", {}):
                r["profile"]["round_over_ar_step_same_compile"] = r["profile"]["round_s"] / base["profile"]["step_s"]
                r["profile"]["ops_round_over_ar_step_same_compile"] = (r["profile"]["ops_per_round"]
                                                                       / base["profile"]["ops_per_step"])
    for r in results:  # against plain AR at the same batch size: ratio of the median latencies (the spread shown
        # beside it is that of the batch-by-batch ratios, each setting against the AR run next to it)
        base = next((b["latency_s"] for b in results if b["setting"] == "ar" and b["batch_size"] == r["batch_size"]),
                    None)
        r["speedup_vs_ar"] = base / r["latency_s"] if base else None
        base = ar_prof.get(r["batch_size"])
        if base and "round_s" in r.get("profile", {}):
            p = r["profile"]
            p["round_over_ar_step"] = p["round_s"] / base["step_s"]
            p["ops_round_over_ar_step"] = p["ops_per_round"] / base["ops_per_step"]
            if p.get("products_s_per_round") and base.get("products_s_per_step"):  # the arithmetic floor
                p["products_over_ar_step"] = p["products_s_per_round"] / base["products_s_per_step"]
    from models.profiling import machine_info

    machine = machine_info(device)
    report = {"model": args.model, "num_images": len(prompts), "device": str(device), "dtype": str(dtype),
              "machine": machine,
              "threads": torch.get_num_threads(), "repeats": args.repeats, "compile": args.compile,
              "compile_s": getattr(family.target, "compile_s", None), "compile_graphs": getattr(family.target, "graphs", None),
              "compile_gemm": args.compile_gemm if args.compile else {label: g for label, g in gemm.items() if comp[label]},
              "sampling": vars(sampling), "cfg": cfg_scale,
              "command": "python main.py benchmark " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["benchmark"] else sys.argv[1:]),
              "results": results}
    (out / "benchmark.json").write_text(json.dumps(report, indent=2))
    table = _measured_on(machine) + "\n\n"
    table += _markdown(results)
    if not args.no_profile:
        table += "\n\n" + _profile_markdown(results)
    (out / "benchmark.md").write_text(table + "\n")
    from models.plots import write_csv, write_plots

    write_csv(results, out)
    if len(args.batch_size) > 1:  # one point per setting and batch size in the figures
        plotted = [{**r, "setting": f"{r['setting']} (B={r['batch_size']})"} for r in results]
    else:
        plotted = results
    write_plots(plotted, out, title=f"{args.model}, {len(prompts)} images per setting")
    print(table)
    return report


def _profile(setting: dict, decoder, family, target, prompts, chunk, cfg_scale, sampling, device, seed: int) -> dict:
    """Ops per round / per AR step and the per-phase time split, on the first batch of prompts (untimed runs)."""
    from models.profiling import profile_ar_step, profile_speculative

    prefix = family.build_prefix([prompts[i] for i in chunk], cfg_scale)

    def gens():
        return [torch.Generator(device=device).manual_seed(seed + i) for i in chunk]

    if decoder is None:
        return profile_ar_step(target, prefix, family.num_image_tokens, sampling, gens, family.allowed_tokens)
    return profile_speculative(decoder, prefix, gens)


def _profile_markdown(results: list[dict]) -> str:
    """Ops per round and where a round's time goes (one untimed image per setting; first batch size)."""
    from models.profiling import ROUND_PHASES

    head = ("| setting | aten ops / round (AR: / step; compiled: launches) | round time (ms) | round ÷ AR step (time, same compile) | "
            "round ÷ AR step (ops, same compile) | matrix products: round ÷ AR step (time alone) | "
            + " | ".join(f"{p} %" for p in ROUND_PHASES) + " |")
    lines = [head, "|" + "---|" * (6 + len(ROUND_PHASES))]
    for r in results:
        p = r.get("profile")
        if not p:
            continue
        if "ops_per_step" in p:
            mp = f"1 ({p['products_per_step']:.0f} in {1e3 * p['products_s_per_step']:.2f} ms)" if p.get(
                "products_s_per_step") else "—"
            lines.append(f"| {r['setting']} | {p['ops_per_step']:.0f} | {1000 * p['step_s']:.2f} | 1 | 1 | {mp} |"
                         + " — |" * len(ROUND_PHASES))
            continue
        key = "round_over_ar_step_same_compile" if "round_over_ar_step_same_compile" in p else "round_over_ar_step"
        rt = f"{p[key]:.2f}" if key in p else "—"
        okey = "ops_round_over_ar_step" + ("_same_compile" if "ops_round_over_ar_step_same_compile" in p else "")
        ro = f"{p[okey]:.2f}" if okey in p else "—"
        shares = " | ".join(f"{100 * p['time_share'][ph]:.0f}" for ph in ROUND_PHASES)
        mp = f"{p['products_over_ar_step']:.2f} ({p['products_per_round']:.0f})" if "products_over_ar_step" in p else "—"
        lines.append(f"| {r['setting']} | {p['ops_per_round']:.0f} | {1000 * p['round_s']:.2f} | {rt} | {ro} | {mp} | "
                     f"{shares} |")
    if any(r.get("compiled") for r in results):
        lines.append("\ncompiled settings: launches = aten ops dispatched eagerly + the kernel launches of every compiled "
                     "graph call (generated kernels, extern kernels and aten fallbacks in inductor's wrapper code, "
                     "models/compiled.py graph_launches); times are those of the setting as run.")
    lines.append("\nmatrix products: every linear / mm / addmm one round (AR: one step) computes, recorded in the eager "
                 "op-count run and replayed alone, with one stand-in matrix per weight of the model, reused as the model "
                 "reuses it (models/profiling.py replay_products): "
                 "the arithmetic floor of a round in AR steps, whatever dispatch and bookkeeping cost (eager rows; a "
                 "compiled round computes the same products).")
    return "\n".join(lines)


def _measured_on(machine: dict) -> str:
    """The first line of a benchmark's table: the machine and the intra-op threads the timings ran with."""
    from models.profiling import describe_machine

    return f"measured on: {describe_machine(machine)}, {torch.get_num_threads()} intra-op thread(s)"


def _markdown(results: list[dict]) -> str:
    has_acc = any("accuracy" in r for r in results)
    head = ("| setting | batch | τ | latency (s / image), median [IQR] | images/s | tokens/s | "
            "speed-up vs AR (same batch) [IQR of per-batch ratios] | target forwards |") + (" accuracy |" if has_acc else "") + \
        " node TVD mean / max | speed-up vs AR, same compile setting [IQR] |"
    sep = "|---|---|---|---|---|---|---|---|" + ("---|" if has_acc else "") + "---|---|"
    lines = [head, sep]
    for r in results:
        sp = f"{r['speedup_vs_ar']:.2f}×" if r.get("speedup_vs_ar") else "—"
        if "speedup_spread" in r:
            sp += f" [{r['speedup_spread']['q1']:.2f}–{r['speedup_spread']['q3']:.2f}]"
        lat = f"{r['latency_s']:.3f}"
        if "latency_spread" in r:
            lat += f" [{r['latency_spread']['q1']:.3f}–{r['latency_spread']['q3']:.3f}]"
        line = (f"| {r['setting']} | {r['batch_size']} | {r['tau']:.2f} | {lat} | "
                f"{r['images_per_s']:.2f} | {r['tokens_per_s']:.0f} | {sp} | {r['target_forwards']:.1f} |")
        if has_acc:
            line += f" {100 * r['accuracy']:.0f} % |"
        line += f" {r['node_tvd_mean']:.3f} / {r['node_tvd_max']:.3f} |" if "node_tvd_mean" in r else " — |"
        if "speedup_vs_ar_same_compile" in r:
            q = r.get("speedup_same_compile_spread")
            line += f" {r['speedup_vs_ar_same_compile']:.2f}×" + (f" [{q['q1']:.2f}–{q['q3']:.2f}] |" if q else " |")
        else:
            line += " — |"
        lines.append(line)
    return "\n".join(lines)


def run_verify_cost(args: argparse.Namespace) -> dict:
    """Median time of one target forward over n tree nodes (after a prefix) relative to one AR step (n = 1).

    Sizes are timed interleaved (every lap runs every size, rotated) and the ratio is taken within each lap, so
    a change of machine load hits all sizes alike; medians and IQRs over ``10 × --repeats`` laps.
    """
    from models.generation import key_validity, prefill
    from models.profiling import OpCounter
    from models.registry import load_family

    device = resolve_device(args.device)
    family = load_family(args.model, device, resolve_dtype(args.precision, device), args.model_path, args.vq_path,
                         args.t5_path)
    target = family.target
    prefix = family.build_prefix(["0"] if args.model in ("demo", "llamagen_c2i") else ["a photo"],
                                 family.defaults.cfg)
    rows, t = prefix.rows, prefix.length
    ctx = t + family.num_image_tokens // 2  # a prefix half-way through the image
    sizes = [1, 4, 16, 26, 59, 128]
    cache = target.new_cache(rows, ctx + max(sizes) + 1)
    keys = key_validity(prefix, ctx + max(sizes) + 1)
    with torch.no_grad():
        prefill(target, prefix, cache)
        ids = torch.zeros(rows, ctx - t, dtype=torch.long, device=device)
        pos = torch.arange(t, ctx, device=device)
        mask = keys[:, None, None, :ctx].expand(-1, 1, ctx - t, -1) & torch.ones(ctx - t, ctx, dtype=torch.bool,
                                                                                  device=device).tril(t)
        target.forward_hidden(target.embed_tokens(ids), pos, cache, pos, mask)
        inputs = {}
        for n in sizes:
            tree_mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()
            m = torch.cat([keys[:, None, None, :ctx].expand(-1, 1, n, -1), tree_mask[None, None].expand(rows, 1, -1, -1)], -1)
            slots = torch.arange(ctx, ctx + n, device=device)
            rope = ctx + torch.arange(n, device=device) % 6  # tree depths stay small; cost does not depend on them
            emb = target.embed_tokens(torch.zeros(rows, n, dtype=torch.long, device=device))
            inputs[n] = (emb, rope, slots, m)

        def forward(n):
            emb, rope, slots, m = inputs[n]
            target.lm_head(target.forward_hidden(emb, rope, cache, slots, m))

        for n in sizes:  # warm-up, and the aten ops of one forward over n nodes
            forward(n)
        ops = {}
        for n in sizes:
            with OpCounter() as c:
                forward(n)
            ops[n] = c.total
        times = {n: [] for n in sizes}
        ratios = {n: [] for n in sizes}
        for r in range(args.repeats * 10):  # interleaved: every repeat times every size, in a rotated order
            lap = {}
            for j in range(len(sizes)):
                n = sizes[(j + r) % len(sizes)]
                t0 = time.perf_counter()
                forward(n)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                lap[n] = time.perf_counter() - t0
                times[n].append(lap[n])
            for n in sizes:
                ratios[n].append(lap[n] / lap[1])
    res = {n: spread(v) for n, v in times.items()}
    rel = {n: spread(v) for n, v in ratios.items()}
    from models.profiling import machine_info

    report = {"model": args.model, "context": ctx, "threads": torch.get_num_threads(), "laps": args.repeats * 10,
              "machine": machine_info(device),
              "seconds": {n: v["median"] for n, v in res.items()}, "seconds_spread": res,
              "relative_to_ar_step": {n: v["median"] for n, v in rel.items()}, "relative_spread": rel,
              "aten_ops": ops}
    print(_measured_on(report["machine"]) + "\n")
    print("| tree nodes | time (ms), median [IQR] | × one AR step, median [IQR] (same lap) | aten ops |\n|---|---|---|---|")
    for n in sizes:
        t_, q = res[n], rel[n]
        print(f"| {n} | {1000 * t_['median']:.2f} [{1000 * t_['q1']:.2f}–{1000 * t_['q3']:.2f}] | "
              f"{q['median']:.2f} [{q['q1']:.2f}–{q['q3']:.2f}] | {ops[n]} |")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "verify_cost.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args().parse_args(argv)
    validate_sampling_args(args)
    check_counts(args, {"num_images": 1, "lantern_k": 1})
    check_output_dir(args.output_dir)
    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats}: must be >= 1")
    on_cpu = resolve_device(args.device).type == "cpu"
    # one intra-op thread on CPU unless asked: with other processes on the cores, extra threads make timings
    # swing by an order of magnitude (README, "CPU threads")
    threads = apply_threads(1 if args.threads is None and on_cpu else args.threads)
    for s in args.settings:  # fail fast on a typo
        parse_setting(s, args.lantern_k, args.tree_choices)
    from models.drafters.choices import get_tree_choices

    for s in args.settings:  # a bad tree name fails now, not after the first settings ran
        setting = parse_setting(s, args.lantern_k, args.tree_choices)
        static = setting["name"] in ("eagle1", "lantern++") or setting.get("static", False)
        if setting["tree"] == "auto" and not static:
            raise UserError(f"setting {s!r}: tree=auto picks a static tree (eagle1, lantern++, lantern with static=1)")
        if setting["tree"] != "auto":
            get_tree_choices(setting["tree"])
    if min(args.batch_size) < 1:
        raise UserError(f"--batch_size must be >= 1, got {min(args.batch_size)}")
    print(f"benchmark: {threads} intra-op thread(s)"  # after validation: an error stays the first line
          + (" (the benchmark's CPU default; --threads N to change)" if args.threads is None and on_cpu else ""),
          file=sys.stderr)
    if args.verify_cost:
        run_verify_cost(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
