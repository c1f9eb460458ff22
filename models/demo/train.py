"""Train the built-in demo model from scratch on scikit-learn's digits (CPU, about half an hour on 2 cores).

    python -m models.demo.train --out ckpts/demo

runs every stage in order and writes the checkpoint folders plus ``train_report.json``:

1. ``vq``         LlamaGen VQ (ds4, 1024 codes, 8-d L2-normalised lookup) on augmented 32×32 digits, with
                  dead codes re-initialised from encoder outputs so that most of the codebook is used;
2. ``gpt``        encode the train split (clean + ``--aug-copies`` augmented copies) to 8×8 = 64 codes each,
                  then train a small LlamaGen C2I GPT (class dropout 0.1 for CFG) with AdamW + cosine schedule;
3. ``classifier`` a small CNN on augmented real digits: the quality meter of the demo;
4. ``eval``       sample ``--eval-per-class`` images per class with CFG, judge them with the classifier, measure
                  next-token flatness and seconds per image.

``--stage`` runs one stage (later stages read the earlier checkpoints from ``--out``). The numbers in
``train_report.json`` are measured by this program, never typed in.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

# Idle OpenMP threads should sleep, not spin: on a 2-core machine shared with other jobs, spinning threads
# made training steps 2-10x slower (measured). Only effective before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from models.base_models.llamagen.gpt import GPTConfig, LlamaGenGPT  # noqa: E402
from models.base_models.llamagen.vq_model import VQConfig, VQModel  # noqa: E402
from models.demo.checkpoint import load_gpt, load_vq, read_json, save_model, write_json  # noqa: E402
from models.demo.classifier import ClassifierConfig, DigitClassifier, load_classifier  # noqa: E402
from models.demo.data import CLASS_NAMES, NUM_CLASSES, augment, load_split  # noqa: E402
from models.demo.sampling import sample_codes  # noqa: E402

STAGES = ("vq", "gpt", "classifier", "eval")


def demo_vq_config() -> VQConfig:
    """32×32 RGB -> 8×8 grid of 1024 codes; widths are multiples of 32 because GroupNorm uses 32 groups."""
    return VQConfig(
        codebook_size=1024,
        codebook_embed_dim=8,
        codebook_l2_norm=True,
        codebook_show_usage=False,  # the 65,536-slot usage buffer is not needed and would cost 256 KB
        encoder_ch_mult=[1, 2, 2],
        decoder_ch_mult=[1, 2, 2],
        z_channels=32,
        ch=32,
        num_res_blocks=1,
    )


def demo_gpt_config(dim: int, n_layer: int, n_head: int) -> GPTConfig:
    """A small LlamaGen C2I transformer over 64 image tokens with a 1024-code vocabulary."""
    return GPTConfig(
        dim=dim,
        n_layer=n_layer,
        n_head=n_head,
        multiple_of=32,
        token_dropout_p=0.0,
        attn_dropout_p=0.0,
        resid_dropout_p=0.05,
        ffn_dropout_p=0.05,
        num_classes=NUM_CLASSES,
        class_dropout_prob=0.1,
        model_type="c2i",
        vocab_size=1024,
        cls_token_num=1,
        block_size=64,
    )


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to ``peak`` then cosine decay to ``floor · peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t))))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def _update_report(out: str, section: str, values: dict) -> None:
    path = os.path.join(out, "train_report.json")
    report = read_json(path, default={})
    report[section] = values
    report["environment"] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
    }
    files = {}
    for root, _, names in os.walk(out):
        for name in names:
            if not name.startswith(".") and name != "train_report.json":
                p = os.path.join(root, name)
                files[os.path.relpath(p, out)] = os.path.getsize(p)
    report["files_bytes"] = dict(sorted(files.items()))
    report["total_bytes"] = sum(files.values())
    write_json(path, report)


def _batches(n: int, batch: int, gen: torch.Generator):
    """Endless random mini-batch indices over ``n`` items (a fresh permutation per epoch)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield perm[i : i + batch]


