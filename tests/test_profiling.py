"""The benchmark's measuring tools: aten ops per round / AR step, the per-phase split, medians and spreads."""

from __future__ import annotations

import json

import pytest
import torch
from test_batching import _demo_decoder, demo  # noqa: F401  (module fixture)

from models.generation import generate_ar
from models.profiling import (
    ROUND_PHASES,
    OpCounter,
    PhaseProfiler,
    profile_ar_step,
    profile_speculative,
    replay_products,
    spread,
)
from models.sampling import SamplingConfig

SAMPLED = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0)


def test_op_counter_counts_aten_calls():
    x = torch.ones(3)
    with OpCounter() as c:
        y = (x + 1) * 2
        y.sum()
    assert c.total == 3 and c.by_op["aten.add"] == 1 and c.by_op["aten.sum"] == 1


def test_spread_median_quartiles():
    s = spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"], s["n"]) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert spread([2.0])["q1"] == spread([2.0])["q3"] == 2.0


def test_phase_profiler_sums_phases_and_counts_rounds():
    c = OpCounter()
    p = PhaseProfiler(c)
    with c:
        for _ in range(2):
            p.mark("drafter")
            torch.ones(2) + 1
            p.mark("verify")
        p.mark(None)
    assert p.rounds == 2 and p.ops["drafter"] == 4 and p.ops["verify"] == 0  # ones + add per round
    assert p.per_round(p.ops)["drafter"] == 2


@pytest.mark.parametrize("setting", ["eagle2", "lantern++:lam=5,tree=chain_6"])
def test_profiled_round_on_the_demo_leaves_tokens_unchanged(demo, setting):  # noqa: F811
    family = demo[0]
    dec = _demo_decoder(demo, setting, SAMPLED)
    prefix = family.build_prefix(["3"], family.defaults.cfg)

    def gens():
        return [torch.Generator().manual_seed(7)]

    plain, st = dec.generate(prefix, gens())
    prof = profile_speculative(dec, prefix, gens)
    assert dec.profiler is None
    again, _ = dec.generate(prefix, gens())
    assert torch.equal(plain, again)
    assert prof["rounds"] == st.target_forwards - 1  # one round per target forward after the prefill
    assert set(prof["ops_per_round_by_phase"]) == set(ROUND_PHASES)
    # the engine's general loop (eager): every phase of the round issues ops; "fused" is the static round run
    # as one function (models/drafters/fused_round.py, tests/test_fused_round.py)
    assert all(v > 0 for p, v in prof["ops_per_round_by_phase"].items() if p != "fused")
    assert prof["ops_per_round_by_phase"]["fused"] == 0
    assert prof["ops_per_round"] == pytest.approx(sum(prof["ops_per_round_by_phase"].values()))
    assert sum(prof["time_share"].values()) == pytest.approx(1.0)
    ar = profile_ar_step(family.target, prefix, family.num_image_tokens, SAMPLED, gens)
    assert 0 < ar["ops_per_step"] < prof["ops_per_round"] and ar["step_s"] > 0
    # the matrix products: an AR step of the LlamaGen layer has 4 per layer (wqkv, wo, w1|w3 merged, w2) + the head;
    # a round has the target's over the tree, the drafter's and the drafter head's at every level
    layers = family.target.config.n_layer
    assert ar["products_per_step"] == 4 * layers + 1 and ar["products_s_per_step"] > 0
    assert prof["products_per_round"] > ar["products_per_step"] and prof["products_s_per_round"] > 0
    with OpCounter() as c:  # the AR count is the whole decode minus the prefill, over the steps
        generate_ar(family.target, prefix, family.num_image_tokens, SAMPLED, gens())
    assert ar["ops_per_step"] * ar["steps"] < c.total


