"""An API client on a fresh database, and API keys for each role."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.auth import service as keys
from app.auth.models import Role
from app.core.config import Settings
from app.core.db import session_scope
from app.main import create_app
from tests.conftest import app_of


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    # /readyz checks the broker too: kombu's in-memory transport stands in for Redis here.
    return Settings(data_dir=tmp_path / "data", database_url=database_url,
                    secret_key="test-secret", broker_url="memory://")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings)
    with TestClient(app) as test_client:
        yield test_client
    app.state.engine.dispose()


KeyFactory = Callable[..., dict[str, str]]


@pytest.fixture
def make_key(client: TestClient) -> KeyFactory:
    """Create an API key and return the Authorization header that carries it."""

    def make(role: str = "requester", client_id: str = "acme") -> dict[str, str]:
        with session_scope(app_of(client).state.sessionmaker) as db_session:
            _, plain = keys.create(db_session, role=Role(role), client_id=client_id)
        return {"Authorization": f"Bearer {plain}"}

    return make


@pytest.fixture
def operator(make_key: KeyFactory) -> dict[str, str]:
    return make_key("operator", "lethe-ops")


@pytest.fixture
def requester(make_key: KeyFactory) -> dict[str, str]:
    return make_key("requester", "acme")


@pytest.fixture
def auditor(make_key: KeyFactory) -> dict[str, str]:
    return make_key("auditor", "compliance")
