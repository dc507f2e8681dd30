"""Initial registry schema: device classes, devices, policies (audit trail), policy acks, rounds,
per-device round metrics.

Revision ID: 0001
Revises: 
Create Date: 2026-11-24 13:26:59.556162

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('device_classes',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_device_classes'))
    )
    op.create_table('rounds',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('config', sa.JSON(), nullable=True),
    sa.Column('summary', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rounds')),
    sa.UniqueConstraint('run_id', 'number', name=op.f('uq_rounds_run_id_number'))
    )
    with op.batch_alter_table('rounds', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rounds_run_id'), ['run_id'], unique=False)

    op.create_table('devices',
    sa.Column('device_id', sa.String(length=64), nullable=False),
    sa.Column('device_class', sa.String(length=64), nullable=True),
    sa.Column('class_pinned', sa.Boolean(), nullable=False),
    sa.Column('online', sa.Boolean(), nullable=False),
    sa.Column('boot_id', sa.String(length=64), nullable=True),
    sa.Column('first_seen', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen', sa.DateTime(timezone=True), nullable=True),
    sa.Column('status_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('profile', sa.JSON(), nullable=True),
    sa.Column('profile_revision', sa.Integer(), nullable=True),
    sa.Column('profile_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('model_id', sa.String(length=200), nullable=True),
    sa.Column('num_layers', sa.Integer(), nullable=True),
    sa.Column('cores', sa.Integer(), nullable=True),
    sa.Column('memory_mb', sa.Integer(), nullable=True),
    sa.Column('desired_version', sa.Integer(), nullable=False),
    sa.Column('desired', sa.JSON(), nullable=True),
    sa.Column('desired_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('applied_version', sa.Integer(), nullable=False),
    sa.Column('ack_status', sa.String(length=16), nullable=True),
    sa.Column('ack_reason', sa.Text(), nullable=True),
    sa.Column('effective_k', sa.Integer(), nullable=True),
    sa.Column('expected_latency_ms', sa.Float(), nullable=True),
    sa.Column('acked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('telemetry', sa.JSON(), nullable=True),
    sa.Column('telemetry_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['device_class'], ['device_classes.name'], name=op.f('fk_devices_device_class_device_classes')),
    sa.PrimaryKeyConstraint('device_id', name=op.f('pk_devices'))
    )
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_devices_device_class'), ['device_class'], unique=False)

    op.create_table('policies',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('scope_key', sa.String(length=80), nullable=False),
    sa.Column('device_class', sa.String(length=64), nullable=False),
    sa.Column('device_id', sa.String(length=64), nullable=True),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('keep', sa.Float(), nullable=True),
    sa.Column('latency_ms', sa.Float(), nullable=True),
    sa.Column('percentile', sa.Float(), nullable=True),
    sa.Column('cleared', sa.Boolean(), nullable=False),
    sa.Column('issued_by', sa.String(length=128), nullable=False),
    sa.Column('issued_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('previous_id', sa.Integer(), nullable=True),
    sa.Column('comment', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['device_class'], ['device_classes.name'], name=op.f('fk_policies_device_class_device_classes')),
    sa.ForeignKeyConstraint(['previous_id'], ['policies.id'], name=op.f('fk_policies_previous_id_policies')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_policies')),
    sa.UniqueConstraint('scope_key', 'version', name=op.f('uq_policies_scope_key_version'))
    )
    with op.batch_alter_table('policies', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_policies_device_class'), ['device_class'], unique=False)
        batch_op.create_index(batch_op.f('ix_policies_scope_key'), ['scope_key'], unique=False)

    op.create_table('round_metrics',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('round_id', sa.Integer(), nullable=False),
    sa.Column('device_id', sa.String(length=64), nullable=False),
    sa.Column('device_class', sa.String(length=64), nullable=True),
    sa.Column('phase', sa.String(length=16), nullable=False),
    sa.Column('policy_version', sa.Integer(), nullable=True),
    sa.Column('k', sa.Integer(), nullable=True),
    sa.Column('accuracy', sa.Float(), nullable=True),
    sa.Column('loss', sa.Float(), nullable=True),
    sa.Column('num_examples', sa.Integer(), nullable=True),
    sa.Column('layer_usage', sa.JSON(), nullable=True),
    sa.Column('mean_kept_layers', sa.Float(), nullable=True),
    sa.Column('latency_ms', sa.Float(), nullable=True),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['round_id'], ['rounds.id'], name=op.f('fk_round_metrics_round_id_rounds'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_round_metrics')),
    sa.UniqueConstraint('round_id', 'device_id', 'phase', name=op.f('uq_round_metrics_round_id_device_id_phase'))
    )
    with op.batch_alter_table('round_metrics', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_round_metrics_device_id'), ['device_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_round_metrics_round_id'), ['round_id'], unique=False)

    op.create_table('policy_acks',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('device_id', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('applied_version', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('effective_k', sa.Integer(), nullable=True),
    sa.Column('expected_latency_ms', sa.Float(), nullable=True),
    sa.Column('desired_version', sa.Integer(), nullable=False),
    sa.Column('converged', sa.Boolean(), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['devices.device_id'], name=op.f('fk_policy_acks_device_id_devices'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_policy_acks'))
    )
    with op.batch_alter_table('policy_acks', schema=None) as batch_op:
        batch_op.create_index('ix_policy_acks_device_id_received_at', ['device_id', 'received_at'], unique=False)



def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('policy_acks', schema=None) as batch_op:
        batch_op.drop_index('ix_policy_acks_device_id_received_at')

    op.drop_table('policy_acks')
    with op.batch_alter_table('round_metrics', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_round_metrics_round_id'))
        batch_op.drop_index(batch_op.f('ix_round_metrics_device_id'))

    op.drop_table('round_metrics')
    with op.batch_alter_table('policies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_policies_scope_key'))
        batch_op.drop_index(batch_op.f('ix_policies_device_class'))

    op.drop_table('policies')
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_devices_device_class'))

    op.drop_table('devices')
    with op.batch_alter_table('rounds', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rounds_run_id'))

    op.drop_table('rounds')
    op.drop_table('device_classes')
