"""The dashboard's pages, sign-in, CSRF and rollback guard, on SQLite and PostgreSQL
(server-rendered HTML read back through the app; the browser tests drive a real Chromium)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.auth import service as keys
from app.auth.models import Role
from app.auth.service import Principal
from app.certificates import signing
from app.core.db import session_scope
from app.dashboard import service
from app.dashboard.service import NO_PER_SAMPLE, deadline_class
from app.references.service import WAITING_REASON
from app.requests import lifecycle
from app.requests.models import DeletionRequest
from tests.dashboard.conftest import World, csrf_of, login_token, sign_in

PAGES = ["/dashboard", "/dashboard/requests", "/dashboard/models",
         "/dashboard/models/fashion-cnn", "/dashboard/jobs", "/dashboard/audit"]


def found(pattern: str, html: str, flags: int = 0) -> re.Match[str]:
    """The first match of ``pattern``, which the page must have."""
    match = re.search(pattern, html, flags)
    assert match is not None, pattern
    return match


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
    deadlines = {found(r'title="([0-9a-f-]{36})"', row).group(1):
                 found(r'class="days (\w+)">([^<]+)<', row).groups()
                 for row in re.findall(r"<tr><td><a href=\"/dashboard/requests/.*?</tr>",
                                       html.split('id="deadlines"')[1], flags=re.S)}
    requests = world.seeded.requests
    assert deadlines[requests["overdue"]] == ("danger", "overdue 2 d")
    assert deadlines[requests["red"]] == ("danger", "3 d")
    assert deadlines[requests["amber"]] == ("warn", "8 d")
    assert deadlines[requests["green"]] == ("ok", "25 d")
    per_day = json.loads(found(r'id="per-day-data">(.*?)</script>', html, re.S).group(1))
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
    chart = json.loads(found(r'id="versions-data">(.*?)</script>', html, re.S).group(1))
    assert chart["labels"] == ["v1", "v2", "v3", "v4", "v5"]
    assert chart["mia_accuracy"] == [None, 0.71, 0.53, 0.51, None]
    assert chart["test_accuracy"] == [0.912, 0.905, 0.908, 0.906, None]
    versions = {found(r'data-version="(\d+)"', row).group(1): row
                for row in rows_of(html, "versions-table") if "data-version" in row}
    assert "production" in versions["4"] and "production" not in versions["3"]
    assert "rejected" in versions["2"] and "failed" in versions["2"]
    # Missing figures render as a dash, not as "None".
    assert versions["5"].count("—") >= 4 and "None" not in html
    assert 'id="rollback-form"' not in html  # auditors look; operators act


def fields_of(row: str) -> dict[str, str]:
    """A table row's cells marked data-field, their text without tags."""
    return {name: re.sub(r"<[^>]+>", "", cell).strip()
            for name, cell in re.findall(r'data-field="([a-z-]+)">(.*?)</td>', row, flags=re.S)}


