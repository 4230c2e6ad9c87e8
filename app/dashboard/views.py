"""Dashboard routes: thin. Page data comes from service.py, rules from the domains."""

from __future__ import annotations

import inspect
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from app.api.deps import SessionDep
from app.auth import service as auth
from app.certificates import service as certificates
from app.core.errors import (
    Conflict,
    Forbidden,
    NotFound,
    Problem,
    TooManyRequests,
    Unauthorized,
)
from app.core.fields import AuditSeq, VersionNumber, parse_utc_datetime
from app.dashboard import auth as session_auth
from app.dashboard import service, sessions
from app.dashboard.auth import DASHBOARD_ROLES, LoginRequired, Viewer
from app.jobs import service as jobs
from app.jobs.models import JobStatus
from app.models_registry import service as registry
from app.models_registry.models import PRODUCTION
from app.requests import service as requests
from app.requests.models import RequestKind, RequestStatus

HERE = Path(__file__).parent
LIVE_SECONDS = 3
PAGE_SIZE = 50
SECURITY_HEADERS = {
    # Scripts and styles only from our own static files: chart data travels as JSON blocks.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

router = APIRouter(prefix="/dashboard", include_in_schema=False)
templates = Jinja2Templates(directory=HERE / "templates")


# ---- template helpers -------------------------------------------------------------------


def _datetime(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if value else "—"


def _number(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _percent(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "—"
    return f"{100 * value:.1f} %"


def _significant(value: Any, digits: int = 3) -> str:
    """A p-value or other figure that may be tiny: significant digits, not decimals."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "—"
    return f"{value:.{digits}g}"


def _compact_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)


templates.env.filters.update(dt=_datetime, num=_number, pct=_percent, compact=_compact_json,
                             sig=_significant, deadline=service.deadline_class)


def render(request: Request, name: str, context: dict[str, Any], *, viewer: Any = None,
           live: bool = False, status_code: int = 200) -> HTMLResponse:
    """A page, with the notice left by the previous redirect (shown once)."""
    flash = session_auth.read_flash(request)
    response = templates.TemplateResponse(
        request, name, {"viewer": viewer, "live_seconds": LIVE_SECONDS if live else 0,
                        "flash": flash, **context},
        status_code=status_code, headers=SECURITY_HEADERS)
    session_auth.clear_flash(request, response)
    return response


def _yes_no(text: str) -> bool:
    if text not in ("yes", "no"):
        raise ValueError(text)
    return text == "yes"


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _optional(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


# ---- sign-in ------------------------------------------------------------------------------


def _login_page(request: Request, next_path: str | None, *, error: str | None = None,
                status_code: int = 200) -> HTMLResponse:
    token = session_auth.new_login_token()
    response = render(request, "login.html", {"next": session_auth.safe_next(next_path),
                                              "csrf_token": token, "error": error},
                      status_code=status_code)
    session_auth.remember_login_token(request, response, token)
    return response


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    return _login_page(request, next)


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, db_session: SessionDep, api_key: Annotated[str, Form()] = "",
          csrf_token: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/dashboard"
          ) -> Response:
    if not session_auth.check_login_token(request, csrf_token):
        return _login_page(request, next, error="The sign-in form expired; please try again.",
                           status_code=400)
    try:
        attempt = session_auth.begin_sign_in(request, db_session)
    except TooManyRequests as exc:
        refused = _login_page(request, next, error=exc.detail, status_code=exc.status)
        refused.headers.update(exc.headers)
        return refused
    try:
        principal = auth.authenticate(db_session, presented=api_key.strip())
    except Unauthorized as exc:  # the attempt stays counted as a failure
        return _login_page(request, next, error=exc.detail, status_code=401)
    if principal.role not in DASHBOARD_ROLES:
        sessions.withdraw_attempt(db_session, attempt_id=attempt)  # a real key: no guess
        return _login_page(request, next, status_code=403, error=(
            "The dashboard is for operator and auditor keys; this key is a "
            f"{principal.role.value} key."))
    response = _redirect(session_auth.safe_next(next))
    session_auth.start_session(request, response, db_session, principal)
    return response


@router.post("/logout")
def logout(request: Request, db_session: SessionDep, viewer: Viewer,
           csrf_token: Annotated[str, Form()] = "") -> Response:
    session_auth.check_csrf(request, viewer, csrf_token)
    response = _redirect("/dashboard/login")
    session_auth.end_session(response, db_session, viewer)
    return response


# ---- pages --------------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
def overview(request: Request, db_session: SessionDep, viewer: Viewer) -> HTMLResponse:
    page = service.overview(db_session)
    return render(request, "overview.html", {"page": page, "nav": "overview"}, viewer=viewer,
                  live=bool(page.active_jobs))


@router.get("/requests", response_class=HTMLResponse)
def requests_list(
    request: Request, db_session: SessionDep, viewer: Viewer,
    status: str | None = None, kind: str | None = None,
    model: Annotated[str | None, Query(max_length=64)] = None,
    client: Annotated[str | None, Query(max_length=128)] = None,
    overdue: str | None = None, received_after: str | None = None,
    received_before: str | None = None, cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> HTMLResponse:
    form = {"status": _optional(status), "kind": _optional(kind), "model": _optional(model),
            "client": _optional(client), "overdue": _optional(overdue),
            "received_after": _optional(received_after),
            "received_before": _optional(received_before)}
    ignored: list[str] = []

    def parse(key: str, convert: Any) -> Any:
        if form[key] is None:
            return None
        try:
            return convert(form[key])
        except ValueError:
            ignored.append(key.replace("_", " "))
            form[key] = None
            return None

    statuses = parse("status", lambda s: [RequestStatus(s)])
    filters = requests.RequestFilters(
        status=statuses, kind=parse("kind", RequestKind), model=form["model"],
        client_id=form["client"],
        overdue=parse("overdue", _yes_no),
        received_after=parse("received_after", parse_utc_datetime),
        received_before=parse("received_before", parse_utc_datetime))
    try:
        page, next_cursor = requests.list_page(db_session, principal=viewer.principal,
                                               filters=filters, limit=PAGE_SIZE, cursor=cursor)
    except Problem:  # a malformed cursor: start from the first page
        ignored.append("cursor")
        page, next_cursor = requests.list_page(db_session, principal=viewer.principal,
                                               filters=filters, limit=PAGE_SIZE)
    query = {k: v for k, v in form.items() if v is not None}
    return render(request, "requests.html", {
        "nav": "requests", "items": requests.to_read(db_session, page), "form": form,
        "ignored": ignored, "next_cursor": next_cursor, "query": query,
        "statuses": [s.value for s in RequestStatus], "kinds": [k.value for k in RequestKind],
        "models": [m.name for m in registry.list_all(db_session)],
    }, viewer=viewer, live=service.any_job_active(db_session))


@router.get("/requests/{request_id}", response_class=HTMLResponse)
def request_detail(request_id: str, request: Request, db_session: SessionDep, viewer: Viewer
                   ) -> HTMLResponse:
    page = service.request_detail(db_session, request_id=request_id,
                                  principal=viewer.principal)
    item = page.item
    return render(request, "request_detail.html", {
        "nav": "requests", "item": item, "timeline": page.timeline, "evidence": page.evidence,
        "certificate_api": f"/v1/deletion-requests/{item.id}/certificate",
    }, viewer=viewer, live=item.status.value in service.WORKING)


@router.get("/requests/{request_id}/certificate")
def certificate_download(request_id: str, db_session: SessionDep, viewer: Viewer
                         ) -> JSONResponse:
    """The same signed document as GET /v1/deletion-requests/{id}/certificate, for a browser
    signed in with a cookie rather than a bearer key."""
    requests.get(db_session, request_id=request_id, principal=viewer.principal)
    document = certificates.document_for(db_session, request_id=request_id)
    return JSONResponse(document, headers={
        "Content-Disposition": f'attachment; filename="certificate-{request_id}.json"'})


@router.get("/models", response_class=HTMLResponse)
def models_list(request: Request, db_session: SessionDep, viewer: Viewer) -> HTMLResponse:
    return render(request, "models.html", {"nav": "models",
                                           "models": service.models_list(db_session)},
                  viewer=viewer, live=service.any_job_active(db_session))


@router.get("/models/{name}", response_class=HTMLResponse)
def model_detail(name: str, request: Request, db_session: SessionDep, viewer: Viewer
                 ) -> HTMLResponse:
    page = service.model_page(db_session, name=name)
    return render(request, "model_detail.html", {"nav": "models", "page": page},
                  viewer=viewer, live=bool(page.active_jobs) or page.references_active)


@router.post("/models/{name}/production")
def move_production(name: str, request: Request, db_session: SessionDep, viewer: Viewer,
                    version: Annotated[VersionNumber, Form()],
                    csrf_token: Annotated[str, Form()] = "") -> Response:
    """Point `production` at another version (a rollback). The registry's set_alias decides,
    exactly as for PUT /v1/models/{name}/aliases/production."""
    session_auth.check_csrf(request, viewer, csrf_token)
    if not viewer.can_operate:
        raise Forbidden("Moving the production alias needs an operator key.")
    model = registry.get(db_session, name=name)
    response = _redirect(f"/dashboard/models/{name}")
    try:
        registry.set_alias(db_session, model=model, alias=PRODUCTION, number=version,
                           actor=viewer.principal.actor)
    except (Conflict, NotFound) as refused:
        db_session.rollback()
        session_auth.flash(request, response, f"Not moved: {refused.detail}", "error")
    else:
        session_auth.flash(request, response, f"Production now serves version {version}.",
                           "ok")
    return response


@router.get("/jobs", response_class=HTMLResponse)
def jobs_list(request: Request, db_session: SessionDep, viewer: Viewer,
              model: Annotated[str | None, Query(max_length=64)] = None,
              status: str | None = None) -> HTMLResponse:
    model, status = _optional(model), _optional(status)
    model_id = registry.get(db_session, name=model).id if model else None
    statuses = [status] if status in {s.value for s in JobStatus} else None
    items = jobs.list_filtered(db_session, model_id=model_id, statuses=statuses, limit=100)
    reads = [jobs.to_read(db_session, job) for job in items]
    return render(request, "jobs.html", {
        "nav": "jobs", "items": reads, "form": {"model": model, "status": status},
        "statuses": [s.value for s in JobStatus],
        "models": [m.name for m in registry.list_all(db_session)],
    }, viewer=viewer, live=service.any_job_active(db_session))


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_detail(job_id: str, request: Request, db_session: SessionDep, viewer: Viewer
               ) -> HTMLResponse:
    page = service.job_page(db_session, job_id=job_id, principal=viewer.principal)
    return render(request, "job_detail.html", {"nav": "jobs", "job": page.job,
                                               "evidence": page.evidence},
                  viewer=viewer, live=page.job.status in service.ACTIVE_JOBS)


@router.get("/audit", response_class=HTMLResponse)
def audit_log(request: Request, db_session: SessionDep, viewer: Viewer,
              before: Annotated[AuditSeq | None, Query()] = None,
              action: Annotated[str | None, Query(max_length=64)] = None,
              entity_type: Annotated[str | None, Query(max_length=32)] = None,
              entity_id: Annotated[str | None, Query(max_length=64)] = None) -> HTMLResponse:
    form = {"action": _optional(action), "entity_type": _optional(entity_type),
            "entity_id": _optional(entity_id)}
    page = service.audit_page(db_session, before=before, limit=PAGE_SIZE, **form)
    return render(request, "audit.html", {"nav": "audit", "page": page, "form": form,
                                          "query": {k: v for k, v in form.items() if v}},
                  viewer=viewer)


# ---- wiring -------------------------------------------------------------------------------


def install(app: FastAPI) -> None:
    """Routes, static files, the sign-in redirect, and HTML error pages under /dashboard."""
    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=HERE / "static"),
              name="dashboard-static")

    async def to_login(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LoginRequired)
        return _redirect(f"/dashboard/login?next={_quote(exc.next_path)}")

    app.add_exception_handler(LoginRequired, to_login)
    problem_handler = app.exception_handlers.get(Problem)

    async def problem_page(request: Request, exc: Exception) -> Response:
        # The API keeps its problem+json; a person in the dashboard gets a page.
        if request.url.path.startswith("/dashboard/") and isinstance(exc, Problem):
            return render(request, "error.html", {"problem": exc}, status_code=exc.status)
        assert problem_handler is not None
        answer = problem_handler(request, exc)
        return await answer if inspect.isawaitable(answer) else answer

    app.add_exception_handler(Problem, problem_page)


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")
