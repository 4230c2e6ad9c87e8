"""Serving the `production` version: loaded once per version, swapped without a restart.

Each call looks up where `production` points (one indexed query); when it moved, the new
version's weights are checked against their sha256, loaded, and swapped in under a lock, so a
publish is served from the next request on."""

from __future__ import annotations

import base64
import binascii
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.orm import Session

from app.core.errors import Conflict, Unprocessable
from app.datasets import shards
from app.datasets.models import Dataset
from app.models_registry import service as registry
from app.models_registry.artifacts import ArtifactStore
from app.models_registry.models import Model
from app.observability.metrics import observe_predict
from app.serving.models import MAX_BATCH, PredictRequest, PredictResponse


@dataclass(frozen=True)
class LoadedModel:
    version_id: int
    number: int
    module: torch.nn.Module
    input_shape: tuple[int, int, int] | None


class ModelServer:
    def __init__(self, store: ArtifactStore, dataset_dir: Path | None = None) -> None:
        self.store, self.dataset_dir = store, dataset_dir
        self._loaded: dict[int, LoadedModel] = {}  # model id -> what is served
        self._lock = threading.Lock()

    def serving(self, db_session: Session, model: Model) -> LoadedModel:
        version = registry.alias_target(db_session, model=model)
        if version is None or version.artifact_uri is None:
            raise Conflict(f"Model {model.name!r} has no production version to serve.")
        current = self._loaded.get(model.id)
        if current is not None and current.version_id == version.id:
            return current
        with self._lock:
            current = self._loaded.get(model.id)
            if current is None or current.version_id != version.id:
                current = self._load(model, version.id, version.number, version.artifact_uri,
                                     version.sha256, self._input_shape(db_session, model))
                self._loaded[model.id] = current
        return current

    def _input_shape(self, db_session: Session, model: Model) -> tuple[int, int, int] | None:
        """The shape each input must have: the architecture's own (from its kwargs), else the
        shape of the dataset it was trained on; None only while neither is known."""
        from unlearning.architectures import input_shape

        declared = input_shape(model.architecture)
        if declared is not None or self.dataset_dir is None:
            return declared
        dataset = db_session.get(Dataset, model.dataset_id)
        return shards.established_shape(db_session, dataset=dataset,
                                        dataset_dir=self.dataset_dir) if dataset else None

    def _load(self, model: Model, version_id: int, number: int, uri: str, sha256: str,
              shape: tuple[int, int, int] | None) -> LoadedModel:
        from unlearning.architectures import build_model
        from unlearning.weights import load_weights

        if self.store.sha256_of(uri) != sha256:
            raise Conflict(f"{model.name} v{number}: weights do not match their sha256.")
        module = load_weights(build_model(model.architecture), self.store.path_of(uri)).eval()
        return LoadedModel(version_id, number, module, shape)

    def predict(self, db_session: Session, model: Model, body: PredictRequest
                ) -> PredictResponse:
        started = time.perf_counter()
        loaded = self.serving(db_session, model)
        db_session.close()  # inference needs no connection; give it back first
        try:
            batch = to_tensor(body, loaded.input_shape)
        except Unprocessable:
            observe_predict(model.name, time.perf_counter() - started, outcome="invalid")
            raise
        try:
            with torch.inference_mode():
                probabilities = torch.softmax(loaded.module(batch).float(), dim=1)
        except RuntimeError as exc:  # finite numbers in 4-D that the layers cannot take
            observe_predict(model.name, time.perf_counter() - started, outcome="invalid")
            raise Unprocessable(f"The model cannot take inputs shaped {list(batch.shape[1:])}: "
                                f"{str(exc).splitlines()[0]}") from None
        observe_predict(model.name, time.perf_counter() - started, samples=len(batch))
        return PredictResponse(
            model=model.name, model_version=loaded.number,
            predictions=probabilities.argmax(1).tolist(),
            probabilities=probabilities.tolist() if body.return_probabilities else None)


def to_tensor(body: PredictRequest, expected: tuple[int, int, int] | None) -> torch.Tensor:
    """Decode and validate the input batch; anything malformed is a 422."""
    if body.inputs is not None:
        try:
            array = np.asarray(body.inputs, dtype=np.float32)
        except (ValueError, TypeError):
            raise Unprocessable("`inputs` must be a regular nested list of numbers.") from None
    else:
        assert body.inputs_b64 is not None and body.shape is not None
        try:
            raw = base64.b64decode(body.inputs_b64, validate=True)
        except (binascii.Error, ValueError):
            raise Unprocessable("`inputs_b64` is not valid base64.") from None
        if any(d <= 0 for d in body.shape) or len(raw) != 4 * math.prod(body.shape):
            raise Unprocessable(f"`inputs_b64` holds {len(raw)} bytes; shape {body.shape} of "
                                "float32 needs 4 x the product of the shape.")
        array = np.frombuffer(raw, dtype="<f4").reshape(body.shape)
    if array.ndim == 3:
        array = array[:, None]  # one channel given as [N, H, W]
    if array.ndim != 4 or array.shape[0] == 0:
        raise Unprocessable(f"Expected a batch shaped [N, C, H, W]; got {list(array.shape)}.")
    if array.shape[0] > MAX_BATCH:
        raise Unprocessable(f"At most {MAX_BATCH} inputs per call.")
    if expected is not None and tuple(array.shape[1:]) != expected:
        raise Unprocessable(f"Each input must be shaped {list(expected)}; got "
                            f"{list(array.shape[1:])}.", expected_shape=list(expected))
    if not np.isfinite(array).all():
        raise Unprocessable("Inputs contain NaN or infinity.")
    return torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy


