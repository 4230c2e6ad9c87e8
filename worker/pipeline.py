"""One delivery of an unlearning job: claim -> load -> unlearn -> verify -> publish, with
escalation when verification fails. What each step does to the job and its requests (and
when to escalate) is in app/jobs/flows.py; the algorithms in unlearning/. This module moves
data between them and keeps the job's row live (progress, heartbeat) while it works."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from sqlalchemy.orm import Session

from app.datasets import service as datasets
from app.datasets.models import Dataset, Sample
from app.jobs import flows
from app.jobs import service as jobs
from app.jobs.models import JobOutcome, UnlearningJob
from app.models_registry.artifacts import StagedArtifact
from app.models_registry.models import Model, ModelVersion, Policy
from app.observability.request_id import request_id_context
from app.references import service as references
from app.requests import lifecycle
from app.requests import service as requests
from app.requests.models import DeletionRequest
from unlearning.architectures import build_model
from unlearning.loops import SampleSet
from unlearning.methods import METHODS, MethodConfig, get_method
from unlearning.methods.base import MethodReferences
from unlearning.runtime import resolve_device
from unlearning.scenarios import Scenario
from unlearning.training import Recipe
from unlearning.verification.report import (
    GateReferences,
    MethodRun,
    Thresholds,
    VerificationReport,
    build_verification_report,
    threshold_names,
)
from unlearning.weights import load_weights, save_weights, tensor_sha256
from worker.context import WorkerContext
from worker.shared import Heartbeat, load_readable

log = logging.getLogger(__name__)

PROGRESS_EVERY = 1.0  # seconds between progress writes to the job row
RETAIN_CHECK_SAMPLES = 5000  # retain samples the report measures accuracy on


class ArtifactCorrupted(RuntimeError):
    """The base version's weights do not match the sha256 recorded for them."""


@dataclass
class JobData:
    """The tensors one job works on, and which request each forgotten sample belongs to."""

    forget: SampleSet  # training samples the batch covers: what the model must forget
    retain: SampleSet  # training samples it keeps
    unseen: SampleSet  # the method's half of the holdout (docs/methods.md, "Data slices")
    audit: SampleSet  # the other half, that only the verifier attacks with
    test: SampleSet
    scenario: Scenario
    forgotten: dict[int, str]  # every covered sample (any split) -> its request
    forget_ids: list[int]  # sample ids of `forget`, in order
    audit_ids: list[int]  # sample ids of `audit`, in order
    unseen_ids: list[int]  # sample ids of `unseen`, in order
    # requests that need a sample the store cannot serve -> why; they fail, the rest go on
    failed_requests: dict[str, str] = field(default_factory=dict)
    unreadable: int = 0  # retain, holdout and test samples left out as unreadable

    @property
    def forget_requests(self) -> list[str]:
        """The request each forget sample belongs to, in `forget`'s order."""
        return [self.forgotten[sample_id] for sample_id in self.forget_ids]


def run(ctx: WorkerContext, job_id: str, *, task_id: str | None = None) -> JobOutcome:
    """Run one delivery of a job; returns what happened: `skipped`, `published`,
    `unchanged`, `failed`, `requeued` or `superseded` (the job was taken from this delivery
    while it ran, so it wrote nothing more)."""
    with ctx.session() as db_session:
        job = flows.start(db_session, job_id=job_id, worker_host=ctx.hostname, task_id=task_id,
                          heartbeat_timeout=ctx.settings.heartbeat_timeout_seconds)
    if job is None:
        return JobOutcome.skipped
    attempt = job.attempt  # the fencing token: every write below carries it
    log.info("job %s: delivery %d on %s", job_id, attempt, ctx.hostname)
    log_per_request(ctx, job_id, "taken up by job %s (delivery %d)", job_id, attempt)
    with Heartbeat(ctx, f"job {job_id}", lambda db_session: flows.heartbeat(
            db_session, job_id=job_id, attempt=attempt), every=ctx.settings.heartbeat_seconds):
        outcome = _deliver(ctx, job_id, attempt)
    log_per_request(ctx, job_id, "job %s ended: %s", job_id, outcome)
    return outcome


