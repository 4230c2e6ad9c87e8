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
from app.core.errors import Unauthorized
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


Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _presented(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("Send an API key as `Authorization: Bearer <key>`.")
    return credentials.credentials


async def get_presented_key(credentials: Bearer) -> str:
    return _presented(credentials)


# The key as presented, not yet checked: for a route that authenticates in its own batch.
PresentedKey = Annotated[str, Depends(get_presented_key)]


def get_principal(db_session: SessionDep, credentials: Bearer) -> Principal:
    return auth.authenticate(db_session, presented=_presented(credentials))


CurrentKey = Annotated[Principal, Depends(get_principal)]


def require(*roles: Role) -> Callable[[Principal], Coroutine[Any, Any, Principal]]:
    async def check(principal: CurrentKey) -> Principal:
        return auth.authorize(principal, roles)

    return check


Submitter = Annotated[Principal, Depends(require(*auth.SUBMITTERS))]
Operator = Annotated[Principal, Depends(require(Role.operator))]
Auditor = Annotated[Principal, Depends(require(Role.auditor))]
# Operators and auditors: see across clients (jobs batch many clients' requests).
Staff = Annotated[Principal, Depends(require(Role.operator, Role.auditor))]
Reader = Annotated[Principal, Depends(require(Role.requester, Role.operator, Role.auditor))]
Admin = Annotated[Principal, Depends(require())]
