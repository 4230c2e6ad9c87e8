"""Carry the request id from whoever sends a Celery task into the task's logs.

``install_celery_request_ids()`` connects three Celery signals once per process (API, worker
and beat alike): a task published while a request id is bound carries it in the
``x_request_id`` message header; the worker binds it around the task, so every log line the
task writes names it. A task sent with no id bound (a beat tick) runs under its own task id."""

from __future__ import annotations

from contextvars import Token
from typing import Any

from celery import signals

from app.observability.logs import configure_logging
from app.observability.request_id import (
    CELERY_HEADER,
    accept_request_id,
    get_request_id,
    request_id_var,
)

_tokens: dict[str, Token[str | None]] = {}


def celery_headers() -> dict[str, str]:
    """Headers to pass explicitly (``apply_async(headers=...)``); the publish hook adds them
    anyway, this is for senders that build messages themselves."""
    request_id = get_request_id()
    return {CELERY_HEADER: request_id} if request_id else {}


def _stamp(headers: dict[str, Any] | None = None, **_: Any) -> None:
    request_id = get_request_id()
    if headers is not None and request_id and not headers.get(CELERY_HEADER):
        headers[CELERY_HEADER] = request_id


def task_request_id(task: Any, task_id: str | None = None) -> str:
    """The id a running task logs under: its message's header, else its own task id."""
    request = getattr(task, "request", None)
    carried = getattr(request, CELERY_HEADER, None)
    if carried is None:
        carried = (getattr(request, "headers", None) or {}).get(CELERY_HEADER)
    return accept_request_id(carried or task_id or getattr(request, "id", None))


def _bind(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task_id is not None:
        _tokens[task_id] = request_id_var.set(task_request_id(task, task_id))


def _unbind(task_id: str | None = None, **_: Any) -> None:
    token = _tokens.pop(task_id, None) if task_id is not None else None
    if token is not None:
        request_id_var.reset(token)


def install_celery_request_ids() -> None:
    """Idempotent (dispatch_uid): calling it from several import paths connects once."""
    signals.before_task_publish.connect(_stamp, weak=False, dispatch_uid="lethe.request_id.stamp")
    signals.task_prerun.connect(_bind, weak=False, dispatch_uid="lethe.request_id.bind")
    signals.task_postrun.connect(_unbind, weak=False, dispatch_uid="lethe.request_id.unbind")


def install_celery_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Celery configures no logging of its own once a receiver answers `setup_logging`: ours
    routes the worker's and beat's loggers (Celery's included) through the JSON handler, and
    prefork children inherit it."""

    def setup(**_: Any) -> None:
        configure_logging(level, fmt)

    signals.setup_logging.connect(setup, weak=False, dispatch_uid="lethe.logging")
