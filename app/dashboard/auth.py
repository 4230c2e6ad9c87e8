"""Dashboard sign-in: an operator or auditor API key, exchanged once for a session cookie.

The cookie holds only the id of a session kept in the database and the session's CSRF token,
signed and time-stamped with the service secret (itsdangerous), HTTP-only and
SameSite=Strict. The session and its key are looked up on every request, so signing out or
revoking the key ends it at once, on every replica. Failed sign-ins are counted per client
address (sessions.py). Every POST carries the session's CSRF token in a form field (the
sign-in form, before a session exists, a token from a short-lived cookie of its own: double
submit), and a cross-origin Origin is refused."""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy.orm import Session

from app.api.deps import SessionDep
from app.auth.models import Role
from app.auth.service import Principal
from app.core.errors import Forbidden
from app.dashboard import sessions

SESSION_COOKIE = "lethe_dashboard"
LOGIN_COOKIE = "lethe_dashboard_login"
FLASH_COOKIE = "lethe_dashboard_flash"
COOKIE_PATH = "/dashboard"
LOGIN_SECONDS = 15 * 60
FLASH_SECONDS = 60
DASHBOARD_ROLES = frozenset({Role.operator, Role.auditor, Role.admin})
OPERATOR_ROLES = frozenset({Role.operator, Role.admin})


class LoginRequired(Exception):
    """No valid session: the handler sends the browser to the sign-in page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


@dataclass(frozen=True)
class DashboardSession:
    principal: Principal
    csrf_token: str
    session_id: str

    @property
    def can_operate(self) -> bool:
        return self.principal.role in OPERATOR_ROLES


def _serializer(request: Request, purpose: str) -> URLSafeTimedSerializer:
    secret: bytes = request.app.state.secret_key
    return URLSafeTimedSerializer(secret, salt=f"lethe.dashboard.{purpose}")


def _secure(request: Request) -> bool:
    return request.url.scheme == "https" or request.app.state.settings.dashboard_secure_cookies


def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: int
                ) -> None:
    response.set_cookie(name, value, max_age=max_age, path=COOKIE_PATH, httponly=True,
                        samesite="strict", secure=_secure(request))


def _load(request: Request, name: str, purpose: str, max_age: float) -> dict[str, Any] | None:
    raw = request.cookies.get(name)
    if not raw:
        return None
    try:
        value = _serializer(request, purpose).loads(raw, max_age=int(max_age))
    except BadSignature:  # tampered, signed with another secret, or expired
        return None
    return value if isinstance(value, dict) else None


def session_seconds(request: Request) -> int:
    return int(request.app.state.settings.dashboard_session_hours * 3600)


def safe_next(candidate: str | None) -> str:
    """Only a path inside the dashboard: never an absolute or protocol-relative URL."""
    if not candidate:
        return "/dashboard"
    parts = urlsplit(candidate)
    if (parts.scheme or parts.netloc or not candidate.startswith("/dashboard")
            or candidate.startswith("//") or "\\" in candidate):
        return "/dashboard"
    return candidate


# ---- sign-in ------------------------------------------------------------------------------


def new_login_token() -> str:
    return secrets.token_urlsafe(24)


def remember_login_token(request: Request, response: Response, token: str) -> None:
    """The sign-in form's token, also kept in a short-lived cookie (double submit)."""
    value = _serializer(request, "login").dumps({"c": token})
    _set_cookie(request, response, LOGIN_COOKIE, value, LOGIN_SECONDS)


def check_login_token(request: Request, presented: str) -> bool:
    stored = _load(request, LOGIN_COOKIE, "login", LOGIN_SECONDS)
    expected = stored.get("c") if stored else None
    return isinstance(expected, str) and hmac.compare_digest(expected, presented)


def client_address(request: Request) -> str:
    """Whom failed sign-ins are counted against: the peer, or the client a trusted proxy
    names (uvicorn's --proxy-headers puts that in request.client)."""
    return request.client.host if request.client else "unknown"


def begin_sign_in(request: Request, db_session: Session) -> int:
    """Count this attempt against its address; TooManyRequests once it has failed too often."""
    settings = request.app.state.settings
    return sessions.begin_attempt(
        db_session, address=client_address(request),
        limit=settings.dashboard_login_failure_limit,
        window=timedelta(seconds=settings.dashboard_login_failure_window_seconds))


def start_session(request: Request, response: Response, db_session: Session,
                  principal: Principal) -> None:
    sessions.clear_failures(db_session, address=client_address(request))
    session_id = sessions.open_session(db_session, key_id=principal.key_id,
                                       lifetime=timedelta(seconds=session_seconds(request)))
    value = _serializer(request, "session").dumps({"s": session_id,
                                                  "c": secrets.token_urlsafe(24)})
    _set_cookie(request, response, SESSION_COOKIE, value, session_seconds(request))
    response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH)


def end_session(response: Response, db_session: Session, session: DashboardSession) -> None:
    """Sign out on the server too: the cookie, replayed, no longer opens anything."""
    sessions.revoke_session(db_session, session_id=session.session_id)
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)


def current_session(request: Request, db_session: SessionDep) -> DashboardSession:
    stored = _load(request, SESSION_COOKIE, "session", session_seconds(request)) or {}
    session_id, csrf_token = stored.get("s"), stored.get("c")
    if isinstance(session_id, str) and isinstance(csrf_token, str):
        principal = sessions.live_principal(db_session, session_id=session_id)
        if principal is not None and principal.role in DASHBOARD_ROLES:
            return DashboardSession(principal=principal, csrf_token=csrf_token,
                                    session_id=session_id)
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    raise LoginRequired(target if request.method == "GET" else "/dashboard")


Viewer = Annotated[DashboardSession, Depends(current_session)]


def check_csrf(request: Request, session: DashboardSession, presented: str) -> None:
    """A state-changing form must carry the session's token and come from this origin."""
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.url.netloc:
        raise Forbidden("Cross-origin form submission refused.")
    if not hmac.compare_digest(session.csrf_token, presented):
        raise Forbidden("The form's CSRF token is missing or stale; reload the page.")


# ---- one-shot notices after a redirect ------------------------------------------------------


def flash(request: Request, response: Response, message: str, kind: str = "info") -> None:
    value = _serializer(request, "flash").dumps({"m": message, "k": kind})
    _set_cookie(request, response, FLASH_COOKIE, value, FLASH_SECONDS)


def read_flash(request: Request) -> dict[str, str] | None:
    stored = _load(request, FLASH_COOKIE, "flash", FLASH_SECONDS)
    if not stored:
        return None
    return {"message": str(stored.get("m", "")), "kind": str(stored.get("k", "info"))}


def clear_flash(request: Request, response: Response) -> None:
    if request.cookies.get(FLASH_COOKIE):
        response.delete_cookie(FLASH_COOKIE, path=COOKIE_PATH)
