"""self_distill: the target's own samples as code shards; per-sample seeds make every sample reproducible."""

from __future__ import annotations

import pytest
import torch
from test_extract_code import (
    assert_complete_and_unique,
    fixture_caption_features,
    interrupt_on_call,
    model_args,
    read_folder,
    write_caption_cache,
    write_checkpoints,
)

from entrypoints import self_distill
from models.base_models.llamagen.loading import load_llamagen_gpt
from models.base_models.llamagen.t5 import save_text_cache
from models.families.base import SamplerDefaults
from models.families.llamagen import LlamaGenFamily
from models.sampling import SamplingConfig, cfg_combine, sample_with_uniforms, target_probs
from models.train_data import CODES_FORMAT, CODES_PREFIX, read_manifest


def run(argv: list[str]) -> dict:
    return self_distill.run_self_distill(self_distill.parse_args().parse_args(argv))


def test_inverse_cdf_sampling_hits_every_token_in_proportion_and_never_a_zero():
    probs = torch.tensor([[0.1, 0.0, 0.25, 0.5, 0.15, 0.0]])
    m = 1000
    u = (torch.arange(m) + 0.5) / m  # an even grid of uniforms: counts must equal p·m up to rounding
    tokens = sample_with_uniforms(probs.expand(m, -1), u)
    counts = torch.bincount(tokens, minlength=6).float()
    assert torch.allclose(counts / m, probs[0], atol=1.5 / m)
    # rounding can push u·total onto the total: still the last token with mass, never a zero-probability one
    edge = sample_with_uniforms(probs, torch.tensor([1.0]))
    assert edge.item() == 4


def test_parse_classes():
    assert self_distill.parse_classes("0-3,7, 9") == [0, 1, 2, 3, 7, 9]
    with pytest.raises(self_distill.UserError):
        self_distill.parse_classes("3-1")


def test_greedy_self_distill_reproduces_the_original_c2i_generation(tmp_path):
    io = write_checkpoints(tmp_path, "c2i")  # gen_tokens: LlamaGen generate(), classes [3, 7], cfg 4, greedy
    out = tmp_path / "sd"
    manifest = run([*model_args(tmp_path, "c2i"), "--vq_path", str(tmp_path / "vq.pt"), "--classes", "3,7",
                    "--temperature", "0", "--top_k", "0", "--cfg", "4", "--output_dir", str(out)])
    assert manifest["format"] == CODES_FORMAT and manifest["source"] == "self_distill"
    assert manifest["model_type"] == "c2i" and manifest["num_image_tokens"] == 16 and manifest["cfg"] == 4.0
    data, lists = read_folder(out, CODES_PREFIX)
    assert data["sample_id"].tolist() == [3, 7]  # class · samples_per_class + j
    assert data["labels"].tolist() == [3, 7] and lists["prompts"] == ["3", "7"]
    assert torch.equal(data["tokens"], io["gen_tokens"])


def test_greedy_self_distill_reproduces_the_original_t2i_generation(tmp_path):
    io = write_checkpoints(tmp_path, "t2i")
    embs, masks = fixture_caption_features(io)
    prompts = ["a red cube on a table", "two dogs in the snow"]
    save_text_cache(tmp_path / "t5.safetensors", prompts, embs, masks)
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "sd"
    run([*model_args(tmp_path, "t2i"), "--vq_path", str(tmp_path / "vq.pt"), "--t5_path",
         str(tmp_path / "t5.safetensors"), "--prompt", str(tmp_path / "prompts.txt"), "--temperature", "0",
         "--top_k", "0", "--cfg", "4", "--output_dir", str(out)])
    data, lists = read_folder(out, CODES_PREFIX)
    assert lists["prompts"] == prompts and data["sample_id"].tolist() == [0, 1]
    assert torch.equal(data["caption_embs"], embs.half()) and torch.equal(data["emb_masks"], masks.to(torch.uint8))
    assert torch.equal(data["tokens"], io["gen_tokens"])


