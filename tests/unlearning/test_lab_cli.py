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
        assert {"retain_acc", "forget_acc", "test_acc", "mia_accuracy", "mia_auc", "asr",
                "seconds", "rte", "retdev", "steps"} <= run.keys()
        assert run["asr"] is None
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
