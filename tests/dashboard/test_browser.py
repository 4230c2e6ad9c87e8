"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright)
against a live uvicorn server on a seeded database: sign-in is enforced, every page renders
without a console error (a Content-Security-Policy violation included), charts draw, a filter
works, a running job's page refreshes itself, and rollback is guarded. Screenshots go to
tests/artifacts/screenshots/ (git-ignored); LETHE_UPDATE_DOCS_SCREENSHOT=1 also rewrites the
README's docs/images/dashboard-overview.png."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.core.db import session_scope
from app.jobs import flows
from tests.conftest import service_unavailable
from tests.dashboard.conftest import LiveServer, World, make_world

CHROMIUM = os.environ.get("LETHE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "tests" / "artifacts" / "screenshots"
DOCS_SCREENSHOT = ROOT / "docs" / "images" / "dashboard-overview.png"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        service_unavailable("Playwright (pip install -e '.[dev]')", exc)
    executable = shutil.which(CHROMIUM) or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if executable is None:
        service_unavailable("Chromium (apt-get install chromium; scripts/bootstrap.sh does)",
                            FileNotFoundError(CHROMIUM))
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path
         ) -> Iterator[tuple[LiveServer, World]]:
    folder = tmp_path_factory.mktemp("browser")
    shutil.copy(sqlite_template, folder / "lethe.db")
    world = make_world(f"sqlite:///{folder / 'lethe.db'}", folder / "data")
    with LiveServer(world.app) as server:
        yield server, world
    world.app.state.engine.dispose()


class Page:
    """A browser tab that records console errors and failed requests."""

    def __init__(self, browser: Any, base_url: str) -> None:
        self.context = browser.new_context(base_url=base_url,
                                           viewport={"width": 1360, "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        self.page.on("requestfailed", lambda request: self.errors.append(
            f"request failed: {request.url}"))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def sign_in(self, api_key: str) -> None:
        self.page.goto("/dashboard")
        self.page.wait_for_url("**/dashboard/login**")
        self.page.fill("#api_key", api_key)
        self.page.click("button[type=submit]")
        self.page.wait_for_url("**/dashboard")

    def shot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def tab(browser: Any, live: tuple[LiveServer, World]) -> Iterator[Page]:
    opened = Page(browser, live[0].url)
    yield opened
    opened.context.close()


def test_sign_in_is_enforced_and_a_wrong_key_is_refused(tab: Page,
                                                       live: tuple[LiveServer, World]) -> None:
    for path in ("/dashboard", "/dashboard/audit", "/dashboard/models/fashion-cnn"):
        tab.page.goto(path)
        assert "/dashboard/login" in tab.page.url
        assert tab.page.locator("h1").inner_text() == "Sign in"
    tab.page.fill("#api_key", "lethe_0000000000000000_not-a-key")
    tab.page.click("button[type=submit]")
    assert "Invalid API key" in tab.page.locator(".flash.error").inner_text()
    tab.page.fill("#api_key", live[1].seeded.keys["requester"])
    tab.page.click("button[type=submit]")
    assert "operator and auditor keys" in tab.page.locator(".flash.error").inner_text()
    tab.shot("login-refused")
    # The 401 and 403 answers are logged by Chromium as failed resources: expected here.
    assert all("status of 40" in error for error in tab.errors), tab.errors


