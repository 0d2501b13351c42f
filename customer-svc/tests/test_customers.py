"""customer-svc over real gRPC on loopback, against a real PostgreSQL database."""

from __future__ import annotations

import threading

import grpc
import pytest
import sqlalchemy as sa

from crm.customer.v1 import customer_events_pb2, customer_pb2, customer_service_pb2
from crm_chassis.errors import read_rpc_error
from tests.support.harness import md

PERSON = customer_pb2.CUSTOMER_TYPE_PERSON
ORG = customer_pb2.CUSTOMER_TYPE_ORGANIZATION


def create(stub, roles="admin", request_id="", **fields):
    fields.setdefault("type", PERSON)
    return stub.CreateCustomer(
        customer_service_pb2.CreateCustomerRequest(customer=customer_pb2.Customer(**fields), request_id=request_id),
        metadata=md(roles),
    )


def error_of(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return read_rpc_error(info.value)


def count(svc, table: str) -> int:
    with svc.ctx.engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()


def test_create_then_get_returns_the_stored_customer_and_writes_its_event(svc, stub):
    made = create(
        stub,
        given_name=" Sara ",
        family_name="Ahmadi",
        email="sara@example.com",
        phone="+98 912 000 1111",
        acquisition_source="Website",
    )
    assert made.name.startswith("customers/")
    assert (made.given_name, made.display_name, made.acquisition_source) == ("Sara", "Sara Ahmadi", "website")
    assert made.etag and made.create_time.seconds > 0
    got = stub.GetCustomer(customer_service_pb2.GetCustomerRequest(name=made.name), metadata=md())
    assert got == made
    with svc.ctx.engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT routing_key, event_type, subject, payload FROM outbox WHERE subject = :s"), {"s": made.name}
        ).one()
    assert (row.routing_key, row.event_type) == ("customer.created.v1", "crm.customer.customer.created.v1")
    event = customer_events_pb2.CustomerCreated.FromString(bytes(row.payload))
    assert event.customer == made  # consumers need no call back to learn the state


def test_organisation_display_name_is_its_name(stub):
    made = create(stub, type=ORG, organization_name="Pars Trading Co.")
    assert made.display_name == "Pars Trading Co."


