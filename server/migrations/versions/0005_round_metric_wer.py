"""Word and character error rates per device and round (speech-recognition fleets, issue 9).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 11:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('round_metrics', schema=None) as batch_op:
        batch_op.add_column(sa.Column('wer', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('cer', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('round_metrics', schema=None) as batch_op:
        batch_op.drop_column('cer')
        batch_op.drop_column('wer')
