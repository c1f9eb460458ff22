"""Benchmark outputs beside the JSON and table: a CSV of every scalar and the PNG figures (matplotlib, Agg)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

import main as cli
from models.plots import write_csv, write_plots

RESULTS = [
    {"setting": "ar", "tau": 1.0, "latency_s": 0.2, "speedup_vs_ar": 1.0, "accuracy": 0.9, "demo_fid": 5.0},
    {"setting": "eagle2", "tau": 1.8, "latency_s": 0.15, "speedup_vs_ar": 1.33, "accuracy": 0.9, "demo_fid": 5.2,
     "acceptance_by_depth": [0.6, 0.4, None]},
    {"setting": "lantern:delta=0.2", "tau": 2.4, "latency_s": 0.1, "speedup_vs_ar": 2.0, "accuracy": 0.85,
     "demo_fid": 6.0, "acceptance_by_depth": [0.8, 0.6, 0.5], "tvd": 0.1},
]


def test_csv_has_one_row_per_setting_and_every_scalar_column(tmp_path):
    path = write_csv(RESULTS, tmp_path)
    rows = list(csv.DictReader(path.open()))
    assert [r["setting"] for r in rows] == ["ar", "eagle2", "lantern:delta=0.2"]
    assert "acceptance_by_depth" not in rows[0] and rows[2]["tvd"] == "0.1" and rows[0]["tvd"] == ""
    assert float(rows[1]["speedup_vs_ar"]) == pytest.approx(1.33)


def test_plots_are_written_as_png(tmp_path):
    files = write_plots(RESULTS, tmp_path, title="test")
    assert {f.name for f in files} == {"benchmark_frontier.png", "benchmark_tau.png", "benchmark_acceptance.png"}
    for f in files:
        with Image.open(f) as im:
            assert im.format == "PNG" and im.size[0] > 300
    # without a quality column or depth statistics only the τ figure is drawn
    bare = [{"setting": "ar", "tau": 1.0, "speedup_vs_ar": 1.0}]
    (tmp_path / "bare").mkdir()
    assert [f.name for f in write_plots(bare, tmp_path / "bare")] == ["benchmark_tau.png"]


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "ckpts" / "demo" / "drafter" / "config.json").exists(),
                    reason="demo checkpoints not committed")
def test_benchmark_writes_csv_plots_and_the_demo_quality_figures(tmp_path):
    cli.main(["benchmark", "--num_images", "4", "--output_dir", str(tmp_path), "--settings", "ar",
              "lantern:delta=0.2"])
    report = json.loads((tmp_path / "benchmark.json").read_text())
    for row in report["results"]:
        assert 0 <= row["accuracy"] <= 1 and row["demo_fid"] > 0 and 0 <= row["precision"] <= 1
    rows = list(csv.DictReader((tmp_path / "benchmark.csv").open()))
    assert [r["setting"] for r in rows] == ["ar", "lantern:delta=0.2"] and "demo_fid" in rows[0]
    for name in ("benchmark_frontier.png", "benchmark_tau.png", "benchmark_acceptance.png"):
        assert (tmp_path / name).stat().st_size > 1000
