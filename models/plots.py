"""Benchmark figures and CSV: the speed / quality trade-off of decoding settings at a glance.

``write_csv`` writes one row per setting with every scalar the benchmark measured (whatever columns other
parts of the benchmark add); ``write_plots`` draws, with matplotlib's file-only Agg backend:

* ``benchmark_frontier.png`` — speed-up over plain AR against the quality figure (demo class accuracy or
  demo-FID when present), one labelled point per setting: the trade-off the paper's tables report;
* ``benchmark_tau.png`` — mean accepted length τ per setting;
* ``benchmark_acceptance.png`` — acceptance rate by draft depth, one line per speculative setting.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

# Quality columns in order of preference for the frontier plot: (key, axis label, higher is better).
QUALITY_KEYS = (("accuracy", "demo class accuracy", True), ("demo_fid", "demo-FID (lower is better)", False),
                ("precision", "demo precision", True))


def _scalar_columns(results: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in results:
        for k, v in r.items():
            if k not in cols and (v is None or isinstance(v, (int, float, str, bool))):
                cols.append(k)
    return cols


def write_csv(results: list[dict], out_dir: str | Path, name: str = "benchmark.csv") -> Path:
    """One row per setting, one column per scalar result (lists such as acceptance by depth are left out)."""
    path = Path(out_dir) / name
    cols = _scalar_columns(results)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow({k: r.get(k) for k in cols})
    os.replace(tmp, path)
    return path


def write_plots(results: list[dict], out_dir: str | Path, title: str = "") -> list[Path]:
    """The three benchmark figures (see the module docstring); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or touched
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = Path(out_dir)
    written: list[Path] = []
    labels = [r["setting"] for r in results]
    colours = [_colour(lab) for lab in labels]

    quality = next(((k, lab, hi) for k, lab, hi in QUALITY_KEYS if any(r.get(k) is not None for r in results)), None)
    if quality is not None:
        # Left: wall-clock speed-up (the paper's headline, machine-dependent); right: τ (machine-independent).
        key, axis, higher = quality
        pct = key in ("accuracy", "precision")
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
        for ax, xkey, xlabel in ((axes[0], "speedup_vs_ar", "speed-up vs plain AR (wall clock)"),
                                 (axes[1], "tau", "τ: mean accepted length")):
            for i, r in enumerate(results):
                if r.get(xkey) is None or r.get(key) is None:
                    continue
                ax.scatter(r[xkey], 100 * r[key] if pct else r[key], color=colours[i], marker=_MARKERS[i % len(_MARKERS)],
                           s=55, zorder=3, label=r["setting"], edgecolors="black", linewidths=0.4)
            ax.axvline(1.0, color="grey", lw=0.8, ls="--", zorder=1)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(axis + (" (%)" if pct else ""))
        axes[1].legend(fontsize=8, loc="best")
        fig.suptitle((title + ": " if title else "") + f"speed vs quality ({'higher' if higher else 'lower'} "
                     "quality is better)", fontsize=10)
        written.append(_save(fig, out / "benchmark_frontier.png"))

    fig, ax = plt.subplots(figsize=(max(6.4, 0.6 * len(results) + 2), 4.0))
    bars = ax.bar(range(len(results)), [r.get("tau", 1.0) for r in results], color=colours)
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(results)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("τ (tokens per target forward)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_title(title or "step compression per setting", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    written.append(_save(fig, out / "benchmark_tau.png"))

    depth_rows = [r for r in results if r.get("acceptance_by_depth")]
    if depth_rows:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for r in depth_rows:
            acc = r["acceptance_by_depth"]
            xs = [d + 1 for d, a in enumerate(acc) if a is not None]
            ax.plot(xs, [a for a in acc if a is not None], marker="o", ms=3, label=r["setting"],
                    color=_colour(r["setting"]))
        ax.set_xlabel("draft depth")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("acceptance rate")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title(title or "acceptance by depth", fontsize=10)
        ax.grid(alpha=0.3)
        written.append(_save(fig, out / "benchmark_acceptance.png"))
    return written


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def _colour(setting: str) -> str:
    """One colour per method family, so that δ / λ sweeps read as a series."""
    name = setting.split(":")[0]
    return {"ar": "#444444", "eagle2": "#1f77b4", "eagle1": "#17becf", "lantern": "#d62728",
            "lantern++": "#ff7f0e"}.get(name, "#2ca02c")


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    os.replace(tmp, path)
    return path
