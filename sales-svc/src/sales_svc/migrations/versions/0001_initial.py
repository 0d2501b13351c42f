"""The chassis tables: outbox, inbox, audit trail, timers, jobs (crm_chassis.migrations)

Revision ID: 0001
"""

from crm_chassis.migrations import first_revision

revision, down_revision = "0001", None
upgrade, downgrade = first_revision()
