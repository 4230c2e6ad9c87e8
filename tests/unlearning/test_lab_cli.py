"""`lethe lab run` end to end on scikit-learn's digits, and the input reshaping it offers for
models built for bigger, colour inputs (ResNet-18 on Fashion-MNIST padded to 3x32x32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from unlearning.cli import lab
from unlearning.data.datasets import load_digits
from unlearning.lab import LabConfig, markdown_report, markdown_table, merge_results, run_lab
from unlearning.training import Recipe


def test_reshaped_pads_centred_with_zeros_and_repeats_the_grey_channel() -> None:
    digits = load_digits()
    padded = digits.reshaped(3, 12, 12)
    assert padded.input_shape == (3, 12, 12)
    assert padded.images.dtype == torch.uint8
    # 8x8 centred in 12x12: two rows and columns of zeros on every side
    inner = padded.images[:, :, 2:10, 2:10]
    for channel in range(3):
        assert torch.equal(inner[:, channel], digits.images[:, 0])
    border = padded.images.clone()
    border[:, :, 2:10, 2:10] = 0
    assert int(border.sum()) == 0
    assert torch.equal(padded.labels, digits.labels)
    assert torch.equal(padded.official_test, digits.official_test)


@pytest.mark.parametrize("shape", [(1, 6, 6), (3, 8, 7)])
def test_reshaped_refuses_to_crop(shape: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="cannot pad"):
        load_digits().reshaped(*shape)


def test_reshaped_refuses_to_invent_channels_from_colour_images() -> None:
    colour = load_digits().reshaped(3, 8, 8)
    with pytest.raises(ValueError, match="channels"):
        colour.reshaped(4, 8, 8)


def test_lab_run_writes_the_documented_json_for_padded_inputs(tmp_path: Path) -> None:
    out, table = tmp_path / "run.json", tmp_path / "run.md"
    result = CliRunner().invoke(lab, [
        "run", "--dataset", "digits", "--arch", "cnn-small", "--input-shape", "3x12x12",
        "--scenario", "subset", "--methods", "retrain,ft", "--seeds", "0", "--epochs", "3",
        "--device", "cpu", "--data-dir", str(tmp_path), "--out", str(out),
        "--table", str(table)])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert written["config"]["input_shape"] == [3, 12, 12]
    assert [run["method"] for run in written["runs"]] == ["retrain", "ft"]
    for run in written["runs"]:
        assert {"retain_accuracy", "forget_accuracy", "test_accuracy", "mia_accuracy",
                "mia_auc", "attack_success_rate", "seconds", "rte", "retdev",
                "steps"} <= run.keys()
        assert run["attack_success_rate"] is None
    assert {"cpu", "cores", "memory_gib", "torch", "torch_threads", "python"} <= (
        written["machine"].keys())
    assert written["machine"]["device"] == "cpu" and "gpu" not in written["machine"]
    # the model really was built for and fed 3x12x12 images: the cached weights say so
    cached = list((tmp_path / "lab-cache" / "digits").glob("*.json"))
    assert cached and all(json.loads(p.read_text())["arch"]["kwargs"]["in_channels"] == 3
                          and json.loads(p.read_text())["arch"]["kwargs"]["input_size"] == 12
                          for p in cached)
    assert table.read_text().startswith("| method |")


@pytest.mark.parametrize("shape", ["3x32", "3x0x32", "axbxc", "-1x32x32"])
def test_a_malformed_input_shape_is_a_usage_error(tmp_path: Path, shape: str) -> None:
    result = CliRunner().invoke(lab, [
        "run", "--dataset", "digits", "--scenario", "subset", "--input-shape", shape,
        "--out", str(tmp_path / "x.json"), "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "CxHxW" in result.output
    assert not (tmp_path / "x.json").exists()


def test_results_of_one_seed_each_merge_into_the_multi_seed_result(tmp_path: Path) -> None:
    def run(seeds: tuple[int, ...]) -> dict:
        return run_lab(LabConfig(dataset="digits", arch="mlp", scenario="subset",
                                 methods=("retrain", "ft"), seeds=seeds, data_dir=tmp_path,
                                 device="cpu", recipe=Recipe(epochs=2)), log=lambda _: None)

    both, first, second = run((0, 1)), run((0,)), run((1,))
    merged = merge_results([first, second])
    assert merged["config"]["seeds"] == [0, 1] and merged["config"]["methods"] == ["retrain",
                                                                                   "ft"]
    assert [(r["seed"], r["method"]) for r in merged["runs"]] == \
        [(r["seed"], r["method"]) for r in both["runs"]]
    # the same cached models, so the same metrics as one two-seed run; timings differ
    for kind in ("original", "retrain"):
        assert merged[kind]["test_accuracy"] == pytest.approx(both[kind]["test_accuracy"])
        assert [r["seed"] for r in merged[kind]["per_seed"]] == [0, 1]
    assert markdown_table(merged).count("\n") == markdown_table(both).count("\n")
    assert merged["machines"] == [{**first["machine"], "seeds": [0, 1]}]
    assert "\nMachine: " in markdown_report([merged], "t")

    # seeds run on different machines: the report names each with its seeds, and a merged
    # result merged again keeps them
    elsewhere = {**second, "machine": {**second["machine"], "cpu": "Other CPU"}}
    mixed = merge_results([first, elsewhere])
    assert [(m["cpu"], m["seeds"]) for m in mixed["machines"]] == \
        [(first["machine"]["cpu"], [0]), ("Other CPU", [1])]
    report = markdown_report([mixed], "t")
    assert "Machines: " in report and "Other CPU, " in report and "(seeds 1)" in report
    third = run((2,))
    again = merge_results([mixed, third])
    assert [(m["cpu"], m["seeds"]) for m in again["machines"]] == \
        [(first["machine"]["cpu"], [0, 2]), ("Other CPU", [1])]

    # `lethe lab table` merges files of one scenario the same way
    paths = [tmp_path / "seed0.json", tmp_path / "seed1.json"]
    for path, result in zip(paths, (first, second), strict=True):
        path.write_text(json.dumps(result))
    table = CliRunner().invoke(lab, ["table", *map(str, paths), "--json-out",
                                     str(tmp_path / "all.json"), "--md-out",
                                     str(tmp_path / "all.md")])
    assert table.exit_code == 0, table.output
    [written] = json.loads((tmp_path / "all.json").read_text())["results"]
    assert written["config"]["seeds"] == [0, 1] and len(written["runs"]) == 4

    with pytest.raises(ValueError, match="more than one result"):
        merge_results([first, first])
    other = run_lab(LabConfig(dataset="digits", arch="mlp", scenario="subset",
                              methods=("ft",), seeds=(1,), data_dir=tmp_path, device="cpu",
                              forget_fraction=0.2, recipe=Recipe(epochs=2)), log=lambda _: None)
    with pytest.raises(ValueError, match="forget_fraction"):
        merge_results([first, other])


def test_retimed_retrain_is_the_rte_denominator(tmp_path: Path) -> None:
    config = LabConfig(dataset="digits", arch="mlp", scenario="subset", methods=("ft",),
                       seeds=(0,), data_dir=tmp_path, device="cpu", recipe=Recipe(epochs=4),
                       retime_epochs=1)
    result = run_lab(config, log=lambda _: None)
    retrain = result["retrain"]["per_seed"][0]
    assert retrain["retimed_epochs"] == 1
    cached = next(meta for meta in (json.loads(p.read_text()) for p in
                                    (tmp_path / "lab-cache" / "digits").glob("*.json"))
                  if meta["removed"] is not None)
    assert retrain["cpu_seconds"] != cached["cpu_seconds"]  # timed now, not at training
    ft = result["runs"][0]
    assert ft["rte"] == pytest.approx(retrain["cpu_seconds"] / ft["cpu_seconds"])
    assert "the retrain's timed on 1 of its epochs" in markdown_report([result], "t")
