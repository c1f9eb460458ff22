"""Speculative Jacobi Decoding in the one engine: SJD / MC-SJD lossless by statistics, greedy SJD == greedy AR,
maximal coupling's two properties, relaxed rules on Jacobi drafts, CLI and benchmark (GSD itself: test_gsd.py).

Statistical tests use fixed seeds and the chi-square helpers of ``test_engine.py`` (p < 1e-3 rejects).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare
from test_engine import (
    SAMPLERS,
    _assert_matches,
    _empirical,
    _fixture_gpt,
    _fixture_prefix,
    _prefix,
    _tiny_target,
    exact_joint,
)

from models.drafters.acceptance import AcceptConfig
from models.drafters.grouped import GroupedAcceptConfig, token_embedding_table
from models.drafters.jacobi import JacobiProposer, maximal_coupling
from models.ea_model import SpeculativeDecoder
from models.generation import generate_ar
from models.sampling import SamplingConfig

CKPT = Path(__file__).resolve().parents[1] / "ckpts" / "demo"


def _sjd(target, n_tok, sampling, cfg, window=3, coupling=False, **kw) -> SpeculativeDecoder:
    return SpeculativeDecoder(target, None, n_tok, sampling, cfg, proposer=JacobiProposer(window, coupling), **kw)


# --------------------------------------------------------------------------------------------- greedy identity
@pytest.mark.parametrize("kind", ["c2i", "t2i"])
@pytest.mark.parametrize("coupling", [False, True])
def test_greedy_sjd_equals_greedy_ar(kind, coupling):
    model, io = _fixture_gpt(kind)
    for i in range(2):
        prefix = _fixture_prefix(model, io, kind, i, 4.0)
        for window in (1, 4, 16):
            tokens, stats = _sjd(model, 16, SamplingConfig(temperature=0), 4.0, window, coupling).generate(
                prefix, torch.Generator().manual_seed(i))
            assert torch.equal(tokens[0], io["gen_tokens"][i])
            assert stats.target_forwards == 1 + len(stats.extra["accept_lengths"])


def test_greedy_sjd_batched_equals_ar():
    model, io = _fixture_gpt("c2i")
    cond, valid = io["gen_cond"][:2], torch.ones(2, 1, dtype=torch.bool)
    prefix = _prefix(model, cond, valid, 4.0)
    tokens, _ = _sjd(model, 16, SamplingConfig(temperature=0), 4.0, 5).generate(prefix)
    ar, _ = generate_ar(model, prefix, 16, SamplingConfig(temperature=0))
    assert torch.equal(tokens, ar)


@pytest.mark.parametrize("coupling", [False, True], ids=["sjd", "mc-sjd"])
def test_sampled_sjd_batch_equals_one_by_one(coupling):
    """One generator per image: an image's tokens do not depend on the batch it was decoded in."""
    model, io = _fixture_gpt("c2i")
    cond, valid = io["gen_cond"][:2], torch.ones(2, 1, dtype=torch.bool)
    dec = _sjd(model, 16, SamplingConfig(temperature=1.0), 4.0, 5, coupling)
    batched, _ = dec.generate(_prefix(model, cond, valid, 4.0), [torch.Generator().manual_seed(i) for i in range(2)])
    for i in range(2):
        one, _ = dec.generate(_prefix(model, cond[i : i + 1], valid[i : i + 1], 4.0), torch.Generator().manual_seed(i))
        assert torch.equal(batched[i], one[0])


