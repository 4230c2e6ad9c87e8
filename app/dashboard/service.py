"""What each dashboard page shows, assembled from the domains' own services.

Nothing here decides a rule: state, deadlines, visibility and the alias guard stay in the
domains; these functions only gather and shape figures for the templates."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.audit.models import AuditEvent, ChainVerification
from app.auth.models import Role
from app.auth.service import Principal
from app.certificates import service as certificates
from app.core.db import utcnow
from app.core.errors import NotFound
from app.datasets.models import Dataset
from app.jobs import service as jobs
from app.jobs.models import ACTIVE_JOB_STATUSES, JobRead, UnlearningJob
from app.models_registry import service as registry
from app.models_registry.models import Model, ModelVersion, VersionStatus
from app.references import service as references
from app.references.models import ReferenceSetRead
from app.requests import metrics as request_metrics
from app.requests import service as requests
from app.requests.models import (
    DeletionRequest,
    DeletionRequestRead,
    RequestStatus,
    TargetStatus,
)

PER_DAY_WINDOW = 30
ACTIVE_JOBS = [s.value for s in ACTIVE_JOB_STATUSES]
# A request is still being worked on (its page refreshes itself) in these states.
WORKING = {RequestStatus.queued.value, RequestStatus.processing.value,
           RequestStatus.verifying.value}


def deadline_class(days_left: int | None) -> str:
    """The overview's colour for days left: at least 10 green, under 10 amber, under 5 red."""
    if days_left is None:
        return "muted"
    if days_left >= 10:
        return "ok"
    if days_left >= 5:
        return "warn"
    return "danger"


def any_job_active(db_session: Session) -> bool:
    return db_session.scalar(select(UnlearningJob.id).where(
        UnlearningJob.status.in_(ACTIVE_JOBS)).limit(1)) is not None


# ---- overview -------------------------------------------------------------------------------


@dataclass
class Overview:
    by_status: dict[str, int]
    open_total: int
    overdue: int
    due_soon: int
    deadlines: list[DeletionRequestRead]
    per_day: dict[str, Any]
    active_jobs: list[JobRead]


def overview(db_session: Session, *, now: datetime | None = None) -> Overview:
    now = now or utcnow()
    by_status = request_metrics.count_by_status(db_session)
    overdue, due_soon = request_metrics.deadline_counts(db_session, now=now,
                                                        soon=timedelta(days=10))
    first_day = (now - timedelta(days=PER_DAY_WINDOW - 1)).date()
    since = datetime.combine(first_day, datetime.min.time(), tzinfo=now.tzinfo)
    counts = request_metrics.received_per_day(db_session, since=since)
    days = [first_day + timedelta(days=i) for i in range(PER_DAY_WINDOW)]
    deadlines = requests.to_read(db_session,
                                 request_metrics.open_by_due_date(db_session, limit=15))
    active = jobs.list_filtered(db_session, statuses=ACTIVE_JOBS, limit=20)
    return Overview(
        by_status=by_status,
        open_total=sum(n for s, n in by_status.items()
                       if s not in {"completed", "canceled", "rejected"}),
        overdue=overdue, due_soon=due_soon, deadlines=deadlines,
        per_day={"labels": [d.isoformat() for d in days],
                 "values": [counts.get(d, 0) for d in days]},
        active_jobs=[jobs.to_read(db_session, job) for job in active])


# ---- evidence (the job and request pages) ---------------------------------------------------

NO_PER_SAMPLE = "the report carries no per-sample test"


