"""crm_chassis.jsonrows on a real PostgreSQL: rows as one jsonb parameter come back typed by the
table's row type (numeric exact, timestamptz, text[], jsonb, NULL) and in the order given."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import sqlalchemy as sa

from crm_chassis import jsonrows
from crm_chassis.db import create_engine


def test_rows_round_trip_typed_and_in_order(databases):
    engine = create_engine(databases.fresh("jsonrows"), pool_size=1)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "CREATE TABLE t (n bigserial, id uuid, amount numeric, at timestamptz, d date,"
                    " tags text[], doc jsonb, note text)"
                )
            )
            when = dt.datetime(2026, 12, 3, 11, 30, 0, 123456, tzinfo=dt.UTC)
            rows = [
                {
                    "id": uuid.UUID(int=i),
                    "amount": Decimal("12345678901234567890.123456789") + i,
                    "at": when + dt.timedelta(hours=i),
                    "d": dt.date(2026, 1, 1 + i),
                    "tags": ["vip", f"t{i}"],
                    "doc": {"k": [i, "ش"]},
                    "note": None if i % 2 else "یادداشت",
                }
                for i in range(5)
            ][::-1]
            cols = ("id", "amount", "at", "d", "tags", "doc", "note")
            conn.execute(
                sa.text(f"INSERT INTO t ({', '.join(cols)}) {jsonrows.select_rows('t', cols)}"),
                {"rows": jsonrows.dumps(rows)},
            )
            got = [dict(r._mapping) for r in conn.execute(sa.text(f"SELECT {', '.join(cols)} FROM t ORDER BY n"))]
        assert got == [{**r, "id": str(r["id"]) if isinstance(got[0]["id"], str) else r["id"]} for r in rows]
    finally:
        engine.dispose()


def test_dumps_writes_what_the_standard_encoder_wrote():
    """orjson's text for the values rows carry is the one json.dumps(default=isoformat/str)
    gave: aware and naive datetimes, dates, UUIDs, exact Decimals, non-string keys, Persian
    text; an integer past 64 bits (orjson refuses it) still goes, and a value of another type is
    refused by name."""
    import json

    import pytest

    at = dt.datetime(2026, 12, 4, 9, 30, 0, 120, tzinfo=dt.timezone(dt.timedelta(hours=3, minutes=30)))
    row = {
        "at": at,
        "naive": dt.datetime(2026, 1, 1),
        "d": dt.date(1405, 1, 1),
        "id": uuid.UUID(int=7),
        "n": Decimal("0.10"),
        "doc": {1: "یک", "k": [None, True, 2.5]},
    }
    legacy = json.dumps([row], default=jsonrows._default, ensure_ascii=False)
    assert json.loads(jsonrows.dumps([row])) == json.loads(legacy)
    assert '"0.10"' in jsonrows.dumps([row]) and "+03:30" in jsonrows.dumps([row])
    assert json.loads(jsonrows.dumps([{"big": 2**70}])) == [{"big": 2**70}]
    with pytest.raises(TypeError, match="set is not a JSON row value"):
        jsonrows.dumps([{"s": {1}}])
