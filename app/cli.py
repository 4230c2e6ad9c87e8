"""Control-plane commands: `lethe serve`, `lethe db ...`, `lethe keys ...`."""

from __future__ import annotations

from typing import IO

import click

from app.core.config import get_settings


def ensure_schema(database_url: str) -> None:
    """Bring the database to the latest migration (what `lethe db upgrade` does)."""
    from app.core import migrate

    migrate.upgrade(database_url)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int,
              help="uvicorn worker processes.")
@click.option("--migrate/--no-migrate", default=None,
              help="Upgrade the schema first (default: on for SQLite, off otherwise).")
def serve(host: str, port: int, workers: int, migrate: bool | None) -> None:
    """Run the HTTP API."""
    import uvicorn

    settings = get_settings()
    url = settings.resolved_database_url
    if migrate if migrate is not None else url.startswith("sqlite"):
        ensure_schema(url)
    from app.observability.logs import uvicorn_log_config
    from app.observability.multiprocess import metrics_dir_for, prepare_multiprocess_dir

    # Several workers are several processes: their metrics meet in files (multiprocess mode).
    metrics_dir = metrics_dir_for(workers, settings.resolved_data_dir)
    if metrics_dir is not None:
        prepare_multiprocess_dir(metrics_dir)
    click.echo(f"Lethe API on http://{host}:{port}  (docs: http://{host}:{port}/docs, "
               f"dashboard: http://{host}:{port}/dashboard, database: {url.split('@')[-1]})")
    # The app's middleware writes the access log (with request ids), so uvicorn's is off.
    uvicorn.run("app.main:create_app", factory=True, host=host, port=port, workers=workers,
                log_config=uvicorn_log_config(settings.log_level, settings.log_format),
                access_log=False)


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (default: head)."""
    from app.core import migrate

    migrate.upgrade(get_settings().resolved_database_url, revision)
    click.echo(f"database at {revision}")


@click.group()
def keys() -> None:
    """API keys."""


def _client_id_option(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    from app.auth.models import check_client_id

    try:
        return check_client_id(value)
    except ValueError as invalid:
        raise click.BadParameter(str(invalid)) from None


@keys.command("create")
@click.option("--role", required=True,
              type=click.Choice(["requester", "operator", "auditor", "admin"]))
@click.option("--client", "client_id", required=True, callback=_client_id_option,
              help="The client the key acts for (as the API accepts: a letter or digit, "
                   "then letters, digits and . _ : -).")
@click.option("--name", default="", help="A label for the key.")
def keys_create(role: str, client_id: str, name: str) -> None:
    """Create a key and print it once; only its hash is stored."""
    from app.auth import service
    from app.auth.models import Role
    from app.core.db import make_engine, make_sessionmaker, session_scope

    settings = get_settings()
    ensure_schema(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    with session_scope(make_sessionmaker(engine)) as db_session:
        api_key, plain = service.create(db_session, role=Role(role), client_id=client_id,
                                        name=name)
    engine.dispose()
    click.echo(plain)
    click.echo(f"(key id {api_key.id}, role {role}, client {client_id}; shown once)", err=True)


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id."""
    from app.auth import service
    from app.core.db import make_engine, make_sessionmaker, session_scope

    engine = make_engine(get_settings().resolved_database_url)
    with session_scope(make_sessionmaker(engine)) as db_session:
        service.revoke(db_session, key_id=key_id, actor="system")
    engine.dispose()
    click.echo(f"revoked {key_id}")





@click.group()
def certificate() -> None:
    """Certificates of erasure."""


@certificate.command("verify")
@click.argument("document", type=click.File("r"))
@click.option("--public-key", "public_key_file", type=click.File("r"),
              help="The key from GET /v1/certificates/public-key: its JSON body as saved, "
                   "or the PEM or JWK in it. Default: this data dir's signing key.")
def certificate_verify(document: IO[str], public_key_file: IO[str] | None) -> None:
    """Verify a certificate offline; exit status 0 when it is valid, 1 when not."""
    import json

    from app.certificates import signing
    from app.certificates.service import Signer

    if public_key_file is not None:
        try:
            key = signing.read_public_key(public_key_file.read())
        except ValueError as exc:  # a UnicodeDecodeError too
            raise click.ClickException(f"--public-key {public_key_file.name}: {exc}") from None
    else:
        key = Signer.from_settings(get_settings()).private_key.public_key()
    try:
        parsed = json.load(document)
    except ValueError as exc:  # not JSON, or not text
        raise click.ClickException(f"not JSON: {exc}") from None
    valid, reason = signing.verify_document(parsed, key)
    statement = parsed.get("certificate", {}) if isinstance(parsed, dict) else {}
    click.echo(f"{'VALID' if valid else 'INVALID'}: {reason}")
    if valid:
        for entry in statement.get("models", []):
            click.echo(f"  {entry['model']} v{entry['version']} sha256={entry['weights_sha256']}"
                       f" method={entry.get('method')}")
            click.echo(f"    outcome: {entry.get('outcome', 'unknown')}, evidence: "
                       f"{entry.get('evidence', 'unknown')}, method steps: "
                       f"{entry.get('method_steps')}, weights changed: "
                       f"{entry.get('weights_changed')}")
            figures = entry.get("per_sample")
            if figures:
                click.echo(f"    per-sample: n={figures['n_testable']}/{figures['n']}, "
                           f"p before {figures['p_before']:.3g}, p after "
                           f"{figures['p_value']:.3g}, {figures['references']} OUT references, "
                           f"alpha {figures['alpha']}, detectable shift "
                           f"{figures['detectable_shift']:.2f} sd")
            if entry.get("statement"):
                click.echo(f"    {entry['statement']}")
    raise SystemExit(0 if valid else 1)
COMMANDS = [serve, db, keys, certificate]
