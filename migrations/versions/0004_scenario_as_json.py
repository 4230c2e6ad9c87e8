"""a target's and a job's scenario stored as the engine's JSON, not a string to parse back

`subset`, `class:N` and `backdoor` become ``Scenario.to_dict()``: kind, forget_class,
target_label and trigger. A backdoor target gets its own request's trigger (a patch spec; a
free-text description is no trigger) and the label its samples carry most often, the
poisoned label; a backdoor job takes its first target's, as the worker did before.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

import app.core.db

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("deletion_targets", "unlearning_jobs")


def _loads(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _scenario(text: str, *, target_label: int | None = None,
              trigger: Any = None) -> dict[str, Any]:
    kind, _, number = text.partition(":")
    return {"kind": kind, "forget_class": int(number) if kind == "class" else None,
            "target_label": target_label if kind == "backdoor" else None,
            "trigger": trigger if kind == "backdoor" and isinstance(trigger, dict) else None}


def _backdoor_target(connection: sa.Connection, request_id: str, model_id: int
                     ) -> dict[str, Any]:
    payload = _loads(connection.execute(sa.text(
        "SELECT payload FROM deletion_requests WHERE id = :id"), {"id": request_id}).scalar())
    payload = payload if isinstance(payload, dict) else {}
    keys = [k for k in payload.get("sample_keys") or [] if isinstance(k, str)]
    labels: Counter[int] = Counter()
    if keys:
        dataset_id = connection.execute(sa.text(
            "SELECT dataset_id FROM models WHERE id = :id"), {"id": model_id}).scalar()
        for (label,) in connection.execute(sa.text(
                "SELECT label FROM samples WHERE dataset_id = :dataset AND sample_key IN :keys"
                ).bindparams(sa.bindparam("keys", expanding=True)),
                {"dataset": dataset_id, "keys": keys}):
            labels[int(label)] += 1
    label = labels.most_common(1)[0][0] if labels else 0
    return _scenario("backdoor", target_label=label, trigger=payload.get("trigger"))


def upgrade() -> None:
    connection = op.get_bind()
    for table in TABLES:
        op.add_column(table, sa.Column("scenario_json", app.core.db.JSONType, nullable=True))
    first_target: dict[str, dict[str, Any]] = {}
    rows = connection.execute(sa.text(
        "SELECT id, request_id, model_id, scenario, job_id FROM deletion_targets ORDER BY id"))
    for target_id, request_id, model_id, text, job_id in rows.fetchall():
        scenario = (_backdoor_target(connection, request_id, model_id) if text == "backdoor"
                    else _scenario(text))
        connection.execute(sa.text(
            "UPDATE deletion_targets SET scenario_json = :value WHERE id = :id"),
            {"value": json.dumps(scenario), "id": target_id})
        if job_id is not None:
            first_target.setdefault(job_id, scenario)
    for job_id, text in connection.execute(sa.text(
            "SELECT id, scenario FROM unlearning_jobs")).fetchall():
        inherited = first_target.get(job_id) if text == "backdoor" else None
        connection.execute(sa.text(
            "UPDATE unlearning_jobs SET scenario_json = :value WHERE id = :id"),
            {"value": json.dumps(inherited or _scenario(text, target_label=0)), "id": job_id})
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("scenario")
            batch.alter_column("scenario_json", new_column_name="scenario", nullable=False,
                               existing_type=app.core.db.JSONType)


def downgrade() -> None:
    connection = op.get_bind()
    for table in TABLES:
        op.add_column(table, sa.Column("scenario_text", sa.String(length=24), nullable=True))
        for row_id, value in connection.execute(sa.text(
                f"SELECT id, scenario FROM {table}")).fetchall():
            scenario = _loads(value) or {}
            kind = scenario.get("kind", "subset")
            text = f"class:{scenario.get('forget_class')}" if kind == "class" else kind
            connection.execute(sa.text(
                f"UPDATE {table} SET scenario_text = :value WHERE id = :id"),
                {"value": text, "id": row_id})
        with op.batch_alter_table(table) as batch:
            batch.drop_column("scenario")
            batch.alter_column("scenario_text", new_column_name="scenario", nullable=False,
                               existing_type=sa.String(length=24))
