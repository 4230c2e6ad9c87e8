"""The request id: one identifier that follows a piece of work from the HTTP request that
started it into every log line it causes, in the API and in the worker.

The API takes a well-formed ``X-Request-ID`` from the caller (or makes one), binds it to a
context variable for the request's lifetime and answers with it. Celery tasks carry it in a
message header (see :mod:`app.observability.celery`), so the worker's logs name it too."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

HEADER = "X-Request-ID"
# The Celery message header that carries it (headers travel with the task message).
CELERY_HEADER = "x_request_id"
# Caller-supplied ids end up in logs: accept only short, plain tokens (no log injection).
_VALID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")

request_id_var: ContextVar[str | None] = ContextVar("lethe_request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(candidate: str | None) -> str:
    """The caller's id when it is well-formed, else a fresh one."""
    if candidate and _VALID.match(candidate):
        return candidate
    return new_request_id()


def get_request_id() -> str | None:
    return request_id_var.get()


@contextmanager
def request_id_context(value: str | None) -> Iterator[str]:
    """Bind a request id (a fresh one when ``value`` is None or malformed) for a block."""
    bound = accept_request_id(value)
    token = request_id_var.set(bound)
    try:
        yield bound
    finally:
        request_id_var.reset(token)
