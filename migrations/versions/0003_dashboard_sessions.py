"""dashboard sessions kept on the server, and failed sign-ins per client address

Signing out revokes the session's row, so a replayed cookie opens nothing; failed sign-ins
are counted in the database, so every API replica throttles the same address. Cookies issued
before this revision name no session row: their holders sign in again.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-20
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.core.db

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dashboard_sessions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=24), nullable=False),
        sa.Column("created_at", app.core.db.UTCDateTime(), nullable=False),
        sa.Column("expires_at", app.core.db.UTCDateTime(), nullable=False),
        sa.Column("revoked_at", app.core.db.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["api_keys.id"],
            name=op.f("fk_dashboard_sessions_key_id_api_keys"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dashboard_sessions")),
    )
    with op.batch_alter_table("dashboard_sessions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_dashboard_sessions_expires_at"), ["expires_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_dashboard_sessions_key_id"), ["key_id"], unique=False)

    op.create_table(
        "dashboard_failed_logins",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("attempted_at", app.core.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dashboard_failed_logins")),
    )
    with op.batch_alter_table("dashboard_failed_logins", schema=None) as batch_op:
        batch_op.create_index(
            "ix_dashboard_failed_logins_address_at", ["address", "attempted_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_dashboard_failed_logins_attempted_at"), ["attempted_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("dashboard_failed_logins", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dashboard_failed_logins_attempted_at"))
        batch_op.drop_index("ix_dashboard_failed_logins_address_at")

    op.drop_table("dashboard_failed_logins")
    with op.batch_alter_table("dashboard_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dashboard_sessions_key_id"))
        batch_op.drop_index(batch_op.f("ix_dashboard_sessions_expires_at"))

    op.drop_table("dashboard_sessions")
