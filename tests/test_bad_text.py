"""A NUL character in any text a caller sends is INVALID_ARGUMENT naming the field (400 over
HTTP), whichever service and whichever field: PostgreSQL cannot store it, and it used to
answer INTERNAL / 500 from deep inside a query."""

from __future__ import annotations

import grpc
import pytest

from crm.customer.v1 import customer_pb2, customer_service_pb2, customer_service_pb2_grpc
from crm_chassis.errors import read_rpc_error
from tests.support.harness import assert_problem, md


def person(**kw):
    body = {"type": "CUSTOMER_TYPE_PERSON", "givenName": "Maryam", "familyName": "Karimi"}
    body.update(kw)
    return body


def test_grpc_create_with_a_nul_names_the_field(suite):
    with grpc.insecure_channel(f"127.0.0.1:{suite.customer.port}") as ch:
        stub = customer_service_pb2_grpc.CustomerServiceStub(ch)
        customer = customer_pb2.Customer(
            type=customer_pb2.CUSTOMER_TYPE_PERSON, given_name="a\x00b", family_name="Karimi"
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateCustomer(customer_service_pb2.CreateCustomerRequest(customer=customer), metadata=md())
        view = read_rpc_error(err.value)
        assert view.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in view.field_violations] == ["customer.given_name"]
        # Unauthenticated callers learn nothing about their input: the token is checked first.
        with pytest.raises(grpc.RpcError) as anon:
            stub.CreateCustomer(customer_service_pb2.CreateCustomerRequest(customer=customer))
        assert anon.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_streaming_rpc_names_every_field_with_a_nul(suite):
    """The check is the chassis interceptor's, before any servicer code: streams and repeated
    fields included."""
    with grpc.insecure_channel(f"127.0.0.1:{suite.customer.port}") as ch:
        stub = customer_service_pb2_grpc.CustomerServiceStub(ch)
        request = customer_service_pb2.ExportCustomersRequest(fields=["display_name", "x\x00"], title="t\x00")
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ExportCustomers(request, metadata=md()))
        view = read_rpc_error(err.value)
        assert view.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in view.field_violations] == ["fields[1]", "title"]


def test_http_body_and_query_with_a_nul_are_400_naming_the_field(suite):
    h = suite.headers()
    assert_problem(suite.http.post("/v1/customers", json=person(givenName="a\u0000b"), headers=h), 400, "given_name")
    assert_problem(suite.http.get("/v1/customers:search?query=a%00b", headers=h), 400, "query")
    assert_problem(suite.http.get("/v1/customers?filter=given_name%20%3D%20%22a%00%22", headers=h), 400, "filter")
    # The same requests without the NUL are fine.
    assert suite.http.post("/v1/customers", json=person(givenName="ab"), headers=h).status_code == 201
    assert suite.http.get("/v1/customers:search?query=ab", headers=h).status_code == 200


def test_an_out_of_range_timestamp_is_invalid_argument_naming_it_not_internal(suite):
    """A Timestamp before 0001-01-01 (or after 9999) cannot become a datetime: the chassis
    interceptor names it before any handler runs. It used to be INTERNAL from ToDatetime()."""
    with grpc.insecure_channel(f"127.0.0.1:{suite.customer.port}") as ch:
        stub = customer_service_pb2_grpc.CustomerServiceStub(ch)
        request = customer_service_pb2.CreateCustomerRequest(
            customer=customer_pb2.Customer(type=customer_pb2.CUSTOMER_TYPE_PERSON, given_name="a", family_name="b")
        )
        request.customer.create_time.seconds = -62_135_596_801
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateCustomer(request, metadata=md())
        view = read_rpc_error(err.value)
        assert view.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in view.field_violations] == ["customer.create_time"]
        request.customer.create_time.seconds = 1_700_000_000  # a real one is taken (and ignored: output only)
        assert stub.CreateCustomer(request, metadata=md()).name.startswith("customers/")


def test_a_long_bad_value_comes_back_as_its_invalid_argument_not_a_transport_error(suite):
    """An error quoting a 3,000-character value (a tag) used to overflow the client's 8 KiB
    metadata limit: RESOURCE_EXHAUSTED over gRPC, 500 or 429 over HTTP. The chassis keeps a
    status's texts short, so the caller gets INVALID_ARGUMENT naming the field, over both. A
    request_id past 128 characters (a unique index's key) is refused by name."""
    long_tag = "س" * 3000
    with grpc.insecure_channel(f"127.0.0.1:{suite.customer.port}") as ch:
        stub = customer_service_pb2_grpc.CustomerServiceStub(ch)
        customer = customer_pb2.Customer(
            type=customer_pb2.CUSTOMER_TYPE_PERSON, given_name="a", family_name="b", tags=["vip", long_tag]
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateCustomer(customer_service_pb2.CreateCustomerRequest(customer=customer), metadata=md())
        view = read_rpc_error(err.value)
        assert view.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in view.field_violations] == ["customer.tags"]
        assert len(view.message) <= 300 and len(view.field_violations[0].description) <= 160
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateCustomer(
                customer_service_pb2.CreateCustomerRequest(
                    customer=customer_pb2.Customer(
                        type=customer_pb2.CUSTOMER_TYPE_PERSON, given_name="a", family_name="b"
                    ),
                    request_id="r" * 3000,
                ),
                metadata=md(),
            )
        view = read_rpc_error(err.value)
        assert view.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in view.field_violations] == ["request_id"]
    problem = suite.http.post("/v1/customers", json=person(tags=["vip", long_tag]), headers=suite.headers())
    assert_problem(problem, 400, "tags")
