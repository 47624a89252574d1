"""Notes, and a log with one row per migration that ran (how the tests count the runs).

Revision ID: r0001
Revises:
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "r0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "alembic_demo_notes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("text", sa.String(200), nullable=False),
    )
    log = op.create_table(
        "alembic_demo_log",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("revision", sa.String(32), nullable=False),
    )
    op.bulk_insert(log, [{"revision": "r0001"}])


def downgrade() -> None:
    op.drop_table("alembic_demo_log")
    op.drop_table("alembic_demo_notes")
