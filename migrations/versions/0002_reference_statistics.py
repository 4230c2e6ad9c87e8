"""reference statistics: reference sets and their per-sample values

Models registered before this revision keep working as they did: their policy gets
`require_references` and `build_references_on_register` set to false (new models default to
true), so their queued requests do not start waiting for references nobody asked for.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import app.core.db

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "reference_sets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=True),
        sa.Column("n_references", sa.Integer(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("phase", sa.String(length=64), nullable=True),
        sa.Column("completed", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("requested_by", sa.String(length=128), nullable=False),
        sa.Column("n_train", sa.Integer(), nullable=True),
        sa.Column("n_holdout", sa.Integer(), nullable=True),
        sa.Column(
            "reference_seconds",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("worker_host", sa.String(length=255), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("created_at", app.core.db.UTCDateTime(), nullable=False),
        sa.Column("started_at", app.core.db.UTCDateTime(), nullable=True),
        sa.Column("dispatched_at", app.core.db.UTCDateTime(), nullable=True),
        sa.Column("heartbeat_at", app.core.db.UTCDateTime(), nullable=True),
        sa.Column("finished_at", app.core.db.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
            name=op.f("fk_reference_sets_model_id_models"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["model_versions.id"],
            name=op.f("fk_reference_sets_version_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reference_sets")),
    )
    with op.batch_alter_table("reference_sets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_reference_sets_model_id"), ["model_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_reference_sets_status"), ["status"], unique=False)

    op.create_table(
        "reference_statistics",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("set_id", sa.Integer(), nullable=False),
        sa.Column(
            "sample_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("reference_index", sa.Integer(), nullable=False),
        sa.Column("phi", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["sample_id"],
            ["samples.id"],
            name=op.f("fk_reference_statistics_sample_id_samples"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["set_id"],
            ["reference_sets.id"],
            name=op.f("fk_reference_statistics_set_id_reference_sets"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reference_statistics")),
        sa.UniqueConstraint(
            "set_id",
            "sample_id",
            "reference_index",
            name="uq_reference_statistics_set_sample_reference",
        ),
    )
    with op.batch_alter_table("reference_statistics", schema=None) as batch_op:
        batch_op.create_index("ix_reference_statistics_sample_id", ["sample_id"], unique=False)

    _existing_models_opt_out()


def _existing_models_opt_out() -> None:
    models = sa.table("models", sa.column("id", sa.Integer()), sa.column("policy", sa.JSON()))
    connection = op.get_bind()
    for model_id, policy in connection.execute(sa.select(models.c.id, models.c.policy)).all():
        policy = dict(policy or {})
        verification = dict(policy.get("verification") or {})
        verification.setdefault("require_references", False)
        verification.setdefault("build_references_on_register", False)
        policy["verification"] = verification
        connection.execute(models.update().where(models.c.id == model_id).values(policy=policy))


def downgrade() -> None:
    with op.batch_alter_table("reference_statistics", schema=None) as batch_op:
        batch_op.drop_index("ix_reference_statistics_sample_id")

    op.drop_table("reference_statistics")
    with op.batch_alter_table("reference_sets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reference_sets_status"))
        batch_op.drop_index(batch_op.f("ix_reference_sets_model_id"))

    op.drop_table("reference_sets")
