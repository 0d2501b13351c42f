"""customer-svc's events consumed by sales-svc: real Event objects through the handlers on a real
database (version guard, deletes, merges re-pointing every table, erasure blanking leads and
redacting their audit), and one event through the broker to the running consumer."""

from __future__ import annotations

import datetime as dt
import uuid

import pika
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from crm.customer.v1 import customer_events_pb2 as ce
from crm.customer.v1 import customer_pb2
from crm.sales.v1 import leads_pb2 as pb
from crm.sales.v1 import leads_pb2_grpc
from crm_chassis.audit import audit_entries
from crm_chassis.messaging import topology
from crm_chassis.messaging.envelope import new_event
from sales_svc import customer_projection
from sales_svc.leads import mark_converted
from sales_svc.runtime import sales
from sales_svc.tables import customer_refs, leads, orders
from tests.support.harness import wait_for

from .conftest import ADMIN, rep


@pytest.fixture(scope="module")
def stub(ch):
    return leads_pb2_grpc.LeadServiceStub(ch)


def customer(cid: str, version: int, **fields) -> customer_pb2.Customer:
    c = customer_pb2.Customer(name=f"customers/{cid}", etag=f'"{version}"', **fields)
    c.create_time.FromDatetime(dt.datetime(2026, 1, 5, tzinfo=dt.UTC))
    return c


def event(routing_key: str, message):
    return new_event(
        domain="customer",
        source_service="customer-svc",
        routing_key=routing_key,
        subject="customers/x",
        message=message,
    )


def handle(svc, e) -> None:
    """Run the subscription's handler for the event in one transaction, as the consumer does."""
    handler = customer_projection.subscriptions(sales(svc.ctx))[0].handlers[e.routing_key]
    with svc.ctx.engine.begin() as conn:
        handler(conn, e)


def ref(svc, cid: str):
    with svc.ctx.engine.connect() as conn:
        return conn.execute(sa.select(customer_refs).where(customer_refs.c.customer_id == cid)).one_or_none()


def lead_row(svc, name: str):
    with svc.ctx.engine.connect() as conn:
        return conn.execute(sa.select(leads).where(leads.c.id == name.split("/")[1])).one()


def test_created_updated_and_deleted_keep_the_newest_version(svc):
    cid = str(uuid.uuid4())
    handle(
        svc,
        event(
            "customer.created.v1",
            ce.CustomerCreated(customer=customer(cid, 2, email="Ali@X.IR", mobile="+989121234567")),
        ),
    )
    r = ref(svc, cid)
    assert (r.email, r.mobile, r.version, r.deleted) == ("ali@x.ir", "+989121234567", 2, False)
    # An older version arriving late changes nothing; a newer one wins.
    handle(svc, event("customer.updated.v1", ce.CustomerUpdated(customer=customer(cid, 1, email="old@x.ir"))))
    assert ref(svc, cid).email == "ali@x.ir"
    handle(
        svc, event("customer.updated.v1", ce.CustomerUpdated(customer=customer(cid, 3, email="new@x.ir", city="Qom")))
    )
    assert (ref(svc, cid).email, ref(svc, cid).city, ref(svc, cid).version) == ("new@x.ir", "Qom", 3)
    gone = customer(cid, 4, email="new@x.ir")
    gone.delete_time.FromDatetime(dt.datetime(2026, 2, 1, tzinfo=dt.UTC))
    handle(svc, event("customer.deleted.v1", ce.CustomerDeleted(customer=gone)))
    assert ref(svc, cid).deleted is True
    handle(svc, event("customer.undeleted.v1", ce.CustomerDeleted(customer=customer(cid, 5, email="new@x.ir"))))
    assert ref(svc, cid).deleted is False


def _converted_lead(svc, stub, customer_id: str, **fields) -> pb.Lead:
    lead = stub.CreateLead(pb.CreateLeadRequest(lead=pb.Lead(**fields)), metadata=rep("rep-proj"))
    with sales(svc.ctx).uow.begin() as tx:
        return mark_converted(tx, lead.name.split("/")[1], customer_id, None, "converter")