# ------------------------------------------------------------------------------------------------ VQ
def train_vq(args: argparse.Namespace) -> dict:
    """Train the VQ tokenizer; returns the stage's measured numbers."""
    t0 = time.time()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    device = torch.device(args.device)
    images, _ = load_split("train")
    val_images, _ = load_split("val")
    cfg = demo_vq_config()
    model = VQModel(cfg).to(device).train()
    quant = model.quantize
    opt = torch.optim.AdamW(model.parameters(), lr=args.vq_lr, betas=(0.9, 0.99), weight_decay=0.0)
    usage = torch.zeros(cfg.codebook_size, device=device)  # code hits since the last dead-code check
    reinit_until = int(args.vq_steps * 0.8)
    n_reinit = 0
    batches = _batches(images.shape[0], args.vq_batch, gen)
    bar = tqdm(range(args.vq_steps), desc="vq", mininterval=5.0)
    for step in bar:
        x = augment(images[next(batches)], gen).to(device)
        _set_lr(opt, cosine_lr(step, args.vq_steps, args.vq_lr, warmup=50))
        # VQModel.forward spelled out, to keep the pre-quantisation latents for dead-code re-initialisation.
        z = model.quant_conv(model.encoder(x))
        zq, losses, idx = quant(z)
        recon = model.decode(zq)
        rec = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        loss = rec + losses["vq_loss"] + losses["commit_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage += torch.bincount(idx, minlength=cfg.codebook_size).float()
        if (step + 1) % args.vq_reinit_every == 0 and step < reinit_until:
            # Codes nobody picked since the last check restart at random (normalised) encoder outputs of
            # this batch, plus a little noise; without this only a fraction of 1024 codes would survive.
            dead = (usage == 0).nonzero().squeeze(1)
            if dead.numel() > 0:
                lat = z.detach().permute(0, 2, 3, 1).reshape(-1, cfg.codebook_embed_dim)
                lat = F.normalize(lat, dim=-1) if cfg.codebook_l2_norm else lat
                pick = torch.randint(0, lat.shape[0], (dead.numel(),), generator=gen).to(device)
                new = lat[pick] + 0.01 * torch.randn(dead.numel(), lat.shape[1], generator=gen).to(device)
                with torch.no_grad():
                    quant.embedding.weight[dead] = F.normalize(new, dim=-1) if cfg.codebook_l2_norm else new
                n_reinit += int(dead.numel())
            usage.zero_()
        if step % 20 == 0:
            bar.set_postfix(rec=f"{rec.item():.4f}", vq=f"{losses['vq_loss'].item():.4f}")
    train_s = time.time() - t0

    model.eval()
    with torch.no_grad():
        val_recon = model(val_images.to(device))[0].clamp(-1, 1)
        val_mse = F.mse_loss(val_recon, val_images.to(device)).item()
        all_images, _ = load_split("all")
        clean_codes = torch.cat([model.encode_to_codes(b.to(device)) for b in all_images.split(256)])
        aug_codes = torch.cat(
            [model.encode_to_codes(augment(b, gen).to(device)) for b in images.repeat(4, 1, 1, 1).split(256)]
        )
    save_model(os.path.join(args.out, "vq"), model, cfg.to_dict())
    stats = {
        "steps": args.vq_steps,
        "batch": args.vq_batch,
        "lr": args.vq_lr,
        "params": sum(p.numel() for p in model.parameters()),
        "val_recon_mse": round(val_mse, 5),
        "val_recon_mse_note": "mean squared error in the [-1, 1] pixel scale on the clean val split",
        "codes_used_clean_all_digits": int(clean_codes.unique().numel()),
        "codes_used_augmented_train_x4": int(aug_codes.unique().numel()),
        "codebook_size": cfg.codebook_size,
        "dead_codes_reinitialised": n_reinit,
        "wall_s": round(time.time() - t0, 1),
        "train_wall_s": round(train_s, 1),
    }
    print("vq:", stats)
    return stats


# ------------------------------------------------------------------------------------------------ GPT
@torch.no_grad()
def encode_dataset(vq: VQModel, copies: int, gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """Codes of the train split (clean + ``copies`` augmented versions) and of the clean val split."""
    images, labels = load_split("train")
    val_images, val_labels = load_split("val")
    codes, labs = [vq.encode_to_codes(images.to(device)).cpu()], [labels]
    for _ in tqdm(range(copies), desc="encode", mininterval=5.0):
        codes.append(torch.cat([vq.encode_to_codes(augment(b, gen).to(device)).cpu() for b in images.split(512)]))
        labs.append(labels)
    return {
        "train_codes": torch.cat(codes),
        "train_labels": torch.cat(labs),
        "val_codes": vq.encode_to_codes(val_images.to(device)).cpu(),
        "val_labels": val_labels,
    }


@torch.no_grad()
def gpt_loss(model: LlamaGenGPT, codes: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    """Mean next-token cross-entropy (nats) of ``codes`` given ``labels`` in eval mode (no class dropout)."""
    was_training = model.training
    model.eval()
    device = model.tok_embeddings.weight.device
    total, count = 0.0, 0
    for c, y in zip(codes.split(batch), labels.split(batch)):
        c, y = c.to(device), y.to(device)
        logits = model(idx=c[:, :-1], cond_idx=y)[:, -c.shape[1] :]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), c.reshape(-1), reduction="sum").item()
        count += c.numel()
    model.train(was_training)
    return total / count


def train_gpt(args: argparse.Namespace) -> dict:
    """Encode the data with the saved VQ and train the GPT; returns the stage's measured numbers."""
    t0 = time.time()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    device = torch.device(args.device)
    vq = load_vq(os.path.join(args.out, "vq"), device)
    data = encode_dataset(vq, args.aug_copies, gen, device)
    encode_s = time.time() - t0
    del vq

    cfg = demo_gpt_config(args.gpt_dim, args.gpt_layers, args.gpt_heads)
    model = LlamaGenGPT(cfg).to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.gpt_wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.gpt_lr,
        betas=(0.9, 0.95),
    )
    codes, labels = data["train_codes"], data["train_labels"]
    batches = _batches(codes.shape[0], args.gpt_batch, gen)
    ema = None
    val_curve = []
    bar = tqdm(range(args.gpt_steps), desc="gpt", mininterval=5.0)
    for step in bar:
        idx = next(batches)
        c, y = codes[idx].to(device), labels[idx].to(device)
        _set_lr(opt, cosine_lr(step, args.gpt_steps, args.gpt_lr, warmup=min(200, args.gpt_steps // 10 + 1)))
        logits = model(idx=c[:, :-1], cond_idx=y)  # train mode: row k predicts token k; labels dropped at 10 %
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), c.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{ema:.3f}")
        if args.gpt_eval_every and (step + 1) % args.gpt_eval_every == 0 and step + 1 < args.gpt_steps:
            val_curve.append([step + 1, round(gpt_loss(model, data["val_codes"], data["val_labels"]), 4)])
            tqdm.write(f"gpt step {step + 1}: train loss (ema) {ema:.4f}, val loss {val_curve[-1][1]:.4f}")
    train_s = time.time() - t0 - encode_s

    val = gpt_loss(model, data["val_codes"], data["val_labels"])
    val_curve.append([args.gpt_steps, round(val, 4)])
    train_clean = gpt_loss(model, data["train_codes"][: len(data["val_codes"])], data["train_labels"][: len(data["val_codes"])])
    save_model(os.path.join(args.out, "gpt"), model, cfg.to_dict())
    stats = {
        "steps": args.gpt_steps,
        "batch": args.gpt_batch,
        "lr": args.gpt_lr,
        "dim": cfg.dim,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "params": sum(p.numel() for p in model.parameters()),
        "train_sequences": int(codes.shape[0]),
        "aug_copies": args.aug_copies,
        "val_loss": round(val, 4),
        "val_loss_note": "next-token cross-entropy (nats) on the clean val split, conditional (no class dropout)",
        "train_loss_clean_subset": round(train_clean, 4),
        "train_loss_ema": round(ema, 4) if ema is not None else None,
        "val_curve": val_curve,
        "encode_wall_s": round(encode_s, 1),
        "train_wall_s": round(train_s, 1),
        "wall_s": round(time.time() - t0, 1),
    }
    print("gpt:", {k: v for k, v in stats.items() if k != "val_curve"})
    return stats


# ------------------------------------------------------------------------------------------------ classifier
def train_classifier(args: argparse.Namespace) -> dict:
    """Train the CNN quality meter on augmented real digits; returns held-out accuracy and timing."""
    t0 = time.time()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 2)
    device = torch.device(args.device)
    images, labels = load_split("train")
    val_images, val_labels = load_split("val")
    cfg = ClassifierConfig()
    model = DigitClassifier(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.clf_lr, weight_decay=1e-4)
    batches = _batches(images.shape[0], args.clf_batch, gen)
    bar = tqdm(range(args.clf_steps), desc="classifier", mininterval=5.0)
    for step in bar:
        idx = next(batches)
        x, y = augment(images[idx], gen).to(device), labels[idx].to(device)
        _set_lr(opt, cosine_lr(step, args.clf_steps, args.clf_lr, warmup=20, floor=0.01))
        loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    pred = model.classify(val_images.to(device)).cpu()
    acc = (pred == val_labels).float().mean().item()
    aug_pred = model.classify(augment(val_images, gen).to(device)).cpu()
    aug_acc = (aug_pred == val_labels).float().mean().item()
    save_model(os.path.join(args.out, "classifier"), model, cfg.to_dict())
    stats = {
        "steps": args.clf_steps,
        "batch": args.clf_batch,
        "params": sum(p.numel() for p in model.parameters()),
        "val_accuracy": round(acc, 4),
        "val_accuracy_augmented": round(aug_acc, 4),
        "val_size": int(val_labels.numel()),
        "wall_s": round(time.time() - t0, 1),
    }
    print("classifier:", stats)
    return stats


# ------------------------------------------------------------------------------------------------ eval
def save_grid(images: torch.Tensor, path: str, nrow: int) -> None:
    """Save images (B, 3, H, W) in [-1, 1] as one PNG grid (for looking at samples by eye)."""
    from PIL import Image

    b, _, h, w = images.shape
    ncol = math.ceil(b / nrow)
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    canvas = torch.zeros(3, ncol * (h + 2), nrow * (w + 2), dtype=torch.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        canvas[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = x[i]
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(canvas.permute(1, 2, 0).numpy()).resize((canvas.shape[2] * 3, canvas.shape[1] * 3), 0).save(path)


def evaluate(args: argparse.Namespace) -> dict:
    """Sample per class with CFG, judge with the classifier, and measure flatness and seconds per image."""
    t0 = time.time()
    device = torch.device(args.device)
    vq = load_vq(os.path.join(args.out, "vq"), device)
    gpt = load_gpt(os.path.join(args.out, "gpt"), device)
    clf = load_classifier(os.path.join(args.out, "classifier"), device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 3)

    labels = torch.arange(NUM_CLASSES, device=device).repeat_interleave(args.eval_per_class)
    codes_all, stats_all = [], []
    for chunk in tqdm(labels.split(args.eval_batch), desc="eval samples", mininterval=5.0):
        codes, st = sample_codes(gpt, chunk, args.cfg_scale, args.temperature, args.top_k, gen)
        codes_all.append(codes)
        stats_all.append(st)
    codes = torch.cat(codes_all)
    entropy = torch.cat([s.entropy for s in stats_all])
    top1 = torch.cat([s.top1_prob for s in stats_all])
    sampled = torch.cat([s.sampled_prob for s in stats_all])
    with torch.no_grad():
        images = torch.cat([vq.decode_codes(c) for c in codes.split(100)]).clamp(-1, 1)
    pred = clf.classify(images)
    correct = pred == labels
    per_class = {CLASS_NAMES[c]: round(correct[labels == c].float().mean().item(), 3) for c in range(NUM_CLASSES)}
    if args.samples_png:
        order = torch.arange(labels.numel()).view(NUM_CLASSES, args.eval_per_class)[:, : min(10, args.eval_per_class)]
        save_grid(images[order.reshape(-1)], args.samples_png, nrow=order.shape[1])

    # Seconds per image: one image (CFG doubles the batch to 2), KV cache, then VQ decode; median of 5 runs.
    one = torch.tensor([7], device=device)
    times, token_times = [], []
    for i in range(6):
        ts = time.perf_counter()
        c, _ = sample_codes(gpt, one, args.cfg_scale, args.temperature, args.top_k, gen)
        tm = time.perf_counter()
        with torch.no_grad():
            vq.decode_codes(c)
        te = time.perf_counter()
        if i > 0:  # the first run warms up allocators and kernels
            times.append(te - ts)
            token_times.append(tm - ts)
    stats = {
        "samples": int(labels.numel()),
        "cfg_scale": args.cfg_scale,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "class_accuracy": round(correct.float().mean().item(), 4),
        "class_accuracy_per_class": per_class,
        "next_token_entropy_nats": round(entropy.mean().item(), 3),
        "mean_top1_prob": round(top1.mean().item(), 3),
        "frac_steps_top1_below_0.3": round((top1 < 0.3).float().mean().item(), 3),
        "mean_prob_of_sampled_token": round(sampled.mean().item(), 3),
        "distinct_codes_in_samples": int(codes.unique().numel()),
        "s_per_image": round(sorted(times)[len(times) // 2], 4),
        "s_per_image_tokens_only": round(sorted(token_times)[len(token_times) // 2], 4),
        "s_per_image_note": "1 image, batch 2 with CFG, static KV cache, 64 tokens + VQ decode, median of 5",
        "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine inflates the timings
        "wall_s": round(time.time() - t0, 1),
    }
    print("eval:", stats)
    return stats


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join("ckpts", "demo"), help="output folder (checkpoints + report)")
    p.add_argument("--stage", choices=("all", *STAGES), default="all", help="run one stage or all in order")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    g = p.add_argument_group("vq")
    g.add_argument("--vq-steps", type=int, default=1400)
    g.add_argument("--vq-batch", type=int, default=32)
    g.add_argument("--vq-lr", type=float, default=1e-3)
    g.add_argument("--vq-reinit-every", type=int, default=50, help="dead-code check interval (steps)")
    g = p.add_argument_group("gpt")
    g.add_argument("--gpt-steps", type=int, default=2600)
    g.add_argument("--gpt-batch", type=int, default=64)
    g.add_argument("--gpt-lr", type=float, default=1e-3)
    g.add_argument("--gpt-wd", type=float, default=0.05)
    g.add_argument("--gpt-dim", type=int, default=128)
    g.add_argument("--gpt-layers", type=int, default=6)
    g.add_argument("--gpt-heads", type=int, default=4)
    g.add_argument("--aug-copies", type=int, default=24, help="augmented copies of the train split to encode")
    g.add_argument("--gpt-eval-every", type=int, default=500, help="val-loss interval (0 = only at the end)")
    g = p.add_argument_group("classifier")
    g.add_argument("--clf-steps", type=int, default=400)
    g.add_argument("--clf-batch", type=int, default=64)
    g.add_argument("--clf-lr", type=float, default=2e-3)
    g = p.add_argument_group("eval")
    g.add_argument("--eval-per-class", type=int, default=20)
    g.add_argument("--eval-batch", type=int, default=100)
    g.add_argument("--cfg-scale", type=float, default=4.0)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = sample from the full distribution")
    g.add_argument("--samples-png", default=None, help="optional path for a PNG grid of eval samples")
    return p


def main(argv: list[str] | None = None) -> None:
    """Run the requested stage(s) and record their measurements in ``<out>/train_report.json``."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    stages = STAGES if args.stage == "all" else (args.stage,)
    runners = {"vq": train_vq, "gpt": train_gpt, "classifier": train_classifier, "eval": evaluate}
    command = "python -m models.demo.train " + " ".join(sys.argv[1:] if argv is None else argv)
    for stage in stages:
        stats = runners[stage](args)
        stats["command"] = command
        _update_report(args.out, stage, stats)


if __name__ == "__main__":
    main()
