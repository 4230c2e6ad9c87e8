"""Models, versions and aliases: registration, uploads, and the rules for moving aliases."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from app.audit import service as audit
from app.auth.models import Role
from app.auth.service import Principal
from app.core.db import utcnow
from app.core.errors import Conflict, NotFound, Unprocessable
from app.datasets import service as datasets
from app.datasets import shards
from app.datasets.models import Dataset
from app.models_registry import engine_bridge
from app.models_registry.artifacts import ArtifactStore, StagedArtifact, version_uri
from app.models_registry.models import (
    PRODUCTION,
    ArchitectureSpec,
    Model,
    ModelAlias,
    ModelCreate,
    ModelRead,
    ModelVersion,
    Policy,
    VersionRead,
    VersionStatus,
)
from app.requests.models import DeletionRequest, DeletionTarget, TargetStatus

SERVABLE = {VersionStatus.candidate, VersionStatus.published, VersionStatus.superseded}


def find(db_session: Session, *, name: str) -> Model | None:
    return db_session.scalar(select(Model).where(Model.name == name))


def get(db_session: Session, *, name: str) -> Model:
    model = find(db_session, name=name)
    if model is None:
        raise NotFound(f"Model {name!r} does not exist.")
    return model


def list_all(db_session: Session) -> list[Model]:
    return list(db_session.scalars(select(Model).order_by(Model.name)))


def policy_of(model: Model) -> Policy:
    return Policy.model_validate(model.policy)


def _check_policy(policy: Policy) -> None:
    if policy.method not in engine_bridge.method_names():
        raise Unprocessable(f"Unknown unlearning method {policy.method!r}.",
                            methods=sorted(engine_bridge.method_names()))
    try:
        engine_bridge.check_method_config(policy.method, policy.method_config)
        engine_bridge.check_training_recipe(policy.training_recipe)
    except ValueError as exc:
        raise Unprocessable(f"Policy: {exc}") from None


def create(db_session: Session, *, model_in: ModelCreate, allowed_factories: list[str],
           actor: str, dataset_dir: Path | None = None, max_parameters: int | None = None
           ) -> Model:
    """Register a model on a dataset. The architecture is built once and a dummy batch of the
    dataset's sample shape passed through it, so a model that cannot take the dataset's
    samples, predicts fewer classes than its labels hold, or exceeds ``max_parameters`` is
    refused here rather than inside its first job. ``dataset_dir`` None skips the data checks
    (the dataset's store is not known)."""
    if find(db_session, name=model_in.name) is not None:
        raise Conflict(f"Model {model_in.name!r} already exists.")
    dataset = datasets.find(db_session, name=model_in.dataset)
    if dataset is None:
        raise Unprocessable(f"Dataset {model_in.dataset!r} does not exist.")
    shape = (shards.established_shape(db_session, dataset=dataset, dataset_dir=dataset_dir)
             if dataset_dir is not None else None)
    try:
        probe = engine_bridge.probe_architecture(
            model_in.architecture.model_dump(), allowed_factories, sample_shape=shape,
            max_parameters=max_parameters)
    except ValueError as exc:
        raise Unprocessable(f"Architecture: {exc}") from None
    top_label = shards.label_range(db_session, dataset=dataset)
    if probe.classes is not None and top_label is not None and top_label >= probe.classes:
        raise Unprocessable(f"Architecture: it predicts {probe.classes} classes, but dataset "
                            f"{dataset.name!r} holds label {top_label}.",
                            classes=probe.classes, largest_label=top_label)
    _check_policy(model_in.policy)
    model = Model(name=model_in.name, architecture=model_in.architecture.model_dump(),
                  dataset_id=dataset.id, policy=model_in.policy.model_dump(mode="json"))
    db_session.add(model)
    db_session.flush()
    audit.record(db_session, actor=actor, action="model.created", entity_type="model",
                 entity_id=model.name, details={"architecture": model.architecture,
                                                "dataset": dataset.name, "policy": model.policy})
    db_session.commit()
    return model


def update_policy(db_session: Session, *, model: Model, policy: Policy, actor: str) -> Model:
    _check_policy(policy)
    model.policy = policy.model_dump(mode="json")
    audit.record(db_session, actor=actor, action="model.policy_updated", entity_type="model",
                 entity_id=model.name, details={"policy": model.policy})
    db_session.commit()
    return model


def aliases_of(db_session: Session, *, model: Model) -> dict[str, int]:
    rows = db_session.execute(
        select(ModelAlias.alias, ModelVersion.number)
        .join(ModelVersion, ModelVersion.id == ModelAlias.version_id)
        .where(ModelAlias.model_id == model.id)
    )
    return {alias: number for alias, number in rows}


def to_read(db_session: Session, *, model: Model) -> ModelRead:
    dataset = db_session.get(Dataset, model.dataset_id)
    assert dataset is not None
    return ModelRead(name=model.name, architecture=ArchitectureSpec(**model.architecture),
                     dataset=dataset.name, policy=policy_of(model),
                     aliases=aliases_of(db_session, model=model), created_at=model.created_at)


# ---- versions ---------------------------------------------------------------------------


def get_version(db_session: Session, *, model: Model, number: int) -> ModelVersion:
    version = db_session.scalar(select(ModelVersion).where(
        ModelVersion.model_id == model.id, ModelVersion.number == number))
    if version is None:
        raise NotFound(f"Model {model.name!r} has no version {number}.")
    return version


def list_versions(db_session: Session, *, model: Model) -> list[ModelVersion]:
    return list(db_session.scalars(
        select(ModelVersion).where(ModelVersion.model_id == model.id)
        .order_by(ModelVersion.number)))


def version_to_read(db_session: Session, version: ModelVersion, *,
                    viewer: Principal | None = None) -> VersionRead:
    """A version as ``viewer`` may see it: a requester's view of the verification report keeps
    only its own client's per-request rows and reasons (a batch mixes clients' requests)."""
    read = VersionRead.model_validate(version)
    if version.parent_id is not None:
        parent = db_session.get(ModelVersion, version.parent_id)
        read.parent = parent.number if parent else None
    if viewer is not None and viewer.role == Role.requester and read.verification_report:
        read.verification_report = redact_report(db_session, read.verification_report,
                                                 client_id=viewer.client_id)
    return read


def redact_report(db_session: Session, report: dict[str, Any], *, client_id: str
                  ) -> dict[str, Any]:
    """``report`` without other clients' request ids: per-sample rows and reasons naming a
    request are kept only for ``client_id``'s own requests."""
    per_sample = _mapping(report.get("per_sample"))
    rows = [r for r in per_sample.get("requests", []) if isinstance(r, dict)]
    named = {str(r.get("request_id")) for r in rows}
    named |= {str(reason).split(":", 1)[0].removeprefix("request ")
              for reason in report.get("reasons") or [] if str(reason).startswith("request ")}
    own = set(db_session.scalars(select(DeletionRequest.id).where(
        DeletionRequest.id.in_(named), DeletionRequest.client_id == client_id))) if named \
        else set()
    redacted = dict(report)
    if per_sample:
        redacted["per_sample"] = {**per_sample, "requests": [
            r for r in rows if r.get("request_id") in own]}
    redacted["reasons"] = [
        reason for reason in report.get("reasons") or []
        if not str(reason).startswith("request ")
        or str(reason).split(":", 1)[0].removeprefix("request ") in own]
    return redacted


def alias_target(db_session: Session, *, model: Model, alias: str = PRODUCTION
                 ) -> ModelVersion | None:
    return db_session.scalar(
        select(ModelVersion).join(ModelAlias, ModelAlias.version_id == ModelVersion.id)
        .where(ModelAlias.model_id == model.id, ModelAlias.alias == alias))


def check_weights(model: Model, staged: StagedArtifact) -> None:
    """Refuse anything that is not a safetensors file fitting the model's architecture."""
    try:
        engine_bridge.check_weights_file(staged.path, model.architecture)
    except ValueError as exc:
        raise Unprocessable(f"Weights rejected: {exc}") from None


def add_version(
    db_session: Session, *, model: Model, staged: StagedArtifact, store: ArtifactStore,
    actor: str, status: VersionStatus = VersionStatus.candidate,
    parent: ModelVersion | None = None, job_id: str | None = None,
    metrics: dict[str, Any] | None = None, verification_report: dict[str, Any] | None = None,
    commit: bool = True,
) -> ModelVersion:
    """Record a staged artifact as the model's next version; the file moves to its final name
    before the row exists, so a row never points at a missing or partial file."""
    # Serialise version numbering per model (a no-op on SQLite, where writers serialise).
    db_session.scalar(select(Model.id).where(Model.id == model.id).with_for_update())
    number = (db_session.scalar(
        select(func.max(ModelVersion.number)).where(ModelVersion.model_id == model.id)) or 0) + 1
    uri = version_uri(model.name, number, staged.sha256)
    store.commit(staged, uri=uri)
    version = ModelVersion(
        model_id=model.id, number=number, parent_id=parent.id if parent else None,
        artifact_uri=uri, sha256=staged.sha256, size_bytes=staged.size_bytes,
        status=status.value, metrics=metrics or {}, verification_report=verification_report,
        job_id=job_id,
    )
    db_session.add(version)
    db_session.flush()
    audit.record(db_session, actor=actor, action="model_version.created",
                 entity_type="model_version", entity_id=f"{model.name}/{number}",
                 details={"sha256": staged.sha256, "status": status.value, "job_id": job_id})
    if commit:
        db_session.commit()
    return version


def artifact_uris(db_session: Session) -> set[str]:
    """Every artifact URI a version row names, purged versions' included."""
    return set(db_session.scalars(select(ModelVersion.artifact_uri)
                                  .where(ModelVersion.artifact_uri.is_not(None))))


def erasure_floor(db_session: Session, *, model: Model) -> int:
    """The lowest version number that holds none of the data erased so far (0: no erasure)."""
    return db_session.scalar(
        select(func.max(ModelVersion.number))
        .join(DeletionTarget, DeletionTarget.version_id == ModelVersion.id)
        .where(DeletionTarget.model_id == model.id,
               DeletionTarget.status == TargetStatus.completed.value)) or 0


def set_alias(db_session: Session, *, model: Model, alias: str, number: int, actor: str,
              commit: bool = True) -> ModelVersion:
    """Point an alias at a version. Moving ``production`` publishes the version and supersedes
    the one it replaces. No alias may point at a version older than a completed erasure."""
    version = get_version(db_session, model=model, number=number)
    if VersionStatus(version.status) not in SERVABLE:
        raise Conflict(f"Version {number} is {version.status} and can never be served.")
    floor = erasure_floor(db_session, model=model)
    if number < floor:
        raise Conflict(
            f"Version {number} predates a completed erasure (published in version {floor}); "
            "it still holds erased data.", erasure_version=floor)
    current = db_session.get(ModelAlias, (model.id, alias))
    previous_id = current.version_id if current else None
    if current is None:
        db_session.add(ModelAlias(model_id=model.id, alias=alias, version_id=version.id))
    else:
        current.version_id = version.id
        current.updated_at = utcnow()
    if alias == PRODUCTION and previous_id != version.id:
        now = utcnow()
        version.status, version.published_at = VersionStatus.published.value, now
        previous = db_session.get(ModelVersion, previous_id) if previous_id else None
        if previous is not None:
            previous.status, previous.superseded_at = VersionStatus.superseded.value, now
    audit.record(db_session, actor=actor, action="model.alias_moved", entity_type="model",
                 entity_id=model.name, details={"alias": alias, "version": number,
                                                "previous_version_id": previous_id})
    if commit:
        db_session.commit()
    return version


def purgeable_versions(db_session: Session, *, model: Model) -> list[ModelVersion]:
    """Versions whose weights must go: superseded ones that predate a completed erasure and
    rejected candidates, once the policy's grace period has passed, or sooner, once a request
    whose data they hold is due: the grace period never outlasts a deadline."""
    now = utcnow()
    cutoff = now - timedelta(days=policy_of(model).grace_days)
    floor = erasure_floor(db_session, model=model)
    erasing = aliased(ModelVersion)
    # The earliest due date among the completed requests a version predates (it holds their
    # data); NULL where it predates none.
    held_due = (select(func.min(DeletionRequest.due_at))
                .join(DeletionTarget, DeletionTarget.request_id == DeletionRequest.id)
                .join(erasing, erasing.id == DeletionTarget.version_id)
                .where(DeletionTarget.model_id == model.id,
                       DeletionTarget.status == TargetStatus.completed.value,
                       erasing.number > ModelVersion.number)
                .correlate(ModelVersion).scalar_subquery())
    holds_erased = ModelVersion.number < floor
    superseded = (ModelVersion.status == VersionStatus.superseded.value) & holds_erased & (
        (ModelVersion.superseded_at <= cutoff) | (held_due <= now))
    rejected = (ModelVersion.status == VersionStatus.rejected.value) & (
        (ModelVersion.created_at <= cutoff) | (holds_erased & (held_due <= now)))
    return list(db_session.scalars(select(ModelVersion).where(
        ModelVersion.model_id == model.id, superseded | rejected).order_by(ModelVersion.number)))


def mark_purged(db_session: Session, *, model: Model, version: ModelVersion,
                actor: str = "system") -> None:
    previous = version.status
    version.status, version.purged_at = VersionStatus.purged.value, utcnow()
    audit.record(db_session, actor=actor, action="model_version.purged",
                 entity_type="model_version", entity_id=f"{model.name}/{version.number}",
                 details={"was": previous, "sha256": version.sha256})
    db_session.commit()


# ---- verification figures (the dashboard's model page, the metrics endpoint) ---------------

# The flat figures a version's verification report carries in its `summary` (the worker also
# stores that summary as the version's `metrics`).
SCORE_KEYS = ("passed", "n_forget", "method", "escalation_level", "mia_accuracy", "mia_auc",
              "mia_n", "indiscernibility", "base_mia_accuracy", "ks_p_value", "test_accuracy",
              "base_test_accuracy", "forget_accuracy", "retain_accuracy",
              "forget_class_accuracy", "attack_success_rate", "evidence", "outcome",
              "method_steps", "weights_changed", "per_sample_requests", "per_sample_flagged",
              "per_sample_flagged_before", "per_sample_not_testable", "per_sample_references")


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def version_scores(version: ModelVersion) -> dict[str, Any]:
    """A version's verification figures, every key of SCORE_KEYS present (None when unknown),
    plus `reasons` (why it failed, if it did). Reads `verification_report.summary`, then the
    version's `metrics`, then the report's nested sections (`mia.candidate`, `utility`)."""
    report = _mapping(version.verification_report)
    flat = {**_mapping(version.metrics), **_mapping(report.get("summary"))}
    mia = _mapping(report.get("mia"))
    mia = _mapping(mia.get("candidate")) or mia
    utility = _mapping(report.get("utility"))
    nested = {"passed": report.get("passed"), "mia_accuracy": mia.get("accuracy"),
              "mia_auc": mia.get("auc"), "mia_n": mia.get("n_members", mia.get("n")),
              "indiscernibility": mia.get("indiscernibility"),
              "test_accuracy": report.get("test_accuracy", utility.get("test_accuracy")),
              "base_test_accuracy": report.get("base_test_accuracy",
                                               utility.get("base_test_accuracy"))}
    scores: dict[str, Any] = {key: flat.get(key) for key in SCORE_KEYS}
    for key, value in nested.items():
        if scores.get(key) is None:
            scores[key] = value
    reasons = report.get("reasons")
    scores["reasons"] = [str(r) for r in reasons] if isinstance(reasons, list) else []
    return scores


def production_versions(db_session: Session) -> list[tuple[Model, ModelVersion]]:
    """Each model with the version its `production` alias points at (models without one are
    left out)."""
    rows = db_session.execute(
        select(Model, ModelVersion)
        .join(ModelAlias, ModelAlias.model_id == Model.id)
        .join(ModelVersion, ModelVersion.id == ModelAlias.version_id)
        .where(ModelAlias.alias == PRODUCTION).order_by(Model.name))
    return [(model, version) for model, version in rows]