def test_first_token_follows_the_processed_target_distribution(tmp_path):
    """Chi-square check of the whole sampler chain (CFG, temperature, top-k) on the first token."""
    from scipy.stats import chisquare

    write_checkpoints(tmp_path, "c2i")
    target = load_llamagen_gpt(tmp_path / "c2i.pt")
    family = LlamaGenFamily("t", target, None, SamplerDefaults(cfg=3.0))
    sampling = SamplingConfig(temperature=1.3, top_k=12)
    n = 4000
    labels = torch.full((n,), 5)
    with torch.no_grad():
        prefix = family.prefix_from_conditions(labels, torch.ones(n, 1, dtype=torch.bool), 3.0)
    uniforms = self_distill.sample_uniforms(list(range(n)), 1)
    tokens = self_distill.generate_seeded(target, prefix, 1, sampling, uniforms)[:, 0]
    with torch.no_grad():
        one = family.prefix_from_conditions(labels[:1], torch.ones(1, 1, dtype=torch.bool), 3.0)
        logits = target.lm_head(target.forward_hidden(one.embeddings, torch.arange(1))[:, -1]).float()
    p = target_probs(cfg_combine(logits, 3.0), sampling)[0].double()
    support = p > 0
    assert support.sum() == 12 and support[tokens].all()
    counts = torch.bincount(tokens, minlength=p.numel())[support].double()
    expected = p[support] / p[support].sum() * n
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


def test_samples_do_not_depend_on_the_batch_they_ran_in(tmp_path):
    write_checkpoints(tmp_path, "c2i")
    base = [*model_args(tmp_path, "c2i"), "--vq_path", str(tmp_path / "vq.pt"), "--classes", "0-4",
            "--samples_per_class", "2", "--random_seed", "11"]
    run([*base, "--batch_size", "1", "--output_dir", str(tmp_path / "b1")])
    run([*base, "--batch_size", "4", "--output_dir", str(tmp_path / "b4")])
    a, _ = read_folder(tmp_path / "b1", CODES_PREFIX)
    b, _ = read_folder(tmp_path / "b4", CODES_PREFIX)
    assert a["sample_id"].tolist() == list(range(10))
    assert a["labels"].tolist() == [i // 2 for i in range(10)]
    assert torch.equal(a["tokens"], b["tokens"])
    assert len({tuple(t) for t in a["tokens"].tolist()}) == 10  # sampled, not all the same
    run([*base[:-1], "12", "--batch_size", "4", "--output_dir", str(tmp_path / "seed12")])
    c, _ = read_folder(tmp_path / "seed12", CODES_PREFIX)
    assert not torch.equal(a["tokens"], c["tokens"])


def test_interrupted_run_resumes_to_the_same_data(tmp_path, monkeypatch):
    write_checkpoints(tmp_path, "t2i")
    prompts = ["a", "b", "c"]
    write_caption_cache(tmp_path / "t5.safetensors", prompts)
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    base = [*model_args(tmp_path, "t2i"), "--vq_path", str(tmp_path / "vq.pt"), "--t5_path",
            str(tmp_path / "t5.safetensors"), "--prompt", str(tmp_path / "prompts.txt"), "--samples_per_prompt", "3",
            "--batch_size", "2", "--shard_size", "3", "--cfg", "2.0"]
    run([*base, "--output_dir", str(tmp_path / "straight")])

    out = tmp_path / "resumed"
    run([*base, "--output_dir", str(out), "--num_prompts", "1"])  # a smaller run first: samples 0..2
    assert_complete_and_unique(out, CODES_PREFIX, {0, 1, 2})
    original = interrupt_on_call(monkeypatch, self_distill, "generate_seeded", 3)
    with pytest.raises(KeyboardInterrupt):
        run([*base, "--output_dir", str(out)])
    assert_complete_and_unique(out, CODES_PREFIX, set(range(7)))  # 3 + two finished batches of 2
    monkeypatch.setattr(self_distill, "generate_seeded", original)
    run([*base, "--output_dir", str(out)])
    assert_complete_and_unique(out, CODES_PREFIX, set(range(9)))
    a, la = read_folder(tmp_path / "straight", CODES_PREFIX)
    b, lb = read_folder(out, CODES_PREFIX)
    assert all(torch.equal(a[k], b[k]) for k in a) and la == lb
    assert lb["prompts"] == [p for p in prompts for _ in range(3)]
    assert read_manifest(out)["temperature"] == 1.0 and read_manifest(out)["top_k"] == 1000  # model defaults


def test_resume_refuses_other_sampler_settings_or_prompts(tmp_path):
    write_checkpoints(tmp_path, "c2i")
    base = [*model_args(tmp_path, "c2i"), "--vq_path", str(tmp_path / "vq.pt"), "--output_dir", str(tmp_path / "sd")]
    run([*base, "--classes", "1", "--cfg", "2"])
    with pytest.raises(ValueError, match="other settings"):
        run([*base, "--classes", "1", "--cfg", "3"])
    with pytest.raises(self_distill.UserError, match="prompt"):
        run([*base, "--prompt", "2", "--num_prompts", "2", "--cfg", "2"])  # sample 1 would be class 2