def test_merged_customers_are_re_pointed_in_every_table(svc, stub):
    survivor, merged_a, merged_b, other = (str(uuid.uuid4()) for _ in range(4))
    for cid in (survivor, merged_a, merged_b, other):
        handle(
            svc,
            event(
                "customer.created.v1",
                ce.CustomerCreated(customer=customer(cid, 1, mobile="+98912" + str(uuid.uuid4().int)[:7])),
            ),
        )
    a = _converted_lead(svc, stub, merged_a, family_name="A")
    b = _converted_lead(svc, stub, merged_b, family_name="B")
    keep = _converted_lead(svc, stub, other, family_name="C")
    with svc.ctx.engine.begin() as conn:
        conn.execute(
            orders.insert(),
            [
                {
                    "number": f"O-{uuid.uuid4().hex[:6]}",
                    "customer_id": merged_a,
                    "currency_code": "IRR",
                    "order_date": dt.date(2026, 1, 1),
                },
                {
                    "number": f"O-{uuid.uuid4().hex[:6]}",
                    "customer_id": other,
                    "currency_code": "IRR",
                    "order_date": dt.date(2026, 1, 1),
                },
            ],
        )
    msg = ce.CustomerMerged(
        survivor=customer(survivor, 2), merged=[f"customers/{merged_a}", f"customers/{merged_b}"], merge="merges/1"
    )
    handle(svc, event("customer.merged.v1", msg))
    assert lead_row(svc, a.name).customer_id == survivor and lead_row(svc, b.name).customer_id == survivor
    assert lead_row(svc, a.name).version == 3  # create, convert, re-point: the etag moved
    assert lead_row(svc, keep.name).customer_id == other
    with svc.ctx.engine.connect() as conn:
        order_customers = sorted(conn.execute(sa.select(orders.c.customer_id)).scalars())
        entry = conn.execute(
            sa.select(audit_entries).where(
                audit_entries.c.resource == a.name, audit_entries.c.action == "customer_merged"
            )
        ).one()
    assert order_customers == sorted([survivor, other])
    assert entry.actor == "customer-svc"
    assert entry.changes == [
        {"field": "customer", "old_value": f'"customers/{merged_a}"', "new_value": f'"customers/{survivor}"'}
    ]
    for cid in (merged_a, merged_b):
        r = ref(svc, cid)
        assert (r.deleted, r.merged_into) == (True, survivor)
    # A merged customer is no longer a duplicate to report.
    mobile = ref(svc, merged_a).mobile
    dup = stub.CreateLead(pb.CreateLeadRequest(lead=pb.Lead(family_name="D", mobile=mobile)), metadata=ADMIN)
    assert f"customers/{merged_a}" not in [d.record for d in dup.possible_duplicates]
    # Unmerged: the restored customers are live again; the re-pointed leads stay with the survivor.
    restored = customer(merged_a, 9)
    handle(
        svc,
        event(
            "customer.unmerged.v1",
            ce.CustomerUnmerged(survivor=customer(survivor, 3), restored=[restored], merge="merges/1"),
        ),
    )
    assert (ref(svc, merged_a).deleted, ref(svc, merged_a).merged_into) == (False, "")
    assert lead_row(svc, a.name).customer_id == survivor


def test_erasure_blanks_the_leads_of_the_customer_and_redacts_their_audit(svc, stub):
    cid, other = str(uuid.uuid4()), str(uuid.uuid4())
    handle(svc, event("customer.created.v1", ce.CustomerCreated(customer=customer(cid, 1, email="sara@erase.ir"))))
    tag = uuid.uuid4().hex[:6]
    fields = dict(
        given_name="سارا",
        family_name=f"Erasable{tag}",
        email="sara@erase.ir",
        mobile="09351112233",
        national_id="0499370899",
        address="خیابان آزادی",
        city="کرج",
        tags=[tag],
    )
    lead = _converted_lead(svc, stub, cid, **fields)
    untouched = _converted_lead(svc, stub, other, **fields)
    erased = customer(cid, 2, city="کرج", erased=True)
    handle(svc, event("customer.erased.v1", ce.CustomerErased(customer=erased)))
    row = lead_row(svc, lead.name)
    for f in customer_projection.ERASED_FIELDS:
        assert getattr(row, f) == "", f
    assert row.city == "کرج" and row.customer_id == cid and row.search_text == f"کرج {tag}"
    assert row.version == int(lead.etag.strip('"')) + 1  # the etag moved
    assert lead_row(svc, untouched.name).email == "sara@erase.ir"
    # Still editable without a name (the erased data does not come back).
    moved = stub.UpdateLead(
        pb.UpdateLeadRequest(
            lead=pb.Lead(name=lead.name, city="رشت"), update_mask=field_mask_pb2.FieldMask(paths=["city"])
        ),
        metadata=ADMIN,
    )
    assert (moved.city, moved.family_name) == ("رشت", "")
    assert ref(svc, cid).email == ""
    # Search no longer finds it by the erased name; the other lead still is found.
    hits = stub.SearchLeads(pb.SearchLeadsRequest(query=f"Erasable{tag}"), metadata=ADMIN).results
    assert [h.lead.name for h in hits] == [untouched.name]
    with svc.ctx.engine.connect() as conn:
        entries = conn.execute(
            sa.select(audit_entries).where(audit_entries.c.resource == lead.name).order_by(audit_entries.c.id)
        ).all()
        kept = conn.execute(sa.select(audit_entries).where(audit_entries.c.resource == untouched.name)).all()
    assert [e.action for e in entries] == ["create", "convert", "customer_erased", "update"]
    text = str([e.changes for e in entries])
    assert "sara@erase.ir" not in text and "Erasable" not in text and "[erased]" in text
    assert "sara@erase.ir" in str([e.changes for e in kept])


def test_an_event_through_the_broker_reaches_the_projection(svc, broker):
    cid = str(uuid.uuid4())
    e = event("customer.created.v1", ce.CustomerCreated(customer=customer(cid, 1, email="broker@x.ir")))
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    try:
        ch = conn.channel()
        topology.declare_producer(ch, "customer")

        def bound() -> bool:  # the consumer has declared and bound its queue
            try:
                probe = conn.channel()
                probe.queue_declare(topology.queue_name("sales-svc", "customer"), passive=True)
                probe.close()
                return True
            except pika.exceptions.ChannelClosedByBroker:
                return False

        wait_for(bound, what="the sales-svc customer-events queue")
        ch.basic_publish(e.exchange, e.routing_key, e.data, e.amqp_properties())
    finally:
        conn.close()
    wait_for(lambda: ref(svc, cid) is not None, what="the customer reference")
    assert ref(svc, cid).email == "broker@x.ir"
