from crm_chassis.db import run_alembic_env

run_alembic_env()
