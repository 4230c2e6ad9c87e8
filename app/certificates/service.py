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
from app.core.config import Settings, read_or_create_file
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

    @classmethod
    def from_settings(cls, settings: Settings) -> Signer:
        """The configured key (PEM, PKCS#8), else the data dir's, created on first use."""
        pem = settings.signing_key or read_or_create_file(
            settings.resolved_data_dir / "signing-key.pem", signing.generate_private_key_pem)
        return cls.from_pem(pem)

    @property
    def key_id(self) -> str:
        return signing.key_id(self.private_key.public_key())


def verification_summary(report: dict[str, Any] | None) -> dict[str, Any]:
    """What a certificate repeats from a version's verification report: its flat summary."""
    return dict((report or {}).get("summary", {}))


def evidence_for(report: dict[str, Any] | None, request_id: str) -> dict[str, Any]:
    """What backed the decision for one request, from the job's stored report: the outcome,
    the method's steps, whether the weights changed (tensor hashes), which evidence (with this
    request's per-sample figures only) and a statement in words that claims no more."""
    report = report or {}
    summary = report.get("summary") or {}
    run = report.get("run") or {}
    evidence = report.get("evidence") or summary.get("evidence") or "population-only"
    outcome = report.get("outcome") or summary.get("outcome") or "unlearned"
    entry: dict[str, Any] = {
        "outcome": outcome, "evidence": evidence, "method_steps": run.get("steps"),
        "weights_changed": run.get("weights_changed"),
        "parent_tensor_sha256": run.get("parent_tensor_sha256"),
        "tensor_sha256": run.get("tensor_sha256")}
    per_sample = report.get("per_sample") or {}
    mine = next((r for r in per_sample.get("requests", []) if r.get("request_id") == request_id),
                None)
    words = []
    if evidence == "none-needed":
        words.append("None of this request's samples were in the model's training data; the "
                     "served version never trained on them.")
    elif evidence == "per-sample" and mine is not None and mine.get("n_testable"):
        entry["per_sample"] = {
            "n": mine["n"], "n_testable": mine["n_testable"], "p_value": mine["p_value"],
            "p_before": mine["p_before"], "flagged_before": mine["flagged_before"],
            "detectable_shift": mine["detectable_shift"],
            "references": per_sample.get("references"), "alpha": per_sample.get("alpha")}
        words.append(
            f"Per-sample evidence: {mine['n_testable']} of the request's {mine['n']} training "
            f"samples were each compared with {per_sample.get('references')} reference models "
            f"that never trained on them; membership p-value {mine['p_before']:.3g} on the "
            f"version before and {mine['p_value']:.3g} on this one (refused below alpha "
            f"{per_sample.get('alpha')} after Benjamini-Hochberg; the test detects a mean "
            f"shift of {mine['detectable_shift']:.2f} standard deviations with 80 % power).")
        if mine["n_testable"] < mine["n"]:
            words.append(f"{mine['n'] - mine['n_testable']} samples had too few reference "
                         "models to be tested.")
    else:
        evidence = entry["evidence"] = "population-only"
        mia_n, ci = summary.get("mia_n"), summary.get("mia_ci95")
        power = (f"a population membership attack on {mia_n} samples (accuracy 95 % interval "
                 f"{ci[0]:.2f} to {ci[1]:.2f})" if mia_n and ci else
                 "no population attack (too few samples)")
        ks = summary.get("ks_p_value")
        words.append(
            "Population-only evidence: no per-sample test backs this request (the model had no "
            f"reference statistics, or none for these samples); {power} and a KS test"
            + (f" (p={ks:.3g})" if ks is not None else "") + " were run, which on a handful "
            "of samples have little power to detect remaining membership.")
    if outcome == "unchanged" and evidence != "none-needed":
        words.append("The weights did not change: the served version already behaves like one "
                     "that never saw these samples; it was not unlearned.")
    elif run:
        words.append(f"The method ({run.get('method')}) ran {run.get('steps')} steps and "
                     "changed the weights.")
    entry["statement"] = " ".join(words)
    return entry


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
        **evidence_for(job.report if job and job.report else version.verification_report,
                       request.id),
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