def _deliver(ctx: WorkerContext, job_id: str, attempt: int) -> JobOutcome:
    try:
        try:
            return _execute(ctx, job_id, attempt)
        except flows.StaleAttempt:
            raise
        except flows.PublishConflict as conflict:  # the base changed: run again on the new one
            with ctx.session() as db_session:
                flows.requeue(db_session, job_id=job_id, attempt=attempt, reason=str(conflict))
            return JobOutcome.requeued
        except Exception as error:  # the job fails with the reason; an operator may retry
            log.exception("job %s failed", job_id)
            with ctx.session() as db_session:
                flows.abandon(db_session, job_id=job_id, attempt=attempt,
                              reason=f"{type(error).__name__}: {error}")
            return JobOutcome.failed
    except flows.StaleAttempt as stale:
        # Fenced: the sweeper gave the job to another delivery while this worker was out of
        # reach (or it ended). Nothing of this delivery's is recorded; it just stops.
        log.warning("job %s: delivery %d stops without writing: %s", job_id, attempt, stale)
        return JobOutcome.superseded


def log_per_request(ctx: WorkerContext, job_id: str, message: str, *args: object) -> None:
    """One log line per request the job carries, under the request id it arrived with, so
    searching the logs for that id finds its intake in the API and its job here."""
    with ctx.session() as db_session:
        traces = jobs.request_traces(db_session, job_id)
    for request_id, trace in traces:
        with request_id_context(trace):
            log.info("deletion request %s: " + message, request_id, *args)


def _execute(ctx: WorkerContext, job_id: str, attempt: int) -> JobOutcome:
    with ctx.session() as db_session:
        job, model, base, dataset = _rows(db_session, job_id)
        policy = Policy.model_validate(model.policy)
        data = load_job_data(db_session, ctx, job, dataset)
        if data.failed_requests and not flows.fail_requests(
                db_session, job_id=job_id, attempt=attempt,
                request_reasons=data.failed_requests):
            return JobOutcome.failed  # none of its requests could be served
        base_path = ctx.artifacts.path_of(base.artifact_uri or "")
        if ctx.artifacts.sha256_of(base.artifact_uri or "") != base.sha256:
            raise ArtifactCorrupted(f"{model.name} v{base.number}: sha256 mismatch")
        architecture, base_sha = model.architecture, base.sha256
        level, scenario_key = job.escalation_level, scenario_for(job).label()
        gate_references, method_references = load_references(db_session, model, data)
    if len(data.forget) == 0:
        nothing = VerificationReport(scenario=data.scenario.to_dict(), n_forget=0, passed=True,
                                     per_sample_note="no training sample of the model is "
                                                     "covered: nothing to unlearn or test")
        with ctx.session() as db_session:
            flows.complete_unchanged(db_session, job_id=job_id, attempt=attempt,
                                     signer=ctx.signer, forgotten=data.forgotten,
                                     report=nothing.to_dict())
        return JobOutcome.unchanged
    base_model = load_weights(build_model(architecture), base_path)
    parent_tensors = tensor_sha256(base_model)
    device = resolve_device(ctx.settings.device)
    seed = int(hashlib.sha256(job_id.encode()).hexdigest()[:8], 16)
    while True:
        method_name, config = method_for(policy, level)
        progress = ProgressWriter(ctx, job_id, attempt, prefix=f"{method_name}: ")
        result = get_method(method_name).unlearn(
            base_model, retain=data.retain, forget=data.forget, unseen=data.unseen,
            original_recipe=Recipe(**policy.training_recipe), scenario=data.scenario,
            references=method_references,
            min_steps=0 if policy.publish_unchanged else policy.min_steps,
            config=config, device=device, seed=seed, progress=progress,
            cancel=CancelCheck(ctx, job_id))
        with ctx.session() as db_session:
            flows.verifying(db_session, job_id=job_id, attempt=attempt)
        retain_check = data.retain.sample(RETAIN_CHECK_SAMPLES, torch.Generator().manual_seed(seed))
        report = build_verification_report(
            result.model, base_model, forget=data.forget, audit=data.audit, test=data.test,
            scenario=data.scenario, device=device, retain=retain_check,
            references=gate_references, alpha=policy.verification.alpha, seed=seed)
        report.record(run=MethodRun(method=method_name, escalation_level=level,
                                    steps=result.steps, seconds=result.seconds,
                                    parent_tensor_sha256=parent_tensors,
                                    tensor_sha256=tensor_sha256(result.model),
                                    details=_jsonable(result.details)),
                      thresholds=thresholds_for(policy))
        if report.passed and policy.publish_unchanged and report.run is not None \
                and not report.run.weights_changed:
            # the policy lets an already-indistinguishable batch keep the served version
            with ctx.session() as db_session:
                flows.complete_unchanged(db_session, job_id=job_id, attempt=attempt,
                                         signer=ctx.signer, forgotten=data.forgotten,
                                         report=report.to_dict())
            return JobOutcome.unchanged
        staged = _stage(ctx, result.model, {"lethe.job": job_id, "lethe.parent": base_sha,
                                            "lethe.scenario": scenario_key})
        stored = report.to_dict()
        if report.passed:
            with ctx.session() as db_session, _discarded_if_refused(ctx, staged):
                version = flows.candidate_passed(
                    db_session, job_id=job_id, attempt=attempt, staged=staged,
                    store=ctx.artifacts, signer=ctx.signer, report=stored,
                    metrics=stored["summary"], forgotten=data.forgotten)
            log.info("job %s: published version %d", job_id, version.number)
            return JobOutcome.published
        with ctx.session() as db_session, _discarded_if_refused(ctx, staged):
            next_level = flows.candidate_failed(
                db_session, job_id=job_id, attempt=attempt, staged=staged,
                store=ctx.artifacts, report=stored, metrics=stored["summary"],
                escalation=policy.escalation,
                reason="verification failed: " + "; ".join(report.reasons),
                request_reasons={request_id: "verification failed: "
                                 + "; ".join(report.reasons_for(request_id))
                                 for request_id in set(data.forgotten.values())})
        if next_level is None:
            return JobOutcome.failed
        level = next_level


