"""The unit of work and the audit trail against a real PostgreSQL: what commits together, what
rolls back together, the relay woken only by a commit that published, the bulk (COPY) forms
storing exactly what the single forms store, and erasure redacting a resource's whole subtree."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from crm_chassis import audit
from crm_chassis.auth import Principal
from crm_chassis.db import create_engine
from crm_chassis.logging import request_id_var
from crm_chassis.messaging.outbox import row_to_event
from crm_chassis.messaging.tables import messaging_metadata, outbox
from crm_chassis.pagination import PageTokens
from crm_chassis.uow import UnitOfWork

ALICE = Principal("alice", ("admin",))


class Payload:
    """Stands in for a protobuf message."""

    class DESCRIPTOR:
        full_name = "test.Thing"

    def __init__(self, data: bytes):
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802
        return self.data


class Relay:
    """Counts wake-ups (the real relay's only part the unit of work touches)."""

    def __init__(self):
        self.wakes = 0

    def wake(self):
        self.wakes += 1


@pytest.fixture(scope="module")
def engine(databases):
    eng = create_engine(databases.fresh("uow"), pool_size=4)
    messaging_metadata.create_all(eng)
    audit.audit_metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(sa.text("CREATE TABLE things (id int PRIMARY KEY, name text NOT NULL)"))
    yield eng
    eng.dispose()


@pytest.fixture
def uow(engine):
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE things, outbox, audit_entries"))
    return UnitOfWork(engine, Relay(), source_service="test-svc", event_domain="chassistest")


def counts(engine) -> tuple[int, int, int]:
    with engine.connect() as conn:
        return tuple(
            conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one()
            for t in ("things", "outbox", "audit_entries")
        )


def test_state_event_and_audit_commit_together_and_wake_the_relay(uow, engine):
    token = request_id_var.set("req-1")
    try:
        with uow.begin() as tx:
            tx.execute(sa.text("INSERT INTO things VALUES (1, 'one')"))
            e = tx.publish("thing.created.v1", Payload(b"one"), "things/1")
            tx.audit("things/1", "create", ALICE, [audit.change("name", "null", '"one"')])
            assert uow.relay.wakes == 0  # not before the commit
    finally:
        request_id_var.reset(token)
    assert counts(engine) == (1, 1, 1)
    assert uow.relay.wakes == 1
    with engine.connect() as conn:
        row = conn.execute(sa.select(outbox)).one()
        entry = conn.execute(sa.select(audit.audit_entries)).one()
    event = row_to_event(row)
    assert (event.id, event.type, event.source, event.subject, event.data) == (
        e.id,
        "crm.chassistest.thing.created.v1",
        "/test-svc",
        "things/1",
        b"one",
    )
    assert (entry.actor, entry.action, entry.request_id) == ("alice", "create", "req-1")
    assert entry.changes == [{"field": "name", "old_value": "null", "new_value": '"one"'}]


def test_a_failure_rolls_back_state_event_and_audit_and_wakes_nothing(uow, engine):
    with pytest.raises(RuntimeError), uow.begin() as tx:
        tx.execute(sa.text("INSERT INTO things VALUES (2, 'two')"))
        tx.publish("thing.created.v1", Payload(b"two"), "things/2")
        tx.audit("things/2", "create", "bob", [])
        raise RuntimeError("the use case refused")
    assert counts(engine) == (0, 0, 0)
    assert uow.relay.wakes == 0


def test_a_commit_without_events_does_not_wake_the_relay(uow, engine):
    with uow.begin() as tx:
        tx.execute(sa.text("INSERT INTO things VALUES (3, 'three')"))
        tx.audit("things/3", "create", ALICE, [])
    assert counts(engine) == (1, 0, 1) and uow.relay.wakes == 0


def test_bulk_events_by_copy_are_the_rows_publish_writes(uow, engine):
    with uow.begin() as tx:
        single = tx.publish("thing.created.v1", Payload(b"a"), "things/a")
        tx.publish_many("thing.created.v1", [(f"things/{i}", Payload(str(i).encode())) for i in range(50)])
    assert uow.relay.wakes == 1
    with engine.connect() as conn:
        events = [row_to_event(r) for r in conn.execute(sa.select(outbox).order_by(outbox.c.id))]
    assert len(events) == 51 and len({e.id for e in events}) == 51
    first, copied = events[0], events[1:]
    assert first.id == single.id
    assert [e.subject for e in copied] == [f"things/{i}" for i in range(50)]
    assert [e.data for e in copied] == [str(i).encode() for i in range(50)]
    for e in copied:  # every attribute the relay reads, as the single form writes it
        assert (e.type, e.source, e.exchange, e.routing_key, e.dataschema) == (
            first.type,
            first.source,
            first.exchange,
            first.routing_key,
            first.dataschema,
        )


def test_bulk_audit_by_copy_stores_what_the_executemany_form_stores(uow, engine):
    changes = [audit.change("city", '"Ahvaz"', '"آبادان"')]
    with uow.begin() as tx:
        tx.audit_many([("things/1", "bulk", changes), ("things/2", "bulk", changes)], ALICE, request_id="r")
        tx.audit_many([("things/3", "bulk", changes), ("things/4", "bulk", changes)], ALICE, request_id="r", copy=True)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(audit.audit_entries).order_by(audit.audit_entries.c.id)).all()
    assert [r.resource for r in rows] == ["things/1", "things/2", "things/3", "things/4"]
    assert {(r.action, r.actor, r.request_id) for r in rows} == {("bulk", "alice", "r")}
    assert all(r.changes == changes for r in rows)


