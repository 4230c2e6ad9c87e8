"""Command-line groups of the engine: ``lethe data ...`` and ``lethe lab ...``.

The root ``lethe`` command (worker/cli.py) adds these groups. The data dir defaults to the
LETHE_DATA_DIR environment variable, else ``./.lethe``; it is read here directly because the
engine never imports the control plane's settings.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

DATA_DIR_HELP = "Root of local state (default: $LETHE_DATA_DIR or ./.lethe)."


def default_data_dir() -> Path:
    return Path(os.environ.get("LETHE_DATA_DIR", "./.lethe")).expanduser()


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _shape(_ctx: click.Context, _param: click.Parameter,
           value: str | None) -> tuple[int, int, int] | None:
    """``CxHxW`` (e.g. ``3x32x32``) as three positive ints."""
    if value is None:
        return None
    parts = value.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise click.BadParameter(f"expected CxHxW such as 3x32x32, got {value!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


@click.group("data", help="Fetch and prepare datasets.")
def data() -> None:
    pass


@data.command("fetch", help="Fetch a dataset into <data dir>/datasets/<name>/ and write it as "
                            "a sample store (shards + manifest.jsonl) under store/.")
@click.argument("name", type=click.Choice(["fashion-mnist", "digits"]))
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help=DATA_DIR_HELP)
@click.option("--samples-per-subject", default=5, show_default=True,
              help="How many samples each pseudonymous subject owns.")
@click.option("--seed", default=0, show_default=True, help="Seed of the splits and subjects.")
def fetch(name: str, data_dir: Path | None, samples_per_subject: int, seed: int) -> None:
    from unlearning.data.catalog import SplitSpec, write_dataset_store
    from unlearning.data.datasets import dataset_dir, load_dataset

    root = data_dir or default_data_dir()
    dataset = load_dataset(name, root)
    manifest = write_dataset_store(dataset, dataset_dir(root, name) / "store",
                                   split_spec=SplitSpec(seed=seed),
                                   samples_per_subject=samples_per_subject)
    click.echo(f"{name}: {len(dataset)} images {dataset.input_shape}; manifest {manifest}")


@click.group("lab", help="Unlearning experiments: originals, retrains, methods, metrics.")
def lab() -> None:
    pass


def _progress_bars() -> Callable[[str], Callable[[str, int, int, dict[str, float]], None]]:
    """One tqdm bar per labelled task; a new label closes the previous bar."""
    from tqdm import tqdm

    current: dict[str, Any] = {}

    def factory(label: str) -> Callable[[str, int, int, dict[str, float]], None]:
        if "bar" in current:
            current.pop("bar").close()
        bar = tqdm(desc=label, leave=False, file=sys.stderr, dynamic_ncols=True)
        current["bar"] = bar

        def update(phase: str, step: int, total: int, metrics: dict[str, float]) -> None:
            bar.total = total
            bar.n = step
            bar.set_description(f"{label} [{phase}]", refresh=False)
            bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()}, refresh=False)
            bar.refresh()

        return update

    return factory


@lab.command("run", help="Train (or load cached) original and retrain, run the methods, "
                         "print a table and write JSON.")
@click.option("--dataset", type=click.Choice(["digits", "fashion-mnist"]), required=True)
@click.option("--arch", default="cnn-small", show_default=True)
@click.option("--scenario", type=click.Choice(["subset", "class", "backdoor"]), required=True)
@click.option("--forget-fraction", default=0.1, show_default=True, type=float)
@click.option("--forget-class", default=0, show_default=True, type=int)
@click.option("--methods", default="retrain,match,ft,ga,ngplus,srl,scrub,salun,msg,ct",
              show_default=True, help="Comma-separated method names.")
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--table", type=click.Path(path_type=Path), default=None,
              help="Also write the markdown table here.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help=DATA_DIR_HELP)
@click.option("--epochs", type=int, default=None, help="Override the recipe's epochs.")
@click.option("--lr", type=float, default=None, help="Override the recipe's learning rate.")
@click.option("--train-size", type=int, default=None,
              help="Train on a random subset of the training split (quick runs).")
@click.option("--poison-rate", default=0.02, show_default=True, type=float)
@click.option("--input-shape", default=None, callback=_shape,
              help="Pad the images (centred, zeros) to CxHxW, repeating a single channel: "
                   "3x32x32 feeds Fashion-MNIST to ResNet-18 as CIFAR-shaped images.")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--retime-epochs", type=click.IntRange(min=1), default=None,
              help="Time the retrain for RTE on this many of its epochs, here and now, "
                   "instead of taking the cached retrain's training time.")
def run(dataset: str, arch: str, scenario: str, forget_fraction: float, forget_class: int,
        methods: str, seeds: str, device: str, out: Path, table: Path | None,
        data_dir: Path | None, epochs: int | None, lr: float | None, train_size: int | None,
        poison_rate: float, input_shape: tuple[int, int, int] | None,
        threads: int | None, retime_epochs: int | None) -> None:
    import torch

    from unlearning.lab import DEFAULT_RECIPES, LabConfig, markdown_table, run_lab
    from unlearning.training import Recipe

    if threads:
        torch.set_num_threads(threads)
    recipe = DEFAULT_RECIPES.get(dataset, Recipe())
    if epochs is not None:
        recipe = recipe.with_(epochs=epochs)
    if lr is not None:
        recipe = recipe.with_(lr=lr)
    config = LabConfig(dataset=dataset, arch=arch, scenario=scenario, methods=_csv(methods),
                       seeds=tuple(int(s) for s in _csv(seeds)),
                       data_dir=data_dir or default_data_dir(), device=device,
                       forget_fraction=forget_fraction, forget_class=forget_class,
                       recipe=recipe, poison_rate=poison_rate, train_size=train_size,
                       input_shape=input_shape, retime_epochs=retime_epochs)
    result = run_lab(config, progress_factory=_progress_bars(),
                     log=lambda line: click.echo(line, err=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    rendered = markdown_table(result)
    if table is not None:
        table.write_text(rendered + "\n")
    click.echo(rendered)


@lab.command("table", help="Merge lab JSON files into one JSON and a markdown report "
                           "(files of one scenario merge into one result).")
@click.argument("results", nargs=-1, type=click.Path(exists=True, path_type=Path),
                required=True)
@click.option("--json-out", type=click.Path(path_type=Path), required=True)
@click.option("--md-out", type=click.Path(path_type=Path), required=True)
@click.option("--title", default="Unlearning quality", show_default=True)
def table_command(results: tuple[Path, ...], json_out: Path, md_out: Path, title: str) -> None:
    from unlearning.lab import markdown_report, merge_by_scenario

    # files of one scenario (one seed per process, say) merge into one result
    loaded = merge_by_scenario([json.loads(path.read_text()) for path in results])
    json_out.write_text(json.dumps({"results": loaded}, indent=1))
    md_out.write_text(markdown_report(loaded, title))
    click.echo(md_out.read_text())