@contextmanager
def _discarded_if_refused(ctx: WorkerContext, staged: StagedArtifact) -> Iterator[None]:
    """A candidate the job's flows refuse to record (this delivery was superseded, or the
    base version changed) is nobody's: its staged weights are deleted at once."""
    try:
        yield
    except flows.PublishConflict:
        ctx.artifacts.discard(staged)
        raise


def _job(db_session: Session, job_id: str) -> UnlearningJob:
    job = db_session.get(UnlearningJob, job_id)
    assert job is not None
    return job


def _rows(db_session: Session, job_id: str
          ) -> tuple[UnlearningJob, Model, ModelVersion, Dataset]:
    job = _job(db_session, job_id)
    model = db_session.get(Model, job.model_id)
    base = db_session.get(ModelVersion, job.base_version_id)
    assert model is not None and base is not None
    dataset = db_session.get(Dataset, model.dataset_id)
    assert dataset is not None
    return job, model, base, dataset


def load_references(db_session: Session, model: Model, data: JobData
                    ) -> tuple[GateReferences | None, MethodReferences | None]:
    """The model's ready reference set, split as the engine splits it: the gate half for the
    job's forget and audit samples (the verifier's), the method half for its forget and
    unseen samples (what a method such as `match` may read). (None, None) when it has none:
    the report then says `population-only`."""
    reference_set = references.ready_set(db_session, model_id=model.id)
    if reference_set is None or not data.forget_ids:
        return None, None
    forget_out, audit_out = references.gate_statistics(
        db_session, reference_set=reference_set, forget_ids=data.forget_ids,
        holdout_ids=data.audit_ids)
    method_forget, method_unseen = references.method_statistics(
        db_session, reference_set=reference_set, forget_ids=data.forget_ids,
        unseen_ids=data.unseen_ids)
    return (GateReferences(forget_out, audit_out, data.forget_requests,
                           reference_set=reference_set.id),
            MethodReferences(forget=method_forget, unseen=method_unseen))


def method_for(policy: Policy, level: int) -> tuple[str, MethodConfig]:
    """Level 0: the policy's method and settings; 1: the same, stronger; 2: exact retrain."""
    if level >= 2:
        return "retrain", METHODS["retrain"].Config()
    config = METHODS[policy.method].Config(**policy.method_config)
    return policy.method, config.stronger() if level == 1 else config


def thresholds_for(policy: Policy) -> Thresholds:
    """The policy's verification settings that are thresholds; the names are shared."""
    settings = policy.verification.model_dump()
    return Thresholds(**{name: settings[name] for name in threshold_names() if name in settings})


