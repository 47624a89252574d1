"""Notes get an author.

Revision ID: r0002
Revises: r0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "r0002"
down_revision: str | None = "r0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = sa.table("alembic_demo_log", sa.column("revision", sa.String))


def upgrade() -> None:
    op.add_column("alembic_demo_notes", sa.Column("author", sa.String(100), nullable=True))
    op.execute(log.insert().values(revision="r0002"))


def downgrade() -> None:
    op.execute(log.delete().where(log.c.revision == "r0002"))
    with op.batch_alter_table("alembic_demo_notes") as batch:
        batch.drop_column("author")
