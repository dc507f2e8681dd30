"""Inference telemetry roll-ups per device and minute (issue 10).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 07:45:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('inference_rollups',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('device_id', sa.String(length=64), nullable=False),
    sa.Column('minute', sa.DateTime(timezone=True), nullable=False),
    sa.Column('messages', sa.Integer(), nullable=False),
    sa.Column('requests', sa.Integer(), nullable=False),
    sa.Column('errors', sa.Integer(), nullable=False),
    sa.Column('deadline_misses', sa.Integer(), nullable=False),
    sa.Column('interventions', sa.Integer(), nullable=False),
    sa.Column('k_counts', sa.JSON(), nullable=False),
    sa.Column('layer_counts', sa.JSON(), nullable=False),
    sa.Column('p50_ms', sa.Float(), nullable=True),
    sa.Column('p99_ms', sa.Float(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_inference_rollups')),
    sa.UniqueConstraint('device_id', 'minute', name=op.f('uq_inference_rollups_device_id_minute'))
    )
    with op.batch_alter_table('inference_rollups', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_inference_rollups_device_id'), ['device_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_inference_rollups_minute'), ['minute'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('inference_rollups', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_inference_rollups_minute'))
        batch_op.drop_index(batch_op.f('ix_inference_rollups_device_id'))
    op.drop_table('inference_rollups')
