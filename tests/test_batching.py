"""Many prompts at once: a prompt decoded in a batch gets exactly what it gets alone.

Greedy: batched speculative decoding == batched AR == batch-1 AR, token for token (B = 1, 3, 8; dynamic and
static trees; the LlamaGen conformance fixtures, C2I and T2I with padded captions, and the demo). Sampling: with
one generator per prompt (seeded per image), batch 1 and batch B give identical tokens for plain AR and for
every speculative setting. The chi-square losslessness tests at B = 3 live in ``test_engine.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_engine import TREES, _fixture_gpt, _prefix, _random_drafter

from models.drafters.kv_cache import KVCache
from models.drafters.tree import build_tree, stack_trees
from models.ea_model import SpeculativeDecoder
from models.generation import Prefix, generate_ar
from models.sampling import SamplingConfig

GREEDY = SamplingConfig(temperature=0)
DEMO = Path(__file__).resolve().parents[1] / "ckpts" / "demo"


def _fixture_conditions(model, io, kind: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` distinct conditions: the fixture's own two, then random ones (T2I: with varied padding)."""
    g = torch.Generator().manual_seed(batch)
    if kind == "c2i":
        extra = torch.randint(0, model.config.num_classes, (max(batch - 2, 0),), generator=g)
        return torch.cat([io["gen_cond"], extra])[:batch], torch.ones(batch, 1, dtype=torch.bool)
    cond, valid = io["cond_idx"], io["emb_masks"].bool()
    n_extra = max(batch - 2, 0)
    t = cond.shape[1]
    lengths = torch.randint(3, t, (n_extra,), generator=g)
    extra_valid = torch.arange(t)[None] >= (t - lengths)[:, None]  # left padding, as LlamaGen's layout
    extra = torch.randn(n_extra, t, cond.shape[2], generator=g) * extra_valid[..., None]
    return torch.cat([cond, extra])[:batch], torch.cat([valid, extra_valid])[:batch]


def _row(prefix: Prefix, b: int) -> Prefix:
    """Prompt b of a batched prefix, alone."""
    rows = [b + s * prefix.batch_size for s in range(prefix.streams)]
    return Prefix(prefix.embeddings[rows], prefix.valid[rows], prefix.cfg_scale)


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_greedy_batched_speculative_equals_batched_and_single_ar(kind, batch):
    model, io = _fixture_gpt(kind)
    prefix = _prefix(model, *_fixture_conditions(model, io, kind, batch), 4.0)
    single = torch.cat([generate_ar(model, _row(prefix, b), 16, GREEDY)[0] for b in range(batch)])
    batched, _ = generate_ar(model, prefix, 16, GREEDY)
    assert torch.equal(batched, single)
    if batch >= 2:
        assert torch.equal(single[:2], io["gen_tokens"])  # the original implementation's tokens
    for tree in TREES.values():
        dec = SpeculativeDecoder(model, _random_drafter(model, 0), 16, GREEDY, 4.0, tree=tree)
        tokens, stats = dec.generate(prefix, [torch.Generator().manual_seed(b) for b in range(batch)])
        assert torch.equal(tokens, single)
        per = stats.extra["per_prompt"]
        assert len(per) == batch and stats.num_tokens == 16 * batch
        # one target forward per round for the whole batch: the slowest prompt sets the count
        assert stats.target_forwards == max(p["target_forwards"] for p in per)


def test_prompts_of_a_batch_finish_at_different_rounds_without_corrupting_the_others():
    """A drafter that is right for some prompts and wrong for others: the fast ones drop out early."""
    model, io = _fixture_gpt("c2i")
    prefix = _prefix(model, *_fixture_conditions(model, io, "c2i", 8), 4.0)
    single = torch.cat([generate_ar(model, _row(prefix, b), 16, GREEDY)[0] for b in range(8)])
    dec = SpeculativeDecoder(model, _random_drafter(model, 1), 16, GREEDY, 4.0, tree=TREES["static"])
    tokens, stats = dec.generate(prefix)
    assert torch.equal(tokens, single)
    assert len({p["target_forwards"] for p in stats.extra["per_prompt"]}) > 1


