"""Accuracy versus wall time from the JSON files `time_to_accuracy.py --json` wrote.

python benchmarks/plot_tradeoff.py benchmarks/results/{fast,fast_e2,fast_e4,fast_e5,air94,reference}.json \
    benchmarks/results/zen4_muon/fast.json --out benchmarks/accuracy_vs_time.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/accuracy_vs_time.png"))
    args = ap.parse_args()

    series: dict[str, list[tuple[float, float, float, int]]] = {}
    for path in args.results:
        d = json.loads(path.read_text())
        r = d["recipe"]
        family = r["name"]
        if r["model"] == "airnet" and r["name"] == "fast":  # fast was SGD until session 8, Muon since
            family = "fast (Muon)" if r.get("optimizer") == "muon" else "fast family (SGD)"
        series.setdefault(family, []).append(
            (d["wall_seconds_median"] / 60, 100 * d["test_accuracy_mean"], 100 * d["test_accuracy_std"], r["epochs"])
        )
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    markers = {"fast family (SGD)": "o", "fast (Muon)": "*", "air94": "s", "reference": "D"}
    for name, pts in sorted(series.items()):
        pts.sort()
        xs, ys, es, eps = zip(*pts)
        ax.errorbar(
            xs,
            ys,
            yerr=es,
            marker=markers.get(name, "^"),
            capsize=3,
            label=name,
            linestyle="-" if len(pts) > 1 else "none",
        )
        for x, y, e in zip(xs, ys, eps):
            ax.annotate(
                f"{e} ep" if name != "reference" else "early stop",
                (x, y),
                textcoords="offset points",
                xytext=(5, -12),
                fontsize=8,
            )
    # The reference recipe in Keras/TensorFlow on the same machine and data (SPEC.md): one seed.
    ax.plot([22.7], [79.9], marker="x", color="black", linestyle="none", label="reference in Keras (SPEC.md)")
    ax.axhline(81.42, color="gray", linestyle=":", linewidth=1)
    ax.text(0.62, 81.5, "talk: 81.42% (official data)", va="bottom", ha="left", fontsize=8, color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("wall time, process start to test accuracy (minutes, log scale)")
    ax.set_ylabel("CIFAR-10 test accuracy (%), shared JPEG copy")
    ax.set_title("Accuracy versus wall time on 2 CPU cores (mean ± std over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
