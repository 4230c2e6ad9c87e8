"""The dashboard's pages, sign-in, CSRF and rollback guard, on SQLite and PostgreSQL
(server-rendered HTML read back through the app; the browser tests drive a real Chromium)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.auth import service as keys
from app.certificates import signing
from app.core.db import session_scope
from app.dashboard.service import deadline_class
from tests.dashboard.conftest import World, csrf_of, login_token, sign_in

PAGES = ["/dashboard", "/dashboard/requests", "/dashboard/models",
         "/dashboard/models/fashion-cnn", "/dashboard/jobs", "/dashboard/audit"]


def rows_of(html: str, table_id: str) -> list[str]:
    body = html.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr\b.*?</tr>", body.split("<tbody>", 1)[1], flags=re.S)


def test_every_page_sends_a_stranger_to_sign_in(client: TestClient, world: World) -> None:
    detail = f"/dashboard/requests/{world.seeded.requests['completed']}"
    for path in [*PAGES, detail, f"{detail}/certificate"]:
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/dashboard/login?next=/dashboard")


def test_sign_in_takes_operator_and_auditor_keys_only(client: TestClient, world: World
                                                      ) -> None:
    def attempt(api_key: str) -> int:
        return client.post("/dashboard/login", data={
            "api_key": api_key, "csrf_token": login_token(client)},
            follow_redirects=False).status_code

    assert attempt("lethe_nope_nope") == 401
    assert attempt(world.seeded.keys["requester"]) == 403
    assert "lethe_dashboard=" not in client.cookies.get("lethe_dashboard", "")
    assert attempt(world.seeded.keys["auditor"]) == 303
    assert client.get("/dashboard").status_code == 200


def test_sign_in_form_needs_its_own_csrf_token(client: TestClient, world: World) -> None:
    login_token(client)
    response = client.post("/dashboard/login", data={
        "api_key": world.seeded.keys["operator"], "csrf_token": "forged"},
        follow_redirects=False)
    assert response.status_code == 400 and "expired" in response.text


def test_session_cookie_is_signed_http_only_and_strict(client: TestClient, world: World
                                                        ) -> None:
    response = client.post("/dashboard/login", data={
        "api_key": world.seeded.keys["auditor"], "csrf_token": login_token(client)},
        follow_redirects=False)
    cookie = next(c for c in response.headers.get_list("set-cookie")
                  if c.startswith("lethe_dashboard="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/dashboard" in cookie
    assert world.seeded.keys["auditor"].split("_", 2)[2] not in cookie  # never the secret
    # (split once on each side of the key id: the secret itself may hold "_")
    value = client.cookies.get("lethe_dashboard")
    assert value
    client.cookies.set("lethe_dashboard", value[:-2] + ("AA" if value[-2:] != "AA" else "BB"),
                       path="/dashboard")
    assert client.get("/dashboard", follow_redirects=False).status_code == 303


def test_revoking_the_key_ends_its_session(auditor: TestClient, world: World) -> None:
    assert auditor.get("/dashboard").status_code == 200
    key_id = world.seeded.keys["auditor"].split("_")[1]
    with session_scope(world.app.state.sessionmaker) as db_session:
        keys.revoke(db_session, key_id=key_id, actor="system")
    assert auditor.get("/dashboard", follow_redirects=False).status_code == 303


def test_sign_out_needs_the_csrf_token_then_ends_the_session(auditor: TestClient) -> None:
    assert auditor.post("/dashboard/logout", data={"csrf_token": "forged"}).status_code == 403
    assert auditor.get("/dashboard").status_code == 200
    response = auditor.post("/dashboard/logout", data={"csrf_token": csrf_of(auditor)},
                            follow_redirects=False)
    assert response.status_code == 303
    assert auditor.get("/dashboard", follow_redirects=False).status_code == 303


def test_after_sign_in_only_dashboard_paths_are_followed(client: TestClient, world: World
                                                         ) -> None:
    for target, expected in (("/dashboard/audit", "/dashboard/audit"),
                             ("https://evil.example/", "/dashboard"),
                             ("//evil.example/dashboard", "/dashboard"),
                             ("/v1/audit", "/dashboard")):
        response = client.post("/dashboard/login", data={
            "api_key": world.seeded.keys["auditor"], "csrf_token": login_token(client),
            "next": target}, follow_redirects=False)
        assert response.headers["location"] == expected, target


def test_pages_render_with_a_strict_content_security_policy(auditor: TestClient,
                                                            world: World) -> None:
    for path in [*PAGES, f"/dashboard/jobs/{world.seeded.jobs['failed']}",
                 f"/dashboard/requests/{world.seeded.requests['failed']}"]:
        response = auditor.get(path)
        assert response.status_code == 200, path
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["cache-control"] == "no-store"
        # No inline script or style: only JSON data blocks and external files.
        assert not re.search(r"<script(?![^>]*(src=|application/json))", response.text), path
        assert " style=" not in response.text, path


def test_overview_counts_states_and_colours_days_left(auditor: TestClient, world: World
                                                      ) -> None:
    html = auditor.get("/dashboard").text
    stat = {name: int(value) for name, value in
            re.findall(r'data-stat="([a-z-]+)">(\d+)<', html)}
    # 9 open: 6 queued, 1 processing, 1 failed, 1 awaiting approval; 1 overdue; 2 due within
    # 10 days (3 and 8 days left); 2 completed.
    assert stat == {"open": 9, "overdue": 1, "due-soon": 2, "completed": 2}
    deadlines = {re.search(r'title="([0-9a-f-]{36})"', row).group(1):  # type: ignore[union-attr]
                 re.search(r'class="days (\w+)">([^<]+)<', row).groups()  # type: ignore[union-attr]
                 for row in re.findall(r"<tr><td><a href=\"/dashboard/requests/.*?</tr>",
                                       html.split('id="deadlines"')[1], flags=re.S)}
    requests = world.seeded.requests
    assert deadlines[requests["overdue"]] == ("danger", "overdue 2 d")
    assert deadlines[requests["red"]] == ("danger", "3 d")
    assert deadlines[requests["amber"]] == ("warn", "8 d")
    assert deadlines[requests["green"]] == ("ok", "25 d")
    per_day = json.loads(re.search(r'id="per-day-data">(.*?)</script>',  # type: ignore[union-attr]
                                   html, flags=re.S).group(1))
    assert len(per_day["labels"]) == 30 and sum(per_day["values"]) == 12


def test_deadline_colour_bands() -> None:
    assert [deadline_class(d) for d in (30, 10, 9, 5, 4, 0, -3, None)] == [
        "ok", "ok", "warn", "warn", "danger", "danger", "danger", "muted"]


def test_request_filters_narrow_the_list(auditor: TestClient, world: World) -> None:
    def statuses(query: str) -> list[str]:
        html = auditor.get(f"/dashboard/requests?{query}").text
        return re.findall(r'<tr data-status="(\w+)"', html)

    assert len(statuses("")) == 13
    assert statuses("status=queued") == ["queued"] * 6
    assert sorted(statuses("overdue=yes")) == ["queued"]
    assert set(statuses("client=globex")) == {"queued", "completed", "rejected"}
    assert statuses("kind=class") == ["queued"]
    assert statuses("model=digits-mlp") == ["awaiting_approval"]
    html = auditor.get("/dashboard/requests?status=bogus&kind=class").text
    assert "Ignored invalid filter: status" in html
    assert re.findall(r'<tr data-status="(\w+)"', html) == ["queued"]


def test_request_detail_has_the_timeline_and_a_verifiable_certificate(
        auditor: TestClient, world: World) -> None:
    request_id = world.seeded.requests["completed"]
    html = auditor.get(f"/dashboard/requests/{request_id}").text
    actions = re.findall(r'<li data-action="([a-z_.]+)"', html)
    assert actions == ["deletion_request.received", "deletion_request.queued", "job.created",
                       "job.started", "deletion_request.processing",
                       "deletion_request.verifying", "deletion_request.completed",
                       "certificate.issued", "job.succeeded"]
    assert f"/v1/deletion-requests/{request_id}/certificate" in html
    download = auditor.get(f"/dashboard/requests/{request_id}/certificate")
    assert download.status_code == 200
    assert "attachment" in download.headers["content-disposition"]
    document = download.json()
    valid, reason = signing.verify_document(document, world.app.state.signer.private_key
                                            .public_key())
    assert valid, reason
    assert document["certificate"]["models"][0]["version"] == 3
    # No certificate before completion: a page says so, not a JSON problem.
    pending = auditor.get(f"/dashboard/requests/{world.seeded.requests['queued']}/certificate")
    assert pending.status_code == 404 and "text/html" in pending.headers["content-type"]


def test_failed_request_and_job_show_the_failure_report(auditor: TestClient, world: World
                                                        ) -> None:
    request_html = auditor.get(f"/dashboard/requests/{world.seeded.requests['failed']}").text
    assert "verification failed: membership attack accuracy 0.710" in request_html
    job_html = auditor.get(f"/dashboard/jobs/{world.seeded.jobs['failed']}").text
    assert 'id="failure-report"' in job_html and "indiscernibility 0.580" in job_html
    assert "<th>mia_accuracy</th><td class=\"num\">0.710</td>" in job_html


def test_running_job_page_shows_progress_and_refreshes_itself(auditor: TestClient,
                                                              world: World) -> None:
    html = auditor.get(f"/dashboard/jobs/{world.seeded.jobs['running']}").text
    assert 'data-live="3"' in html
    assert '<progress max="100" value="40.0"' in html and "match: epoch 2/5" in html
    assert "<th>forget_accuracy</th>" in html
    finished = auditor.get(f"/dashboard/jobs/{world.seeded.jobs['completed']}").text
    assert "data-live" not in finished.split("<main>")[0]


def test_model_page_charts_verification_per_version(auditor: TestClient) -> None:
    html = auditor.get("/dashboard/models/fashion-cnn").text
    chart = json.loads(re.search(r'id="versions-data">(.*?)</script>',  # type: ignore[union-attr]
                                 html, flags=re.S).group(1))
    assert chart["labels"] == ["v1", "v2", "v3", "v4", "v5"]
    assert chart["mia_accuracy"] == [None, 0.71, 0.53, 0.51, None]
    assert chart["test_accuracy"] == [0.912, 0.905, 0.908, 0.906, None]
    versions = {re.search(r'data-version="(\d+)"', row).group(1): row  # type: ignore[union-attr]
                for row in rows_of(html, "versions-table") if "data-version" in row}
    assert "production" in versions["4"] and "production" not in versions["3"]
    assert "rejected" in versions["2"] and "failed" in versions["2"]
    # Missing figures render as a dash, not as "None".
    assert versions["5"].count("—") >= 4 and "None" not in html
    assert 'id="rollback-form"' not in html  # auditors look; operators act


def test_rollback_is_refused_exactly_where_the_api_refuses_it(operator: TestClient) -> None:
    def move(version: int) -> tuple[str, str]:
        response = operator.post("/dashboard/models/fashion-cnn/production",
                                 data={"version": version, "csrf_token": csrf_of(operator)},
                                 follow_redirects=False)
        assert response.status_code == 303
        html = operator.get(response.headers["location"]).text
        flash = re.search(r'<p class="flash (\w+)"[^>]*>(.*?)</p>', html, flags=re.S)
        assert flash, html
        return flash.group(1), flash.group(2)

    kind, message = move(3)
    assert kind == "error" and "predates a completed erasure" in message
    kind, message = move(2)
    assert kind == "error" and "can never be served" in message
    kind, message = move(5)
    assert kind == "ok" and "version 5" in message
    html = operator.get("/dashboard/models/fashion-cnn").text
    assert re.search(r'id="production-version"><strong>v5<', html)
    # The flash is shown once.
    assert 'class="flash' not in operator.get("/dashboard/models/fashion-cnn").text


def test_rollback_needs_csrf_and_an_operator(client: TestClient, world: World) -> None:
    sign_in(client, world.seeded.keys["operator"])
    forged = client.post("/dashboard/models/fashion-cnn/production",
                         data={"version": 5, "csrf_token": "forged"})
    assert forged.status_code == 403
    cross_site = client.post("/dashboard/models/fashion-cnn/production",
                             data={"version": 5, "csrf_token": csrf_of(client)},
                             headers={"Origin": "https://evil.example"})
    assert cross_site.status_code == 403
    sign_in(client, world.seeded.keys["auditor"])
    as_auditor = client.post("/dashboard/models/fashion-cnn/production",
                             data={"version": 5, "csrf_token": csrf_of(client)})
    assert as_auditor.status_code == 403
    assert re.search(r'id="production-version"><strong>v4<',
                     client.get("/dashboard/models/fashion-cnn").text)


def test_audit_page_shows_the_chain_verification_and_a_broken_link(auditor: TestClient,
                                                                   world: World) -> None:
    html = auditor.get("/dashboard/audit").text
    assert "Hash chain intact" in html
    assert len(rows_of(html, "audit-table")) == 50 and "Older →" in html
    filtered = auditor.get("/dashboard/audit?action=model.alias_moved").text
    assert len(rows_of(filtered, "audit-table")) == 4  # v1 of each model, v3, v4
    with world.app.state.engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET actor = 'someone-else' WHERE seq = 7"))
    html = auditor.get("/dashboard/audit").text
    assert "Hash chain BROKEN at event #7" in html and "the row was altered" in html


def test_unknown_things_get_a_page_not_a_500(auditor: TestClient) -> None:
    for path in ("/dashboard/models/nope", "/dashboard/jobs/nope", "/dashboard/requests/nope",
                 "/dashboard/jobs?model=nope"):
        response = auditor.get(path)
        assert response.status_code == 404 and "<h1>404" in response.text, path
    # The API under /v1 keeps its problem+json.
    assert auditor.get("/v1/models/nope").headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_vendored_chart_library_matches_its_recorded_checksum(database_url: str) -> None:
    vendor = Path(__file__).resolve().parents[2] / "app" / "dashboard" / "static" / "vendor"
    recorded = (vendor / "README.md").read_text()
    digest = hashlib.sha256((vendor / "chartjs" / "chart.umd.min.js").read_bytes()).hexdigest()
    assert digest in recorded and "Chart.js v4.6.1" in (
        vendor / "chartjs" / "chart.umd.min.js").read_text()[:200]
    assert "MIT License" in (vendor / "chartjs" / "LICENSE.md").read_text()
