"""Predict request and response bodies."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_BATCH = 256


class PredictRequest(BaseModel):
    """Either ``inputs`` (nested lists, ``[N, C, H, W]`` or ``[N, H, W]`` for one channel) or
    ``inputs_b64`` with ``shape`` (little-endian float32). Pixels are floats in [0, 1]."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"inputs": [[[0.0] * 28] * 28]},
    ]})

    inputs: list[object] | None = Field(default=None, max_length=MAX_BATCH)
    inputs_b64: str | None = Field(default=None, max_length=64 << 20)
    shape: list[int] | None = Field(default=None, min_length=2, max_length=4)
    return_probabilities: bool = True

    @model_validator(mode="after")
    def _one_encoding(self) -> PredictRequest:
        if (self.inputs is None) == (self.inputs_b64 is None):
            raise ValueError("give exactly one of `inputs` or `inputs_b64`")
        if self.inputs_b64 is not None and self.shape is None:
            raise ValueError("`inputs_b64` needs `shape`")
        return self


class PredictResponse(BaseModel):
    model: str
    model_version: int = Field(description="The production version that answered.")
    predictions: list[int]
    probabilities: list[list[float]] | None = None
