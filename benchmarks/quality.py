"""Quality benchmark: merge `lethe lab run` results (one JSON per scenario) into one report
and draw the Pareto plot of run-time efficiency against RetDev.

    for s in subset class backdoor; do
      .venv/bin/lethe lab run --dataset fashion-mnist --arch cnn-small --scenario $s \\
          --seeds 0,1,2 --train-size 6000 --out /tmp/lab/$s.json
    done
    .venv/bin/python benchmarks/quality.py /tmp/lab/*.json --name fashion-mnist-cnn-small

Several files of one scenario (say one seed per process, to use every core) are merged.
Writes benchmarks/results/quality-<name>.{json,md,png}: the lab's per-scenario tables (mean
± std over seeds of RA, FA, TA, MIA, the MIA gap to retrain, RetDev, RTE) and one panel per
scenario with each method's mean RTE (log scale) against its mean RetDev. Better is up and
to the left; the methods on the Pareto front are named in the markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from unlearning.lab import markdown_report, merge_by_scenario  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def method_means(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Mean RTE, RetDev and MIA gap per method over the seeds (retrain left out)."""
    means: dict[str, dict[str, float]] = {}
    for method in dict.fromkeys(run["method"] for run in result["runs"]):
        if method == "retrain":
            continue
        runs = [run for run in result["runs"] if run["method"] == method]
        means[method] = {key: sum(float(run[key]) for run in runs) / len(runs)
                         for key in ("rte", "retdev", "mia_gap")}
    return means


def pareto_front(means: dict[str, dict[str, float]]) -> list[str]:
    """Methods no other method beats on both RTE (higher) and RetDev (lower)."""
    return [name for name, m in means.items()
            if not any(o["rte"] >= m["rte"] and o["retdev"] <= m["retdev"]
                       and (o["rte"], o["retdev"]) != (m["rte"], m["retdev"])
                       for other, o in means.items() if other != name)]


def plot(results: list[dict[str, Any]], path: Path) -> None:
    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.2), squeeze=False)
    for axis, result in zip(axes[0], results, strict=True):
        means = method_means(result)
        front = set(pareto_front(means))
        for name, m in means.items():
            axis.scatter(m["retdev"], m["rte"], s=60 if name == "match" else 30,
                         color="tab:red" if name == "match" else
                         ("tab:blue" if name in front else "tab:gray"), zorder=3)
            axis.annotate(name, (m["retdev"], m["rte"]), textcoords="offset points",
                          xytext=(4, 4), fontsize=8)
        axis.set_xscale("symlog", linthresh=0.05)
        axis.set_yscale("log")
        axis.set_xlabel("RetDev (lower is better)")
        axis.set_ylabel("RTE = retrain time / method time")
        axis.set_title(f"{result['config']['scenario']} "
                       f"({len(result['config']['seeds'])} seeds)")
        axis.grid(True, which="both", alpha=0.3)
    figure.suptitle(f"{results[0]['config']['dataset']}, {results[0]['config']['arch']}\n"
                    "RTE against RetDev (red: match; blue: Pareto front)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--name", default="fashion-mnist-cnn-small")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    # Files of the same scenario (e.g. one seed per process, one per core) merge into one.
    results = merge_by_scenario([json.loads(path.read_text()) for path in args.results])
    base = args.out_dir / f"quality-{args.name}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps({"results": results}, indent=1))
    fronts = "\n".join(f"- {r['config']['scenario']}: " + ", ".join(
        pareto_front(method_means(r))) for r in results)
    report = markdown_report(results, "Unlearning quality")
    base.with_suffix(".md").write_text(
        report + f"\n## Pareto front (RTE against RetDev)\n\n![Pareto plot]({base.name}.png)\n\n"
        + fronts + "\n")
    plot(results, base.with_suffix(".png"))
    print(base.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
