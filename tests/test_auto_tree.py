"""``--tree auto``: the expected-tokens formula, the acceptance statistics, the choice under a cost model, and
the command line (models/drafters/auto_tree.py)."""

from __future__ import annotations

import inspect
import json
import math
import random
from pathlib import Path

import pytest
import torch

import main as cli
from models.drafters.auto_tree import (
    AcceptanceStats,
    AutoTreeDecoder,
    Candidate,
    candidate,
    choose,
    expected_tokens,
    expected_tokens_chain,
    fit_round_cost,
    round_cost,
)
from models.drafters.choices import get_tree_choices
from models.drafters.tree import StaticTreeTemplate
from models.sampling import SamplingConfig

DEMO = Path(__file__).resolve().parents[1] / "ckpts" / "demo"


def tmpl(name_or_paths) -> StaticTreeTemplate:
    return StaticTreeTemplate.from_choices(get_tree_choices(name_or_paths))


def simulate_round(template: StaticTreeTemplate, rate, rng: random.Random) -> list[int]:
    """One round of the sequential sibling test: at each node, children in rank order until one passes."""
    kids: dict[int, list[int]] = {}
    for i, p in enumerate(template.parents.tolist()):
        if p >= 0:
            kids.setdefault(p, []).append(i)
    depths, ranks = template.depths.tolist(), template.child_rank.tolist()
    path = [0]
    while True:
        nxt = None
        for c in sorted(kids.get(path[-1], []), key=lambda j: ranks[j]):
            if rng.random() < rate(depths[c], ranks[c]):
                nxt = c
                break
        if nxt is None:
            return path
        path.append(nxt)