@pytest.mark.parametrize(
    ("fields", "bad_field"),
    [
        ({"given_name": "", "family_name": "  "}, "customer.family_name"),
        ({"type": ORG, "organization_name": ""}, "customer.organization_name"),
        ({"type": 0, "given_name": "X"}, "customer.type"),
        ({"given_name": "X", "email": "not-an-email"}, "customer.email"),
        ({"given_name": "X", "email": "a@b"}, "customer.email"),
        ({"given_name": "X", "phone": "call me"}, "customer.phone"),
        ({"given_name": "X", "acquisition_source": "web site!"}, "customer.acquisition_source"),
        ({"given_name": "X" * 201}, "customer.given_name"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field_and_writes_nothing(svc, stub, fields, bad_field):
    before = (count(svc, "customers"), count(svc, "outbox"))
    err = error_of(lambda: create(stub, **fields))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_field in [v.field for v in err.field_violations]
    assert (count(svc, "customers"), count(svc, "outbox")) == before


def test_every_violation_is_reported_at_once(stub):
    err = error_of(lambda: create(stub, given_name="", email="x", phone="?"))
    assert {v.field for v in err.field_violations} == {"customer.family_name", "customer.email", "customer.phone"}


def test_get_unknown_id_is_not_found_and_malformed_name_is_invalid(stub):
    err = error_of(
        lambda: stub.GetCustomer(
            customer_service_pb2.GetCustomerRequest(name="customers/00000000-0000-4000-8000-000000000000"),
            metadata=md(),
        )
    )
    assert err.code == grpc.StatusCode.NOT_FOUND and err.reason == "CUSTOMER_NOT_FOUND"
    assert err.metadata["name"] == "customers/00000000-0000-4000-8000-000000000000"
    for bad in ("customers/123", "people/00000000-0000-4000-8000-000000000000", ""):
        err = error_of(lambda b=bad: stub.GetCustomer(customer_service_pb2.GetCustomerRequest(name=b), metadata=md()))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in err.field_violations] == ["name"]


def test_negative_page_size_and_forged_page_token_are_rejected(stub):
    err = error_of(lambda: stub.ListCustomers(customer_service_pb2.ListCustomersRequest(page_size=-1), metadata=md()))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.field_violations[0].field == "page_size"
    for _ in range(3):
        create(stub, given_name="Page")
    first = stub.ListCustomers(customer_service_pb2.ListCustomersRequest(page_size=1), metadata=md())
    assert first.next_page_token
    body, _, sig = first.next_page_token.partition(".")
    for forged in ("garbage", body + ".AAAA", body[:-2] + "xx." + sig, "." + sig):
        err = error_of(
            lambda f=forged: stub.ListCustomers(
                customer_service_pb2.ListCustomersRequest(page_size=1, page_token=f), metadata=md()
            )
        )
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.field_violations[0].field == "page_token"


def test_keyset_pages_neither_skip_nor_repeat_while_rows_are_inserted(stub):
    # Baseline: everything that exists now, walked in pages while new customers keep arriving.
    existing = []
    token = ""
    while True:
        page = stub.ListCustomers(
            customer_service_pb2.ListCustomersRequest(page_size=7, page_token=token), metadata=md()
        )
        existing += [c.name for c in page.customers]
        create(stub, given_name="Concurrent")  # arrives during the walk: newer than every listed row
        token = page.next_page_token
        if not token:
            break
    assert len(existing) == len(set(existing)), "a row was repeated"
    newest_first = stub.ListCustomers(customer_service_pb2.ListCustomersRequest(page_size=1000), metadata=md())
    all_names = [c.name for c in newest_first.customers]
    assert [n for n in all_names if n in set(existing)] == existing, "a row was skipped or out of order"
    times = [(c.create_time.seconds, c.create_time.nanos) for c in newest_first.customers]
    assert times == sorted(times, reverse=True)


def test_page_size_zero_means_default_and_huge_is_capped(stub):
    page = stub.ListCustomers(customer_service_pb2.ListCustomersRequest(page_size=0), metadata=md())
    assert len(page.customers) <= 50
    page = stub.ListCustomers(customer_service_pb2.ListCustomersRequest(page_size=10**6), metadata=md())
    assert len(page.customers) <= 1000


def test_retry_with_same_request_id_returns_the_first_result_once(svc, stub):
    before = count(svc, "outbox")
    results = []

    def call():
        results.append(create(stub, request_id="req-42", given_name="Once"))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.name for r in results}) == 1
    assert count(svc, "outbox") == before + 1


def test_no_valid_token_gets_no_data_and_roles_are_enforced(stub):
    req = customer_service_pb2.ListCustomersRequest()
    for metadata in ([], [("authorization", "Bearer not.a.jwt")], [("authorization", "Basic abc")]):
        err = error_of(lambda m=metadata: stub.ListCustomers(req, metadata=m))
        assert err.code == grpc.StatusCode.UNAUTHENTICATED
    from crm_chassis.auth import TokenVerifier

    forged = TokenVerifier("another-secret-of-at-least-32-characters!").mint("mallory", ["admin"])
    err = error_of(lambda: stub.ListCustomers(req, metadata=[("authorization", f"Bearer {forged}")]))
    assert err.code == grpc.StatusCode.UNAUTHENTICATED
    expired = TokenVerifier(__import__("crm_chassis.config").config.DEFAULT_JWT_SECRET).mint(
        "old", ["admin"], ttl_seconds=-60
    )
    err = error_of(lambda: stub.ListCustomers(req, metadata=[("authorization", f"Bearer {expired}")]))
    assert err.code == grpc.StatusCode.UNAUTHENTICATED and err.reason == "TOKEN_EXPIRED"
    # analysts read but do not write
    stub.ListCustomers(req, metadata=md("analyst"))
    err = error_of(lambda: create(stub, roles="analyst", given_name="No"))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and err.metadata["permission"] == "customers.write"
