"""Prometheus metrics at ``/metrics``, correct behind any number of uvicorn workers.

Two kinds of figure, each gathered the way that stays correct with several processes:

* **State, read from the database at scrape time** (:class:`DatabaseCollector`): requests by
  status, overdue and due-soon requests, queue depth, jobs by status, finished jobs and their
  durations, the production version's verification scores, reference sets (by status, the
  newest set's progress and the ready set's cost, models left waiting). The database is the
  one source of truth every API worker and every worker host shares, so any process answering
  the scrape gives the same, exact answer, and the worker needs to report nothing for these.
* **Events only a process sees** (HTTP requests, predict latency): prometheus-client
  counters and histograms. With several uvicorn workers each is a separate process, so
  ``lethe serve --workers N`` sets ``PROMETHEUS_MULTIPROC_DIR`` and the scrape merges every
  worker's files (prometheus-client's multiprocess mode); with one process they live in memory.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from datetime import timedelta
from enum import StrEnum

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from app.core.db import utcnow
from app.jobs import service as jobs
from app.jobs.models import ACTIVE_JOB_STATUSES
from app.models_registry import service as registry
from app.observability.multiprocess import MULTIPROC_ENV
from app.references import service as references
from app.references.models import ReferenceStatus
from app.requests import metrics as requests

log = logging.getLogger(__name__)

DUE_SOON = timedelta(days=5)  # the dashboard's red band
JOB_DURATION_BUCKETS = (30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
                        14400.0, 28800.0)
# Verification figures exported per model, from the production version's report.
SCORE_GAUGES = {
    "mia_accuracy": "Membership-inference attack accuracy on forgotten vs. unseen data "
                    "(0.5: cannot tell them apart).",
    "mia_auc": "Membership-inference attack AUC on forgotten vs. unseen data.",
    "indiscernibility": "1 - |MIA accuracy - 0.5| / 0.5.",
    "test_accuracy": "Test accuracy.",
    "base_test_accuracy": "Test accuracy of the version it was derived from.",
}

# ---- process-local events ------------------------------------------------------------------

PROCESS_REGISTRY = CollectorRegistry(auto_describe=True)
HTTP_REQUESTS = Counter(
    "lethe_http_requests_total", "HTTP requests answered.", ["method", "route", "status"],
    registry=PROCESS_REGISTRY)
HTTP_DURATION = Histogram(
    "lethe_http_request_duration_seconds", "Time to answer an HTTP request.",
    ["method", "route"], registry=PROCESS_REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
PREDICT_LATENCY = Histogram(
    "lethe_predict_latency_seconds", "Time to answer a predict call, model inference included.",
    ["model", "outcome"], registry=PROCESS_REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
PREDICT_SAMPLES = Counter(
    "lethe_predict_samples_total", "Inputs classified by predict calls.", ["model"],
    registry=PROCESS_REGISTRY)


def observe_http(method: str, route: str, status: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(method, route, str(status)).inc()
    HTTP_DURATION.labels(method, route).observe(seconds)


def observe_predict(model: str, seconds: float, *, samples: int = 1, outcome: str = "ok"
                    ) -> None:
    """Record one predict call (the serving route calls this): its latency, and how many
    inputs it classified. ``outcome``: ``ok``, or a short error class such as ``invalid``."""
    PREDICT_LATENCY.labels(model, outcome).observe(seconds)
    if outcome == "ok":
        PREDICT_SAMPLES.labels(model).inc(samples)


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


# ---- state read from the database at scrape time ------------------------------------------


def _histogram(durations: Iterable[float]) -> tuple[list[tuple[str, float]], float]:
    values = sorted(durations)
    buckets, total, index = [], math.fsum(values), 0
    for bound in JOB_DURATION_BUCKETS:
        while index < len(values) and values[index] <= bound:
            index += 1
        buckets.append((str(bound), float(index)))
    buckets.append(("+Inf", float(len(values))))
    return buckets, total


def _by_status(name: str, documentation: str, counts: dict[str, int],
               statuses: Iterable[StrEnum]) -> GaugeMetricFamily:
    """A gauge with one sample per status, 0 where none is counted."""
    gauge = GaugeMetricFamily(name, documentation, labels=["status"])
    for status in statuses:
        gauge.add_metric([status.value], counts.get(status.value, 0))
    return gauge


class DatabaseCollector(Collector):
    """Reads the domain's state in one short session per scrape."""

    def __init__(self, sessionmaker: sessionmaker[Session]) -> None:
        self.sessionmaker = sessionmaker

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        up = GaugeMetricFamily("lethe_metrics_database_up",
                               "1 when the scrape could read the database.")
        try:
            with self.sessionmaker() as db_session:
                families = list(self._families(db_session))
        except Exception:  # a scrape must still answer (and say so) when the database is down
            log.warning("metrics: database unavailable", exc_info=True)
            families = []
            up.add_metric([], 0.0)
        else:
            up.add_metric([], 1.0)
        yield from families
        yield up
        elapsed = GaugeMetricFamily("lethe_metrics_database_scrape_seconds",
                                    "Time the scrape spent reading the database.")
        elapsed.add_metric([], time.perf_counter() - started)
        yield elapsed

    def _families(self, db_session: Session) -> Iterator[Metric]:
        now = utcnow()
        by_status = requests.count_by_status(db_session)
        family = GaugeMetricFamily("lethe_deletion_requests",
                                   "Deletion requests by status.", labels=["status"])
        for status, count in sorted(by_status.items()):
            family.add_metric([status], count)
        yield family
        received = CounterMetricFamily("lethe_deletion_requests_received",
                                       "Deletion requests recorded, ever.")
        received.add_metric([], sum(by_status.values()))
        yield received

        overdue, due_soon = requests.deadline_counts(db_session, now=now, soon=DUE_SOON)
        yield GaugeMetricFamily("lethe_deletion_requests_overdue",
                                "Open deletion requests past their legal due date.",
                                value=overdue)
        yield GaugeMetricFamily("lethe_deletion_requests_due_soon",
                                f"Open deletion requests due within {DUE_SOON.days} days.",
                                value=due_soon)

        depth = GaugeMetricFamily("lethe_queue_depth",
                                  "Deletion targets queued and waiting for a batch, per model.",
                                  labels=["model"])
        for model, count in sorted(requests.queued_targets_per_model(db_session).items()):
            depth.add_metric([model], count)
        yield depth

        yield _by_status("lethe_jobs_active", "Unfinished unlearning jobs by status.",
                         jobs.count_by_status(db_session), ACTIVE_JOB_STATUSES)

        finished: dict[tuple[str, str], list[float]] = defaultdict(list)
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for model, status, seconds in jobs.finished_durations(db_session):
            counts[(model, status)] += 1
            if seconds is not None:
                finished[(model, status)].append(seconds)
        outcome = CounterMetricFamily("lethe_jobs_finished",
                                      "Finished unlearning jobs by model and outcome.",
                                      labels=["model", "status"])
        duration = HistogramMetricFamily(
            "lethe_job_duration_seconds",
            "Unlearning job time from start to finish, by model and outcome.",
            labels=["model", "status"])
        for key in sorted(counts):
            outcome.add_metric(list(key), counts[key])
            buckets, total = _histogram(finished.get(key, []))
            duration.add_metric(list(key), buckets, total)
        yield outcome
        yield duration

        version_gauge = GaugeMetricFamily("lethe_model_production_version",
                                          "The version number the production alias points at.",
                                          labels=["model"])
        passed = GaugeMetricFamily("lethe_model_verification_passed",
                                   "1 when the production version passed verification.",
                                   labels=["model"])
        scores = {key: GaugeMetricFamily(f"lethe_model_{key}", help_text, labels=["model"])
                  for key, help_text in SCORE_GAUGES.items()}
        for registered, version in registry.production_versions(db_session):
            name = registered.name
            version_gauge.add_metric([name], version.number)
            figures = registry.version_scores(version)
            if isinstance(figures.get("passed"), bool):
                passed.add_metric([name], 1.0 if figures["passed"] else 0.0)
            for figure, gauge in scores.items():
                reading = figures.get(figure)
                if isinstance(reading, int | float) and not isinstance(reading, bool):
                    gauge.add_metric([name], float(reading))
        yield version_gauge
        yield passed
        yield from scores.values()
        yield from self._references(db_session)

    def _references(self, db_session: Session) -> Iterator[Metric]:
        yield _by_status("lethe_reference_sets", "Reference sets by status.",
                         references.count_by_status(db_session), list(ReferenceStatus))
        completed = GaugeMetricFamily(
            "lethe_reference_models_completed",
            "Reference models trained and measured in the model's newest reference set.",
            labels=["model"])
        cost = GaugeMetricFamily(
            "lethe_reference_seconds",
            "Wall seconds of the reference models of the model's newest ready reference set.",
            labels=["model"])
        models = registry.list_all(db_session)
        for model in models:
            newest = references.list_sets(db_session, model_id=model.id, limit=1)
            if newest:
                completed.add_metric([model.name], newest[0].completed)
            ready = references.ready_set(db_session, model_id=model.id)
            if ready is not None:
                cost.add_metric([model.name], math.fsum(ready.reference_seconds or []))
        yield completed
        yield cost
        yield GaugeMetricFamily(
            "lethe_models_without_references",
            "Models whose policy requires reference statistics and that have no ready "
            "reference set: their deletion requests wait.",
            value=len(references.models_waiting(db_session, [m.id for m in models])))


class _ProcessMetrics(Collector):
    """This process's own metrics, or every worker's merged in multiprocess mode."""

    def collect(self) -> Iterator[Metric]:
        if multiprocess_enabled():
            merged = CollectorRegistry()
            prometheus_multiprocess.MultiProcessCollector(merged)
            yield from merged.collect()
        else:
            yield from PROCESS_REGISTRY.collect()


def render(sessionmaker: sessionmaker[Session]) -> bytes:
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(_ProcessMetrics())
    scrape.register(DatabaseCollector(sessionmaker))
    return generate_latest(scrape)


router = APIRouter(tags=["health"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request) -> Response:
    return Response(render(request.app.state.sessionmaker), media_type=CONTENT_TYPE_LATEST)