def test_per_image_generators_make_sampling_batch_invariant_on_fixtures():
    model, io = _fixture_gpt("t2i")
    prefix = _prefix(model, *_fixture_conditions(model, io, "t2i", 3), 4.0)
    sampling = SamplingConfig(temperature=1.0, top_k=20)

    def gens():
        return [torch.Generator().manual_seed(100 + b) for b in range(3)]

    ar = generate_ar(model, prefix, 16, sampling, gens())[0]
    ar_single = torch.cat([generate_ar(model, _row(prefix, b), 16, sampling, [g])[0] for b, g in enumerate(gens())])
    assert torch.equal(ar, ar_single)
    for tree in TREES.values():
        dec = SpeculativeDecoder(model, _random_drafter(model, 0), 16, sampling, 4.0, tree=tree)
        batched = dec.generate(prefix, gens())[0]
        single = torch.cat([dec.generate(_row(prefix, b), g)[0] for b, g in enumerate(gens())])
        assert torch.equal(batched, single)


def test_generators_must_match_the_batch():
    model, io = _fixture_gpt("c2i")
    prefix = _prefix(model, *_fixture_conditions(model, io, "c2i", 3), 4.0)
    with pytest.raises(ValueError, match="one per prompt"):
        generate_ar(model, prefix, 4, SamplingConfig(), [torch.Generator()])
    dec = SpeculativeDecoder(model, _random_drafter(model, 0), 4, SamplingConfig(), 4.0)
    with pytest.raises(ValueError, match="one per prompt"):
        dec.generate(prefix, [torch.Generator()] * 2)


def test_stack_trees_pads_smaller_trees_with_isolated_nodes():
    a = build_tree(torch.tensor([5, 1, 2]), torch.tensor([-1, 0, 0]))
    b = build_tree(torch.tensor([7, 3, 4, 6]), torch.tensor([-1, 0, 1, 2]))
    stacked = stack_trees([a, b])
    tok, dep, mask = stacked.tokens, stacked.depths, stacked.tree_mask
    assert tok.tolist() == [[5, 1, 2, 0], [7, 3, 4, 6]] and dep.tolist() == [[0, 1, 1, 0], [0, 1, 2, 3]]
    assert torch.equal(mask[0, :3, :3], a.tree_mask) and mask[0, 3].tolist() == [False, False, False, True]
    assert torch.equal(mask[1], b.tree_mask)


def test_kv_cache_per_row_writes_and_commits():
    cache = KVCache(1, 2, 1, 8, 1)
    k = torch.arange(6, dtype=torch.float32).view(2, 1, 3, 1)
    cache.update(0, torch.tensor([[0, 1, 2], [3, 4, 5]]), k, k, 8)
    assert cache.k[0][0, 0, :3, 0].tolist() == [0, 1, 2] and cache.k[0][1, 0, 3:6, 0].tolist() == [3, 4, 5]
    # row 0: slots 1, 2 -> 0, 1; row 1: slot 5 -> 2 (padded by repeating the last pair)
    cache.commit_rows(torch.tensor([[1, 2], [5, 5]]), torch.tensor([[0, 1], [2, 2]]))
    assert cache.k[0][0, 0, :2, 0].tolist() == [1, 2] and cache.v[0][1, 0, 2, 0].item() == 5


# --------------------------------------------------------------------------------------------- the demo
@pytest.fixture(scope="module")
def demo():
    if not (DEMO / "drafter" / "config.json").exists():
        pytest.skip("demo checkpoints not committed")
    from models.drafters.cnets import load_drafter
    from models.drafters.neighbours import load_neighbour_table
    from models.registry import load_family

    family = load_family("demo")
    drafter = load_drafter(DEMO / "drafter", target_config=family.target.config)
    neighbours = load_neighbour_table(DEMO / "neighbours.safetensors", k=20)
    return family, drafter, neighbours


def _demo_decoder(demo, setting: str, sampling: SamplingConfig):
    from entrypoints.benchmark import build_decoder, parse_setting

    family, drafter, neighbours = demo
    return build_decoder(family, drafter, parse_setting(setting, 20, "mc_sim_7b_63"), sampling,
                         family.defaults.cfg, neighbours)


def test_demo_greedy_batched_speculative_equals_single_ar(demo):
    family = demo[0]
    prompts = ["0", "3", "7", "1", "9", "4", "8", "2"]
    prefix = family.build_prefix(prompts, family.defaults.cfg)
    n = family.num_image_tokens
    single = torch.cat([generate_ar(family.target, _row(prefix, b), n, GREEDY)[0] for b in range(8)])
    assert torch.equal(generate_ar(family.target, prefix, n, GREEDY)[0], single)
    for setting in ("eagle2", "eagle1:tree=chain_6"):
        dec = _demo_decoder(demo, setting, GREEDY)
        for batch in (3, 8):
            tokens, _ = dec.generate(family.build_prefix(prompts[:batch], family.defaults.cfg))
            assert torch.equal(tokens, single[:batch]), (setting, batch)


