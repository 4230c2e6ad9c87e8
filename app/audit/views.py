"""Routes for reading and verifying the audit log (auditors and admins)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import Auditor, SessionDep
from app.audit import service
from app.audit.models import AuditEventRead, AuditPage, ChainVerification
from app.core.fields import AuditSeq

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("", response_model=AuditPage, summary="Read the audit log, oldest first")
def list_events(
    db_session: SessionDep, principal: Auditor,
    after: Annotated[AuditSeq, Query(description="Return events after this `seq`.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    action: Annotated[str | None, Query(max_length=64)] = None,
    entity_type: Annotated[str | None, Query(max_length=32)] = None,
    entity_id: Annotated[str | None, Query(max_length=64)] = None,
) -> AuditPage:
    events = service.list_events(db_session, after_seq=after, limit=limit + 1, action=action,
                                 entity_type=entity_type, entity_id=entity_id)
    page = events[:limit]
    return AuditPage(items=[AuditEventRead.model_validate(e) for e in page],
                     next_cursor=str(page[-1].seq) if len(events) > limit else None)


@router.get("/verify", response_model=ChainVerification,
            summary="Recompute the hash chain and name the first broken link")
def verify(db_session: SessionDep, principal: Auditor) -> ChainVerification:
    return service.verify_chain(db_session)
