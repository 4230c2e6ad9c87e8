"""JSON log lines, each naming the request id bound when it was written.

``configure_logging`` sets up the root logger for a process (the API under uvicorn, a Celery
worker or beat); ``uvicorn_log_config`` is the same set-up as a dictConfig for uvicorn, which
applies it in every worker process it spawns."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import Any

from app.observability.request_id import get_request_id

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "request_id", "taskName"}


class RequestIdFilter(logging.Filter):
    """Stamps each record with the request id of the context that wrote it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = get_request_id()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, then any extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or get_request_id(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if record.stack_info:
            entry["stack_info"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def make_handler(fmt: str = "json", stream: Any = None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.set_name("lethe")
    return handler


def configure_logging(level: str = "INFO", fmt: str = "json", stream: Any = None) -> None:
    """Route every logger through one handler on the root logger (idempotent: a second call
    replaces the handler it installed instead of adding another)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == "lethe":
            root.removeHandler(handler)
    root.addHandler(make_handler(fmt, stream))
    root.setLevel(level.upper())
    # uvicorn's and celery's own loggers propagate to the root, so they log as JSON too.
    for name in ("uvicorn", "uvicorn.error", "celery"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def uvicorn_log_config(level: str = "INFO", fmt: str = "json") -> dict[str, Any]:
    """A dictConfig for ``uvicorn.run(log_config=...)``. uvicorn's access log is left off: the
    observability middleware writes one access line per request, with its id and duration."""
    formatter: dict[str, Any] = ({"()": "app.observability.logs.JsonFormatter"} if fmt == "json"
                                 else {"format": TEXT_FORMAT})
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "app.observability.logs.RequestIdFilter"}},
        "formatters": {"lethe": formatter},
        "handlers": {"lethe": {"class": "logging.StreamHandler", "formatter": "lethe",
                               "filters": ["request_id"], "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["lethe"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": False},
        },
    }