# --------------------------------------------------------------------------------------------- losslessness
@pytest.mark.parametrize("coupling", [False, True], ids=["sjd", "mc-sjd"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sjd_sampling_is_lossless_with_cfg(coupling, sampler):
    """CFG 2.0: the joint of the first three tokens of 4 equals plain AR's exact distribution (window 3)."""
    target = _tiny_target()
    prefix = _prefix(target, torch.tensor([1]), torch.ones(1, 1, dtype=torch.bool), 2.0)
    sampling = SAMPLERS[sampler]
    dec = _sjd(target, 4, sampling, 2.0, window=3, coupling=coupling)
    _assert_matches(_empirical(dec, prefix, 3, 1500, seed=11), exact_joint(target, prefix, 3, sampling))


def test_batched_mc_sjd_is_lossless():
    target = _tiny_target()
    prefix = _prefix(target, torch.tensor([2] * 3), torch.ones(3, 1, dtype=torch.bool), 2.0)
    sampling = SAMPLERS["t1"]
    dec = _sjd(target, 4, sampling, 2.0, window=2, coupling=True)
    _assert_matches(_empirical(dec, prefix, 3, 1500, seed=5), exact_joint(target, prefix, 3, sampling))


@pytest.mark.slow
@pytest.mark.parametrize("coupling", [False, True], ids=["sjd", "mc-sjd"])
@pytest.mark.parametrize("window", [1, 2, 3])
def test_sjd_sampling_is_lossless_many_samples(coupling, window):
    target = _tiny_target()
    prefix = _prefix(target, torch.tensor([1]), torch.ones(1, 1, dtype=torch.bool), 2.0)
    sampling = SAMPLERS["topk_topp"]
    dec = _sjd(target, 4, sampling, 2.0, window=window, coupling=coupling)
    _assert_matches(_empirical(dec, prefix, 3, 10000, seed=7), exact_joint(target, prefix, 3, sampling))


def test_coupling_raises_acceptance():
    """MC-SJD keeps drafts whose distribution barely changed, so τ rises over SJD (same prompts and seeds)."""
    target = _tiny_target()
    prefix = _prefix(target, torch.tensor([0]), torch.ones(1, 1, dtype=torch.bool), 2.0)
    taus = {}
    for coupling in (False, True):
        dec = _sjd(target, 16, SamplingConfig(), 2.0, window=4, coupling=coupling)
        gen = torch.Generator().manual_seed(0)
        taus[coupling] = sum(dec.generate(prefix, gen)[1].extra["step_compression"] for _ in range(100)) / 100
    assert taus[True] > taus[False]


@pytest.mark.parametrize("relaxed", [False, True, "gsd"])
def test_chain_verification_is_verify_tree_on_a_chain(relaxed):
    """The vectorised chain test draws the same uniforms in the same order as the depth-by-depth walk: same
    accepted length, next token and realised TVD, seed for seed."""
    from models.drafters.acceptance import verify_tree
    from models.drafters.jacobi import verify_chain
    from models.drafters.tree import build_tree

    g = torch.Generator().manual_seed(0)
    cfg = AcceptConfig(relax="lantern", k=2, delta=0.3) if relaxed else AcceptConfig()
    if relaxed == "gsd":
        cfg = GroupedAcceptConfig(rank_window=2, prob_gap=0.3, max_dist=1.0, embeddings=torch.randn(4, 2, generator=g))
    for trial in range(50):
        p = torch.softmax(2 * torch.randn(6, 4, generator=g), -1)
        q = torch.softmax(2 * torch.randn(6, 4, generator=g), -1)
        tokens = torch.cat([torch.tensor([1]), torch.multinomial(q[:5], 1, generator=g).squeeze(1)])
        tree = build_tree(tokens, torch.arange(-1, 5), q)
        a = verify_chain(tree, p, cfg, NEIGHBOURS, False, torch.Generator().manual_seed(trial))
        b = verify_tree(tree, p, cfg, NEIGHBOURS, False, torch.Generator().manual_seed(trial))
        assert a.accept_len == b.accept_len and int(a.next_token) == int(b.next_token)
        assert torch.allclose(a.node_tvd, b.node_tvd, atol=1e-6)


# --------------------------------------------------------------------------------------------- coupling
def test_maximal_coupling_keeps_marginal_and_maximises_agreement():
    g = torch.Generator().manual_seed(0)
    old_q = torch.tensor([0.5, 0.3, 0.15, 0.05])
    new_q = torch.tensor([0.2, 0.4, 0.1, 0.3])
    n = 40000
    old = torch.multinomial(old_q, n, replacement=True, generator=g)
    new = maximal_coupling(old, old_q.expand(n, -1), new_q.expand(n, -1), g)
    counts = torch.bincount(new, minlength=4).double()
    expected = new_q.double() / new_q.double().sum() * counts.sum()
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3
    tvd = 0.5 * (old_q - new_q).abs().sum()
    same = (new == old).double().mean()
    assert abs(float(same) - (1 - float(tvd))) < 4 * (0.25 / n) ** 0.5 + 1e-3
    # an unchanged distribution keeps every draft
    assert torch.equal(maximal_coupling(old, old_q.expand(n, -1), old_q.expand(n, -1), g), old)


# --------------------------------------------------------------------------------------------- relaxed rules
# (GSD's own tests: tests/test_gsd.py)
NEIGHBOURS = torch.tensor([[1, 2, 3], [0, 2, 3], [3, 1, 0], [2, 0, 1]])


def test_gsd_and_lantern_on_jacobi_drafts_accept_more():
    target = _tiny_target()
    prefix = _prefix(target, torch.tensor([0]), torch.ones(1, 1, dtype=torch.bool), 2.0)
    taus = {}
    for name, acc in {"exact": AcceptConfig(), "lantern": AcceptConfig(relax="lantern", k=2, delta=0.3),
                      "gsd": GroupedAcceptConfig(prob_gap=1.0, max_dist=1e9, embeddings=token_embedding_table(target, 4))
                      }.items():
        dec = _sjd(target, 8, SamplingConfig(), 2.0, window=4, accept=acc, neighbours=NEIGHBOURS)
        gen = torch.Generator().manual_seed(0)
        taus[name] = sum(dec.generate(prefix, gen)[1].extra["step_compression"] for _ in range(100)) / 100
    assert taus["lantern"] > taus["exact"] and taus["gsd"] > taus["exact"]


def _every_third_forced():
    """A position-dependent token mask (like Lumina's newlines): index i ≡ 2 (mod 3) allows only token 0."""
    from models.token_masks import PositionalTokenMask

    classes = torch.tensor([[True] * 4, [True, False, False, False]])
    return PositionalTokenMask(classes, (torch.arange(20) % 3 == 2).long()[None])


def test_new_window_positions_respect_position_dependent_masks():
    prop = JacobiProposer(window=6, allowed_tokens=_every_third_forced())
    (tree,) = prop.propose([0], torch.tensor([3]), [1], [20], torch.Generator().manual_seed(0), 4)
    index = torch.arange(1, 7)  # the root is image token 0; window token j sits at index j
    forced = index % 3 == 2
    assert torch.all(tree.tokens[1:][forced] == 0)
    assert torch.allclose(tree.draft_probs[:6][forced], torch.tensor([1.0, 0, 0, 0]))
    assert torch.allclose(tree.draft_probs[:6][~forced], torch.full((4,), 0.25))


def test_decoder_needs_exactly_one_proposer():
    target = _tiny_target()
    with pytest.raises(ValueError, match="exactly one"):
        SpeculativeDecoder(target, None, 4, SamplingConfig(), 2.0)
    with pytest.raises(ValueError, match="sjd_window"):
        JacobiProposer(window=0)


# --------------------------------------------------------------------------------------------- demo, CLI, benchmark
@pytest.fixture
def _demo():
    if not (CKPT / "gpt").exists():
        pytest.skip("demo checkpoints not committed")


def test_greedy_sjd_equals_greedy_ar_on_the_demo(tmp_path, _demo):
    import numpy as np

    import main as cli

    runs = {}
    for engine in (["--model_type", "base"], ["--model_type", "sjd"], ["--model_type", "sjd", "--sjd_coupling",
                                                                        "--sjd_window", "7"]):
        out = tmp_path / "_".join(engine)
        cli.main(["generate_images", "--model", "demo", *engine, "--temperature", "0", "--save_tokens",
                  "--output_dir", str(out), "--num_images", "2"])
        runs[out.name] = [np.load(out / f"prompt_{i}_tokens.npy") for i in range(2)]
    base = runs.pop("--model_type_base")
    for tokens in runs.values():
        assert all(np.array_equal(a, b) for a, b in zip(tokens, base))


def test_sjd_cli_writes_the_same_statistics(tmp_path, _demo):
    import main as cli

    out = tmp_path / "o"
    cli.main(["generate_images", "--model", "demo", "--model_type", "sjd", "--gsd", "--gsd_dist", "200",
              "--output_dir", str(out),
              "--num_images", "2", "--set_seed"])
    stats = json.loads((out / "global_statistics_0_2.json").read_text())
    for entry in stats.values():
        assert entry["step_compression"] > 1.0 and entry["latency"] > 0 and entry["target_forwards"] < 64
        assert len(entry["acceptance_by_depth"]) == 16  # the default window
        assert entry["node_tvd_mean"] > 0  # GSD is relaxed: its realised shift is measured and reported
    with pytest.raises(SystemExit) as e:
        cli.main(["generate_images", "--model", "demo", "--model_type", "sjd", "--gsd", "--lantern",
                  "--output_dir", str(tmp_path / "x"), "--num_images", "1"])
    assert e.value.code == 2


@pytest.mark.parametrize("flags,needle", [
    (["--model_type", "sjd", "--sjd_window", "0"], "--sjd_window"),
    (["--model_type", "sjd", "--gsd", "--gsd_prob_gap", "-1"], "--gsd_prob_gap"),
    (["--model_type", "base", "--gsd"], "--model_type sjd"),
])
def test_bad_jacobi_flags_are_one_line_errors(tmp_path, capsys, flags, needle):
    import main as cli

    with pytest.raises(SystemExit) as e:
        cli.main(["generate_images", "--model", "demo", *flags, "--output_dir", str(tmp_path / "o"), "--num_images", "1"])
    assert e.value.code == 2 and needle in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["benchmark", "--settings", "sjd:window=0", "--output_dir", str(tmp_path / "b")])
    assert e.value.code == 2


def test_benchmark_runs_the_jacobi_settings(tmp_path, _demo):
    import main as cli

    cli.main(["benchmark", "--num_images", "2", "--output_dir", str(tmp_path), "--settings", "ar", "sjd", "mc-sjd",
              "gsd:dist=200,window=8", "sjd+lantern:delta=0.2"])
    rows = {r["setting"]: r for r in json.loads((tmp_path / "benchmark.json").read_text())["results"]}
    for name in ("sjd", "mc-sjd", "gsd:dist=200,window=8", "sjd+lantern:delta=0.2"):
        assert rows[name]["tau"] > 1.0 and 0 <= rows[name]["accuracy"] <= 1
        assert rows[name]["target_forwards"] < 64
