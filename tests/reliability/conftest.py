"""Fixtures for the fault-injection tests: private servers they may crash."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import service_unavailable
from tests.reliability.servers import PrivatePostgres, PrivateRedis, ServerUnavailable


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    try:
        server = PrivatePostgres()
    except ServerUnavailable as error:
        service_unavailable("A private PostgreSQL server", error)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    try:
        server = PrivateRedis()
    except ServerUnavailable as error:
        service_unavailable("A private Redis server", error)
    try:
        yield server
    finally:
        server.close()
