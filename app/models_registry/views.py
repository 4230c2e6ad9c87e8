"""Routes for models, their versions (safetensors uploads) and aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import ArtifactStoreDep, Operator, Reader, SessionDep, SettingsDep
from app.core.errors import PROBLEM, Conflict, NotFound
from app.core.fields import VersionNumber
from app.models_registry import service
from app.models_registry.models import (
    AliasRead,
    AliasUpdate,
    ModelCreate,
    ModelPolicyUpdate,
    ModelRead,
    VersionRead,
    VersionStatus,
)
from app.references import service as references

router = APIRouter(prefix="/v1/models", tags=["models"])

AliasName = Annotated[str, Path(pattern=r"^[a-z][a-z0-9_-]{0,31}$", examples=["production"])]


@router.post("", status_code=201, response_model=ModelRead, summary="Register a model",
             responses={409: PROBLEM, 422: PROBLEM})
def create_model(body: ModelCreate, db_session: SessionDep, principal: Operator,
                 settings: SettingsDep) -> ModelRead:
    model = service.create(db_session, model_in=body, actor=principal.actor,
                           allowed_factories=settings.allowed_model_factories,
                           dataset_dir=settings.resolved_dataset_dir,
                           max_parameters=settings.max_model_parameters)
    return service.to_read(db_session, model=model)


@router.get("", response_model=list[ModelRead], summary="List models")
def list_models(db_session: SessionDep, principal: Reader) -> list[ModelRead]:
    return [service.to_read(db_session, model=m) for m in service.list_all(db_session)]


@router.get("/{name}", response_model=ModelRead, summary="Get a model",
            responses={404: PROBLEM})
def get_model(name: str, db_session: SessionDep, principal: Reader) -> ModelRead:
    return service.to_read(db_session, model=service.get(db_session, name=name))


@router.put("/{name}/policy", response_model=ModelRead, summary="Replace a model's policy",
            responses={404: PROBLEM, 422: PROBLEM})
def update_policy(name: str, body: ModelPolicyUpdate, db_session: SessionDep,
                  principal: Operator) -> ModelRead:
    model = service.get(db_session, name=name)
    service.update_policy(db_session, model=model, policy=body.policy, actor=principal.actor)
    return service.to_read(db_session, model=model)


WEIGHTS_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}


@router.post(
    "/{name}/versions", status_code=201, response_model=VersionRead,
    summary="Upload weights (safetensors) as a new version", openapi_extra=WEIGHTS_BODY,
    responses={404: PROBLEM, 413: PROBLEM, 422: PROBLEM},
)
async def upload_version(name: str, request: Request, db_session: SessionDep,
                         principal: Operator, store: ArtifactStoreDep) -> VersionRead:
    """The body is the raw safetensors file. Its sha256 is computed as it streams in; anything
    that is not safetensors fitting the model's architecture (a pickle included) is 422 and
    never executed. The new version is a `candidate` until an alias points at it."""
    model = await run_in_threadpool(service.get, db_session, name=name)
    staged = await store.stage_stream(request.stream())
    try:
        await run_in_threadpool(service.check_weights, model, staged)
        version = await run_in_threadpool(
            lambda: service.add_version(db_session, model=model, staged=staged, store=store,
                                        actor=principal.actor))
        await run_in_threadpool(references.build_on_register, db_session, model=model,
                                actor=principal.actor)
    finally:
        store.discard(staged)  # a no-op once the file has moved to its final name
    return await run_in_threadpool(service.version_to_read, db_session, version)


@router.get("/{name}/versions", response_model=list[VersionRead], summary="List versions",
            responses={404: PROBLEM})
def list_versions(name: str, db_session: SessionDep, principal: Reader) -> list[VersionRead]:
    model = service.get(db_session, name=name)
    return [service.version_to_read(db_session, v, viewer=principal)
            for v in service.list_versions(db_session, model=model)]


@router.get("/{name}/versions/{number}", response_model=VersionRead, summary="Get a version",
            responses={404: PROBLEM})
def get_version(name: str, number: VersionNumber, db_session: SessionDep, principal: Reader
                ) -> VersionRead:
    model = service.get(db_session, name=name)
    return service.version_to_read(db_session,
                                   service.get_version(db_session, model=model, number=number),
                                   viewer=principal)


@router.get("/{name}/versions/{number}/weights", response_class=FileResponse,
            summary="Download a version's weights (safetensors)",
            responses={200: {"content": {"application/octet-stream": {}}}, 404: PROBLEM,
                       409: PROBLEM})
def download_weights(name: str, number: VersionNumber, db_session: SessionDep, principal: Operator,
                     store: ArtifactStoreDep) -> FileResponse:
    model = service.get(db_session, name=name)
    version = service.get_version(db_session, model=model, number=number)
    if version.status == VersionStatus.purged or version.artifact_uri is None:
        raise Conflict(f"Version {number}'s weights were purged.")
    return FileResponse(store.path_of(version.artifact_uri), media_type="application/octet-stream",
                        filename=f"{name}-v{number}.safetensors",
                        headers={"Digest": f"sha-256={version.sha256}"})


@router.put("/{name}/aliases/{alias}", response_model=AliasRead,
            summary="Point an alias (e.g. production) at a version",
            responses={404: PROBLEM, 409: PROBLEM})
def set_alias(name: str, alias: AliasName, body: AliasUpdate, db_session: SessionDep,
              principal: Operator) -> AliasRead:
    """Moving `production` publishes the version and serves it. A version that predates a
    completed erasure, or one that was rejected or purged, is refused with 409."""
    model = service.get(db_session, name=name)
    service.set_alias(db_session, model=model, alias=alias, number=body.version,
                      actor=principal.actor)
    return AliasRead(model=name, alias=alias, version=body.version)


@router.get("/{name}/aliases/{alias}", response_model=AliasRead, summary="Resolve an alias",
            responses={404: PROBLEM})
def get_alias(name: str, alias: AliasName, db_session: SessionDep, principal: Reader
              ) -> AliasRead:
    model = service.get(db_session, name=name)
    version = service.alias_target(db_session, model=model, alias=alias)
    if version is None:
        raise NotFound(f"Model {name!r} has no alias {alias!r}.")
    return AliasRead(model=name, alias=alias, version=version.number)
