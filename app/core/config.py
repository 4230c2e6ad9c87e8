"""One Settings object, read from the environment (prefix ``LETHE_``), with the embedded
defaults written in it: SQLite and artifacts in the data dir, secrets generated there on first
start when they are not given."""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from unlearning.atomic import atomic_write


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

    # ---- Dashboard sign-in throttling (app/dashboard/sessions.py) ------------------------
    dashboard_login_failure_limit: int = Field(
        default=5, ge=1, description="Failed dashboard sign-ins an address may make within "
        "the window; further attempts are refused (429, Retry-After) until the window "
        "passes, whatever key they present. The address is the client's as uvicorn sees it "
        "(X-Forwarded-For from trusted proxies with --proxy-headers).")
    dashboard_login_failure_window_seconds: float = Field(
        default=15 * 60, gt=0, description="The window failed dashboard sign-ins are counted "
        "in; a successful sign-in clears its address's count.")
    # ---- end of dashboard sign-in throttling ---------------------------------------------

    # A burst of requests waiting for the same idempotency key or the audit chain lock must
    # not exhaust the pool: size it for the threadpool that runs sync routes.
    db_pool_size: int = 20
    db_max_overflow: int = 20

    # ---- Webhook targets (SSRF guard: app/webhooks/targets.py) ---------------------------
    webhook_allowed_networks: str = Field(
        default="",
        description="Comma-separated networks (CIDR, e.g. `10.20.0.0/16,fd00:1::/48`) that "
        "webhook URLs may resolve to although they are not public. Without them, a webhook "
        "whose host resolves to any loopback, link-local, private (RFC 1918, fc00::/7), "
        "multicast, unspecified or reserved address, IPv4-mapped forms included, is refused "
        "at registration (422) and at each delivery (marked failed, never sent). Empty by "
        "default: list only networks whose services may receive requesters' POSTs.")

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _webhook_networks_parse(cls, value: str) -> str:
        parse_networks(value)  # a typo stops the start, not the first registration
        return value

    @property
    def webhook_allowed_network_list(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return parse_networks(self.webhook_allowed_networks)
    # ---- end of webhook targets -----------------------------------------------------------

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


def parse_networks(value: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Comma-separated CIDRs (``10.0.0.0/8, ::1/128``); a bare address is a /32 or /128."""
    return [ipaddress.ip_network(part.strip(), strict=False)
            for part in value.split(",") if part.strip()]


def read_or_create_file(path: Path, make: Callable[[], str]) -> str:
    """Read a secret file, creating it (mode 0600) with ``make()`` on first use."""
    if path.exists():
        return path.read_text()
    try:
        with atomic_write(path, mode=0o600, replace=False) as staging:
            staging.write_text(make())
    except FileExistsError:
        pass  # of two processes starting at once, one secret wins and both read it
    return path.read_text()


@lru_cache
def get_settings() -> Settings:
    return Settings()
