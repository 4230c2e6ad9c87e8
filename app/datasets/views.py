"""Routes for datasets and their sample manifests."""

from __future__ import annotations

import tempfile
from typing import Annotated

from fastapi import APIRouter, Header, Request
from starlette.concurrency import run_in_threadpool

from app.core.deps import Operator, Reader, SecretKeyDep, SessionDep
from app.core.errors import PROBLEM
from app.datasets import service
from app.datasets.models import DatasetCreate, DatasetRead, ManifestResult

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

# Spool to disk past this size: a manifest is parsed as a stream, never held whole.
SPOOL_IN_MEMORY = 8 << 20


def _read(db_session: SessionDep, dataset: service.Dataset) -> DatasetRead:
    read = DatasetRead.model_validate(dataset)
    read.samples = service.split_counts(db_session, dataset_id=dataset.id)
    return read


@router.post("", status_code=201, response_model=DatasetRead, summary="Register a dataset",
             responses={409: PROBLEM, 422: PROBLEM})
def create_dataset(body: DatasetCreate, db_session: SessionDep, principal: Operator
                   ) -> DatasetRead:
    dataset = service.create(db_session, dataset_in=body, actor=principal.actor)
    return _read(db_session, dataset)


@router.get("", response_model=list[DatasetRead], summary="List datasets")
def list_datasets(db_session: SessionDep, principal: Reader) -> list[DatasetRead]:
    return [_read(db_session, d) for d in service.list_all(db_session)]


@router.get("/{name}", response_model=DatasetRead, summary="Get a dataset",
            responses={404: PROBLEM})
def get_dataset(name: str, db_session: SessionDep, principal: Reader) -> DatasetRead:
    return _read(db_session, service.get(db_session, name=name))


MANIFEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "text/csv": {"schema": {"type": "string"}, "example":
                         "sample_key,subject_ref,label,split,locator\n"
                         "img-000001,customer-4711,3,train,train-000.safetensors#1\n"},
            "application/x-ndjson": {"schema": {"type": "string"}, "example":
                                     '{"sample_key": "img-000001", "subject_ref": '
                                     '"customer-4711", "label": 3, "split": "train", '
                                     '"locator": "train-000.safetensors#1"}\n'},
        },
    }
}


@router.post(
    "/{name}/samples", status_code=201, response_model=ManifestResult,
    summary="Add samples from a manifest (CSV or JSON lines)", openapi_extra=MANIFEST_BODY,
    responses={404: PROBLEM, 409: PROBLEM, 413: PROBLEM, 415: PROBLEM, 422: PROBLEM},
)
async def add_samples(
    name: str, request: Request, db_session: SessionDep, principal: Operator,
    secret_key: SecretKeyDep,
    content_type: Annotated[str, Header(alias="Content-Type")] = "",
) -> ManifestResult:
    """Columns: `sample_key`, `subject_ref` (optional; stored as a keyed hash only), `label`,
    `split` (`train`, `holdout` or `test`), `locator` (a path inside the dataset's store,
    `shard.safetensors#row` or an image file). The manifest lands whole or not at all."""
    dataset = await run_in_threadpool(service.get, db_session, name=name)
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        async for chunk in request.stream():
            spool.write(chunk)
        spool.seek(0)

        def ingest() -> tuple[int, int]:
            rows = service.parse_manifest(spool, content_type=content_type)  # type: ignore[arg-type]
            return service.ingest_manifest(db_session, dataset=dataset, rows=rows,
                                           secret_key=secret_key, actor=principal.actor)

        inserted, with_subject = await run_in_threadpool(ingest)
    return ManifestResult(dataset=name, inserted=inserted, with_subject=with_subject)
