"""Routes for a model's reference statistics: ask for a set (operators), watch its state and
cost (operators and auditors)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Response
from pydantic import BaseModel

from app.api.deps import Operator, SessionDep, Staff
from app.core.errors import PROBLEM
from app.models_registry import service as registry
from app.references import service
from app.references.models import ReferenceBuild, ReferenceSetRead

router = APIRouter(prefix="/v1/models", tags=["references"])


class ReferenceSetList(BaseModel):
    items: list[ReferenceSetRead]


@router.post("/{name}/references", response_model=ReferenceSetRead, status_code=202,
             summary="Train reference models for per-sample verification",
             description="Queues a reference job: `references` models trained with the model's "
                         "recipe on random halves of its training data, kept only as "
                         "per-sample statistics. Returns the set already queued or running, "
                         "if any (200).",
             responses={200: {"model": ReferenceSetRead}, 404: PROBLEM, 422: PROBLEM})
def build_references(name: str, db_session: SessionDep, principal: Operator,
                     response: Response,
                     body: Annotated[ReferenceBuild | None, Body()] = None) -> ReferenceSetRead:
    model = registry.get(db_session, name=name)
    reference_set, created = service.request_build(
        db_session, model=model, actor=principal.actor,
        references=body.references if body else None)
    if not created:
        response.status_code = 200
    return service.to_read(db_session, [reference_set])[0]


@router.get("/{name}/references", response_model=ReferenceSetList,
            summary="A model's reference sets, newest first", responses={404: PROBLEM})
def list_references(name: str, db_session: SessionDep, principal: Staff,
                    limit: Annotated[int, Query(ge=1, le=100)] = 20) -> ReferenceSetList:
    model = registry.get(db_session, name=name)
    return ReferenceSetList(items=service.to_read(
        db_session, service.list_sets(db_session, model_id=model.id, limit=limit)))