@dataclass
class Evidence:
    """What backed a job's decision, read from its stored verification report: which evidence
    (per-sample, population-only, none-needed), the outcome (unlearned, unchanged), what the
    method did, and the per-request rows of the per-sample test with the figures they rest
    on (``per_sample`` without its ``requests``)."""

    evidence: str
    outcome: str | None
    method_steps: int | None
    weights_changed: bool | None
    rows: list[dict[str, Any]]
    per_sample: dict[str, Any] | None
    note: str | None


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def evidence_of(report: dict[str, Any] | None, *, request_id: str | None = None
                ) -> Evidence | None:
    """The evidence of a job's report, None before there is one. With ``request_id``, only
    that request's own per-sample row: a batch mixes requests of several clients."""
    if not isinstance(report, dict):
        return None
    summary, run = _mapping(report.get("summary")), _mapping(report.get("run"))
    section = _mapping(report.get("per_sample"))
    # A report written before the per-sample test (version 1) had only population figures;
    # the certificates read it the same way.
    evidence = report.get("evidence") or summary.get("evidence") or "population-only"
    rows = [r for r in section.get("requests") or [] if isinstance(r, dict)]
    if request_id is not None:
        rows = [r for r in rows if r.get("request_id") == request_id]
    note = report.get("per_sample_note")
    if not section and not note and evidence != "none-needed":
        note = NO_PER_SAMPLE
    return Evidence(
        evidence=evidence, outcome=report.get("outcome") or summary.get("outcome"),
        method_steps=run.get("steps", summary.get("method_steps")),
        weights_changed=run.get("weights_changed", summary.get("weights_changed")),
        rows=rows, note=note,
        per_sample={k: v for k, v in section.items() if k != "requests"} if section else None)


@dataclass
class JobPage:
    job: JobRead
    evidence: Evidence | None


def job_page(db_session: Session, *, job_id: str, principal: Principal) -> JobPage:
    job = jobs.get(db_session, job_id=job_id)
    if job is None:
        raise NotFound(f"Job {job_id!r} does not exist.")
    read = jobs.to_read(db_session, job)
    if principal.role == Role.requester and read.report:
        # The dashboard signs in operator and auditor keys only; should that change, a
        # requester still sees only its own client's request ids, as through the API.
        read.report = registry.redact_report(db_session, read.report,
                                             client_id=principal.client_id)
        own = set(db_session.scalars(select(DeletionRequest.id).where(
            DeletionRequest.id.in_(read.request_ids),
            DeletionRequest.client_id == principal.client_id)))
        read.request_ids = [rid for rid in read.request_ids if rid in own]
    return JobPage(job=read, evidence=evidence_of(read.report))


# ---- requests -------------------------------------------------------------------------------


@dataclass
class TimelineEntry:
    event: AuditEvent
    label: str


def request_timeline(db_session: Session, request: DeletionRequest, job_ids: list[str]
                     ) -> list[TimelineEntry]:
    """The request's transitions from the audit log, with the events of the jobs that
    carried it (started, escalated, succeeded, failed), in chain order."""
    entities = [("deletion_request", request.id)] + [("job", job_id) for job_id in job_ids]
    return [TimelineEntry(event=e, label=e.action.replace("deletion_request.", "request ")
                          .replace(".", " ").replace("_", " "))
            for e in audit.events_of(db_session, entities=entities)]


@dataclass
class TargetEvidence:
    """One target's evidence: this request's own row of its job's report, and, once the
    target is completed, the statement its certificate makes."""

    model: str
    job_id: str
    evidence: Evidence
    statement: str | None


def request_evidence(db_session: Session, read: DeletionRequestRead) -> list[TargetEvidence]:
    result = []
    for target in read.targets:
        job = jobs.get(db_session, job_id=target.job_id) if target.job_id else None
        evidence = evidence_of(job.report, request_id=read.id) if job else None
        if job is None or evidence is None:
            continue
        statement = (certificates.evidence_for(job.report, read.id)["statement"]
                     if target.status == TargetStatus.completed else None)
        result.append(TargetEvidence(model=target.model, job_id=job.id, evidence=evidence,
                                     statement=statement))
    return result


@dataclass
class RequestPage:
    item: DeletionRequestRead
    timeline: list[TimelineEntry]
    evidence: list[TargetEvidence]


def request_detail(db_session: Session, *, request_id: str, principal: Principal
                   ) -> RequestPage:
    request = requests.get(db_session, request_id=request_id, principal=principal)
    read = requests.to_read(db_session, [request])[0]
    job_ids = sorted({t.job_id for t in read.targets if t.job_id})
    return RequestPage(item=read, timeline=request_timeline(db_session, request, job_ids),
                       evidence=request_evidence(db_session, read))


