"""service_nodes: the registry of running processes and their roles; jobs.worker widened to hold
a host:pid/worker name (PostgreSQL enforces lengths, SQLite does not)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 08:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'service_nodes',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=300), nullable=False),
        sa.Column('host', sa.String(length=255), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('role', sa.String(length=16), nullable=False),
        sa.Column('version', sa.String(length=32), nullable=False),
        sa.Column('started_at', sa.DateTime(), nullable=False),
        sa.Column('heartbeat_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('name'),
    )
    op.create_index('ix_service_nodes_heartbeat_at', 'service_nodes', ['heartbeat_at'],
                    unique=False)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.alter_column('worker', existing_type=sa.String(length=128),
                              type_=sa.String(length=320), existing_nullable=True)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.alter_column('worker', existing_type=sa.String(length=320),
                              type_=sa.String(length=128), existing_nullable=True)
    op.drop_index('ix_service_nodes_heartbeat_at', table_name='service_nodes')
    op.drop_table('service_nodes')
