"""The Celery application. Job state lives in Lethe's database, not in a result backend:
Celery only delivers "run job X" and the periodic ticks (batch, sweep, webhooks, purge)."""

from __future__ import annotations

from celery import Celery

from app.core.config import Settings, get_settings
from app.observability.celery_context import install_celery_request_ids

MAINTENANCE_QUEUE = "lethe"


def make_celery(settings: Settings) -> Celery:
    app = Celery("lethe", broker=settings.resolved_broker_url, include=["worker.tasks"])
    install_celery_request_ids()  # a task logs under the request id of whoever sent it
    hard_limit = settings.job_time_limit_seconds
    app.conf.update(
        task_ignore_result=True,
        result_backend=None,
        # Delivery we can trust: a job's message is acknowledged only when the job is done,
        # requeued if its worker process dies, and a worker takes one job at a time.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=hard_limit,
        task_soft_time_limit=max(hard_limit - 60, 60),
        # Redis redelivers an unacknowledged message after the visibility timeout: keep it
        # above the hard limit so a long job is never delivered twice while still running.
        broker_transport_options={"visibility_timeout": hard_limit + 3600},
        broker_connection_retry_on_startup=True,
        task_default_queue=MAINTENANCE_QUEUE,
        task_routes={"lethe.run_job": {"queue": settings.job_queue}},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        beat_schedule={
            "batch": {"task": "lethe.batch", "schedule": settings.batch_interval_seconds},
            "sweep": {"task": "lethe.sweep", "schedule": settings.sweep_interval_seconds},
            "deliver-webhooks": {"task": "lethe.deliver_webhooks", "schedule": 5.0},
            "purge": {"task": "lethe.purge", "schedule": 60.0},
        },
        beat_schedule_filename=str(settings.resolved_data_dir / "celerybeat-schedule"),
    )
    return app


celery_app = make_celery(get_settings())
