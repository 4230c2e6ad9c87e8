"""What a worker process needs, built once per process (after the prefork pool forks, so no
database connection or CUDA context is ever shared across a fork)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.certificates.service import Signer
from app.core.config import Settings, get_settings
from app.core.db import make_engine, make_sessionmaker, session_scope
from app.models_registry.artifacts import ArtifactStore


@dataclass
class WorkerContext:
    settings: Settings

    @cached_property
    def engine(self) -> Engine:
        return make_engine(self.settings.resolved_database_url, pool_size=2, max_overflow=2)

    @cached_property
    def sessionmaker(self) -> sessionmaker[Session]:
        return make_sessionmaker(self.engine)

    @cached_property
    def artifacts(self) -> ArtifactStore:
        return ArtifactStore(self.settings.resolved_artifact_dir)

    @cached_property
    def signer(self) -> Signer:
        return Signer.from_settings(self.settings)

    @property
    def hostname(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    @contextmanager
    def session(self) -> Iterator[Session]:
        with session_scope(self.sessionmaker) as db_session:
            yield db_session


_context: tuple[int, WorkerContext] | None = None


def current() -> WorkerContext:
    """This process's context; rebuilt in a forked child rather than inherited."""
    global _context
    if _context is None or _context[0] != os.getpid():
        _context = (os.getpid(), WorkerContext(get_settings()))
    return _context[1]
