"""ConvertLead against a real customer-svc behind a proxy the tests cut: exactly one customer
whatever fails, UNAVAILABLE with nothing changed during an outage, the same answer on a retry."""

from __future__ import annotations

import threading

import grpc
import pytest
import sqlalchemy as sa

from crm.sales.v1 import conversion_pb2, conversion_pb2_grpc
from customer_svc.__main__ import SPEC as CUSTOMER
from sales_svc.__main__ import SPEC
from sales_svc.conversion import customer_request_id
from sales_svc.tables import leads, opportunities
from tests.support.harness import channel, md, start_service
from tests.support.tcp_proxy import TcpProxy

from .conftest import ADMIN, events, rep


@pytest.fixture(scope="module")
def customer_svc(databases, broker):
    service = start_service(CUSTOMER, databases.fresh("conv_customer"), broker.url, relay=False)
    yield service
    service.stop(0)


@pytest.fixture(scope="module")
def proxy(customer_svc):
    p = TcpProxy(("127.0.0.1", customer_svc.port)).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def sales(databases, broker, proxy):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUSTOMER_SVC_ADDR", f"127.0.0.1:{proxy.port}")
        mp.setenv("CUSTOMER_SVC_TIMEOUT_SECONDS", "2")
        service = start_service(SPEC, databases.fresh("conv_sales"), broker.url, relay=False)
        yield service
        service.stop(0)


@pytest.fixture(scope="module")
def stub(sales):
    with channel(sales) as ch:
        yield conversion_pb2_grpc.LeadConversionServiceStub(ch)


def new_lead(sales, owner: str = "rita", status: str = "qualified", **values) -> str:
    n = threading.get_ident() % 100000
    row = {
        "given_name": "Sara",
        "family_name": f"Karimi{n}",
        "email": f"sara{n}@example.ir",
        "mobile": "+989121234567",
        "source": "exhibition",
        "status": status,
        "owner_id": owner,
        **values,
    }
    with sales.ctx.engine.begin() as conn:
        return str(conn.execute(leads.insert().values(**row).returning(leads.c.id)).scalar())


def customers_made(customer_svc, lead_id: str) -> int:
    with customer_svc.ctx.engine.connect() as conn:
        return conn.execute(
            sa.text("SELECT count(*) FROM customers WHERE request_id = :r"), {"r": customer_request_id(lead_id)}
        ).scalar()


def opportunities_of(sales, lead_id: str) -> list:
    with sales.ctx.engine.connect() as conn:
        return conn.execute(sa.select(opportunities).where(opportunities.c.lead_id == lead_id)).all()


def lead_row(sales, lead_id: str):
    with sales.ctx.engine.connect() as conn:
        return conn.execute(sa.select(leads).where(leads.c.id == lead_id)).one()


def convert(stub, lead_id: str, who=None, **kw):
    return stub.ConvertLead(
        conversion_pb2.ConvertLeadRequest(name=f"leads/{lead_id}", **kw), metadata=who or rep("rita"), timeout=20
    )


def test_a_lead_becomes_one_customer_and_one_opportunity_and_a_retry_changes_nothing(stub, sales, customer_svc):
    lead_id = new_lead(sales)
    first = convert(stub, lead_id)
    assert first.customer_created and first.customer.startswith("customers/")
    assert first.opportunity.startswith("opportunities/") and first.lead == f"leads/{lead_id}"
    row = lead_row(sales, lead_id)
    assert row.status == "converted" and row.customer_id == first.customer.removeprefix("customers/")
    assert str(row.opportunity_id) == first.opportunity.removeprefix("opportunities/")
    opp = opportunities_of(sales, lead_id)
    assert len(opp) == 1 and opp[0].customer_id == row.customer_id and opp[0].owner_id == "rita"
    assert opp[0].source == "exhibition"
    converted = [e for e in events(sales, "lead.converted.v1") if e.subject == f"leads/{lead_id}"]
    assert len(converted) == 1

    again = convert(stub, lead_id)
    assert (again.customer, again.opportunity) == (first.customer, first.opportunity)
    assert customers_made(customer_svc, lead_id) == 1 and len(opportunities_of(sales, lead_id)) == 1
    assert len([e for e in events(sales, "lead.converted.v1") if e.subject == f"leads/{lead_id}"]) == 1


