"""A seeded Lethe for the dashboard's tests: an app (TestClient) on SQLite and PostgreSQL, a
live uvicorn server for the browser, and a signed-in client per role."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app
from tests.dashboard.seed import Seeded, seed


@dataclass
class World:
    app: FastAPI
    seeded: Seeded


def make_world(database_url: str, data_dir: Path) -> World:
    settings = Settings(data_dir=data_dir, database_url=database_url,
                        secret_key="dashboard-test-secret", broker_url="memory://",
                        access_log=False)
    app = create_app(settings)
    seeded = seed(app.state.sessionmaker, store=app.state.artifact_store,
                  signer=app.state.signer, secret_key=app.state.secret_key)
    return World(app=app, seeded=seeded)


@pytest.fixture
def world(database_url: str, tmp_path: Path) -> Iterator[World]:
    built = make_world(database_url, tmp_path / "data")
    yield built
    built.app.state.engine.dispose()


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    with TestClient(world.app) as test_client:
        yield test_client


def login_token(client: TestClient) -> str:
    page = client.get("/dashboard/login")
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert match, page.text
    return match.group(1)


def sign_in(client: TestClient, api_key: str) -> None:
    response = client.post("/dashboard/login", data={
        "api_key": api_key, "csrf_token": login_token(client), "next": "/dashboard"},
        follow_redirects=False)
    assert response.status_code == 303, response.text


def csrf_of(client: TestClient, path: str = "/dashboard") -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text)
    assert match
    return match.group(1)


@pytest.fixture
def operator(client: TestClient, world: World) -> TestClient:
    sign_in(client, world.seeded.keys["operator"])
    return client


@pytest.fixture
def auditor(client: TestClient, world: World) -> TestClient:
    sign_in(client, world.seeded.keys["auditor"])
    return client


# ---- a live server for the browser --------------------------------------------------------


class LiveServer:
    def __init__(self, app: FastAPI) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False,
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the live server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()
