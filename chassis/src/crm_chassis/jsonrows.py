"""Many rows as ONE jsonb parameter of a statement compiled once.

A multi-row VALUES list is compiled by SQLAlchemy for every batch (a bind per cell: a third of
a consumer batch's time in campaign-svc's profile), an executemany is a statement per row and
arrays per column cost psycopg a dump per element. `dumps(rows)` is one orjson call (about 8x
the standard library's encoder on a consumer batch's rows, which calls back into Python for
every datetime, UUID and Decimal); `select_rows(table, cols)` reads them back typed by the table's row type
(jsonb_populate_recordset: JSON arrays become SQL arrays, objects stay jsonb), in order.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal

import orjson

# Keys that are not strings (an int key of a details dict) as json.dumps writes them.
_OPTIONS = orjson.OPT_NON_STR_KEYS


def _default(v):
    if isinstance(v, Decimal):
        return str(v)  # exact: numeric parses the text
    if isinstance(v, (dt.datetime, dt.date)):
        return v.isoformat()
    if isinstance(v, uuid.UUID):
        return str(v)
    raise TypeError(f"{type(v).__name__} is not a JSON row value")


def dumps(rows) -> str:
    """The rows (dicts of column -> value) as the text of one jsonb parameter. orjson writes
    datetimes, dates and UUIDs as isoformat() and str() do; what it refuses (an integer past 64
    bits, a value of another type) goes through the standard encoder, which says what it is."""
    rows = list(rows)
    try:
        return orjson.dumps(rows, default=_default, option=_OPTIONS).decode()
    except orjson.JSONEncodeError:
        return json.dumps(rows, default=_default, ensure_ascii=False)


def select_rows(table: str, cols, param: str = "rows") -> str:
    """SQL: SELECT `cols` of the rows of the jsonb parameter `param`, in the order given."""
    names = ", ".join(f"v.{c}" for c in cols)
    return (
        f"SELECT {names} FROM jsonb_populate_recordset(NULL::{table}, CAST(:{param} AS jsonb))"
        " WITH ORDINALITY AS v ORDER BY v.ordinality"
    )
