"""Grouped Speculative Decoding (models/drafters/grouped.py): the group G(x) on hand-made cases, the acceptance
probability min(1, p(G)/q(G)) and the residual by statistics, the exact output law and its TVD from p, greedy
GSD == greedy AR (LlamaGen fixture, demo), forced tokens on Chameleon, flags and benchmark keys.

Statistical tests use fixed seeds; binomial rates are checked within 4 standard errors, laws by chi-square
(p < 1e-3 rejects), so they hold on any CPU and thread count.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare
from test_engine import _fixture_gpt, _fixture_prefix, _prefix, _tiny_target

from models.drafters.acceptance import AcceptConfig, node_tvd, sibling_output_law, static_sibling_test
from models.drafters.grouped import (
    GroupedAcceptConfig,
    gsd_accept_prob,
    gsd_config_for,
    gsd_group_mask,
    gsd_output_law,
    gsd_residual,
    token_embedding_table,
)
from models.drafters.jacobi import JacobiProposer
from models.ea_model import SpeculativeDecoder
from models.sampling import SamplingConfig

CKPT = Path(__file__).resolve().parents[1] / "ckpts" / "demo"

# p in descending order of id 0..5 (ranks = ids), 1-d embeddings
P = torch.tensor([0.30, 0.25, 0.20, 0.12, 0.08, 0.05])
EMB = torch.tensor([[0.0], [0.1], [0.2], [1.0], [0.3], [0.35]])


def _group(x: int, p=P, emb=EMB, w=2, gap=0.15, dist=0.5) -> list[int]:
    return gsd_group_mask(p, torch.tensor(x), emb, w, gap, dist).nonzero().flatten().tolist()


# --------------------------------------------------------------------------------------------- the group
def test_group_window_is_asymmetric_in_rank():
    """Window w: x, its w − 1 likelier and its w less likely rank neighbours (the original's sort[c−w : c+w])."""
    far = dict(gap=1.0, dist=1e9)  # no filter: the window alone
    assert _group(2, w=2, **far) == [1, 2, 3, 4]  # rank 2: ranks 1 | 2 | 3, 4
    assert _group(2, w=1, **far) == [2, 3]  # one less likely token, no likelier one
    assert _group(0, w=3, **far) == [0, 1, 2, 3]  # clipped at the top
    assert _group(5, w=3, **far) == [3, 4, 5]  # clipped at the bottom
    assert _group(2, w=0, **far) == [2]  # w = 0: the exact test
    # ranks follow p, not ids: permute p and the window moves with it
    p = P[[5, 4, 3, 2, 1, 0]]  # id 5 is now the likeliest
    assert _group(3, p=p, w=2, **far) == [1, 2, 3, 4]
    # ties (e.g. p = 0 outside the target's top-k) are ordered by id (stable sort)
    tied = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    assert _group(3, p=tied, w=1, **far) == [3, 4]


def test_group_keeps_close_probabilities_and_close_embeddings():
    assert _group(0) == [0, 1, 2]  # gaps 0.05, 0.10; distances 0.01, 0.04
    assert _group(2) == [1, 2, 4]  # 3 is within the gap but ‖e3 − e2‖² = 0.64 ≥ 0.5
    assert _group(3) == [3, 4, 5]  # 2: gap 0.08 but distance 0.64; 4: 0.49 < 0.5; 5: 0.4225
    assert _group(0, gap=0.06) == [0, 1]  # |0.20 − 0.30| = 0.10 is not < 0.06
    assert _group(0, gap=0.05) == [0]  # strict: |0.25 − 0.30| = 0.05 is not < 0.05
    assert _group(3, dist=0.45) == [3, 5]
    # ids past the embedding table never join; a draft past it is alone
    assert _group(0, emb=EMB[:2], gap=1.0, dist=1e9, w=3) == [0, 1]
    assert _group(4, emb=EMB[:4], gap=1.0, dist=1e9, w=3) == [4]
    # batched candidates give each its own row
    rows = gsd_group_mask(P.expand(3, -1), torch.tensor([0, 2, 3]), EMB, 2, 0.15, 0.5)
    assert [r.nonzero().flatten().tolist() for r in rows] == [[0, 1, 2], [1, 2, 4], [3, 4, 5]]


def test_config_validation_and_greedy_path():
    with pytest.raises(ValueError, match="rank_window"):
        GroupedAcceptConfig(rank_window=-1, embeddings=EMB)
    with pytest.raises(ValueError, match="embeddings"):
        GroupedAcceptConfig(embeddings=torch.zeros(3))
    with pytest.raises(ValueError, match="token embeddings"):
        GroupedAcceptConfig().group_mask(P, torch.tensor(0))
    cfg = GroupedAcceptConfig(embeddings=EMB)
    assert cfg.enabled and not cfg.needs_neighbours and AcceptConfig(relax="lantern", k=1, delta=0.1).needs_neighbours
    p_x, mask = cfg.relaxed_for(P, torch.tensor(2), None)  # greedy: the exact test
    assert float(p_x) == pytest.approx(0.2) and mask.nonzero().flatten().tolist() == [2]


# --------------------------------------------------------------------------------------------- acceptance, law
Q = torch.tensor([0.05, 0.10, 0.40, 0.05, 0.30, 0.10])
CFG = GroupedAcceptConfig(rank_window=2, prob_gap=0.15, max_dist=0.5, embeddings=EMB)


def test_acceptance_probability_is_group_mass_ratio():
    """For each draft x, n verifier tests accept at rate min(1, p(G)/q(G)) (4 standard errors), and rejected
    tests resample from normalise(max(0, p − q)) (chi-square)."""
    n = 40000
    g = torch.Generator().manual_seed(0)
    res = gsd_residual(P, Q)
    assert torch.allclose(res, (P - Q).clamp(min=0) / (P - Q).clamp(min=0).sum())
    for x in range(6):
        group = gsd_group_mask(P, torch.tensor(x), EMB, 2, 0.15, 0.5)
        a = float(gsd_accept_prob(P, Q, group))
        assert a == pytest.approx(min(1.0, float(P[group].sum() / Q[group].sum())))
        acc, r = static_sibling_test(P.expand(n, -1), Q.expand(n, -1), torch.full((n, 1), x), CFG, None, g)
        rate = float((acc >= 0).double().mean())
        assert abs(rate - a) <= 4 * (a * (1 - a) / n) ** 0.5 + 1e-9, (x, rate, a)
        assert torch.allclose(r[0], res)
        rejected = int((acc < 0).sum())
        if rejected > 1000:
            draws = torch.multinomial(r[0], rejected, replacement=True, generator=g)
            counts = torch.bincount(draws, minlength=6).double()
            keep = res > 0
            assert chisquare(counts[keep].numpy(), (res[keep].double() * rejected).numpy()).pvalue > 1e-3


def test_output_law_and_its_tvd_from_p():
    """The verifier's law given each draft (sibling_output_law) averaged over x ~ q is gsd_output_law exactly;
    sampled one-step outputs follow it (chi-square); its TVD from p is reported (exact rule: 0)."""
    xs = torch.arange(6)[:, None]
    given_x = sibling_output_law(P.expand(6, -1), xs, CFG, None, Q.expand(6, -1))
    law = gsd_output_law(P, Q, CFG)
    assert torch.allclose((Q[:, None] * given_x).sum(0), law, atol=1e-6)
    exact = sibling_output_law(P.expand(6, -1), xs, AcceptConfig(), None, Q.expand(6, -1))
    assert torch.allclose((Q[:, None] * exact).sum(0), P, atol=1e-6)
    n = 100000
    g = torch.Generator().manual_seed(1)
    x = torch.multinomial(Q, n, replacement=True, generator=g)
    acc, res = static_sibling_test(P.expand(n, -1), Q.expand(n, -1), x[:, None], CFG, None, g)
    out = torch.where(acc >= 0, x, torch.multinomial(res, 1, generator=g).squeeze(1))
    counts = torch.bincount(out, minlength=6).double()
    assert chisquare(counts.numpy(), (law.double() * n).numpy()).pvalue > 1e-3
    tvd = 0.5 * float((law - P).abs().sum())
    # node_tvd (what the engine reports per emitted token) is the shift given the draw; its mean over draws
    # bounds the marginal TVD from above (convexity)
    per_draw = node_tvd(P.expand(6, -1), xs, CFG, None, Q.expand(6, -1))
    bound = float((Q * per_draw).sum())
    print(f"GSD one-step TVD(output, p) = {tvd:.4f}; E_x node_tvd = {bound:.4f} (w=2, gap 0.15, dist 0.5)")
    assert 0.05 < tvd <= bound + 1e-6
    wide = GroupedAcceptConfig(rank_window=6, prob_gap=1.0, max_dist=1e9, embeddings=EMB)
    assert 0.5 * float((gsd_output_law(P, Q, wide) - P).abs().sum()) > tvd  # larger groups move further from p
    alone = GroupedAcceptConfig(rank_window=0, embeddings=EMB)  # G(x) = {x}: lossless
    assert torch.allclose(gsd_output_law(P, Q, alone), P, atol=1e-6)


# --------------------------------------------------------------------------------------------- engine
def test_greedy_gsd_equals_greedy_ar_on_the_llamagen_fixture():
    model, io = _fixture_gpt("c2i")
    emb = token_embedding_table(model, model.config.vocab_size)
    cfg = GroupedAcceptConfig(prob_gap=1.0, max_dist=1e9, embeddings=emb)  # the widest groups
    for i in range(2):
        prefix = _fixture_prefix(model, io, "c2i", i, 4.0)
        dec = SpeculativeDecoder(model, None, 16, SamplingConfig(temperature=0), 4.0, cfg, proposer=JacobiProposer(5))
        tokens, _ = dec.generate(prefix, torch.Generator().manual_seed(i))
        assert torch.equal(tokens[0], io["gen_tokens"][i])


def test_sampled_gsd_accepts_more_than_sjd_and_reports_its_shift():
    target = _tiny_target()
    prefix = _prefix(target, torch.tensor([0]), torch.ones(1, 1, dtype=torch.bool), 2.0)
    emb = token_embedding_table(target, 4)
    taus, tvds = {}, {}
    for name, acc in {"sjd": AcceptConfig(),
                      "gsd": GroupedAcceptConfig(prob_gap=1.0, max_dist=1e9, embeddings=emb)}.items():
        dec = SpeculativeDecoder(target, None, 8, SamplingConfig(), 2.0, acc, proposer=JacobiProposer(4))
        gen = torch.Generator().manual_seed(0)
        stats = [dec.generate(prefix, gen)[1].extra for _ in range(100)]
        taus[name] = sum(s["step_compression"] for s in stats) / 100
        tvds[name] = sum(s.get("node_tvd_mean", 0.0) for s in stats) / 100
    assert taus["gsd"] > taus["sjd"] and tvds["gsd"] > 0 == tvds["sjd"]


def test_gsd_keeps_chameleon_forced_tokens_in_place():
    """Lumina-style forced token (index 1 allows only id 5): a point mass whatever the group, even with the
    widest groups (every candidate's distance and gap pass)."""
    from test_chameleon_family import forced_token_case

    target, prefix, allowed, sampling = forced_token_case()
    cfg = GroupedAcceptConfig(rank_window=7, prob_gap=1.0, max_dist=1e9,
                              embeddings=token_embedding_table(target, target.config.vocab_size, allowed))
    assert cfg.embeddings.shape[0] == 6
    dec = SpeculativeDecoder(target, None, 3, sampling, 2.0, cfg, allowed_tokens=allowed, proposer=JacobiProposer(2))
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        tokens, _ = dec.generate(prefix, gen)
        assert int(tokens[0, 1]) == 5 and int(tokens[0, 0]) < 4 and int(tokens[0, 2]) < 4
    # at a forced position p = δ_5: the forced token's group is itself (accepted), any other draft's group
    # leaves it out (gap 1) and has p-mass 0 (rejected; the residual max(0, p − q) is δ_5 again)
    p = torch.tensor([0, 0, 0, 0, 0, 1.0])
    q = torch.full((6,), 1 / 6)
    g5 = cfg.group_mask(p, torch.tensor(5))
    assert g5.nonzero().flatten().tolist() == [5] and float(gsd_accept_prob(p, q, g5)) == 1.0
    for x in range(5):
        g = cfg.group_mask(p, torch.tensor(x))
        assert not bool(g[5]) and float(gsd_accept_prob(p, q, g)) == 0.0
    assert torch.equal(gsd_residual(p, q), p)


# --------------------------------------------------------------------------------------------- demo, CLI, benchmark
@pytest.fixture
def _demo():
    if not (CKPT / "gpt").exists():
        pytest.skip("demo checkpoints not committed")


def test_demo_gsd_config_and_greedy_cli(tmp_path, _demo):
    import numpy as np

    import main as cli
    from models.registry import load_family

    fam = load_family("demo", torch.device("cpu"), torch.float32, None, None, None, None)
    cfg = gsd_config_for(fam)
    assert cfg.embeddings.shape == (fam.target.lm_head.weight.shape[0], fam.target.config.dim)
    assert (cfg.rank_window, cfg.prob_gap, cfg.max_dist) == (7, 0.15, 0.5)
    runs = {}
    for name, engine in {"base": ["--model_type", "base"],
                         "gsd": ["--model_type", "sjd", "--gsd", "--gsd_dist", "1e9", "--gsd_prob_gap", "1"]}.items():
        out = tmp_path / name
        cli.main(["generate_images", "--model", "demo", *engine, "--temperature", "0", "--save_tokens",
                  "--output_dir", str(out), "--num_images", "2"])
        runs[name] = [np.load(out / f"prompt_{i}_tokens.npy") for i in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(runs["gsd"], runs["base"]))


@pytest.mark.parametrize("flags,needle", [
    (["--model_type", "sjd", "--gsd", "--gsd_rank_window", "-1"], "--gsd_rank_window"),
    (["--model_type", "sjd", "--gsd", "--gsd_prob_gap", "1.5"], "--gsd_prob_gap"),
    (["--model_type", "sjd", "--gsd", "--gsd_dist", "nan"], "--gsd_dist"),
])
def test_bad_gsd_flags_are_one_line_errors(tmp_path, capsys, flags, needle):
    import main as cli

    with pytest.raises(SystemExit) as e:
        cli.main(["generate_images", "--model", "demo", *flags, "--output_dir", str(tmp_path / "o"), "--num_images", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("setting,needle", [("gsd:dist=-1", "dist"), ("gsd:prob_gap=x", "prob_gap"),
                                            ("sjd:prob_gap=0.1", "gsd only"), ("gsd:group=10", "unknown options")])
def test_bad_gsd_benchmark_keys_are_errors(tmp_path, capsys, setting, needle):
    import main as cli

    with pytest.raises(SystemExit) as e:
        cli.main(["benchmark", "--settings", setting, "--output_dir", str(tmp_path / "b")])
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_benchmark_gsd_keys(tmp_path, _demo):
    import main as cli

    cli.main(["benchmark", "--num_images", "2", "--repeats", "1", "--no_profile", "--output_dir", str(tmp_path),
              "--settings", "gsd", "gsd:rank_window=3,prob_gap=1,dist=1e9,window=8"])
    rows = {r["setting"]: r for r in json.loads((tmp_path / "benchmark.json").read_text())["results"]}
    wide = rows["gsd:rank_window=3,prob_gap=1,dist=1e9,window=8"]
    assert wide["tau"] > 1.0 and wide["node_tvd_mean"] > 0 and 0 <= wide["accuracy"] <= 1
    assert rows["gsd"]["tau"] > 1.0
