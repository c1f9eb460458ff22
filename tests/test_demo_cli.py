"""The newcomer's command on the committed demo, the default engine choice, and the benchmark command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import main as cli

CKPT = Path(__file__).resolve().parents[1] / "ckpts" / "demo"


@pytest.fixture(autouse=True)
def _need_demo():
    if not (CKPT / "drafter" / "config.json").exists():
        pytest.skip("demo checkpoints not committed")


def test_bare_command_runs_the_demo_with_lantern(tmp_path, capsys):
    out = tmp_path / "out"
    cli.main(["generate_images", "--output_dir", str(out), "--num_images", "3", "--set_seed"])
    cfg = json.loads((out / "generation_configs.json").read_text())
    assert cfg["model"] == "demo" and cfg["model_type"] == "eagle" and cfg["lantern"] is True
    stats = json.loads((out / "global_statistics_0_3.json").read_text())
    assert list(stats) == ["prompt_0", "prompt_1", "prompt_2"]
    for i, entry in enumerate(stats.values()):
        assert entry["step_compression"] >= 1.0 and entry["latency"] > 0
        assert Image.open(out / f"prompt_{i}.png").size == (32, 32)
    assert "tau" in capsys.readouterr().out


def test_explicit_eagle_stays_exact_and_base_is_plain_ar(tmp_path):
    cli.main(["generate_images", "--model", "demo", "--model_type", "eagle", "--output_dir", str(tmp_path / "e"),
              "--num_images", "1"])
    assert json.loads((tmp_path / "e" / "generation_configs.json").read_text())["lantern"] is False
    cli.main(["generate_images", "--model", "demo", "--output_dir", str(tmp_path / "b"), "--num_images", "1"])
    cfg = json.loads((tmp_path / "b" / "generation_configs.json").read_text())
    assert cfg["model_type"] == "base"
    stats = json.loads((tmp_path / "b" / "global_statistics_0_1.json").read_text())
    assert stats["prompt_0"]["step_compression"] == 1.0 and stats["prompt_0"]["target_forwards"] == 64


def test_greedy_speculative_equals_greedy_ar_on_the_demo(tmp_path):
    import numpy as np

    runs = {}
    for engine in (["--model_type", "base"], ["--model_type", "eagle"], ["--model_type", "eagle", "--static_tree"]):
        out = tmp_path / "_".join(engine)
        cli.main(["generate_images", "--model", "demo", *engine, "--temperature", "0", "--save_tokens",
                  "--output_dir", str(out), "--num_images", "3"])
        runs[out.name] = [np.load(out / f"prompt_{i}_tokens.npy") for i in range(3)]
    base = runs.pop("--model_type_base")
    for tokens in runs.values():
        assert all(np.array_equal(a, b) for a, b in zip(tokens, base))


def test_benchmark_reports_tau_speed_and_accuracy(tmp_path):
    cli.main(["benchmark", "--num_images", "2", "--output_dir", str(tmp_path), "--settings", "ar", "eagle2",
              "lantern:delta=0.2", "lantern++:lam=5"])
    report = json.loads((tmp_path / "benchmark.json").read_text())
    rows = {r["setting"]: r for r in report["results"]}
    assert rows["ar"]["tau"] == 1.0 and rows["ar"]["speedup_vs_ar"] == pytest.approx(1.0)
    for r in rows.values():
        assert 0 <= r["accuracy"] <= 1 and r["latency_s"] > 0
    assert rows["eagle2"]["target_forwards"] < 64
    md = (tmp_path / "benchmark.md").read_text()
    assert md.startswith(f"measured on: {report['machine']['cpu']}") and "\n| setting |" in md
    assert report["machine"]["cpu_cores"] >= 1


def test_benchmark_rejects_unknown_settings(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["benchmark", "--settings", "medusa"])
    assert e.value.code == 2


@pytest.mark.parametrize("flags,relax,value", [
    (["--lantern", "--lantern_delta", "0.3"], "lantern", 0.3),
    (["--lantern", "--lantern_delta", "5"], "lantern++", 5.0),  # the original's shared flag: > 1 means lambda
    (["--lantern_tvd", "0.4"], "lantern", 0.4),
    (["--lantern_lambda", "1.5"], "lantern++", 1.5),
    ([], None, None),
])
def test_relaxation_flags(flags, relax, value):
    from entrypoints.generate_images import parse_args, resolve_defaults
    from models.ea_model import build_speculative_decoder
    from models.registry import load_family
    from models.sampling import SamplingConfig

    args = resolve_defaults(parse_args().parse_args(["--model", "demo", "--model_type", "eagle", *flags]))
    dec = build_speculative_decoder(load_family("demo"), args, SamplingConfig(), 4.0)
    assert dec.accept.relax == relax
    if relax == "lantern":
        assert dec.accept.delta == value
    elif relax == "lantern++":
        assert dec.accept.lam == value
