"""The schema changes only through Alembic, and the migrations match the ORM exactly."""

from __future__ import annotations

from app.core import migrate
from app.tables import metadata


def test_migrations_match_the_orm_models(database_url: str) -> None:
    # The fixture already upgraded this database to head through Alembic.
    differences = migrate.drift(database_url, metadata)
    assert differences == [], f"ORM and migrations differ: {differences}"


def test_upgrade_is_idempotent(database_url: str) -> None:
    migrate.upgrade(database_url)
    assert migrate.drift(database_url, metadata) == []
