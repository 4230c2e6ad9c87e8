"""Routes for watching unlearning jobs (operators and auditors)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from app.api.deps import SessionDep, Staff
from app.core.errors import PROBLEM, NotFound
from app.jobs import service
from app.jobs.models import JobRead
from app.models_registry import service as registry

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


class JobList(BaseModel):
    items: list[JobRead]


@router.get("", response_model=JobList, summary="Recent unlearning jobs, newest first",
            responses={404: PROBLEM})
def list_jobs(db_session: SessionDep, principal: Staff,
              model: Annotated[str | None, Query(max_length=64)] = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 50) -> JobList:
    model_id = registry.get(db_session, name=model).id if model else None
    jobs = service.list_recent(db_session, model_id=model_id, limit=limit)
    return JobList(items=[service.to_read(db_session, job) for job in jobs])


@router.get("/{job_id}", response_model=JobRead, summary="A job's live progress and report",
            responses={404: PROBLEM})
def get_job(job_id: str, db_session: SessionDep, principal: Staff) -> JobRead:
    job = service.get(db_session, job_id=job_id)
    if job is None:
        raise NotFound(f"Job {job_id!r} does not exist.")
    return service.to_read(db_session, job)
