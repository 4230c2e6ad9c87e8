"""Reading lab results: merging the results of separate runs (one seed per process, say) into
one, and writing them as the tables and the report under benchmarks/results/. Older result files
are read under today's metric names."""

from __future__ import annotations

import json
import statistics
from typing import Any

from unlearning.lab.run import summarize_seeds
from unlearning.verification.metrics import current_names


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several ``run_lab`` results of the same experiment (dataset, arch,
    scenario, recipe, split) run as separate processes, e.g. one seed per core. Seeds and
    methods are united in order of appearance; a (seed, method) pair given twice, or configs
    that differ in anything but seeds and methods, are refused."""
    if not results:
        raise ValueError("nothing to merge")
    results = [_current(result) for result in results]

    def experiment(result: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in result["config"].items() if k not in ("seeds", "methods")}

    first = experiment(results[0])
    for result in results[1:]:
        other = experiment(result)
        differing = sorted(k for k in first.keys() | other.keys()
                           if first.get(k) != other.get(k))
        if differing:
            raise ValueError(f"results of different experiments: {', '.join(differing)} differ")
    runs = [run for result in results for run in result["runs"]]
    pairs = [(run["seed"], run["method"]) for run in runs]
    if len(set(pairs)) != len(pairs):
        raise ValueError("a (seed, method) run appears in more than one result")

    def per_seed(kind: str) -> list[dict[str, Any]]:
        by_seed: dict[int, dict[str, Any]] = {}
        for result in results:
            for row in result[kind]["per_seed"]:
                by_seed.setdefault(row["seed"], row)
        return list(by_seed.values())

    config = {**results[0]["config"],
              "seeds": list(dict.fromkeys(s for r in results for s in r["config"]["seeds"])),
              "methods": list(dict.fromkeys(m for r in results
                                            for m in r["config"]["methods"]))}
    return {**results[0], "config": config, "machines": machines_by_seed(results),
            "original": summarize_seeds(per_seed("original")),
            "retrain": summarize_seeds(per_seed("retrain")), "runs": runs,
            "finished_at": max(r["finished_at"] for r in results)}


def _current(result: dict[str, Any]) -> dict[str, Any]:
    """A result file's runs and per-seed rows under today's metric names."""
    return {**result, "runs": [current_names(run) for run in result["runs"]],
            **{kind: {**result[kind], "per_seed": [current_names(row)
                                                   for row in result[kind]["per_seed"]]}
               for kind in ("original", "retrain") if kind in result}}


def machines_by_seed(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each distinct machine of ``results`` with the seeds it ran (``seeds`` beside the
    machine's description), in order of appearance; a merged result brings its own list."""
    machines: dict[str, dict[str, Any]] = {}  # by the description's JSON
    for result in results:
        for entry in result.get("machines") or [{**result["machine"],
                                                 "seeds": result["config"]["seeds"]}]:
            machine = {k: v for k, v in entry.items() if k != "seeds"}
            known = machines.setdefault(json.dumps(machine, sort_keys=True),
                                        {**machine, "seeds": []})
            known["seeds"] = list(dict.fromkeys([*known["seeds"], *entry["seeds"]]))
    return list(machines.values())


def _machine_line(machine: dict[str, Any]) -> str:
    return (f"{machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch "
            f"threads), device {machine['device']}"
            f"{', ' + machine['gpu'] if 'gpu' in machine else ''}, torch {machine['torch']}, "
            f"Python {machine['python']}")


def merge_by_scenario(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One merged result per scenario (subset, class, backdoor first, in that order)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault(result["config"]["scenario"], []).append(result)
    order = {"subset": 0, "class": 1, "backdoor": 2}
    return [merge_results(groups[s]) for s in sorted(groups, key=lambda s: order.get(s, 9))]


def _cell(values: list[float], digits: int = 4) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(result: dict[str, Any]) -> str:
    """One row per method (mean ± std over seeds), retrain and original first."""
    scenario = result["config"]["scenario"]
    show_asr = scenario == "backdoor"
    columns = ["method", "RA", "FA", "TA", "MIA", "MIA gap", *(["ASR"] if show_asr else []),
               "RetDev", "RTE", "seconds", "steps"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    retrain_mia = {r["seed"]: r["mia_accuracy"] for r in result["retrain"]["per_seed"]}

    def row(name: str, per_seed: list[dict[str, Any]], extra: list[str]) -> str:
        cells = [name] + [_cell([r[k] for r in per_seed]) for k in
                          ("retain_accuracy", "forget_accuracy", "test_accuracy",
                           "mia_accuracy")]
        cells.append(_cell([abs(r["mia_accuracy"] - retrain_mia[r["seed"]]) for r in per_seed]))
        if show_asr:
            cells.append(_cell([r["attack_success_rate"] for r in per_seed
                                if r["attack_success_rate"] is not None]))
        return "| " + " | ".join(cells + extra) + " |"

    lines.append(row("original", result["original"]["per_seed"],
                     ["-", "-", _cell([r["seconds"] for r in result["original"]["per_seed"]],
                                      1), "-"]))
    methods = list(dict.fromkeys(r["method"] for r in result["runs"]))
    for method in methods:
        runs = [r for r in result["runs"] if r["method"] == method]
        steps = [float(r["steps"]) for r in runs if r["steps"] is not None]
        lines.append(row(method, runs, [_cell([r["retdev"] for r in runs]),
                                        _cell([r["rte"] for r in runs], 1),
                                        _cell([r["seconds"] for r in runs], 1),
                                        _cell(steps, 0)]))
    return "\n".join(lines)


def markdown_report(results: list[dict[str, Any]], title: str) -> str:
    """Machine, recipe and one table per scenario, for benchmarks/results/."""
    first = results[0]
    config = first["config"]
    machines = first.get("machines") or []
    machine_text = ("Machines: " + "; ".join(
        f"{_machine_line(m)} (seeds {', '.join(map(str, m['seeds']))})" for m in machines)
        if len(machines) > 1 else "Machine: " + _machine_line(first["machine"]))
    lines = [f"# {title}", "",
             f"{machine_text}.", "",
             f"Dataset {config['dataset']}, architecture {config['arch']}, recipe "
             f"`{json.dumps(config['recipe'])}`, seeds {list(config['seeds'])}.", "",
             "RA / FA / TA: retain / forget / test accuracy (class scenario: TA on the other "
             "classes). MIA: population attack accuracy on the forget set vs its counterpart in "
             "the audit slice (0.5 = blind); MIA gap: its distance to the retrain's, per seed. "
             "RetDev: deviation from retrain (lower is better). RTE: retrain seconds / method "
             "seconds, "
             f"in {first.get('rte_clock', 'cpu_seconds').replace('_', ' ')}"
             + (f"; the retrain's timed on {config['retime_epochs']} of its epochs in the "
                "process that ran the methods, scaled to the recipe's"
                if config.get("retime_epochs") else "")
             + ". Mean ± std over seeds.", ""]
    for result in results:
        config = result["config"]
        heading = {"subset": f"subset ({config['forget_fraction']:.0%} random samples)",
                   "class": f"class {config['forget_class']}",
                   "backdoor": f"backdoor (BadNets, {config['poison_rate']:.0%} poisoned, "
                               f"target {config['target_label']})"}[config["scenario"]]
        lines += [f"## {heading}", "", markdown_table(result), ""]
    return "\n".join(lines)