# ------------------------------------------------------------------------------------------ expected tokens
def test_chain_formula_on_hand_made_rates():
    assert expected_tokens_chain([]) == 1.0
    assert expected_tokens_chain([0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens_chain([1.0] * 6) == 7.0
    assert expected_tokens_chain([0.8, 0.5, 0.0, 1.0]) == pytest.approx(1 + 0.8 + 0.4)
    rates = [0.9, 0.7, 0.6, 0.5]
    assert expected_tokens(tmpl("chain_4"), lambda d, r: rates[d - 1]) == pytest.approx(expected_tokens_chain(rates))


def test_tree_formula_on_hand_made_rates():
    rate = {(1, 0): 0.5, (1, 1): 0.4, (2, 0): 0.3}
    # two root children: 1 + a(1,0) + (1 − a(1,0)) a(1,1)
    assert expected_tokens(tmpl([[0], [1]]), lambda d, r: rate[d, r]) == pytest.approx(1 + 0.5 + 0.5 * 0.4)
    # rank 0 has a child: its acceptance adds a(1,0) a(2,0)
    assert expected_tokens(tmpl([[0], [1], [0, 0]]), lambda d, r: rate[d, r]) == pytest.approx(1.85)


def test_tree_formula_matches_a_simulation_of_the_sibling_tests():
    """E = 1 + V(root) against 20,000 simulated rounds of mc_sim_7b_63 (fixed seed; 5 standard errors)."""
    t = tmpl("mc_sim_7b_63")

    def rate(d, r):
        return max(0.05, 0.8 - 0.1 * d - 0.15 * r)

    rng = random.Random(0)
    tokens = [len(simulate_round(t, rate, rng)) for _ in range(20000)]  # accepted drafts + the target's token
    mean = sum(tokens) / len(tokens)
    sd = math.sqrt(sum((x - mean) ** 2 for x in tokens) / (len(tokens) - 1))
    assert abs(mean - expected_tokens(t, rate)) < 5 * sd / math.sqrt(len(tokens))


# ------------------------------------------------------------------------------------------ statistics
def test_observe_counts_the_sibling_tests_of_the_walked_path():
    s = AcceptanceStats()
    s.observe(tmpl("chain_4"), [0, 1, 2])  # two drafts accepted, the third rejected
    assert s.tests == {(1, 0): [1, 1], (2, 0): [1, 1], (3, 0): [0, 1]}
    t = tmpl("mc_sim_7b_63")
    third = t.children[0, 2].item()  # the root's rank-2 child, a leaf-parent of one child ([2, 0], [2, 1])
    s = AcceptanceStats()
    s.observe(t, [0, third])  # ranks 0, 1 rejected, 2 accepted; then both of its children rejected
    assert s.tests == {(1, 0): [0, 1], (1, 1): [0, 1], (1, 2): [1, 1], (2, 0): [0, 1], (2, 1): [0, 1]}
    s = AcceptanceStats()
    s.observe(tmpl("chain_2"), [0, 1, 2])  # a full chain: nothing tested below the leaf
    assert s.tests == {(1, 0): [1, 1], (2, 0): [1, 1]}


def test_rates_start_at_the_prior_and_converge_to_the_observed_ones():
    s = AcceptanceStats(prior_weight=4)
    assert s.rate(1, 0) == 0.5 and s.rate(3, 0) == 0.5 and s.rate(1, 1) == 0.25
    t = tmpl("mc_sim_7b_63")

    def truth(d, r):
        return 0.85 - 0.05 * d - 0.2 * r

    rng = random.Random(1)
    for _ in range(5000):
        s.observe(t, simulate_round(t, truth, rng))
    for d, r in [(1, 0), (1, 1), (2, 0), (3, 0), (1, 3)]:
        acc, att = s.tests[d, r]
        se = math.sqrt(truth(d, r) * (1 - truth(d, r)) / att)
        assert abs(s.rate(d, r) - truth(d, r)) < 5 * se + 4 / att, (d, r, att)
    # a depth never drafted (mc_sim_7b_63 has 5 levels) borrows the deepest observed one
    assert s.rate(6, 0) == pytest.approx(s.rate(5, 0), abs=0.02)


# ------------------------------------------------------------------------------------------ choice
def _candidates(c0: float, per_node: float, per_level: float) -> list[Candidate]:
    out = []
    for name in [f"chain_{n}" for n in range(1, 9)] + ["mc_sim_7b_63"]:
        c = candidate(name)
        c.round_s = round_cost((c0, per_node, per_level), c.nodes, c.template.max_depth)
        out.append(c)
    return out


def _stats(rate: float, sibling: float | None = None) -> AcceptanceStats:
    """Rank-0 tests pass with ``rate``, later siblings with ``sibling`` (default: a tenth of it)."""
    s = AcceptanceStats(prior_weight=0)
    for d in range(1, 9):
        for r in range(4):
            p = rate if r == 0 else (rate / 10 if sibling is None else sibling)
            s.tests[d, r] = [round(p * 1000), 1000]
    return s


def test_cheap_verify_picks_long_chains_and_expensive_verify_short_ones():
    stats = _stats(0.8)
    # a round costs its fixed overhead; nodes nearly free -> the deepest chain (most tokens per round)
    assert choose(_candidates(1.0, 0.001, 0.0), stats, 64)[0]["tree"] == "chain_8"
    # every node costs as much as the overhead -> one draft per round
    assert choose(_candidates(0.1, 1.0, 0.0), stats, 64)[0]["tree"] == "chain_1"
    # in between an interior chain length wins, and a low acceptance shortens it
    mid = choose(_candidates(1.0, 0.15, 0.0), stats, 64)[0]["tree"]
    low = choose(_candidates(1.0, 0.15, 0.0), _stats(0.4), 64)[0]["tree"]
    assert mid not in ("chain_1", "chain_8") and int(low.split("_")[1]) < int(mid.split("_")[1])


def test_wide_tree_wins_when_nodes_are_free_and_ranks_help():
    s = _stats(0.5, sibling=0.5)  # every sibling test passes half the time: a tree's second chances pay
    best = choose(_candidates(1.0, 0.0, 0.0), s, 64)
    assert best[0]["tree"] == "mc_sim_7b_63"
    assert best[0]["expected_tokens_per_round"] > max(r["expected_tokens_per_round"] for r in best[1:])


def test_round_cost_fit_recovers_the_coefficients():
    pts = [(n, d, 0.002 + 0.0003 * n + 0.001 * d) for n, d in [(2, 1), (4, 3), (7, 6), (9, 8), (26, 5)]]
    assert fit_round_cost(pts) == pytest.approx((0.002, 0.0003, 0.001))
    # a node cost that would come out negative is dropped, not allowed to make big trees look cheap
    pts = [(n, d, 0.01 + 0.001 * d - 0.0001 * n) for n, d in [(2, 1), (4, 3), (7, 6), (26, 5)]]
    c0, c1, c2 = fit_round_cost(pts)
    assert c1 == 0.0 and c0 > 0 and c2 >= 0


# ------------------------------------------------------------------------------------------ the engine
@pytest.fixture(scope="module")
def demo():
    if not (DEMO / "drafter" / "config.json").exists():
        pytest.skip("demo checkpoints not committed")
    from models.drafters.cnets import load_drafter
    from models.registry import load_family

    family = load_family("demo")
    return family, load_drafter(DEMO / "drafter", target_config=family.target.config)


def test_auto_decoder_stays_greedy_identical_across_tree_changes(demo):
    """Swapping the tree between images keeps greedy decoding equal to greedy AR (any tree verifies exactly)."""
    from models.ea_model import SpeculativeDecoder, TreeConfig
    from models.generation import generate_ar

    family, drafter = demo
    greedy = SamplingConfig(temperature=0.0)
    cfg = family.defaults.cfg
    dec = SpeculativeDecoder(family.target, drafter, family.num_image_tokens, greedy, cfg,
                             tree=TreeConfig(static_choices=tuple(map(tuple, get_tree_choices("chain_2")))))
    auto = AutoTreeDecoder(dec, candidates=("chain_2", "mc_sim_7b_63"), log=lambda m: None)
    for c in auto.candidates:  # a hand-made cost model instead of the calibration: the wide tree costs more
        c.round_s, c.setup_s = (0.001 if c.name == "chain_2" else 0.05), 0.0
    auto.calibration = {"hand-made": True}
    auto._repick()
    assert auto.choice == "chain_2"
    for c in auto.candidates:  # now nodes are free: the next image must switch to the tree
        c.round_s = 0.001
    for prompt, tree in (("3", "chain_2"), ("7", "mc_sim_7b_63")):
        prefix = family.build_prefix([prompt], cfg)
        tokens, st = auto.generate(prefix)
        assert st.extra["per_prompt"][0]["tree"] == tree and st.extra["auto_tree"]["tree"] == tree
        assert torch.equal(tokens, generate_ar(family.target, prefix, family.num_image_tokens, greedy)[0])
    assert [h["tree"] for h in auto.history] == ["chain_2", "mc_sim_7b_63"]
    assert sum(att for _, att in auto.stats.tests.values()) > 0  # the rounds were counted


# ------------------------------------------------------------------------------------------ command line
def test_cli_tree_auto_records_the_calibration_and_the_choice(demo, tmp_path, capsys):
    out = tmp_path / "auto"
    cli.main(["generate_images", "--model", "demo", "--model_type", "eagle", "--lantern_lambda", "20",
              "--tree", "auto", "--num_images", "3", "--batch_size", "2", "--set_seed", "--output_dir", str(out)])
    cfg = json.loads((out / "generation_configs.json").read_text())
    auto = cfg["auto_tree"]
    assert set(auto["calibration"]["measured_round_ms"]) == set(auto["candidates"])
    assert all(v > 0 for v in auto["calibration"]["measured_round_ms"].values())
    assert set(auto["calibration"]["fitted_round_ms"]) == set(auto["candidates"])
    chosen = auto["choices"][0]["tree"]
    assert chosen in auto["candidates"]
    # the last choice is the best final score, or within the switching margin of it (near-ties do not flip)
    margin = inspect.signature(AutoTreeDecoder).parameters["switch_margin"].default
    final = {r["tree"]: r["expected_tokens_per_s"] for r in auto["final_scores"]}
    assert final[auto["choices"][-1]["tree"]] >= (1 - margin) * auto["final_scores"][0]["expected_tokens_per_s"]
    stats = json.loads((out / "global_statistics_0_3.json").read_text())  # batches of 2 and 1 prompts
    assert stats["prompt_0"]["tree"] == stats["prompt_1"]["tree"] == chosen
    assert stats["prompt_2"]["tree"] in auto["candidates"]
    assert f"auto tree: {chosen}" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--model_type", "eagle", "--tree_choices", "chain_3"], "drop --tree_choices"),
    (["--model_type", "base"], "--model_type eagle"),
    (["--model_type", "sjd"], "--model_type eagle"),
])
def test_cli_tree_auto_bad_combinations_are_one_line_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate_images", "--model", "demo", "--tree", "auto", *flags, "--output_dir", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_benchmark_tree_auto_on_a_dynamic_setting_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["benchmark", "--settings", "ar", "eagle2:tree=auto", "--output_dir", str(tmp_path)])
    assert e.value.code == 2 and "tree=auto" in capsys.readouterr().err
