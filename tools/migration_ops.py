"""`python tools/migration_ops.py PACKAGE.MODULE:METADATA MIGRATIONS_DIR DATABASE_URL`

Prints the Alembic operations that take a database at the service's current head to what the
module's tables declare (what a new migration's upgrade() needs), to paste into a migration
and review: booleans render as sa.text("1")/("0") and need "true"/"false", and an array of
Text needs `sa.Text()`. The database is migrated to head first; use an empty scratch one.

    createdb -h 127.0.0.1 -U postgres scratch
    .venv/bin/python tools/migration_ops.py support_svc.tables:metadata \\
        support-svc/src/support_svc/migrations postgresql://postgres@127.0.0.1:5432/scratch
"""

from __future__ import annotations

import importlib
import pathlib
import sys

import sqlalchemy as sa
from alembic.autogenerate import produce_migrations, render_python_code
from alembic.runtime.migration import MigrationContext

from crm_chassis.db import migrate


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__)
        return 2
    module, attr = argv[0].split(":")
    metadata = getattr(importlib.import_module(module), attr)
    migrate(argv[2], pathlib.Path(argv[1]))
    engine = sa.create_engine(argv[2].replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        existing = set(sa.inspect(conn).get_table_names())

        def include(obj, name, kind, reflected, compare_to):  # leave the chassis' tables alone
            return not (kind == "table" and reflected and name in existing and name not in metadata.tables)

        ctx = MigrationContext.configure(conn, opts={"include_object": include})
        print(render_python_code(produce_migrations(ctx, metadata).upgrade_ops, render_as_batch=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