def test_benchmark_reports_repeats_spreads_and_profile(tmp_path, capsys):
    import main as cli

    cli.main(["benchmark", "--num_images", "2", "--repeats", "2", "--output_dir", str(tmp_path), "--settings", "ar",
              "lantern++:lam=5,tree=chain_6"])
    assert "1 intra-op thread(s) (the benchmark's CPU default" in capsys.readouterr().err
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert report["threads"] == 1 and report["repeats"] == 2
    rows = {r["setting"]: r for r in report["results"]}
    for r in rows.values():
        assert r["latency_spread"]["n"] == 4  # 2 images x 2 repeats, every one timed beside AR
        assert r["latency_spread"]["q1"] <= r["latency_s"] <= r["latency_spread"]["q3"]
        assert r["speedup_spread"]["n"] == 4
    assert rows["ar"]["speedup_spread"]["max"] == 1.0
    p = rows["lantern++:lam=5,tree=chain_6"]["profile"]
    assert p["ops_round_over_ar_step"] == pytest.approx(p["ops_per_round"] / rows["ar"]["profile"]["ops_per_step"])
    assert "aten ops / round" in (tmp_path / "benchmark.md").read_text()


def test_verify_cost_reports_medians_spreads_and_ops(tmp_path):
    import main as cli

    cli.main(["benchmark", "--verify_cost", "--repeats", "1", "--output_dir", str(tmp_path)])
    report = json.loads((tmp_path / "verify_cost.json").read_text())
    assert report["laps"] == 10 and report["relative_spread"]["1"]["max"] == 1.0
    assert all(v["n"] == 10 for v in report["seconds_spread"].values())
    assert set(report["aten_ops"]) == {"1", "4", "16", "26", "59", "128"}


def test_compile_setting_key_is_parsed_and_checked():
    from entrypoints.benchmark import parse_setting
    from entrypoints.common import UserError

    assert parse_setting("ar:compile=1", 20, "mc_sim_7b_63")["compile"] is True
    assert "compile" not in parse_setting("eagle2", 20, "mc_sim_7b_63")
    with pytest.raises(UserError, match="compile is 0 or 1"):
        parse_setting("eagle2:compile=yes", 20, "mc_sim_7b_63")


def test_skipping_the_tvd_measure_keeps_tokens_and_saves_verify_ops(demo):  # noqa: F811
    family = demo[0]
    dec = _demo_decoder(demo, "lantern++:lam=20,tree=chain_6", SAMPLED)
    prefix = family.build_prefix(["5"], family.defaults.cfg)

    def gens():
        return [torch.Generator().manual_seed(11)]

    on, st_on = dec.generate(prefix, gens())
    with_tvd = profile_speculative(dec, prefix, gens)["ops_per_round_by_phase"]["verify"]
    dec.measure_shift = False
    off, st_off = dec.generate(prefix, gens())
    without = profile_speculative(dec, prefix, gens)["ops_per_round_by_phase"]["verify"]
    assert torch.equal(on, off) and st_on.extra["accept_lengths"] == st_off.extra["accept_lengths"]
    assert "node_tvd_mean" in st_on.extra and "node_tvd_mean" not in st_off.extra
    assert without < 0.8 * with_tvd


def test_recorded_products_name_their_weights():
    """The product record identifies each weight, so a replay reuses one stand-in per weight of the model (a
    layer's weight at every step), as the model does, instead of streaming a new matrix per call."""
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(3, 16)
    with torch.inference_mode(), OpCounter(record_products=True) as c:
        for _ in range(4):
            layer(x)
        torch.nn.Linear(16, 8)(x)
    assert len(c.products) == 5 and all(p[:3] == (3, 16, 8) for p in c.products)
    assert len({p[5] for p in c.products}) == 2  # the four calls of one layer share its weight
    assert replay_products(c.products, repeats=3) > 0


def test_machine_info_names_the_cpu_its_cores_and_vector_extension():
    from models.profiling import describe_machine, machine_info

    info = machine_info(torch.device("cpu"))
    assert info["cpu"] and info["cpu_cores"] >= 1 and info["torch"] == torch.__version__
    assert info["cpu_isa"] in (None, "AMX", "AVX-512", "AVX2", "AVX")
    line = describe_machine(info)
    assert line.startswith(info["cpu"]) and f"{info['cpu_cores']} cores" in line and torch.__version__ in line
    assert describe_machine({**info, "cpu_isa": None, "gpu": "X"}).count("GPU X") == 1
