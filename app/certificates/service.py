"""Issuing and reading signed certificates of erasure."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.certificates import signing
from app.certificates.models import Certificate
from app.core.db import utcnow
from app.core.errors import NotFound
from app.jobs.models import UnlearningJob
from app.models_registry.models import Model, ModelVersion
from app.requests.models import DeletionRequest, DeletionTarget, RequestStatus, TargetStatus

STATEMENT_TYPE = "lethe.erasure-certificate/v1"


@dataclass(frozen=True)
class Signer:
    private_key: Ed25519PrivateKey

    @classmethod
    def from_pem(cls, pem: str) -> Signer:
        return cls(signing.load_private_key(pem))

    @property
    def key_id(self) -> str:
        return signing.key_id(self.private_key.public_key())


def verification_summary(report: dict[str, Any] | None) -> dict[str, Any]:
    """What a certificate repeats from a version's verification report: its flat summary."""
    return dict((report or {}).get("summary", {}))


def issue(db_session: Session, *, request: DeletionRequest, signer: Signer,
          actor: str = "system") -> Certificate:
    """Sign what was done for a completed request; part of the caller's transaction."""
    if request.status != RequestStatus.completed:
        raise ValueError(f"request {request.id} is {request.status}, not completed")
    rows = db_session.execute(
        select(Model.name, ModelVersion, UnlearningJob)
        .select_from(DeletionTarget)
        .join(Model, Model.id == DeletionTarget.model_id)
        .join(ModelVersion, ModelVersion.id == DeletionTarget.version_id)
        .outerjoin(UnlearningJob, UnlearningJob.id == DeletionTarget.job_id)
        .where(DeletionTarget.request_id == request.id,
               DeletionTarget.status == TargetStatus.completed.value)
        .order_by(Model.name))
    models = [{
        "model": name, "version": version.number, "weights_sha256": version.sha256,
        "method": job.method if job else None,
        "escalation_level": job.escalation_level if job else None,
        "job_id": job.id if job else None,
        "verification": verification_summary(version.verification_report),
    } for name, version, job in rows]
    now = utcnow()
    certificate_id = str(uuid.uuid4())
    statement = {
        "type": STATEMENT_TYPE, "certificate_id": certificate_id, "request_id": request.id,
        "client_id": request.client_id, "kind": request.kind,
        "subject_ref_hash": request.subject_hash,
        "scope": {k: v for k, v in request.payload.items() if not k.startswith("missing")},
        "received_at": request.received_at.isoformat(),
        "completed_at": (request.completed_at or now).isoformat(),
        "issued_at": now.isoformat(), "models": models,
        "issuer": {"service": "lethe", "key_id": signer.key_id},
    }
    certificate = Certificate(id=certificate_id, request_id=request.id, issued_at=now,
                              body=statement, signature=signing.sign(signer.private_key,
                                                                     statement),
                              key_id=signer.key_id)
    db_session.add(certificate)
    audit.record(db_session, actor=actor, action="certificate.issued",
                 entity_type="deletion_request", entity_id=request.id,
                 details={"certificate_id": certificate_id, "key_id": signer.key_id})
    return certificate


def document_for(db_session: Session, *, request_id: str) -> dict[str, Any]:
    certificate = db_session.scalar(select(Certificate).where(
        Certificate.request_id == request_id))
    if certificate is None:
        raise NotFound("This request has no certificate (yet): certificates are issued when "
                       "a request is completed.")
    return {"certificate": certificate.body, "signature": certificate.signature,
            "algorithm": signing.ALGORITHM, "key_id": certificate.key_id}