def test_demo_sampling_is_batch_invariant_with_per_image_seeds(demo):
    """The bare command's setting (LANTERN++ chain of 6, λ 20), LANTERN δ and plain AR: batch 4 == batch 1."""
    family = demo[0]
    sampling = SamplingConfig(temperature=1.0)
    prompts = ["5", "6", "5", "0"]
    prefix = family.build_prefix(prompts, family.defaults.cfg)

    def gens():
        return [torch.Generator().manual_seed(42 + i) for i in range(len(prompts))]

    n = family.num_image_tokens
    ar = generate_ar(family.target, prefix, n, sampling, gens())[0]
    ar1 = torch.cat([generate_ar(family.target, _row(prefix, b), n, sampling, g)[0] for b, g in enumerate(gens())])
    assert torch.equal(ar, ar1)
    assert not torch.equal(ar[0], ar[2])  # same prompt, different seed
    for setting in ("lantern++:lam=20,tree=chain_6", "lantern:delta=0.2"):
        dec = _demo_decoder(demo, setting, sampling)
        batched, stats = dec.generate(prefix, gens())
        single = [dec.generate(_row(prefix, b), g) for b, g in enumerate(gens())]
        assert torch.equal(batched, torch.cat([s[0] for s in single])), setting
        taus = [p["step_compression"] for p in stats.extra["per_prompt"]]
        assert taus == pytest.approx([s[1].extra["step_compression"] for s in single])


@pytest.mark.parametrize("engine", [["--model", "demo", "--model_type", "base"], []])  # [] = the bare command
def test_generate_images_batch_size_keeps_every_image_and_resumes(demo, tmp_path, engine):
    """--batch_size 3 writes the same images as --batch_size 1 with --set_seed, and resumes a partial run."""
    import json

    import numpy as np

    import main as cli

    common = [*engine, "--num_images", "5", "--set_seed", "--save_tokens"]
    cli.main(["generate_images", *common, "--output_dir", str(tmp_path / "b1"), "--batch_size", "1"])
    cli.main(["generate_images", *common, "--output_dir", str(tmp_path / "b3"), "--batch_size", "3"])
    for i in (1, 4):  # as if the run had stopped before these two were written: the rerun makes them, together
        (tmp_path / "b3" / f"prompt_{i}.png").unlink()
        (tmp_path / "b3" / f"prompt_{i}_tokens.npy").unlink()
    cli.main(["generate_images", *common, "--output_dir", str(tmp_path / "b3"), "--batch_size", "3"])
    for i in range(5):
        a, b = (np.load(tmp_path / d / f"prompt_{i}_tokens.npy") for d in ("b1", "b3"))
        assert np.array_equal(a, b), i
    stats = json.loads((tmp_path / "b3" / "global_statistics_0_5.json").read_text())
    assert [stats[f"prompt_{i}"]["batch_size"] for i in range(5)] == [3, 2, 3, 2, 2]
    assert all(e["step_compression"] >= 1.0 and e["latency"] > 0 for e in stats.values())


def test_benchmark_reports_throughput_per_batch_size(demo, tmp_path):
    import json

    import main as cli

    cli.main(["benchmark", "--num_images", "4", "--batch_size", "1", "2", "--output_dir", str(tmp_path),
              "--settings", "ar", "lantern++:lam=20,tree=chain_6"])
    rows = {(r["setting"], r["batch_size"]): r for r in json.loads((tmp_path / "benchmark.json").read_text())["results"]}
    assert set(rows) == {(s, b) for s in ("ar", "lantern++:lam=20,tree=chain_6") for b in (1, 2)}
    for (setting, bs), r in rows.items():
        assert r["images_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(64 * r["images_per_s"])
        assert r["speedup_vs_ar"] == pytest.approx(r["latency_s"] and rows[("ar", bs)]["latency_s"] / r["latency_s"])
        # per-image seeds: the same images, hence the same τ and accuracy, in every batch size
        assert r["tau"] == pytest.approx(rows[(setting, 1)]["tau"]) and r["accuracy"] == rows[(setting, 1)]["accuracy"]
    assert rows[("lantern++:lam=20,tree=chain_6", 2)]["tau"] > 1.5
    assert "| batch |" in (tmp_path / "benchmark.md").read_text()
