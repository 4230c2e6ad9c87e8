"""Routes for deletion requests: thin; the lifecycle lives in lifecycle.py."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session, sessionmaker

from app.api.deps import (
    CurrentKey,
    Operator,
    PresentedKey,
    Reader,
    SecretKeyDep,
    SessionDep,
    Submitter,
)
from app.auth.service import Principal
from app.core.db import session_scope
from app.core.errors import PROBLEM, Problem
from app.core.fields import NAIVE_IS_UTC, UTCDatetime
from app.core.group_commit import GroupCommit
from app.core.spreadsheet import inert_cell
from app.observability.request_id import get_request_id
from app.requests import lifecycle, service
from app.requests.intake import Presented, Submission, Submitted, submit_many
from app.requests.models import (
    CREATE_EXAMPLES,
    BulkCreate,
    BulkFailure,
    BulkResult,
    DeletionRequestCreate,
    DeletionRequestPage,
    DeletionRequestRead,
    DenyBody,
    RequestKind,
    RequestStatus,
)

router = APIRouter(prefix="/v1/deletion-requests", tags=["deletion requests"])

IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", max_length=255,
    description="Same key and body returns the same request; same key, other body is 409.")]


def _one(db_session: SessionDep, request_id: str, principal: CurrentKey) -> DeletionRequestRead:
    request = service.get(db_session, request_id=request_id, principal=principal)
    return service.to_read(db_session, [request])[0]


@router.post(
    "", status_code=202, response_model=DeletionRequestRead,
    summary="Record a deletion request",
    responses={409: PROBLEM, 422: PROBLEM},
)
async def create_request(
    request: Request, response: Response, key: PresentedKey,
    body: Annotated[DeletionRequestCreate, Body(openapi_examples=CREATE_EXAMPLES)],
    idempotency_key: IdempotencyKey = None,
) -> DeletionRequestRead:
    """Accepted requests are queued for unlearning (or held for approval where the model's
    policy asks for it); a subject with nothing held in any model is closed at once with
    outcome `no_data`. Poll the `Location` for progress. `class` and `backdoor` requests
    change what a model does for everyone: they need an operator key, or a requester key whose
    client the model's policy names in `scenario_clients` (else 403).

    Requests that arrive together are recorded in one transaction; each is answered only
    once it is committed."""
    # Group commit: app/requests/intake.py.
    intake: GroupCommit[Presented, Submitted] = request.app.state.intake
    recorded, replayed = await intake.submit(Presented(
        key=key, body=body, idempotency_key=idempotency_key, trace_id=get_request_id()))
    response.headers["Location"] = f"{router.prefix}/{recorded.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return recorded


@router.post(":bulk", response_model=BulkResult, summary="Record up to 100 deletion requests")
def create_bulk(
    db_session: SessionDep, principal: Submitter, secret_key: SecretKeyDep, body: BulkCreate,
    idempotency_key: IdempotencyKey = None,
) -> BulkResult:
    """Recorded in one transaction, but each item on its own account: one bad item does not
    stop the others. With an `Idempotency-Key`, item *i* uses the key `<key>:<i>`."""
    submissions = [Submission(
        principal, item, f"{idempotency_key}:{index}" if idempotency_key else None,
        get_request_id()) for index, item in enumerate(body.requests)]
    succeeded, failed = [], []
    for index, answer in enumerate(submit_many(db_session, submissions,
                                               secret_key=secret_key)):
        if isinstance(answer, Problem):
            failed.append(BulkFailure(index=index, status=answer.status, title=answer.title,
                                      detail=answer.detail))
        else:
            succeeded.append(answer[0])
    return BulkResult(succeeded=succeeded, failed=failed)


CSV_COLUMNS = ["id", "client_id", "kind", "status", "outcome", "models", "received_at",
               "due_at", "days_left", "overdue", "completed_at"]


@router.get(
    "", response_model=DeletionRequestPage, summary="List deletion requests",
    responses={200: {"content": {"text/csv": {}},
                     "description": "JSON page, or every match as CSV with `Accept: text/csv`."},
               400: PROBLEM},
)
def list_requests(
    request: Request, db_session: SessionDep, principal: Reader,
    status: Annotated[list[RequestStatus] | None, Query()] = None,
    kind: RequestKind | None = None,
    model: Annotated[str | None, Query(max_length=64)] = None,
    client: Annotated[str | None, Query(max_length=128,
                                        description="Ignored for requesters.")] = None,
    overdue: bool | None = None,
    received_after: Annotated[UTCDatetime | None, Query(
        description=f"Received at or after this time. {NAIVE_IS_UTC}")] = None,
    received_before: Annotated[UTCDatetime | None, Query(
        description=f"Received before this time. {NAIVE_IS_UTC}")] = None,
    sort: Literal["received_at", "-received_at", "due_at", "-due_at"] = "-received_at",
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> DeletionRequestPage | StreamingResponse:
    filters = service.RequestFilters(
        status=status, kind=kind, model=model, client_id=client, overdue=overdue,
        received_after=received_after, received_before=received_before)
    sort_column, descending = sort.lstrip("-"), sort.startswith("-")
    if "text/csv" in request.headers.get("accept", ""):
        db_session.close()  # the export streams on its own session, after this one is gone
        rows = _csv_rows(request.app.state.sessionmaker, principal, filters, sort_column,
                         descending)
        return StreamingResponse(rows, media_type="text/csv", headers={
            "Content-Disposition": 'attachment; filename="deletion-requests.csv"'})
    page, next_cursor = service.list_page(
        db_session, principal=principal, filters=filters, sort=sort_column,
        descending=descending, limit=limit, cursor=cursor)
    return DeletionRequestPage(items=service.to_read(db_session, page), next_cursor=next_cursor)


def _csv_rows(sessionmaker: sessionmaker[Session], principal: Principal,
              filters: service.RequestFilters, sort_column: str, descending: bool
              ) -> Iterator[str]:
    # Its own session: the response streams after the route's session is closed.
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    with session_scope(sessionmaker) as db_session:
        for page in service.iter_all(db_session, principal=principal, filters=filters,
                                     sort=sort_column, descending=descending):
            for item in service.to_read(db_session, page):
                writer.writerow([inert_cell(cell) for cell in (
                    item.id, item.client_id, item.kind.value, item.status.value,
                    item.outcome.value if item.outcome else None,
                    " ".join(t.model for t in item.targets), item.received_at.isoformat(),
                    item.due_at.isoformat(), item.days_left, str(item.overdue).lower(),
                    item.completed_at.isoformat() if item.completed_at else None)])
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()  # the header alone when nothing matched


@router.get("/{request_id}", response_model=DeletionRequestRead,
            summary="Get a deletion request", responses={404: PROBLEM})
def get_request(request_id: str, db_session: SessionDep, principal: Reader
                ) -> DeletionRequestRead:
    return _one(db_session, request_id, principal)


@router.post("/{request_id}/cancel", response_model=DeletionRequestRead,
             summary="Cancel a request before processing starts",
             responses={404: PROBLEM, 409: PROBLEM})
def cancel_request(request_id: str, db_session: SessionDep, principal: Submitter
                   ) -> DeletionRequestRead:
    request = service.get(db_session, request_id=request_id, principal=principal)
    lifecycle.cancel(db_session, request=request, actor=principal.actor)
    return _one(db_session, request_id, principal)


@router.post("/{request_id}/approve", response_model=DeletionRequestRead,
             summary="Approve a request held for approval", responses={404: PROBLEM,
                                                                       409: PROBLEM})
def approve_request(request_id: str, db_session: SessionDep, principal: Operator
                    ) -> DeletionRequestRead:
    request = service.get(db_session, request_id=request_id, principal=principal)
    lifecycle.approve(db_session, request=request, actor=principal.actor)
    return _one(db_session, request_id, principal)


@router.post("/{request_id}/deny", response_model=DeletionRequestRead,
             summary="Deny a request held for approval", responses={404: PROBLEM,
                                                                    409: PROBLEM})
def deny_request(request_id: str, body: DenyBody, db_session: SessionDep, principal: Operator
                 ) -> DeletionRequestRead:
    request = service.get(db_session, request_id=request_id, principal=principal)
    lifecycle.deny(db_session, request=request, reason=body.reason, actor=principal.actor)
    return _one(db_session, request_id, principal)


@router.post("/{request_id}/retry", response_model=DeletionRequestRead,
             summary="Queue a failed request's targets again", responses={404: PROBLEM,
                                                                          409: PROBLEM})
def retry_request(request_id: str, db_session: SessionDep, principal: Operator
                  ) -> DeletionRequestRead:
    request = service.get(db_session, request_id=request_id, principal=principal)
    lifecycle.retry(db_session, request=request, actor=principal.actor)
    return _one(db_session, request_id, principal)
