"""Routes for datasets and their sample manifests."""

from __future__ import annotations

import tempfile
from typing import Annotated

from fastapi import APIRouter, Header, Path, Request
from starlette.concurrency import run_in_threadpool

from app.api.deps import Operator, Reader, SecretKeyDep, SessionDep, SettingsDep
from app.core.config import Settings
from app.core.errors import PROBLEM
from app.datasets import service, shards
from app.datasets.models import DatasetCreate, DatasetRead, ManifestResult, ShardRead

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

# Spool to disk past this size: a manifest is parsed as a stream, never held whole.
SPOOL_IN_MEMORY = 8 << 20


def _manifest_checker(db_session: SessionDep, dataset: service.Dataset, settings: Settings
                      ) -> shards.ManifestChecker:
    shape = shards.established_shape(db_session, dataset=dataset,
                                     dataset_dir=settings.resolved_dataset_dir)
    limit = shards.class_limit(db_session, dataset=dataset, shape=shape,
                               allowed_factories=settings.allowed_model_factories)
    return shards.ManifestChecker(shards.dataset_root(settings.resolved_dataset_dir, dataset),
                                  shape=shape, limit=limit)


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
    secret_key: SecretKeyDep, settings: SettingsDep,
    content_type: Annotated[str, Header(alias="Content-Type")] = "",
) -> ManifestResult:
    """Columns: `sample_key`, `subject_ref` (optional; stored as a keyed hash only), `label`,
    `split` (`train`, `holdout` or `test`), `locator` (a path inside the dataset's store,
    `shard.safetensors#row` or an image file). Each row is checked against the store: the file
    exists, the row is in range, the sample has the dataset's shape, the label is the one the
    shard holds and a class of every model on the dataset; a row that fails is a 422 naming its
    line. The manifest lands whole or not at all."""
    dataset = await run_in_threadpool(service.get, db_session, name=name)
    checker = await run_in_threadpool(_manifest_checker, db_session, dataset, settings)
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        async for chunk in request.stream():
            spool.write(chunk)
        spool.seek(0)

        def ingest() -> tuple[int, int]:
            rows = service.parse_manifest(spool, content_type=content_type,
                                          check=checker.check)
            return service.ingest_manifest(db_session, dataset=dataset, rows=rows,
                                           secret_key=secret_key, actor=principal.actor)

        inserted, with_subject = await run_in_threadpool(ingest)
    return ManifestResult(dataset=name, inserted=inserted, with_subject=with_subject)


SHARD_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}


@router.put(
    "/{name}/shards/{path:path}", status_code=201, response_model=ShardRead,
    summary="Upload a sample shard (safetensors) into the dataset's store",
    openapi_extra=SHARD_BODY,
    responses={404: PROBLEM, 409: PROBLEM, 413: PROBLEM, 422: PROBLEM},
)
async def upload_shard(
    name: str, path: Annotated[str, Path(max_length=256, examples=["train-000.safetensors"])],
    request: Request, db_session: SessionDep, principal: Operator, settings: SettingsDep,
) -> ShardRead:
    """The body is a safetensors file holding `x` (uint8, [N, C, H, W]), `y` (int64, [N])
    and, in the header metadata, `keys`: a JSON list of N distinct strings (the rows' sample
    keys). It is streamed to disk (413 past LETHE_MAX_UPLOAD_BYTES), checked (422: the layout
    above, the dataset's sample shape, labels within the classes of the dataset's models) and
    only then made visible; an existing shard is never replaced (409). Register its rows with
    a manifest afterwards (`locator`: `<path>#<row>`)."""
    shards.check_shard_path(path)
    dataset = await run_in_threadpool(service.get, db_session, name=name)

    def rules() -> tuple[shards.Shape | None, shards.ClassLimit | None]:
        shape = shards.established_shape(db_session, dataset=dataset,
                                         dataset_dir=settings.resolved_dataset_dir)
        limit = shards.class_limit(db_session, dataset=dataset, shape=shape,
                                   allowed_factories=settings.allowed_model_factories)
        db_session.close()  # the upload may be long: give the connection back
        return shape, limit

    shape, limit = await run_in_threadpool(rules)
    target = shards.dataset_root(settings.resolved_dataset_dir, dataset) / path
    reader = await shards.receive_shard(
        request.stream(), target=target, max_bytes=settings.max_upload_bytes,
        check=lambda staged: shards.check_shard(staged, shape=shape, limit=limit))
    return shards.shard_read(reader, path)
