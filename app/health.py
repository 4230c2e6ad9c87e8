"""Liveness and readiness probes."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from kombu import Connection
from sqlalchemy import text

from app.core.errors import problem_response

router = APIRouter(tags=["health"])

BROKER_TIMEOUT_SECONDS = 2.0


def ping_broker(url: str, timeout: float = BROKER_TIMEOUT_SECONDS) -> None:
    """Raise unless the Celery broker at ``url`` answers within ``timeout`` seconds."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("redis", "rediss", "redis+socket"):
        import redis

        if scheme == "redis+socket":  # kombu's unix-socket form: redis+socket:///path/to.sock
            client = redis.Redis(unix_socket_path=unquote(urlsplit(url).path),
                                 socket_timeout=timeout, socket_connect_timeout=timeout)
        else:
            client = redis.Redis.from_url(url, socket_timeout=timeout,
                                          socket_connect_timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()
        return
    # Any other transport Celery supports. Connection is imported with this module, not
    # here: kombu resolves its attributes lazily, and threads that reached it first at the
    # same time got ImportError (a ready service answered 503 to its first probes).
    with Connection(url, connect_timeout=timeout) as connection:
        connection.ensure_connection(max_retries=1, timeout=timeout)


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Dependencies are reachable",
            responses={503: {"description": "A dependency is down (problem body)."}})
def readyz(request: Request) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        with request.app.state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any failure means "not ready", with the reason
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        ping_broker(request.app.state.settings.resolved_broker_url)
        checks["broker"] = "ok"
    except Exception as exc:  # the URL may hold a password: name the error class only
        checks["broker"] = f"error: {type(exc).__name__}"
    if all(v == "ok" for v in checks.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    return problem_response(503, slug="not-ready", detail="A dependency is unavailable.",
                            checks=checks)