def load_job_data(db_session: Session, ctx: WorkerContext, job: UnlearningJob,
                  dataset: Dataset) -> JobData:
    """Resolve the batch's forget set (union of its requests, de-duplicated, already
    forgotten samples skipped), the retain set and two disjoint unseen slices.

    A sample the store can no longer serve (its file lost or damaged since upload) fails only
    the requests that need it, named in ``failed_requests`` with the reason; their samples go
    back to the retain set. An unreadable retain, holdout or test sample is left out."""
    wanted: dict[str, list[Sample]] = {}  # request -> the samples it covers
    for target in lifecycle.targets_of(db_session, job_id=job.id):
        if target.status not in ("processing", "verifying"):
            continue
        request = db_session.get(DeletionRequest, target.request_id)
        assert request is not None
        wanted[request.id] = requests.samples_covered(db_session, request=request,
                                                      dataset_id=dataset.id)
    root = ctx.settings.resolved_dataset_dir / dataset.store
    candidates = list({s.id: s for samples in wanted.values() for s in samples
                       if s.split == "train"}.values())
    readable = load_readable(root, candidates)
    failed_requests = {
        request_id: "; ".join(f"sample {s.sample_key!r} cannot be read: {readable.broken[s.id]}"
                              for s in samples if s.id in readable.broken)
        for request_id, samples in wanted.items()
        if any(s.id in readable.broken for s in samples)}
    forgotten: dict[int, str] = {}
    covered: set[int] = set()
    for request_id, samples in wanted.items():
        if request_id in failed_requests:
            continue
        for sample in samples:
            forgotten.setdefault(sample.id, request_id)
            covered.add(sample.id)
    unreadable = 0

    def held(split: str) -> tuple[SampleSet, list[Sample]]:
        nonlocal unreadable
        loaded = load_readable(root, [
            s for s in datasets.held_samples(db_session, dataset_id=dataset.id, split=split)
            if s.id not in covered])
        if loaded.broken:
            unreadable += len(loaded.broken)
            log.warning("job %s: %d %s samples cannot be read and are left out (first: %s)",
                        job.id, len(loaded.broken), split, next(iter(loaded.broken.values())))
        return loaded.samples, loaded.kept

    positions = [i for i, s in enumerate(readable.kept) if s.id in covered]
    forget_rows = [readable.kept[i] for i in positions]
    forget = readable.samples.subset(torch.tensor(positions, dtype=torch.long))
    holdout, holdout_rows = held("holdout")
    generator = torch.Generator().manual_seed(int(hashlib.sha256(job.id.encode()).hexdigest()[:8],
                                                  16))
    order = torch.randperm(len(holdout), generator=generator)
    half = len(holdout) // 2
    return JobData(
        forget=forget, retain=held("train")[0],
        unseen=holdout.subset(order[:half]), audit=holdout.subset(order[half:]),
        test=held("test")[0], scenario=scenario_for(job),
        forgotten=forgotten, forget_ids=[s.id for s in forget_rows],
        audit_ids=[holdout_rows[i].id for i in order[half:].tolist()],
        unseen_ids=[holdout_rows[i].id for i in order[:half].tolist()],
        failed_requests=failed_requests, unreadable=unreadable)


def scenario_for(job: UnlearningJob) -> Scenario:
    """The job's scenario, as intake stored it with its targets (Scenario.to_dict()): a
    backdoor's trigger and poisoned label are its own requests', never guessed here."""
    return Scenario.from_dict(job.scenario)


def _stage(ctx: WorkerContext, model: torch.nn.Module, metadata: dict[str, str]
           ) -> Any:
    path = ctx.artifacts.new_staging_path()
    save_weights(model, path, metadata=metadata)
    return ctx.artifacts.stage_file(path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


class ProgressWriter:
    """The method's progress callback: writes phase, step and metrics to the job row at most
    once a second (which also counts as a heartbeat), as the delivery that claimed
    ``attempt``; raises `StaleAttempt` into the method once the job is no longer its."""

    def __init__(self, ctx: WorkerContext, job_id: str, attempt: int, *, prefix: str = ""
                 ) -> None:
        self.ctx, self.job_id, self.attempt, self.prefix = ctx, job_id, attempt, prefix
        self._last = 0.0

    def __call__(self, phase: str, step: int, total: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        if now - self._last < PROGRESS_EVERY and step < total:
            return
        self._last = now
        with self.ctx.session() as db_session:
            written = flows.report_progress(
                db_session, job_id=self.job_id, attempt=self.attempt,
                phase=self.prefix + phase, step=step, total=total, metrics=_jsonable(metrics))
        if not written:  # the job was taken from this delivery: stop computing for nothing
            raise flows.StaleAttempt(self.job_id, self.attempt,
                                     now="its progress write matched no running delivery")


class CancelCheck:
    """Polled by the method every step; asks the database at most every few seconds."""

    def __init__(self, ctx: WorkerContext, job_id: str, every: float = 5.0) -> None:
        self.ctx, self.job_id, self.every = ctx, job_id, every
        self._checked, self._canceled = 0.0, False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self._canceled and now - self._checked >= self.every:
            self._checked = now
            with self.ctx.session() as db_session:
                self._canceled = jobs.is_canceled(db_session, job_id=self.job_id)
        return self._canceled
