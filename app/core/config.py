"""One Settings object, read from the environment (prefix ``LETHE_``), with the embedded
defaults written in it: SQLite and artifacts in the data dir, secrets generated there on first
start when they are not given."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LETHE_", env_file=None, extra="ignore")

    data_dir: Path = Field(default=Path("./.lethe"), description="Root of all local state.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite file in the data dir."
    )
    broker_url: str | None = Field(
        default=None, description="Celery broker; default: the embedded broker in the data dir."
    )
    artifact_dir: Path | None = Field(
        default=None, description="Model weights store; default: <data dir>/artifacts."
    )
    dataset_dir: Path | None = Field(
        default=None, description="Sample stores (shards, images); default: <data dir>/datasets."
    )
    # Keyed hash for subject references. Generated into the data dir when absent, so a
    # multi-host deployment must pass it explicitly (the same value everywhere).
    secret_key: str | None = Field(default=None, repr=False)

    model_factory_modules: str = Field(
        default="",
        description="Comma-separated modules whose `module:factory` architectures the API "
        "accepts (they import code, so none by default).",
    )

    # Ed25519 private key (PEM) for certificates; generated into the data dir when absent.
    signing_key: str | None = Field(default=None, repr=False)

    max_body_bytes: int = Field(default=1 << 20, description="Limit for JSON bodies (413 above).")
    max_upload_bytes: int = Field(
        default=2 << 30, description="Limit for weights uploads, sample shards and sample "
        "manifests (413 above)."
    )
    max_model_parameters: int = Field(
        default=200_000_000, ge=1, description="Largest model (in parameters) that may be "
        "registered; counted without allocating it, so an architecture that would exhaust "
        "the workers' memory is refused at registration (422)."
    )
    # Worker pipeline.
    job_queue: str = Field(default="unlearning", description="Celery queue for unlearning jobs "
                           "(one per GPU class when scaling out).")
    job_time_limit_seconds: int = Field(default=6 * 3600, description="Hard limit per job.")
    heartbeat_seconds: float = Field(default=10.0, description="How often a job heart-beats.")
    heartbeat_timeout_seconds: float = Field(
        default=120.0, description="A running job silent this long lost its worker: requeue.")
    batch_interval_seconds: float = Field(default=5.0, description="Batcher period (beat).")
    sweep_interval_seconds: float = Field(default=15.0, description="Sweeper period (beat).")
    device: str = Field(default="auto", description="`auto`, `cpu`, `cuda` or `cuda:N`.")

    # Observability and the dashboard.
    log_level: str = Field(default="INFO", description="Root log level.")
    log_format: Literal["json", "text"] = Field(
        default="json", description="`json`: one JSON object per line, with the request id.")
    access_log: bool = Field(default=True, description="One log line per HTTP request.")
    dashboard_session_hours: float = Field(
        default=8.0, gt=0, le=24 * 30, description="Lifetime of a dashboard sign-in.")
    dashboard_secure_cookies: bool = Field(
        default=False, description="Mark dashboard cookies Secure even when the request "
        "reached the API over plain HTTP (behind a TLS-terminating proxy without "
        "--proxy-headers); over HTTPS they always are.")

    # A burst of requests waiting for the same idempotency key or the audit chain lock must
    # not exhaust the pool: size it for the threadpool that runs sync routes.
    db_pool_size: int = 20
    db_max_overflow: int = 20

    @property
    def allowed_model_factories(self) -> list[str]:
        return [m.strip() for m in self.model_factory_modules.split(",") if m.strip()]

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir / 'lethe.db'}"

    @property
    def resolved_broker_url(self) -> str:
        """The configured broker, or the embedded one: a redis-server private to the data dir,
        on a unix socket (started by `lethe up` or `lethe broker`)."""
        if self.broker_url:
            return self.broker_url
        return f"redis+socket://{self.embedded_broker_socket}"

    @property
    def embedded_broker_socket(self) -> Path:
        return self.resolved_data_dir / "broker" / "redis.sock"

    @property
    def resolved_artifact_dir(self) -> Path:
        return (self.artifact_dir or self.resolved_data_dir / "artifacts").expanduser().resolve()

    @property
    def resolved_dataset_dir(self) -> Path:
        return (self.dataset_dir or self.resolved_data_dir / "datasets").expanduser().resolve()

    def resolved_secret_key(self) -> bytes:
        if self.secret_key:
            return self.secret_key.encode()
        path = self.resolved_data_dir / "secret.key"
        return read_or_create_file(path, lambda: secrets.token_hex(32)).strip().encode()

    def signing_key_pem(self) -> str:
        """The Ed25519 key certificates are signed with (PEM, PKCS#8)."""
        if self.signing_key:
            return self.signing_key
        from app.certificates.signing import generate_private_key_pem

        return read_or_create_file(self.resolved_data_dir / "signing-key.pem",
                                   generate_private_key_pem)


def read_or_create_file(path: Path, make: Callable[[], str]) -> str:
    """Read a secret file, creating it (mode 0600) with ``make()`` on first use."""
    if path.exists():
        return path.read_text()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(make())
        handle.flush()
        os.fsync(handle.fileno())
    try:
        # link() fails when the name exists: of two processes starting at once, exactly one
        # secret wins and both read it, never a half-written file.
        os.link(staging, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(staging)
    return path.read_text()


@lru_cache
def get_settings() -> Settings:
    return Settings()
