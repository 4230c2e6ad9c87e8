"""Routes for managing API keys (admins). `lethe keys create` does the same from a shell."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import Admin, SessionDep
from app.auth import service
from app.auth.models import ApiKeyCreate, ApiKeyCreated, ApiKeyRead, Role
from app.core.errors import PROBLEM

router = APIRouter(prefix="/v1/api-keys", tags=["api keys"])


@router.post("", status_code=201, response_model=ApiKeyCreated, summary="Create an API key")
def create_key(body: ApiKeyCreate, db_session: SessionDep, principal: Admin) -> ApiKeyCreated:
    api_key, plain = service.create(db_session, role=Role(body.role), client_id=body.client_id,
                                    name=body.name, actor=principal.actor)
    return ApiKeyCreated(**ApiKeyRead.model_validate(api_key).model_dump(), key=plain)


@router.get("", response_model=list[ApiKeyRead], summary="List API keys")
def list_keys(db_session: SessionDep, principal: Admin) -> list[ApiKeyRead]:
    return [ApiKeyRead.model_validate(k) for k in service.list_all(db_session)]


@router.post("/{key_id}/revoke", response_model=ApiKeyRead, summary="Revoke an API key",
             responses={404: PROBLEM})
def revoke_key(key_id: str, db_session: SessionDep, principal: Admin) -> ApiKeyRead:
    return ApiKeyRead.model_validate(service.revoke(db_session, key_id=key_id,
                                                    actor=principal.actor))
