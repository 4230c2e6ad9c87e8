"""Dashboard sessions kept on the server, and failed sign-ins throttled per client address:
a signed-out cookie opens nothing when replayed, and an address that keeps guessing keys is
refused (429) until its window passes, whatever key it then presents."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.core.db import session_scope, utcnow
from app.dashboard.models import DashboardSignIn, FailedSignIn
from tests.dashboard.conftest import World, csrf_of, login_token, sign_in

GUESSER = ("198.51.100.7", 40000)
NEIGHBOUR = ("203.0.113.9", 40000)


@pytest.fixture
def guesser(world: World) -> Iterator[TestClient]:
    with TestClient(world.app, client=GUESSER) as test_client:
        yield test_client


def attempt(client: TestClient, api_key: str) -> int:
    return client.post("/dashboard/login", data={
        "api_key": api_key, "csrf_token": login_token(client)},
        follow_redirects=False).status_code


def failures(world: World) -> int:
    with session_scope(world.app.state.sessionmaker) as db_session:
        return db_session.scalar(select(func.count()).select_from(FailedSignIn)) or 0


def test_a_signed_out_cookie_replayed_opens_nothing(auditor: TestClient, world: World) -> None:
    cookie = auditor.cookies.get("lethe_dashboard")
    assert cookie and auditor.get("/dashboard").status_code == 200
    response = auditor.post("/dashboard/logout", data={"csrf_token": csrf_of(auditor)},
                            follow_redirects=False)
    assert response.status_code == 303
    auditor.cookies.set("lethe_dashboard", cookie, path="/dashboard")  # the stolen copy
    replayed = auditor.get("/dashboard/audit", follow_redirects=False)
    assert replayed.status_code == 303
    assert replayed.headers["location"] == "/dashboard/login?next=/dashboard/audit"
    with session_scope(world.app.state.sessionmaker) as db_session:
        assert db_session.scalars(select(DashboardSignIn.revoked_at)).one() is not None


def test_signing_out_ends_only_that_session(world: World) -> None:
    with TestClient(world.app) as laptop, TestClient(world.app) as desktop:
        sign_in(laptop, world.seeded.keys["operator"])
        sign_in(desktop, world.seeded.keys["operator"])
        laptop.post("/dashboard/logout", data={"csrf_token": csrf_of(laptop)})
        assert laptop.get("/dashboard", follow_redirects=False).status_code == 303
        assert desktop.get("/dashboard", follow_redirects=False).status_code == 200


def test_an_expired_session_opens_nothing(auditor: TestClient, world: World) -> None:
    with session_scope(world.app.state.sessionmaker) as db_session:
        db_session.execute(update(DashboardSignIn).values(expires_at=utcnow()))
    assert auditor.get("/dashboard", follow_redirects=False).status_code == 303


def test_an_address_that_keeps_failing_is_refused_even_with_the_right_key(
        guesser: TestClient, world: World) -> None:
    operator_key = world.seeded.keys["operator"]
    for _ in range(5):
        assert attempt(guesser, "lethe_0000000000000000_guess") == 401
    refused = guesser.post("/dashboard/login", data={
        "api_key": operator_key, "csrf_token": login_token(guesser)}, follow_redirects=False)
    assert refused.status_code == 429
    assert "Too many failed sign-ins" in refused.text
    assert 0 < int(refused.headers["retry-after"]) <= 15 * 60
    assert "lethe_dashboard" not in guesser.cookies
    assert failures(world) == 5  # refused attempts do not lengthen the wait

    # Another address is not held back by this one's failures.
    with TestClient(world.app, client=NEIGHBOUR) as neighbour:
        assert attempt(neighbour, operator_key) == 303

    # Once the window has passed the right key works again, and clears the count.
    with session_scope(world.app.state.sessionmaker) as db_session:
        db_session.execute(update(FailedSignIn).values(
            attempted_at=utcnow() - timedelta(minutes=15, seconds=1)))
    assert attempt(guesser, operator_key) == 303
    assert guesser.get("/dashboard").status_code == 200
    assert failures(world) == 0


def test_a_burst_of_guesses_at_once_gets_no_more_tries_than_the_limit(
        guesser: TestClient, world: World) -> None:
    token = login_token(guesser)

    def guess(_: int) -> int:
        return guesser.post("/dashboard/login", data={
            "api_key": "lethe_nope_nope", "csrf_token": token}).status_code

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(guess, range(12)))
    # Each guess is written before the others are counted: some may be refused early, none
    # past the limit. A 400 is the form's token refused before any key is tried: the threads
    # share one cookie jar, and each answer may rotate the sign-in token under the others.
    assert set(answers) <= {400, 401, 429} and answers.count(401) <= 5
    assert failures(world) == answers.count(401)


def test_the_limit_and_window_come_from_the_settings(guesser: TestClient, world: World
                                                     ) -> None:
    settings = world.app.state.settings
    settings.dashboard_login_failure_limit = 2
    settings.dashboard_login_failure_window_seconds = 60.0
    assert [attempt(guesser, "lethe_nope_nope") for _ in range(3)] == [401, 401, 429]
    with session_scope(world.app.state.sessionmaker) as db_session:
        db_session.execute(update(FailedSignIn).values(
            attempted_at=utcnow() - timedelta(seconds=61)))
    assert attempt(guesser, world.seeded.keys["auditor"]) == 303


def test_a_real_key_of_another_role_or_a_stale_form_is_no_failure(
        guesser: TestClient, world: World) -> None:
    for _ in range(6):
        assert attempt(guesser, world.seeded.keys["requester"]) == 403
        assert guesser.post("/dashboard/login", data={
            "api_key": "lethe_nope_nope", "csrf_token": "forged"}).status_code == 400
    assert failures(world) == 0
    assert attempt(guesser, world.seeded.keys["auditor"]) == 303
