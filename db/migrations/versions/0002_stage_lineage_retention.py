"""Job stage and progress, warm-start sources, trial lineage, deleted artifacts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("stage", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("progress", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("warm_sources", sa.JSON(), nullable=True))
    with op.batch_alter_table("trials") as batch:
        batch.add_column(sa.Column("parent", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("artifact_deleted", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("trials") as batch:
        batch.drop_column("artifact_deleted")
        batch.drop_column("parent")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("warm_sources")
        batch.drop_column("progress")
        batch.drop_column("stage")
