"""RFC 9457 problem details: every error the API returns is ``application/problem+json``.

Domain code raises a ``Problem`` subclass; the handlers here turn it (and FastAPI's own
validation and HTTP errors) into a problem body. A client mistake is always a 4xx."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
PROBLEM_SCHEMA_REF = {"$ref": "#/components/schemas/Problem"}
# For route `responses=`: documents that an error status answers with a problem body.
PROBLEM = {"content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA_REF}},
           "description": "A problem (RFC 9457)."}
PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details. Further members carry specifics: `errors` "
                   "(validation), `limit` (body size), `current_status` (conflicts), ...",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "examples": ["urn:lethe:problem:not-found"]},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "instance": {"type": "string", "description": "The request path."},
    },
    "additionalProperties": True,
}
# The errors any operation may answer with, whatever its route declares.
GENERIC_ERRORS = {
    400: "The body could not be parsed.",
    401: "No valid API key.",
    403: "The key's role may not do this.",
    413: "The body exceeds the size limit.",
    422: "The request does not match the schema; `errors` says where.",
    503: "The database is unavailable or busy; retry after `Retry-After` seconds.",
}


RESERVED_MEMBERS = frozenset({"type", "title", "status", "detail", "instance"})


def problem_type(slug: str) -> str:
    return f"urn:lethe:problem:{slug}"


class Problem(Exception):
    """An error with an HTTP status, reported as a problem body."""

    status: int = 500
    slug: str = "internal-error"

    def __init__(
        self, detail: str, *, title: str | None = None, headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        reserved = RESERVED_MEMBERS.intersection(extensions)
        if reserved:
            raise ValueError(f"problem extensions cannot redefine {sorted(reserved)}")
        self.detail = detail
        self.title = title or HTTPStatus(self.status).phrase
        self.headers = headers or {}
        self.extensions = extensions


class BadRequest(Problem):
    status, slug = 400, "bad-request"


class Unauthorized(Problem):
    status, slug = 401, "unauthorized"

    def __init__(self, detail: str, **extensions: Any) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"}, **extensions)


class Forbidden(Problem):
    status, slug = 403, "forbidden"


class NotFound(Problem):
    status, slug = 404, "not-found"


class NotAcceptable(Problem):
    status, slug = 406, "not-acceptable"


class Conflict(Problem):
    status, slug = 409, "conflict"


class PayloadTooLarge(Problem):
    status, slug = 413, "payload-too-large"


class UnsupportedMediaType(Problem):
    status, slug = 415, "unsupported-media-type"


class Unprocessable(Problem):
    status, slug = 422, "unprocessable-content"


class TooManyRequests(Problem):
    status, slug = 429, "too-many-requests"


class ServiceUnavailable(Problem):
    status, slug = 503, "service-unavailable"


class UnstorableValue(Unprocessable):
    """The database refused a value the request carried: a NUL character (PostgreSQL stores
    none in text or JSON), a string longer than its column, a number out of range."""

    slug = "unstorable-value"

    @classmethod
    def from_error(cls, error: DataError) -> UnstorableValue:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else "invalid value"
        return cls(f"The database cannot take a value in this request: {reason}.")


def problem_response(
    status: int, *, slug: str, detail: str, title: str | None = None, instance: str | None = None,
    headers: dict[str, str] | None = None, **extensions: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": problem_type(slug),
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update(extensions)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _http_slug(status: int) -> str:
    return HTTPStatus(status).phrase.lower().replace(" ", "-").replace("'", "")


def document_problems(schema: dict[str, Any]) -> None:
    """Make the OpenAPI document say what the handlers below do: every error status of every
    operation answers with a problem body (FastAPI documents its own `HTTPValidationError`
    for 422, which this API never sends), and the errors any operation can meet (no key, a
    body that does not parse or is too large, the database down) are listed on each."""
    schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            generic = set()
            if operation.get("security"):
                generic |= {401, 403, 503}
            if "requestBody" in operation:
                generic |= {400, 413, 422}
            if operation.get("parameters"):
                generic.add(422)
            responses = operation.setdefault("responses", {})
            for status in sorted(generic):
                responses.setdefault(str(status), {"description": GENERIC_ERRORS[status]})
            operation["responses"] = responses = dict(sorted(responses.items()))
            for status, response in responses.items():
                if status[:1] in ("4", "5"):
                    if response.get("description") == "Validation Error":
                        response["description"] = GENERIC_ERRORS[422]
                    response["content"] = {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA_REF}}
    schemas = schema["components"]["schemas"]
    if '"#/components/schemas/HTTPValidationError"' not in json.dumps(schema["paths"]):
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)


def install_problem_handlers(app: FastAPI) -> None:
    generate_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document_problems(generate_openapi())  # generates and caches it; amended in place
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            exc.status, slug=exc.slug, title=exc.title, detail=exc.detail,
            instance=request.url.path, headers=exc.headers, **exc.extensions,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type")}
            for err in exc.errors()
        ]
        return problem_response(
            422, slug="validation-error", title="Request validation failed",
            detail="The request does not match the schema; see `errors`.",
            instance=request.url.path, errors=errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(
            exc.status_code, slug=_http_slug(exc.status_code), detail=str(exc.detail),
            instance=request.url.path, headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(OperationalError)
    async def _database_down(request: Request, exc: OperationalError) -> JSONResponse:
        # The database is unreachable or locked: a retryable status instead of a 500. A
        # commit cut off by the outage may still have landed (the reliability suite sees it
        # happen), so the client is told to retry with the same Idempotency-Key.
        log.warning("database unavailable: %s", exc.orig)
        return problem_response(
            503, slug="database-unavailable",
            detail="The database is unavailable; retry later (with the same Idempotency-Key: "
                   "a write under way when it went may have been recorded).",
            instance=request.url.path, headers={"Retry-After": "5"},
        )

    @app.exception_handler(PoolTimeout)
    async def _pool_exhausted(request: Request, exc: PoolTimeout) -> JSONResponse:
        log.warning("no database connection free in time")
        return problem_response(
            503, slug="database-busy", detail="The database is busy; retry later.",
            instance=request.url.path, headers={"Retry-After": "5"},
        )

    @app.exception_handler(DataError)
    async def _unstorable_value(request: Request, exc: DataError) -> JSONResponse:
        # Bad input that only the database could tell (its transaction is rolled back).
        return await _problem(request, UnstorableValue.from_error(exc))

    @app.exception_handler(DBAPIError)
    async def _database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            return await _database_down(request, OperationalError(None, None, exc.orig or exc))
        log.exception("database error on %s", request.url.path)
        return problem_response(
            500, slug="internal-error", detail="An internal error occurred.",
            instance=request.url.path,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return problem_response(
            500, slug="internal-error", detail="An internal error occurred.",
            instance=request.url.path,
        )
