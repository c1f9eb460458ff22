"""The built-in digits demo: prompts, data, and the committed checkpoints under ``ckpts/demo``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.base_models.llamagen.gpt import GPTConfig
from models.base_models.llamagen.vq_model import VQConfig
from models.demo.checkpoint import load_gpt, load_vq
from models.demo.classifier import load_classifier
from models.demo.data import CLASS_NAMES, augment, load_split, prompt_to_class, train_val_split
from models.demo.sampling import cfg_logits, sample_codes

CKPT = Path(__file__).resolve().parents[1] / "ckpts" / "demo"


# ------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize(
    "prompt", ["7", "seven", "Seven", "digit 7", "a handwritten seven", "A handwritten digit 7.", "  SEVEN "]
)
def test_prompt_forms_map_to_class(prompt):
    assert prompt_to_class(prompt) == 7


def test_every_class_name_and_digit_maps_to_its_id():
    for i, name in enumerate(CLASS_NAMES):
        assert prompt_to_class(name) == i
        assert prompt_to_class(str(i)) == i
        assert prompt_to_class(f"a handwritten {name}") == i


@pytest.mark.parametrize("prompt", ["a cat", "", "77", "seventy", "digit", "a handwritten seven cat"])
def test_unknown_prompt_raises_listing_accepted_forms(prompt):
    with pytest.raises(ValueError, match="Accepted forms") as err:
        prompt_to_class(prompt)
    assert '"a handwritten seven"' in str(err.value)


# ------------------------------------------------------------------------------------------- data
def test_digits_are_32x32_rgb_in_range_and_split_is_fixed():
    images, labels = load_split("all")
    assert images.shape == (1797, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
    train_idx, val_idx = train_val_split(1797)
    assert len(set(train_idx.tolist()) & set(val_idx.tolist())) == 0
    assert len(train_idx) + len(val_idx) == 1797
    assert torch.equal(val_idx, train_val_split(1797)[1])


def test_augment_is_deterministic_given_a_generator_and_keeps_range():
    images, _ = load_split("val")
    a = augment(images[:8], torch.Generator().manual_seed(3))
    b = augment(images[:8], torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == images[:8].shape
    assert a.min() >= -1.0 and a.max() <= 1.0
    assert not torch.equal(a, images[:8])


# ------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def demo():
    if not (CKPT / "gpt" / "model.safetensors").exists():
        pytest.skip("ckpts/demo not trained")
    return {
        "vq": load_vq(CKPT / "vq"),
        "gpt": load_gpt(CKPT / "gpt"),
        "clf": load_classifier(CKPT / "classifier"),
    }


def test_checkpoint_layout_and_configs(demo):
    vq_cfg = VQConfig.from_dict(json.loads((CKPT / "vq" / "config.json").read_text()))
    gpt_cfg = GPTConfig.from_dict(json.loads((CKPT / "gpt" / "config.json").read_text()))
    assert vq_cfg.codebook_size == gpt_cfg.vocab_size == 1024
    assert vq_cfg.downsample_factor == 4 and gpt_cfg.block_size == 64
    assert gpt_cfg.model_type == "c2i" and gpt_cfg.num_classes == 10 and gpt_cfg.cls_token_num == 1
    assert (CKPT / "train_report.json").exists()
    # The recipe's own files stay within 12 MB so that the drafter and neighbour table fit the 20 MB cap.
    own = [CKPT / "train_report.json", *(CKPT / d / f for d in ("vq", "gpt", "classifier") for f in ("config.json", "model.safetensors"))]
    assert sum(p.stat().st_size for p in own) <= 12 * 1024 * 1024
    assert sum(p.stat().st_size for p in CKPT.rglob("*") if p.is_file()) <= 20 * 1024 * 1024


def test_classifier_is_accurate_on_held_out_digits(demo):
    images, labels = load_split("val")
    acc = (demo["clf"].classify(images) == labels).float().mean().item()
    assert acc >= 0.9


def test_vq_reconstructions_of_real_digits_are_still_recognised(demo):
    images, labels = load_split("val")
    images, labels = images[:40], labels[:40]
    codes = demo["vq"].encode_to_codes(images)
    assert codes.shape == (40, 64) and codes.max() < 1024
    recon = demo["vq"].decode_codes(codes).clamp(-1, 1)
    assert recon.shape == images.shape
    acc = (demo["clf"].classify(recon) == labels).float().mean().item()
    assert acc >= 0.9


def test_cached_sampler_matches_uncached_forward(demo):
    """The measurement sampler's KV-cached logits equal a plain causal forward over the same codes."""
    gpt = demo["gpt"]
    labels = torch.tensor([3, 8])
    codes, _ = sample_codes(gpt, labels, cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = gpt(idx=codes[:, :-1], cond_idx=labels)  # eval mode: (B, 64, V), row k predicts token k
        cache = gpt.new_cache(2, 65)
        h = gpt.embed_condition(labels)
        rows = []
        for k in range(64):
            pos = torch.tensor([k])
            rows.append(gpt.output(gpt.forward_hidden(h, pos, cache=cache, cache_pos=pos)[:, -1]).float())
            h = gpt.embed_tokens(codes[:, k])[:, None]
    torch.testing.assert_close(torch.stack(rows, 1), full, atol=1e-4, rtol=1e-4)


def test_cfg_combination_formula():
    cond, uncond = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.5, 1.0]])
    out = cfg_logits(torch.cat([cond, uncond]), 4.0)
    torch.testing.assert_close(out, uncond + 4.0 * (cond - uncond))


def test_generated_digits_are_recognised(demo):
    """With CFG 4, temperature 1 and the full distribution, most samples show the prompted digit."""
    labels = torch.arange(10).repeat_interleave(10)
    codes, stats = sample_codes(demo["gpt"], labels, 4.0, 1.0, 0, torch.Generator().manual_seed(0))
    images = demo["vq"].decode_codes(codes)
    acc = (demo["clf"].classify(images) == labels).float().mean().item()
    assert acc >= 0.7
    assert stats.entropy.mean() > 1.0  # next-token distributions stay flat, as in real visual AR models
