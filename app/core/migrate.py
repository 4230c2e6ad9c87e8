"""Alembic, driven from code: `lethe db upgrade`, start-up migration, and the drift check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData

import migrations
from app.core.db import make_engine, normalise_url

SCRIPT_LOCATION = Path(migrations.__file__).parent


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    # '%' is Alembic's interpolation character; URLs may contain it (encoded passwords).
    config.set_main_option("sqlalchemy.url", normalise_url(database_url).replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    """Back to ``revision`` (for tests of a data migration; operators roll forward)."""
    command.downgrade(alembic_config(database_url), revision)


def drift(database_url: str, metadata: MetaData) -> list[Any]:
    """Differences between the migrated schema and the ORM's ``metadata`` (every domain's
    tables: ``app.tables.metadata``); empty when they agree."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "render_as_batch": True})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()