def test_every_page_renders_without_console_errors(tab: Page,
                                                   live: tuple[LiveServer, World]) -> None:
    seeded = live[1].seeded
    tab.sign_in(seeded.keys["auditor"])
    pages = {
        "overview": ("/dashboard", "Overview"),
        "requests": ("/dashboard/requests", "Deletion requests"),
        "request-completed": (f"/dashboard/requests/{seeded.requests['completed']}",
                              "Request"),
        "request-failed": (f"/dashboard/requests/{seeded.requests['failed']}", "Request"),
        "models": ("/dashboard/models", "Models"),
        "model": ("/dashboard/models/fashion-cnn", "fashion-cnn"),
        "jobs": ("/dashboard/jobs", "Unlearning jobs"),
        "job-running": (f"/dashboard/jobs/{seeded.jobs['running']}", "Job"),
        "job-failed": (f"/dashboard/jobs/{seeded.jobs['failed']}", "Job"),
        "audit": ("/dashboard/audit", "Audit log"),
    }
    for name, (path, heading) in pages.items():
        response = tab.page.goto(path)
        assert response is not None and response.status == 200, (path, response)
        assert tab.page.locator("h1").inner_text().startswith(heading)
        tab.page.wait_for_load_state("networkidle")
        tab.shot(name)
    assert tab.errors == []

    # Charts drew (Chart.js attached to the canvas) from the vendored library, offline.
    tab.page.goto("/dashboard/models/fashion-cnn")
    tab.page.wait_for_function("() => window.Chart && Chart.getChart('versions-chart')")
    points = tab.page.evaluate(
        "() => Chart.getChart('versions-chart').data.datasets[0].data")
    assert points[1:4] == [0.71, 0.53, 0.51]
    tab.page.goto("/dashboard")
    tab.page.wait_for_function("() => window.Chart && Chart.getChart('per-day-chart')")
    # 13 requests seeded, one of them received 32 days ago: outside the 30-day window.
    assert sum(tab.page.evaluate(
        "() => Chart.getChart('per-day-chart').data.datasets[0].data")) == 12
    assert tab.page.locator("#audit-table").count() == 0
    if os.environ.get("LETHE_UPDATE_DOCS_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        tab.page.screenshot(path=str(DOCS_SCREENSHOT), full_page=True)
    assert tab.errors == []


def test_a_filter_narrows_the_request_list(tab: Page, live: tuple[LiveServer, World]) -> None:
    tab.sign_in(live[1].seeded.keys["auditor"])
    tab.page.goto("/dashboard/requests")
    all_rows = tab.page.locator("#requests-table tbody tr").count()
    tab.page.select_option("select[name=status]", "queued")
    tab.page.click("#request-filters button[type=submit]")
    tab.page.wait_for_url("**status=queued**")
    statuses = tab.page.locator("#requests-table tbody tr").evaluate_all(
        "rows => rows.map(row => row.dataset.status)")
    assert statuses and set(statuses) == {"queued"} and len(statuses) < all_rows
    assert tab.page.locator("select[name=status]").input_value() == "queued"
    tab.shot("requests-filtered")
    assert tab.errors == []


def test_a_running_job_page_refreshes_itself(tab: Page, live: tuple[LiveServer, World]) -> None:
    server, world = live
    job_id = world.seeded.jobs["running"]
    tab.sign_in(world.seeded.keys["operator"])
    tab.page.goto(f"/dashboard/jobs/{job_id}")
    assert tab.page.locator("body").get_attribute("data-live") == "3"
    assert tab.page.locator("#job-progress .pct").inner_text() == "40 %"
    with session_scope(world.app.state.sessionmaker) as db_session:
        flows.report_progress(db_session, job_id=job_id, attempt=1, phase="match: epoch 5/5",
                              step=85, total=100, metrics={"loss": 0.2})
    # No navigation: the poll swaps the live region in place.
    tab.page.wait_for_function(
        "() => document.querySelector('#job-progress .pct').textContent.trim() === '85 %'",
        timeout=15_000)
    assert tab.page.locator("#job-phase").inner_text() == "match: epoch 5/5"
    assert int(tab.page.locator("body").get_attribute("data-refreshed") or 0) >= 1
    tab.shot("job-live")
    assert tab.errors == []


def test_rollback_is_guarded_like_the_api(tab: Page, live: tuple[LiveServer, World]) -> None:
    tab.sign_in(live[1].seeded.keys["operator"])
    tab.page.goto("/dashboard/models/fashion-cnn")
    tab.page.select_option("#rollback-form select[name=version]", "3")
    tab.page.click("#rollback-form button[type=submit]")
    tab.page.wait_for_load_state()
    assert "predates a completed erasure" in tab.page.locator(".flash").inner_text()
    assert "v4" in tab.page.locator("#production-version").inner_text()
    tab.shot("rollback-refused")
    assert tab.errors == []
