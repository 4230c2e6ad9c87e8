"""Architectures build by name and take their documented inputs; weights travel only as
safetensors, and a file that does not fit (or is a pickle) is refused before loading."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from unlearning.architectures import ArchitectureError, build_model, input_shape
from unlearning.loops import SampleSet, forward_parts, freeze_norm_statistics, predict_logits
from unlearning.weights import (
    WeightsError,
    check_weights_file,
    load_weights,
    read_signature,
    save_weights,
    state_dict_signature,
)


@pytest.mark.parametrize(("spec", "shape"), [
    ({"name": "mlp", "kwargs": {"input_size": 8}}, (2, 1, 8, 8)),
    ({"name": "cnn-small", "kwargs": {"in_channels": 1, "num_classes": 10}}, (2, 1, 28, 28)),
    ({"name": "resnet8", "kwargs": {"in_channels": 3, "num_classes": 10}}, (2, 3, 32, 32)),
    ({"name": "resnet20", "kwargs": {"in_channels": 1, "num_classes": 4}}, (2, 1, 28, 28)),
    ({"name": "resnet18", "kwargs": {"in_channels": 1, "num_classes": 7}}, (2, 1, 32, 32)),
    ({"name": "resnet18", "kwargs": {"num_classes": 10, "cifar_stem": True}}, (2, 3, 32, 32)),
])
def test_builtin_architectures_map_their_inputs_to_class_logits(spec: dict,
                                                                shape: tuple) -> None:
    model = build_model(spec).eval()
    with torch.no_grad():
        logits = model(torch.rand(shape))
    assert logits.shape == (shape[0], spec["kwargs"].get("num_classes", 10))


@pytest.mark.parametrize("name", ["cnn-small", "resnet8"])
def test_forward_by_parts_gives_the_concatenated_pass_outputs_and_gradients(name: str) -> None:
    """match's step feeds its forget, retain and unseen batches through the model one by
    one on the CPU; the loss and every gradient must be those of one pass over all of them
    (resnet8: with its normalisation statistics frozen, as match runs it)."""
    torch.manual_seed(0)
    model = build_model({"name": name, "kwargs": {"in_channels": 1, "num_classes": 10}})
    model.train()
    freeze_norm_statistics(model)
    parts = [torch.rand(n, 1, 28, 28) for n in (5, 7, 3)]
    weights = [1.0, 0.5, 2.0]

    def loss_and_grads(outputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = sum((w * out.logsumexp(1).mean() for w, out in zip(weights, outputs, strict=True)),
                   torch.tensor(0.0))
        loss.backward()
        grads = []
        for p in model.parameters():
            assert p.grad is not None  # every parameter takes part in the loss
            grads.append(p.grad.clone())
        return loss.detach(), grads

    by_parts = forward_parts(model, parts, torch.device("cpu"))
    assert [len(out) for out in by_parts] == [5, 7, 3]
    loss, grads = loss_and_grads(by_parts)
    whole = list(model(torch.cat(parts)).split([5, 7, 3]))
    expected_loss, expected_grads = loss_and_grads(whole)
    torch.testing.assert_close(loss, expected_loss)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_predictions_do_not_depend_on_the_batch_size() -> None:
    torch.manual_seed(0)
    model = build_model({"name": "cnn-small", "kwargs": {"in_channels": 1, "num_classes": 10}})
    samples = SampleSet(torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8),
                        torch.zeros(300, dtype=torch.long))
    default = predict_logits(model, samples, torch.device("cpu"))  # 128 per batch on the CPU
    assert default.shape == (300, 10)
    torch.testing.assert_close(default, predict_logits(model, samples, torch.device("cpu"),
                                                       batch_size=1024))


def test_input_shape_is_known_for_fixed_input_models_only() -> None:
    assert input_shape({"name": "cnn-small", "kwargs": {"in_channels": 1}}) == (1, 28, 28)
    assert input_shape({"name": "mlp", "kwargs": {"input_size": 8}}) == (1, 8, 8)
    assert input_shape({"name": "resnet18", "kwargs": {}}) is None
    assert input_shape({"name": "resnet8", "kwargs": {"input_size": 32}}) == (3, 32, 32)


def test_factory_specs_import_only_allowed_modules() -> None:
    spec = {"name": "torch.nn:Linear", "kwargs": {"in_features": 4, "out_features": 2}}
    assert isinstance(build_model(spec, allowed_modules=["torch.nn"]), nn.Linear)
    with pytest.raises(ArchitectureError, match="not in the allowed"):
        build_model(spec, allowed_modules=[])
    with pytest.raises(ArchitectureError, match="unknown architecture"):
        build_model({"name": "resnet9000"})
    with pytest.raises(ArchitectureError, match="bad kwargs"):
        build_model({"name": "cnn-small", "kwargs": {"wings": 2}})


def test_weights_round_trip_through_safetensors_exactly(tmp_path: Path) -> None:
    spec = {"name": "resnet8", "kwargs": {"in_channels": 1}}
    torch.manual_seed(0)
    source = build_model(spec)
    path = save_weights(source, tmp_path / "w" / "model.safetensors", {"version": "3"})
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]
    signature, metadata = read_signature(path)
    assert signature == state_dict_signature(spec)
    assert metadata["version"] == "3"
    torch.manual_seed(1)
    target = load_weights(build_model(spec), path)
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, target.state_dict()[name]), name
    # the file holds plain (contiguous) tensors; the loaded model keeps the channels-last
    # layout build_model gives convolutions (the CPU's fast path)
    assert all(t.is_contiguous() for t in load_file(str(path)).values())
    convolutions = [m.weight for m in target.modules() if isinstance(m, nn.Conv2d)]
    assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last)
                                for w in convolutions)
    # (a 1-channel or 1x1 kernel is both; the 3x3 ones over many channels are not contiguous)
    assert any(not w.is_contiguous() for w in convolutions)


def test_a_pickle_is_refused_without_being_unpickled(tmp_path: Path) -> None:
    model = build_model({"name": "mlp", "kwargs": {"input_size": 8}})
    torch_file, raw_pickle = tmp_path / "model.pt", tmp_path / "model.pkl"
    torch.save(model.state_dict(), torch_file)

    class Boom:
        def __reduce__(self):  # would run on unpickling
            return (exec, ("raise SystemExit('unpickled!')",))

    raw_pickle.write_bytes(pickle.dumps(Boom()))
    for path in (torch_file, raw_pickle):
        with pytest.raises(WeightsError, match="not a safetensors file"):
            load_weights(model, path)


def test_weights_for_another_architecture_are_refused_with_the_differences(
        tmp_path: Path) -> None:
    path = save_weights(build_model({"name": "cnn-small", "kwargs": {"num_classes": 10}}),
                        tmp_path / "model.safetensors")
    check_weights_file(path, {"name": "cnn-small", "kwargs": {"num_classes": 10}})
    with pytest.raises(WeightsError, match=r"classifier\.3\.weight: shape \[10, 128\]"):
        check_weights_file(path, {"name": "cnn-small", "kwargs": {"num_classes": 5}})
    with pytest.raises(WeightsError, match="missing tensor"):
        check_weights_file(path, {"name": "resnet8", "kwargs": {}})
