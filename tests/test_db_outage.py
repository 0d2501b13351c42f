"""PostgreSQL goes away under a running customer-svc (a proxy between them is cut, as when the
server restarts): every call answers UNAVAILABLE (503 over HTTP) without a stack trace, health
and the gateway's /readyz say not ready, and all of it recovers by itself when it is back."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crm.customer.v1 import customer_pb2, customer_service_pb2, customer_service_pb2_grpc
from tests.support.db_proxy import proxied_database
from tests.support.harness import assert_problem, md, start_service, token, wait_for


@pytest.fixture(scope="module")
def outage(databases, broker):
    from crm_gateway import create_app
    from crm_gateway.clients import Clients
    from customer_svc.__main__ import SPEC as CUSTOMER
    from reporting_svc.__main__ import SPEC as REPORTING

    proxy, url = proxied_database(databases.fresh("outage"))
    service = start_service(CUSTOMER, url, broker.url)
    reporting = start_service(REPORTING, databases.fresh("outage-reporting"), broker.url)  # its database stays up
    clients = Clients({"customer": f"127.0.0.1:{service.port}", "reporting": f"127.0.0.1:{reporting.port}"})
    http = create_app(clients).test_client()
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    yield proxy, service, http, channel
    channel.close()
    clients.close()
    service.stop(0)
    reporting.stop(0)
    proxy.stop()


def person(name: str) -> customer_service_pb2.CreateCustomerRequest:
    return customer_service_pb2.CreateCustomerRequest(
        customer=customer_pb2.Customer(type=customer_pb2.CUSTOMER_TYPE_PERSON, given_name=name, family_name="Karimi")
    )


def health(channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status


def test_a_database_outage_is_unavailable_not_ready_and_recovers(outage, caplog):
    proxy, service, http, channel = outage
    stub = customer_service_pb2_grpc.CustomerServiceStub(channel)
    made = stub.CreateCustomer(person("Before"), metadata=md())
    assert health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert http.get("/readyz").status_code == 200
    headers = {"Authorization": f"Bearer {token()}"}

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        proxy.stop()  # PostgreSQL goes away
        codes = []
        for i in range(10):  # the pooled connections are broken, new ones are refused
            with pytest.raises(grpc.RpcError) as err:
                stub.CreateCustomer(person(f"During {i}"), metadata=md())
            codes.append(err.value.code())
        with pytest.raises(grpc.RpcError) as err:
            stub.GetCustomer(customer_service_pb2.GetCustomerRequest(name=made.name), metadata=md())
        codes.append(err.value.code())
        assert set(codes) == {grpc.StatusCode.UNAVAILABLE}, codes
        body = {"type": "CUSTOMER_TYPE_PERSON", "givenName": "Http", "familyName": "Karimi"}
        assert_problem(http.post("/v1/customers", json=body, headers=headers), 503)

        wait_for(lambda: health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING, what="NOT_SERVING")
        assert health(channel, "crm.customer.v1.CustomerService") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health(channel, "liveness") == health_pb2.HealthCheckResponse.SERVING  # no restart wanted
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.get_json()["services"] == {
            "customer": "NOT_SERVING",
            "reporting": "SERVING",
        }
    # One WARNING line per failed call, no ERROR, no stack trace (from any logger).
    assert not any(r.exc_info or r.levelno >= logging.ERROR for r in caplog.records), [
        (r.name, r.getMessage()) for r in caplog.records
    ]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("database unavailable in ") for m in messages)
    assert messages.count("database unreachable; not ready") == 1
    assert "outbox database error" not in messages  # the relay says it once per outage, not per retry
    assert messages.count("relay's database unavailable; it retries with back-off") <= 1

    proxy.start()  # PostgreSQL is back
    wait_for(lambda: health(channel) == health_pb2.HealthCheckResponse.SERVING, what="SERVING again")
    assert http.get("/readyz").status_code == 200
    again = stub.CreateCustomer(person("After"), metadata=md())
    assert stub.GetCustomer(customer_service_pb2.GetCustomerRequest(name=again.name), metadata=md()).name
