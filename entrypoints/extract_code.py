"""extract_code: a folder of images + captions -> VQ code shards (and T5 caption features for T2I).

Input (``--data_path``, as in the original README): ``{name}.jpg|jpeg|png|webp|bmp`` with ``{name}.txt`` beside
it. For T2I models the text is the caption (encoded by FLAN-T5, or looked up in a ``--t5_path`` feature cache);
for C2I models it is the class (``llamagen_c2i``: an ImageNet index; ``demo``: "7", "seven", "a handwritten
seven" ...). Files are taken in sorted name order; the k-th is sample_id k, ``--num_samples`` takes the first
ones (or, with ``--shuffle_seed``, a random subset as the original does). Images are resized (shorter side) and centre-cropped to the model's image size as LlamaGen's code
extraction does, scaled to [-1, 1] and encoded with the VQ in float32. Unreadable images and captions are
reported and skipped.

Output (``--output_dir``): code shards ``codes_r{rank}_{index:05d}.safetensors`` + ``manifest.json``, the format
documented in :mod:`models.train_data`. Rerunning the command resumes (finished samples are skipped); under
``accelerate launch`` every process encodes its own share and writes its own files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from entrypoints.common import UserError, add_device_args, resolve_device, resolve_dtype, run_cli
from models.distributed import ProcessContext
from models.registry import MODELS
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

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Image sizes used when the GPT checkpoint (which fixes the token grid) is not available.
DEFAULT_IMAGE_SIZES = {"demo": 32, "llamagen": 256, "llamagen2": 512, "llamagen_c2i": 256, "anole": 512,
                       "lumina_mgpt": 768}


def parse_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="extract_code",
        description="Encode a folder of {name}.jpg + {name}.txt into VQ code shards (+ T5 caption features for "
        "text-to-image models) for generate_train_data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="demo", choices=list(MODELS), help="model family / checkpoint set")
    p.add_argument("--data_path", required=True, help="folder of {name}.jpg|png + {name}.txt")
    p.add_argument("--output_dir", required=True, help="where the code shards and manifest.json go")
    p.add_argument("--num_samples", type=int, default=None, help="use the first N files (sorted by name); default all")
    p.add_argument("--shuffle_seed", type=int, default=None,
                   help="take a random subset of --num_samples files instead (the original shuffles with seed 42); "
                   "the subset only grows when --num_samples is raised")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--shard_size", type=int, default=256, help="samples per shard file")
    p.add_argument("--num_workers", type=int, default=0, help="image-decoding worker processes")
    p.add_argument("--model_path", default=None,
                   help="target GPT checkpoint; only read for the token grid and model type, and optional when "
                   "--image_size is given or the model's default size applies")
    p.add_argument("--vq_path", default=None,
                   help="VQ tokenizer checkpoint (Chameleon: the tokenizer folder); default: the ckpts/ layout")
    p.add_argument("--t5_path", default=None, help="FLAN-T5 folder or a caption-feature cache (.safetensors), T2I only")
    p.add_argument("--image_size", type=int, default=None,
                   help="pixel size images are cropped to; default: VQ downsample factor x the target's grid side")
    add_device_args(p)
    return p


@dataclass
class Encoders:
    """What encoding needs: the VQ, the T5 (T2I) or class parser (C2I), and the image geometry."""

    vq: torch.nn.Module
    model_type: str
    image_size: int
    text_encoder: Any = None
    class_parser: Callable[[str], int] | None = None
    family: Any = None  # Chameleon: codes -> the family's token ids (and its image preprocessing)

    @property
    def num_image_tokens(self) -> int:
        if self.family is not None:
            return self.family.num_image_tokens
        return (self.image_size // self.vq.config.downsample_factor) ** 2


def load_encoders(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Encoders:
    """Load the VQ and the text encoder / class parser; the GPT only if its checkpoint is there.

    The GPT fixes the token grid and whether the model is class- or text-conditional; without it both come
    from the model name and ``--image_size`` (or the model's default size), so codes can be extracted on a
    machine that only holds the VQ (and T5).
    """
    from models.registry import get_spec, load_family, resolve_path

    spec = get_spec(args.model)
    gpt_path = resolve_path(spec, "model", args.model_path)
    if spec.family == "chameleon":  # VQGAN + vocabulary layout only (no 7 B weights needed to encode images)
        from models.families.chameleon_data import skeleton_family

        family = skeleton_family(spec, args.model_path, args.vq_path, args.image_size, device)
        enc = Encoders(family.vq, "chameleon", family.image_size, family=family)
    elif gpt_path.exists():
        family = load_family(args.model, device, dtype, args.model_path, args.vq_path, args.t5_path, args.image_size)
        cfg = family.target.config
        size = args.image_size or cfg.grid_size * family.vq.config.downsample_factor
        enc = Encoders(family.vq.float(), cfg.model_type, size, family.text_encoder, family.class_parser)
    else:
        if args.model_path:
            raise UserError(f"--model_path {args.model_path} does not exist")
        from models.base_models.llamagen.loading import load_llamagen_vq
        from models.families.llamagen import parse_class_prompt
        from models.registry import demo_class_parser

        size = args.image_size or DEFAULT_IMAGE_SIZES.get(args.model)
        if size is None:
            raise UserError(f"pass --image_size (no GPT checkpoint to read the token grid of {args.model!r} from)")
        print(f"note: no GPT checkpoint at {gpt_path}; encoding with the VQ only at {size} px")
        vq = load_llamagen_vq(resolve_path(spec, "vq", args.vq_path), device, torch.float32)
        if "t5" in spec.paths:
            from models.base_models.llamagen.t5 import load_text_encoder

            enc = Encoders(vq, "t2i", size, text_encoder=load_text_encoder(resolve_path(spec, "t5", args.t5_path),
                                                                            device, dtype))
        else:
            parser = demo_class_parser() if args.model == "demo" else (lambda p: parse_class_prompt(p, 1000))
            enc = Encoders(vq, "c2i", size, class_parser=parser)
    if enc.image_size % enc.vq.config.downsample_factor:
        raise UserError(f"image size {enc.image_size} is not a multiple of the VQ downsample factor "
                        f"{enc.vq.config.downsample_factor}")
    return enc


def center_crop_arr(image, image_size: int):
    """Shorter side -> ``image_size`` (box-halving first for large images, then bicubic), centre crop (ADM/LlamaGen)."""
    from PIL import Image

    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def load_image(path: Path, image_size: int, chameleon: bool = False) -> torch.Tensor:
    """Image file -> (3, S, S) float32 in [-1, 1] (grey and RGBA images become RGB).

    ``chameleon``: Chameleon's own preprocessing (transparency on white, Lanczos resize, centre crop).
    """
    from PIL import Image

    if chameleon:
        from models.base_models.chameleon.vqgan import preprocess_image

        with Image.open(path) as im:
            return preprocess_image(im, image_size)
    with Image.open(path) as im:
        arr = center_crop_arr(im.convert("RGB"), image_size)
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1).float() / 127.5 - 1.0


def list_samples(data_path: Path) -> tuple[list[Path], list[str]]:
    """Image files in sorted name order (-> sample ids 0, 1, ...) and the names of images without a caption."""
    if not data_path.is_dir():
        raise UserError(f"--data_path {data_path} is not a folder")
    images, no_text = [], []
    for p in sorted(data_path.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            (images if p.with_suffix(".txt").exists() else no_text).append(p)
    return images, [p.name for p in no_text]


class ImageCaptionFolder(torch.utils.data.Dataset):
    """(sample_id, path) pairs -> dicts with the image tensor (None if unreadable) and the caption text."""

    def __init__(self, items: list[tuple[int, Path]], image_size: int, chameleon: bool = False):
        self.items, self.image_size, self.chameleon = items, image_size, chameleon

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        sid, path = self.items[i]
        out = {"sample_id": sid, "name": path.name, "image": None, "text": None, "error": None}
        try:
            out["text"] = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
            out["image"] = load_image(path, self.image_size, self.chameleon)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            out["error"] = f"{type(e).__name__}: {e}"
        return out


def _collate(batch: list[dict]) -> list[dict]:
    return batch


def run_extract_code(args: argparse.Namespace) -> dict:
    """Encode every selected, not yet finished sample of this process's share; returns the manifest."""
    from entrypoints.validation import validate_common_args

    validate_common_args(args)  # every number in range and the output folder writable, before any work
    ctx = ProcessContext.current(args.device)
    device = ctx.device(resolve_device(args.device) if args.device else None) or resolve_device(None)
    dtype = resolve_dtype(args.precision, device)
    if args.batch_size < 1:
        raise UserError("--batch_size must be >= 1")
    data_path, out = Path(args.data_path), Path(args.output_dir)
    images, no_text = list_samples(data_path)
    order = list(range(len(images)))
    if args.shuffle_seed is not None:
        order = np.random.default_rng(args.shuffle_seed).permutation(len(images)).tolist()
    selected = set(order[: args.num_samples] if args.num_samples is not None else order)
    if not images:
        raise UserError(f"no {'/'.join(IMAGE_SUFFIXES)} files with a .txt caption in {data_path}")
    if no_text and ctx.is_main:
        print(f"warning: {len(no_text)} images have no .txt caption and are ignored (e.g. {no_text[0]})")

    enc = load_encoders(args, device, dtype)
    settings = {"model": args.model, "image_size": enc.image_size, "num_image_tokens": enc.num_image_tokens,
                "model_type": enc.model_type}
    header = {"format": CODES_FORMAT, "model": args.model, "num_image_tokens": enc.num_image_tokens,
              "model_type": enc.model_type, "source": "extract_code", "image_size": enc.image_size,
              "data_path": str(args.data_path), "vq_path": args.vq_path, "num_processes": ctx.world}
    check_resume_settings(out, CODES_PREFIX, settings)
    done_names = finished_metadata(out, CODES_PREFIX, "names")
    moved = [i for i, p in enumerate(images) if i in done_names and done_names[i] != p.name]
    if moved:
        raise UserError(f"{out} was made from a different file list (sample {moved[0]} was "
                        f"{done_names[moved[0]]!r}, now {images[moved[0]].name!r}); use a new --output_dir")
    done = finished_sample_ids(out, CODES_PREFIX)
    todo = [(i, p) for i, p in enumerate(images) if i in selected and i not in done and ctx.owns(i)]
    if done and ctx.is_main:
        print(f"resuming: {len(done)} samples already in {out}")

    writer = ShardWriter(out, CODES_PREFIX, ctx.rank, args.shard_size, settings)
    loader = torch.utils.data.DataLoader(ImageCaptionFolder(todo, enc.image_size, enc.family is not None),
                                         batch_size=args.batch_size,
                                         num_workers=args.num_workers, collate_fn=_collate)
    skipped: list[tuple[str, str]] = []
    bar = tqdm(total=len(todo), desc=f"extract_code r{ctx.rank}", unit="img", disable=not ctx.is_main)
    try:
        for batch in loader:
            good = []
            for item in batch:
                if item["error"] is None and enc.model_type in ("t2i", "chameleon") and not item["text"]:
                    item["error"] = "empty caption"
                if item["error"] is None and enc.model_type == "c2i":
                    try:
                        item["label"] = int(enc.class_parser(item["text"]))
                    except ValueError as e:
                        item["error"] = f"bad class: {e}"
                if item["error"] is None:
                    good.append(item)
                else:
                    skipped.append((item["name"], item["error"]))
                    tqdm.write(f"rank {ctx.rank}: skipping {item['name']}: {item['error']}")
            if good:
                writer.add(*_encode(enc, good, device))
            bar.update(len(batch))
    except BaseException:  # keep every finished sample, then report the interruption
        finish_shards(ctx, writer, out, CODES_PREFIX, header, interrupted=True)
        raise
    bar.close()
    manifest = finish_shards(ctx, writer, out, CODES_PREFIX, header)
    if skipped:
        print(f"rank {ctx.rank}: skipped {len(skipped)} of {len(todo)} samples (unreadable image or caption): "
              + ", ".join(n for n, _ in skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    if ctx.is_main:
        print(f"{manifest['num_samples']} samples in {out} ({len(manifest['shards'])} shards)")
    return manifest


@torch.no_grad()
def _encode(enc: Encoders, items: list[dict], device: torch.device) -> tuple[dict, dict]:
    """A batch of decoded items -> (shard tensors, per-sample lists)."""
    pixels = torch.stack([it["image"] for it in items]).to(device, torch.float32)
    tensors = {"tokens": enc.vq.encode_to_codes(pixels).long().cpu(),
               "sample_id": torch.tensor([it["sample_id"] for it in items], dtype=torch.long)}
    texts = [it["text"] for it in items]
    if enc.family is not None:  # Chameleon: VQ indices -> token ids (Lumina: with newline / end tokens)
        tensors["tokens"] = enc.family.codes_to_tokens(tensors["tokens"]).long()
    elif enc.model_type == "c2i":
        tensors["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
    else:
        embs, masks = enc.text_encoder.get_text_embeddings(texts)  # right-padded, as T5 returns them
        tensors["caption_embs"] = embs.to(torch.float16).cpu()
        tensors["emb_masks"] = masks.to(torch.uint8).cpu()
    return tensors, {"prompts": texts, "names": [it["name"] for it in items]}


def main(argv: list[str] | None = None) -> None:
    timed_main(run_extract_code, parse_args(), argv)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
