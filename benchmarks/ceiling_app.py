"""The ceiling for the intake benchmark: a bare FastAPI endpoint that validates the same JSON
body and does one INSERT of a row shaped like a deletion request, nothing else (no auth, no
target resolution, no audit, no idempotency lookup).

Same stack as Lethe: uvicorn, a sync route on the threadpool, a SQLAlchemy sync engine on
psycopg 3 with the pool size Lethe is given (CEILING_POOL_SIZE, CEILING_MAX_OVERFLOW), and
nothing more: no pre-ping on checkout. Run by benchmarks/intake.py as

    uvicorn --app-dir benchmarks ceiling_app:create_app --factory --workers 2

with CEILING_DATABASE_URL set; the benchmark creates the table (``metadata``) beforehand.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import FastAPI, Header, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import (
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    create_engine,
    insert,
)
from sqlalchemy.dialects.postgresql import JSONB

SECRET_KEY = b"ceiling-benchmark"
metadata = MetaData()
ceiling_requests = Table(
    "ceiling_requests", metadata,
    Column("id", String(36), primary_key=True),
    Column("client_id", String(128), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("subject_hash", String(64)),
    Column("payload", JSONB, nullable=False),
    Column("idempotency_key", String(255)),
    Column("status", String(24), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("due_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("client_id", "idempotency_key"),
)


class SubjectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["subject"]
    subject_ref: str = Field(min_length=1, max_length=256)
    model: str | None = Field(default=None, max_length=64)


class Accepted(BaseModel):
    id: str
    status: str
    received_at: datetime
    due_at: datetime


def create_app() -> FastAPI:
    app = FastAPI(title="intake ceiling")
    engine = create_engine(os.environ["CEILING_DATABASE_URL"],
                           pool_size=int(os.environ.get("CEILING_POOL_SIZE", "20")),
                           max_overflow=int(os.environ.get("CEILING_MAX_OVERFLOW", "20")))

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/deletion-requests", status_code=202, response_model=Accepted)
    def create_request(
        body: SubjectRequest, response: Response,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> Accepted:
        now = datetime.now(UTC)
        accepted = Accepted(id=str(uuid.uuid4()), status="queued", received_at=now,
                            due_at=now + timedelta(days=30))
        with engine.begin() as connection:
            connection.execute(insert(ceiling_requests), {
                **accepted.model_dump(), "client_id": "acme", "kind": body.kind,
                "subject_hash": hmac.new(SECRET_KEY, body.subject_ref.encode(),
                                         hashlib.sha256).hexdigest(),
                "payload": {}, "idempotency_key": idempotency_key})
        response.headers["Location"] = f"/v1/deletion-requests/{accepted.id}"
        return accepted

    return app