def test_model_page_lists_reference_sets_with_their_state_and_cost(auditor: TestClient,
                                                                   world: World) -> None:
    html = auditor.get("/dashboard/models/fashion-cnn").text
    assert re.search(r'id="production-evidence"><span class="badge s-per-sample">per-sample'
                     r'</span> · <span class="badge s-unlearned">unlearned<', html)
    sets = {found(r'data-set="(\d+)"', row).group(1): row
            for row in rows_of(html, "reference-table") if "data-set" in row}
    ids = world.seeded.reference_sets
    assert list(sets) == [str(ids["running"]), str(ids["ready"])]  # newest first
    running, ready = sets[str(ids["running"])], sets[str(ids["ready"])]
    # 3 of 8 models stored, each with its OUT half of the 56 live training samples and the
    # 20 holdout samples (28 + 20); wall seconds 30 + 30.5 + 31.
    assert fields_of(running) == {"completed": "3 / 8", "statistics": "144", "cost": "91.5 s"}
    assert "reference 4/8: train" in running and "gpu-worker-2:4343" in running
    assert running.count("—") == 1  # not finished
    # 8 models over 60 live training samples (30 + 20 each: 400), less the 16 values of the
    # 4 samples v4 erased; 30 + 30.5 + ... + 33.5 seconds.
    assert fields_of(ready) == {"completed": "8 / 8", "statistics": "384", "cost": "254.0 s"}
    assert 's-ready">ready<' in ready and "gpu-worker-1:4242" in ready
    assert "reference 8/8" not in ready and "—" in ready  # no phase once ready
    assert 'id="references-waiting"' not in html  # its policy does not wait
    digits = auditor.get("/dashboard/models/digits-mlp").text
    rows = rows_of(digits, "reference-table")
    assert len(rows) == 2 and 's-failed">failed<' in rows[0]
    assert fields_of(rows[0]) == {"completed": "0 / 8", "statistics": "0", "cost": "0.0 s"}
    assert 'class="failure">reference 2/8: CUDA out of memory<' in rows[1]
    assert f'id="references-waiting">{WAITING_REASON}<' in digits
    assert 'id="production-evidence">— · —<' in digits  # v1 was uploaded, never verified


def test_job_page_has_a_per_request_evidence_table(auditor: TestClient, world: World) -> None:
    seeded = world.seeded
    html = auditor.get(f"/dashboard/jobs/{seeded.jobs['completed-2']}").text
    assert 'id="evidence-kind"><span class="badge s-per-sample">' in html
    assert 'id="evidence-outcome"><span class="badge s-unlearned">' in html
    assert re.search(r'id="evidence-run">100 steps ·\s*weights changed<', html)
    assert f"reference set #{seeded.reference_sets['ready']} · alpha 0.05" in html
    rows = rows_of(html, "per-request-evidence")
    assert len(rows) == 1 and f'data-request="{seeded.requests["completed-2"]}"' in rows[0]
    assert fields_of(rows[0]) == {"testable": "3 / 4", "p-before": "0.0012 flagged",
                                  "p-after": "0.41", "flagged": "no", "shift": "1.37 σ"}
    assert 'id="per-sample-note"' not in html
    # No reference set was ready when this one ran: the note says so, and no table.
    population = auditor.get(f"/dashboard/jobs/{seeded.jobs['completed']}").text
    assert 'id="per-request-evidence"' not in population
    assert ('id="per-sample-note"><strong>population-only</strong>: the model had no ready '
            'reference set when the job ran<') in population
    assert 'id="evidence-outcome"><span class="badge s-unlearned">' in population
    # A report written before the per-sample test: population-only, nothing claimed.
    legacy = auditor.get(f"/dashboard/jobs/{seeded.jobs['failed']}").text
    assert f"<strong>population-only</strong>: {NO_PER_SAMPLE}<" in legacy
    assert 'id="evidence-outcome">—<' in legacy and "steps —" in legacy
    # A job with no report yet has no evidence section.
    assert 'id="job-evidence"' not in auditor.get(
        f"/dashboard/jobs/{seeded.jobs['running']}").text


def test_request_page_shows_its_own_evidence_and_why_it_waits(auditor: TestClient,
                                                               world: World) -> None:
    seeded = world.seeded
    html = auditor.get(f"/dashboard/requests/{seeded.requests['completed-2']}").text
    rows = rows_of(html, "request-evidence-table")
    assert len(rows) == 2 and 'data-model="fashion-cnn"' in rows[0]
    assert 's-per-sample">per-sample<' in rows[0] and 's-unlearned">unlearned<' in rows[0]
    assert fields_of(rows[0]) == {"testable": "3 / 4", "p-before": "0.0012 flagged",
                                  "p-after": "0.41", "flagged": "no", "shift": "1.37 σ"}
    # The certificate's own statement, for a completed target.
    assert "membership p-value 0.0012 on the version before and 0.41 on this one" in rows[1]
    population = auditor.get(f"/dashboard/requests/{seeded.requests['completed']}").text
    rows = rows_of(population, "request-evidence-table")
    assert 's-population-only">population-only<' in rows[0] and "data-field" not in rows[0]
    assert "the model had no ready reference set when the job ran" in rows[0]
    assert "Population-only evidence" in rows[1]
    # No job has carried a queued request yet: no evidence section.
    assert 'id="request-evidence"' not in auditor.get(
        f"/dashboard/requests/{seeded.requests['queued']}").text

    # digits-mlp requires references and has none ready: once approved, its request waits.
    held = f"/dashboard/requests/{seeded.requests['awaiting_approval']}"
    assert "data-waiting" not in auditor.get(held).text
    with session_scope(world.app.state.sessionmaker) as db_session:
        request = db_session.get(DeletionRequest, seeded.requests["awaiting_approval"])
        assert request is not None
        lifecycle.approve(db_session, request=request, actor="key:test")
    assert f'data-waiting="digits-mlp">{WAITING_REASON}<' in auditor.get(held).text


