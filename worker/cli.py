"""The `lethe` command. Assembled here, in the top layer, from each layer's own commands,
plus the process commands of the worker layer: `worker`, `beat`, `broker`, `up`, `demo`."""

from __future__ import annotations

import signal
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from app.cli import COMMANDS as APP_COMMANDS
from app.cli import ensure_schema
from app.core.config import get_settings
from unlearning.cli import data as data_commands
from unlearning.cli import lab as lab_commands
from worker.processes import embedded_broker_if_needed, start_services, stop_services, supervise

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Lethe: right-to-be-forgotten requests honoured against deployed models."""


for command in (*APP_COMMANDS, data_commands, lab_commands):
    main.add_command(command)


@main.command()
@click.option("--queues", default=None,
              help="Comma-separated queues (default: the job queue and the maintenance queue).")
@click.option("--concurrency", default=1, show_default=True,
              help="Jobs at once; keep 1 per GPU.")
@click.option("--loglevel", default="info", show_default=True)
def worker(queues: str | None, concurrency: int, loglevel: str) -> None:
    """Run a Celery worker (unlearning jobs and maintenance tasks)."""
    from app.observability.celery_context import install_celery_logging
    from worker.celery_app import MAINTENANCE_QUEUE, celery_app

    settings = get_settings()
    install_celery_logging(settings.log_level, settings.log_format)
    queues = queues or f"{settings.job_queue},{MAINTENANCE_QUEUE}"
    with embedded_broker_if_needed():
        # prefork: the parent only imports modules; each job runs in a child process, so the
        # parent never initialises CUDA before forking.
        celery_app.worker_main(["worker", f"--loglevel={loglevel}", "-Q", queues,
                                f"--concurrency={concurrency}", "--pool=prefork",
                                "--without-gossip", "--without-mingle"])


@main.command()
@click.option("--loglevel", default="info", show_default=True)
def beat(loglevel: str) -> None:
    """Run the scheduler: batching, sweeping, webhook delivery, purging (run exactly one)."""
    from app.observability.celery_context import install_celery_logging
    from worker.celery_app import celery_app

    settings = get_settings()
    install_celery_logging(settings.log_level, settings.log_format)
    with embedded_broker_if_needed():
        celery_app.start(["beat", f"--loglevel={loglevel}"])


class StopSignal(Exception):
    """SIGTERM or SIGINT arrived: unwind, so `finally` blocks stop what was started."""


def _raise_stop(signum: int, _frame: object) -> None:
    raise StopSignal(signal.Signals(signum).name)


@main.command()
def broker() -> None:
    """Run the embedded broker in the foreground (the embedded default's Redis)."""
    from worker.embedded_broker import EmbeddedBroker

    settings = get_settings()
    embedded = EmbeddedBroker(settings.embedded_broker_socket)
    # The server runs in its own session (a terminal's Ctrl-C does not reach it) and would
    # outlive us: SIGTERM's default action ends this process without a word to it. The
    # handlers go in before the start, so a signal at any point still reaches `finally`.
    previous = {signum: signal.signal(signum, _raise_stop)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        if not embedded.start():
            raise click.ClickException(f"a broker already answers at {embedded.url}")
        click.echo(f"embedded broker at {embedded.url}; Ctrl-C or SIGTERM stops it")
        while True:
            signal.pause()
    except StopSignal:
        pass
    finally:
        for signum in previous:  # a second signal must not cut the stop short
            signal.signal(signum, signal.SIG_IGN)
        if embedded.process is not None:  # ours: terminate, wait, kill after the timeout
            embedded.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
def up(host: str, port: int) -> None:
    """API, worker, beat and (on the embedded default) the broker, together."""
    settings = get_settings()
    ensure_schema(settings.resolved_database_url)
    with embedded_broker_if_needed():
        processes = start_services(host, port)
        click.echo(f"Lethe is up: http://{host}:{port}/docs  (Ctrl-C stops everything)")
        try:
            exit_code = supervise(processes)
        finally:
            stop_services(processes)
    raise SystemExit(exit_code)


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path(".lethe/demo"),
              show_default=True, help="Recreated on each run (the trained original is kept "
              "beside it in demo-world/).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--subjects", default=12, show_default=True,
              help="How many data subjects ask to be forgotten.")
@click.option("--seed", type=int, default=None,
              help="Seed for choosing the subjects at random (default: a fresh draw).")
def demo(data_dir: Path, port: int, subjects: int, seed: int | None) -> None:
    """Request -> references -> unlearn -> verify -> publish -> certificate, on real data,
    narrated."""
    from worker.demo import run_demo

    raise SystemExit(run_demo(data_dir, port=port, subjects=subjects, seed=seed))


@main.group()
def references() -> None:
    """Reference statistics for per-sample verification."""


def _session() -> AbstractContextManager[Session]:
    from app.core.db import make_engine, make_sessionmaker, session_scope

    settings = get_settings()
    ensure_schema(settings.resolved_database_url)
    return session_scope(make_sessionmaker(make_engine(settings.resolved_database_url)))


@references.command("build")
@click.argument("model")
@click.option("--references", "k", type=int, default=None,
              help="Reference models (a multiple of 4 from 8 to 16); default: the policy's.")
@click.option("--now", is_flag=True,
              help="Train here, in this process, instead of queueing for a worker.")
def references_build(model: str, k: int | None, now: bool) -> None:
    """Queue (or with --now, run) a reference job for MODEL."""
    from app.core.errors import Problem
    from app.models_registry import service as registry
    from app.references import service

    with _session() as db_session:
        try:
            reference_set, created = service.request_build(
                db_session, model=registry.get(db_session, name=model), actor="cli",
                references=k)
        except Problem as problem:
            raise click.ClickException(problem.detail) from None
        set_id, size = reference_set.id, reference_set.n_references
    click.echo(f"reference set {set_id} ({size} models) "
               f"{'queued' if created else 'already queued or running'}")
    if now:
        from worker import context
        from worker.references import build

        outcome = build(context.current(), set_id)
        click.echo(f"reference set {set_id}: {outcome}")
        raise SystemExit(0 if outcome in ("ready", "skipped") else 1)


@references.command("status")
@click.argument("model")
def references_status(model: str) -> None:
    """MODEL's reference sets, newest first: state, progress and cost."""
    from app.core.errors import Problem
    from app.models_registry import service as registry
    from app.references import service

    with _session() as db_session:
        try:
            found = registry.get(db_session, name=model)
        except Problem as problem:
            raise click.ClickException(problem.detail) from None
        rows = service.to_read(db_session, service.list_sets(db_session, model_id=found.id))
    if not rows:
        click.echo(f"{model}: no reference sets")
    for row in rows:
        click.echo(f"set {row.id}: {row.status.value}, {row.completed}/{row.references} models, "
                   f"{row.statistics} statistics, {row.cost_seconds:.1f} s"
                   + (f", {row.phase}" if row.phase and row.status.value == "running" else "")
                   + (f", failed: {row.failure_reason}" if row.failure_reason else ""))


if __name__ == "__main__":  # after every command is defined
    main()