def test_erasure_redacts_the_whole_subtree_and_nothing_beside_it(uow, engine):
    with uow.begin() as tx:
        tx.audit("customers/1", "create", ALICE, [audit.change("email", "null", '"me@x.ir"')])
        tx.audit("customers/1/notes/9", "note.create", ALICE, [audit.change("text", "null", '"private"')])
        tx.audit("customers/12", "create", ALICE, [audit.change("email", "null", '"other@x.ir"')])
    with uow.begin() as tx:
        assert tx.redact_audit("customers/1") == 2
    with engine.connect() as conn:
        rows = {r.resource: r.changes for r in conn.execute(sa.select(audit.audit_entries))}
    assert rows["customers/1"] == [{"field": "email", "old_value": '"[erased]"', "new_value": '"[erased]"'}]
    assert rows["customers/1/notes/9"] == [{"field": "text", "old_value": '"[erased]"', "new_value": '"[erased]"'}]
    assert rows["customers/12"][0]["new_value"] == '"other@x.ir"'


def test_audit_pages_are_newest_first_and_cover_the_subtree(uow, engine):
    with uow.begin() as tx:
        for i in range(5):
            tx.audit("orders/7" if i % 2 == 0 else "orders/7/lines/1", f"a{i}", ALICE, [])
        tx.audit("orders/70", "other", ALICE, [])
    tokens = PageTokens("secret", "test")
    seen, token = [], ""
    with uow.read() as conn:
        while True:
            rows, token = audit.page(conn, tokens, "orders/7", 2, token)
            seen += [r.action for r in rows]
            if not token:
                break
    assert seen == ["a4", "a3", "a2", "a1", "a0"]


def test_a_service_without_an_event_domain_cannot_publish(engine):
    uow = UnitOfWork(engine, None, source_service="quiet-svc")
    with pytest.raises(RuntimeError, match="publishes no events"), uow.begin() as tx:
        tx.publish("x.happened.v1", Payload(b""), "x/1")


def test_an_audited_value_is_the_json_text_json_dumps_would_write():
    # audit.value takes shortcuts for the common kinds (it runs for every field of every write);
    # each must give exactly the text of the plain encoding, dates as ISO strings.
    import datetime as dt
    import json

    values = ["", "x", 'q"uote\\', "علی", 0, 7, True, None, 1.5, dt.date(1990, 8, 3), [], ["vip", "ب"]]
    values += [{"b": 1, "a": "ö"}, [{"given_name": "A", "role": "CEO"}], dt.datetime(2026, 1, 2, 3, 4, 5)]
    for v in values:
        plain = json.dumps(v.isoformat() if isinstance(v, dt.date) else v, ensure_ascii=False, sort_keys=True)
        assert audit.value(v) == plain, v


def test_a_joined_transaction_commits_and_rolls_back_with_the_callers(uow, engine):
    """A timer or event handler's connection: what it publishes and audits rides on the
    caller's transaction (both rolled back when the caller's fails)."""

    def handler(conn, n):
        with uow.joined(conn) as tx:
            tx.execute(sa.text("INSERT INTO things VALUES (:n, 'x')"), {"n": n})
            tx.publish("thing.made.v1", Payload(b"x"), f"things/{n}")
            tx.audit(f"things/{n}", "create", ALICE, [])

    with engine.begin() as conn:
        handler(conn, 1)
        handler(conn, 3)
        assert uow.relay.wakes == 0  # not before the rows are committed: the relay would find none
    assert uow.relay.wakes == 1  # once, at the commit
    with pytest.raises(RuntimeError), engine.begin() as conn:
        handler(conn, 2)
        raise RuntimeError("the caller fails after the handler")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT array_agg(id ORDER BY id) FROM things")).scalar() == [1, 3]
        assert conn.execute(sa.text("SELECT array_agg(subject ORDER BY subject) FROM outbox")).scalar() == [
            "things/1",
            "things/3",
        ]
        assert conn.execute(sa.text("SELECT array_agg(resource ORDER BY resource) FROM audit_entries")).scalar() == [
            "things/1",
            "things/3",
        ]
    assert uow.relay.wakes == 1  # nothing to relay from the rolled-back one


def test_events_built_by_the_database_parse_as_the_messages_python_would_publish(uow, engine):
    """publish_select: one outbox row per selected row, the payload the template's bytes plus
    string fields encoded in SQL (one-, two- and three-byte lengths, UTF-8 text)."""
    from google.rpc import error_details_pb2

    texts = ["a", "سلام" * 40, "x" * 20000, ""]
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO things VALUES (1, :a), (2, :b), (3, :c), (4, :d)"),
            dict(zip("abcd", texts, strict=True)),
        )
    things = sa.table("things", sa.column("id"), sa.column("name"))
    with uow.begin() as tx:
        q = sa.select(("things/" + sa.cast(things.c.id, sa.Text)).label("subject"), things.c.name.label("reason"))
        n = tx.publish_select(
            "thing.named.v1", error_details_pb2.ErrorInfo(domain="crm", metadata={"k": "v"}), q, {"reason": 1}
        )
    assert n == 4
    with engine.connect() as conn:
        rows = conn.execute(sa.select(outbox).order_by(outbox.c.subject)).all()
    got = {r.subject: row_to_event(r).parse(error_details_pb2.ErrorInfo) for r in rows}
    for i, text in enumerate(texts, 1):
        assert got[f"things/{i}"] == error_details_pb2.ErrorInfo(reason=text, domain="crm", metadata={"k": "v"})
    assert {r.routing_key for r in rows} == {"thing.named.v1"} and len({r.event_id for r in rows}) == 4
    assert uow.relay.wakes == 1
