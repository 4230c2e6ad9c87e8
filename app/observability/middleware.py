"""One ASGI middleware, outermost, for every HTTP request: binds the request id (and answers
with it), records the request's metrics and writes one access-log line.

One pure-ASGI layer rather than three: it sits on the intake hot path."""

from __future__ import annotations

import logging
import time

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.observability import metrics
from app.observability.request_id import HEADER, accept_request_id, request_id_var

access_log = logging.getLogger("lethe.access")
_HEADER_KEY = HEADER.lower().encode()


def route_of(scope: Scope) -> str:
    """The matched route's template (``/v1/deletion-requests/{request_id}``), never the raw
    path, so the metrics' label values stay few."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, *, access_log_enabled: bool = True) -> None:
        self.app = app
        self.access_log_enabled = access_log_enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        presented = next((value.decode("latin-1") for key, value in scope["headers"]
                          if key == _HEADER_KEY), None)
        request_id = accept_request_id(presented)
        token = request_id_var.set(request_id)
        status = 500  # what the client gets if the app raises before answering
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = route_of(scope)
            metrics.observe_http(scope["method"], route, status, elapsed)
            if self.access_log_enabled:
                access_log.info(
                    "%s %s %d", scope["method"], scope["path"], status,
                    extra={"method": scope["method"], "path": scope["path"], "route": route,
                           "status": status, "duration_ms": round(elapsed * 1000, 2)})
            request_id_var.reset(token)