def test_evidence_keeps_to_its_own_request_and_client(world: World) -> None:
    report = {"evidence": "per-sample", "outcome": "unchanged",
              "run": {"steps": 0, "weights_changed": False},
              "per_sample": {"alpha": 0.05, "requests": [
                  {"request_id": "mine", "n": 2, "n_testable": 2},
                  {"request_id": "someone-else", "n": 5, "n_testable": 5}]}}
    mine = service.evidence_of(report, request_id="mine")
    assert mine is not None and [r["request_id"] for r in mine.rows] == ["mine"]
    assert (mine.outcome, mine.method_steps, mine.weights_changed) == ("unchanged", 0, False)
    assert mine.per_sample == {"alpha": 0.05} and mine.note is None
    every = service.evidence_of(report)
    assert every is not None and len(every.rows) == 2
    assert service.evidence_of(None) is None
    # Should a requester ever reach a job page, it sees no other client's request ids.
    job_id, theirs = world.seeded.jobs["completed-2"], world.seeded.requests["completed-2"]
    with session_scope(world.app.state.sessionmaker) as db_session:
        for client, expected in (("acme-bank", []), ("globex", [theirs])):
            page = service.job_page(db_session, job_id=job_id, principal=Principal(
                key_id="k", role=Role.requester, client_id=client))
            assert page.evidence is not None
            assert [r["request_id"] for r in page.evidence.rows] == expected, client
            assert page.job.request_ids == expected, client
        auditor_view = service.job_page(db_session, job_id=job_id, principal=Principal(
            key_id="k", role=Role.auditor, client_id="compliance"))
        assert auditor_view.job.request_ids == [theirs]


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


def test_dates_numbers_and_cursors_it_cannot_use_are_ignored_or_422_never_500(
        operator: TestClient) -> None:
    def statuses(query: str) -> tuple[list[str], str]:
        response = operator.get(f"/dashboard/requests?{query}")
        assert response.status_code == 200, response.text
        return re.findall(r'<tr data-status="(\w+)"', response.text), response.text

    naive = base64.urlsafe_b64encode(json.dumps(["2030-01-01T00:00:00", "x"]).encode())
    found, html = statuses(f"cursor={naive.decode()}")  # a time without a zone: not ours
    assert "Ignored invalid filter: cursor." in html and len(found) == 13
    found, html = statuses("received_after=2030-01-01")  # read as UTC, like the API
    assert found == [] and "Ignored" not in html
    found, html = statuses("received_after=0001-01-01T00:00:00%2B01:00")  # before UTC began
    assert "Ignored invalid filter: received after." in html and len(found) == 13
    for before in ("100000000000000000000", "1e20", str(2**63)):
        response = operator.get(f"/dashboard/audit?before={before}")
        assert response.status_code == 422, (before, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    for version in (2**31, 2**63):
        response = operator.post("/dashboard/models/fashion-cnn/production", data={
            "version": version, "csrf_token": csrf_of(operator)}, follow_redirects=False)
        assert response.status_code == 422, (version, response.text)


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
