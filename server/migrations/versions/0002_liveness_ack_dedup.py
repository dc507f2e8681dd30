"""Birth/death ordering and duplicate-id evidence on devices, redelivered acks stored once, a reason
on failed round rows.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 08:00:00

Existing duplicate ack rows (same device, version, applied version, status) are reduced to the
first one before the unique constraint is created.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_ACK_KEY = ['device_id', 'version', 'applied_version', 'status']


def upgrade() -> None:
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('boot_seq', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('status_seq', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('replaced_boot_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('replaced_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('duplicate_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('duplicate_boot_id', sa.String(length=64), nullable=True))

    op.execute(
        "DELETE FROM policy_acks WHERE id NOT IN "
        "(SELECT MIN(id) FROM policy_acks GROUP BY device_id, version, applied_version, status)"
    )
    with op.batch_alter_table('policy_acks', schema=None) as batch_op:
        batch_op.create_unique_constraint(batch_op.f('uq_policy_acks_device_id_version_applied_version_status'), _ACK_KEY)

    with op.batch_alter_table('round_metrics', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reason', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('round_metrics', schema=None) as batch_op:
        batch_op.drop_column('reason')
    with op.batch_alter_table('policy_acks', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_policy_acks_device_id_version_applied_version_status'), type_='unique')
    with op.batch_alter_table('devices', schema=None) as batch_op:
        for col in ('duplicate_boot_id', 'duplicate_at', 'replaced_at', 'replaced_boot_id', 'status_seq', 'boot_seq'):
            batch_op.drop_column(col)
