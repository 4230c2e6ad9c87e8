"""Named dependencies, so a route's signature says what it needs.

Those that never wait on I/O are ``async``: FastAPI runs a sync dependency on the threadpool,
and each hop there and back costs more than the dependency itself."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.auth import service as auth
from app.auth.models import Role
from app.auth.service import Principal
from app.core.config import Settings
from app.core.errors import Forbidden, Unauthorized
from app.models_registry.artifacts import ArtifactStore


async def get_session(request: Request) -> AsyncIterator[Session]:
    session: Session = request.app.state.sessionmaker()  # connects on first use, not here
    try:
        yield session
    finally:
        if session.in_transaction():  # closing sends a ROLLBACK: not on the event loop
            await run_in_threadpool(session.close)
        else:
            session.close()


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_secret_key(request: Request) -> bytes:
    key: bytes = request.app.state.secret_key
    return key


async def get_artifact_store(request: Request) -> ArtifactStore:
    store: ArtifactStore = request.app.state.artifact_store
    return store


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
SecretKeyDep = Annotated[bytes, Depends(get_secret_key)]
ArtifactStoreDep = Annotated[ArtifactStore, Depends(get_artifact_store)]

_bearer = HTTPBearer(auto_error=False, description="An API key: `lethe_<id>_<secret>`.")


def get_principal(
    db_session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("Send an API key as `Authorization: Bearer <key>`.")
    return auth.authenticate(db_session, presented=credentials.credentials)


CurrentKey = Annotated[Principal, Depends(get_principal)]


def require(*roles: Role) -> Callable[[Principal], Coroutine[Any, Any, Principal]]:
    allowed = set(roles) | {Role.admin}

    async def check(principal: CurrentKey) -> Principal:
        if principal.role not in allowed:
            raise Forbidden(f"This needs one of the roles: "
                            f"{', '.join(sorted(r.value for r in allowed))}.")
        return principal

    return check


# Who may submit and cancel deletion requests.
Submitter = Annotated[Principal, Depends(require(Role.requester, Role.operator))]
Operator = Annotated[Principal, Depends(require(Role.operator))]
Auditor = Annotated[Principal, Depends(require(Role.auditor))]
# Operators and auditors: see across clients (jobs batch many clients' requests).
Staff = Annotated[Principal, Depends(require(Role.operator, Role.auditor))]
Reader = Annotated[Principal, Depends(require(Role.requester, Role.operator, Role.auditor))]
Admin = Annotated[Principal, Depends(require())]