# ---- models ---------------------------------------------------------------------------------


@dataclass
class VersionRow:
    version: ModelVersion
    parent: int | None
    scores: dict[str, Any]
    is_production: bool
    predates_erasure: bool
    servable: bool


@dataclass
class ModelSummary:
    model: Model
    dataset: str
    production: ModelVersion | None
    versions: int
    policy: dict[str, Any]


@dataclass
class ModelPage:
    model: Model
    dataset: str
    policy: dict[str, Any]
    production: ModelVersion | None
    erasure_floor: int
    versions: list[VersionRow] = field(default_factory=list)
    chart: dict[str, Any] = field(default_factory=dict)
    active_jobs: list[JobRead] = field(default_factory=list)
    recent_jobs: list[JobRead] = field(default_factory=list)
    # The production version's evidence and outcome (from its report's summary).
    production_scores: dict[str, Any] = field(default_factory=dict)
    reference_sets: list[ReferenceSetRead] = field(default_factory=list)
    references_active: bool = False
    references_waiting: str | None = None  # why the model's requests wait, when they do


def models_list(db_session: Session) -> list[ModelSummary]:
    result = []
    for model in registry.list_all(db_session):
        dataset = db_session.get(Dataset, model.dataset_id)
        result.append(ModelSummary(
            model=model, dataset=dataset.name if dataset else "?",
            production=registry.alias_target(db_session, model=model),
            versions=len(registry.list_versions(db_session, model=model)),
            policy=registry.policy_of(model).model_dump()))
    return result


def model_page(db_session: Session, *, name: str) -> ModelPage:
    model = registry.get(db_session, name=name)
    dataset = db_session.get(Dataset, model.dataset_id)
    production = registry.alias_target(db_session, model=model)
    floor = registry.erasure_floor(db_session, model=model)
    versions = registry.list_versions(db_session, model=model)
    numbers = {v.id: v.number for v in versions}
    rows = [VersionRow(
        version=v, parent=numbers.get(v.parent_id) if v.parent_id else None,
        scores=registry.version_scores(v),
        is_production=production is not None and production.id == v.id,
        # For display only: set_alias is what refuses a move, with its own message.
        predates_erasure=v.number < floor,
        servable=VersionStatus(v.status) in registry.SERVABLE) for v in versions]
    chart = {
        "labels": [f"v{row.version.number}" for row in rows],
        "mia_accuracy": [row.scores.get("mia_accuracy") for row in rows],
        "test_accuracy": [row.scores.get("test_accuracy") for row in rows],
        "statuses": [row.version.status for row in rows],
    }
    model_jobs = jobs.list_filtered(db_session, model_id=model.id, limit=10)
    sets = references.to_read(db_session, references.list_sets(db_session, model_id=model.id))
    return ModelPage(
        model=model, dataset=dataset.name if dataset else "?",
        policy=registry.policy_of(model).model_dump(), production=production,
        erasure_floor=floor, versions=list(reversed(rows)), chart=chart,
        active_jobs=[jobs.to_read(db_session, j) for j in model_jobs
                     if j.status in ACTIVE_JOBS],
        recent_jobs=[jobs.to_read(db_session, j) for j in model_jobs],
        production_scores=registry.version_scores(production) if production else {},
        reference_sets=sets,
        references_active=any(s.status.value in references.ACTIVE for s in sets),
        references_waiting=references.WAITING_REASON
        if references.waiting_for_references(db_session, model=model) else None)


# ---- audit ----------------------------------------------------------------------------------


@dataclass
class AuditPage:
    events: list[AuditEvent]
    verification: ChainVerification
    older_than: int | None


def audit_page(db_session: Session, *, before: int | None, limit: int, action: str | None,
               entity_type: str | None, entity_id: str | None) -> AuditPage:
    rows = audit.list_recent(db_session, before_seq=before, limit=limit + 1, action=action,
                             entity_type=entity_type, entity_id=entity_id)
    page = rows[:limit]
    return AuditPage(events=page, verification=audit.verify_chain(db_session),
                     older_than=page[-1].seq if len(rows) > limit else None)