def test_customer_svc_down_answers_unavailable_with_nothing_changed_then_a_retry_converts(
    stub, sales, customer_svc, proxy
):
    lead_id = new_lead(sales)
    proxy.stop()
    try:
        with pytest.raises(grpc.RpcError) as err:
            convert(stub, lead_id)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proxy.start()
    row = lead_row(sales, lead_id)
    assert row.status == "qualified" and row.customer_id == "" and row.opportunity_id is None
    assert opportunities_of(sales, lead_id) == [] and customers_made(customer_svc, lead_id) == 0
    done = convert(stub, lead_id)
    assert done.customer_created and lead_row(sales, lead_id).status == "converted"
    assert customers_made(customer_svc, lead_id) == 1


def test_a_customer_made_by_an_attempt_that_never_finished_is_the_one_the_retry_uses(stub, sales, customer_svc):
    """The first attempt created the customer, then this process died before step 3 (or the
    reply was lost): the retry gets the same customer from customer-svc."""
    from sales_svc.conversion import Converter, customer_from_lead

    lead_id = new_lead(sales)
    client = Converter(sales.ctx.shared["runtime"]).customers
    made = client.create_customer(
        customer_from_lead(lead_row(sales, lead_id)), customer_request_id(lead_id), md("sales_rep", "rita")[0][1]
    )
    done = convert(stub, lead_id)
    assert done.customer == made.name
    assert customers_made(customer_svc, lead_id) == 1 and len(opportunities_of(sales, lead_id)) == 1


def test_concurrent_conversions_of_one_lead_make_one_customer_and_one_opportunity(stub, sales, customer_svc):
    lead_id = new_lead(sales)
    results, errors = [], []

    def run():
        try:
            results.append(convert(stub, lead_id))
        except grpc.RpcError as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, [e.details() for e in errors]
    assert len({(r.customer, r.opportunity) for r in results}) == 1
    assert customers_made(customer_svc, lead_id) == 1 and len(opportunities_of(sales, lead_id)) == 1


def test_what_cannot_convert_is_refused_by_name(stub, sales):
    disq = new_lead(sales, status="disqualified", disqualify_reason="no_budget")
    with pytest.raises(grpc.RpcError) as err:
        convert(stub, disq)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "reopen" in err.value.details()
    others = new_lead(sales, owner="omid")
    with pytest.raises(grpc.RpcError) as err:
        convert(stub, others)  # rita may not see omid's lead
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.ConvertLead(conversion_pb2.ConvertLeadRequest(name="leads/nope"), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        convert(stub, new_lead(sales), customer="customers/00000000-0000-4000-8000-000000000000")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert lead_row(sales, others).status == "qualified"


def test_linking_an_existing_customer_creates_none(stub, sales, customer_svc):
    first = convert(stub, new_lead(sales))
    lead_id = new_lead(sales)
    linked = convert(stub, lead_id, customer=first.customer)
    assert not linked.customer_created and linked.customer == first.customer
    assert customers_made(customer_svc, lead_id) == 0


def test_a_lead_that_names_its_customer_converts_to_that_customer(stub, sales, customer_svc):
    """A campaign response from a known customer opens a lead naming them (campaign_responses):
    converting it without `customer` links that customer, never a second one (the journey found
    it made a duplicate)."""
    first = convert(stub, new_lead(sales))
    lead_id = new_lead(sales, source="campaign", customer_id=first.customer.removeprefix("customers/"))
    linked = convert(stub, lead_id)
    assert not linked.customer_created and linked.customer == first.customer
    assert customers_made(customer_svc, lead_id) == 0
    assert lead_row(sales, lead_id).customer_id == first.customer.removeprefix("customers/")
