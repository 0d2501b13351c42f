"""sales-svc's customer-svc client against a real customer-svc started in-process: idempotent
create by request_id, the caller's token forwarded, errors mapped to sales' domain errors."""

from __future__ import annotations

import uuid

import grpc
import pytest
import sqlalchemy as sa

from crm.customer.v1 import customer_pb2
from crm_chassis.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable
from sales_svc.customer_client import CustomerClient, authorization_of, settings_from_env
from tests.support.harness import free_port, start_service, token


@pytest.fixture(scope="module")
def customer_svc(databases, broker):
    from customer_svc.__main__ import SPEC as CUSTOMER

    service = start_service(CUSTOMER, databases.fresh("cust"), broker.url, relay=False)
    yield service
    service.stop(0)


@pytest.fixture(scope="module")
def client(customer_svc):
    c = CustomerClient(f"127.0.0.1:{customer_svc.port}", timeout=5)
    yield c
    c.close()


def bearer(roles: str = "sales_rep", sub: str = "rita") -> str:
    return f"Bearer {token(roles, sub)}"


def person(**kw) -> customer_pb2.Customer:
    kw.setdefault("given_name", "Sara")
    kw.setdefault("family_name", "Ahmadi")
    return customer_pb2.Customer(type=customer_pb2.CUSTOMER_TYPE_PERSON, **kw)


def test_the_same_request_id_creates_one_customer(customer_svc, client):
    rid = f"lead-{uuid.uuid4()}-convert"
    first = client.create_customer(person(email="sara@example.com"), rid, bearer())
    again = client.create_customer(person(email="sara@example.com"), rid, bearer())
    assert first.name.startswith("customers/") and again.name == first.name
    with customer_svc.ctx.engine.connect() as conn:
        n = conn.execute(sa.text("SELECT count(*) FROM customers WHERE request_id = :r"), {"r": rid}).scalar()
    assert n == 1
    got = client.get_customer(first.name, bearer())
    assert (got.name, got.given_name, got.email) == (first.name, "Sara", "sara@example.com")
    assert client.find_duplicates(first.name, bearer()) == []


def test_a_bad_field_comes_back_named_under_the_prefix(client):
    with pytest.raises(InvalidArgument) as info:
        client.create_customer(person(email="not an e-mail"), uuid.uuid4().hex, bearer())
    fields = [v.field for v in info.value.violations]
    assert fields == ["customer.email"], fields
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # a caller that puts the customer under another field of its own request says so
    with pytest.raises(InvalidArgument) as info:
        client.create_customer(person(email="nope"), uuid.uuid4().hex, bearer(), field_prefix="lead")
    assert [v.field for v in info.value.violations] == ["lead.customer.email"]


def test_missing_customer_and_the_callers_own_rights(client):
    with pytest.raises(NotFound) as info:
        client.get_customer(f"customers/{uuid.uuid4()}", bearer())
    assert info.value.code == grpc.StatusCode.NOT_FOUND and info.value.reason.endswith("NOT_FOUND")
    # the caller's token is what customer-svc checks: an analyst may not create customers
    with pytest.raises(PermissionDenied):
        client.create_customer(person(), uuid.uuid4().hex, bearer("analyst", "ana"))


def test_customer_svc_down_is_unavailable():
    port = free_port()  # nothing listens there
    down = CustomerClient(f"127.0.0.1:{port}", timeout=1)
    try:
        with pytest.raises(Unavailable) as info:
            down.create_customer(person(), uuid.uuid4().hex, bearer())
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert f"127.0.0.1:{port}" in info.value.message and "retry" in info.value.message
    finally:
        down.close()


def test_a_stopped_customer_svc_is_unavailable(databases, broker):
    from customer_svc.__main__ import SPEC as CUSTOMER

    service = start_service(CUSTOMER, databases.fresh("cust_stop"), broker.url, relay=False)
    c = CustomerClient(f"127.0.0.1:{service.port}", timeout=2)
    try:
        made = c.create_customer(person(), uuid.uuid4().hex, bearer())
        service.stop(0)
        with pytest.raises(Unavailable):
            c.get_customer(made.name, bearer())
    finally:
        c.close()


def test_settings_and_the_incoming_token():
    assert settings_from_env({}) == ("localhost:50051", 5.0)
    assert settings_from_env({"CUSTOMER_SVC_ADDR": "customer-svc:50051", "CUSTOMER_SVC_TIMEOUT_SECONDS": "2.5"}) == (
        "customer-svc:50051",
        2.5,
    )
    with pytest.raises(SystemExit, match="CUSTOMER_SVC_TIMEOUT_SECONDS"):
        settings_from_env({"CUSTOMER_SVC_TIMEOUT_SECONDS": "soon"})

    class Context:  # what a servicer's context answers
        def invocation_metadata(self):
            return (("x-request-id", "r1"), ("authorization", "Bearer abc"))

    assert authorization_of(Context()) == "Bearer abc"


def test_a_customer_svc_that_does_not_answer_hits_the_deadline():
    import socket

    silent = socket.socket()  # accepts connections and never speaks HTTP/2
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    target = f"127.0.0.1:{silent.getsockname()[1]}"
    c = CustomerClient(target, timeout=0.5)
    try:
        with pytest.raises(Unavailable) as info:
            c.get_customer(f"customers/{uuid.uuid4()}", bearer())
        assert target in info.value.message and "did not answer in time" in info.value.message
        assert info.value.metadata["code"] == "DEADLINE_EXCEEDED"
    finally:
        c.close()
        silent.close()
