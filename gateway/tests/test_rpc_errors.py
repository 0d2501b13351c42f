"""A service's error that does not arrive as sent still answers a problem document.

A real gRPC server on loopback stands in for sales-svc's LeadService and answers what a service
may: a validation error that repeats the client's (long) input in its message and field
violation. Its trailers then pass the gateway channel's metadata limit, and gRPC core turns the
call into RESOURCE_EXHAUSTED "received metadata size exceeds ..." while keeping (some of) the
trailers: grpc_status.from_call raises ValueError over a status proto that says
INVALID_ARGUMENT. That is neither a 500 HTML page nor a 429 (a rate limit) with gRPC core's text.
"""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from crm.sales.v1 import leads_pb2, leads_pb2_grpc
from crm_chassis.grpc_client import make_channel
from tests.support.harness import gateway_client, token


class Leads(leads_pb2_grpc.LeadServiceServicer):
    def CreateLead(self, request, context):
        phone = request.lead.phone
        if phone.startswith("mismatch"):
            # a status proto that disagrees with the call's code and details
            sent = status_pb2.Status(code=code_pb2.NOT_FOUND, message="no such lead")
            context.set_trailing_metadata((("grpc-status-details-bin", sent.SerializeToString()),))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the lead is closed")
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field="lead.phone", description=f"not a phone: {phone}")
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad)
        status = status_pb2.Status(
            code=code_pb2.INVALID_ARGUMENT, message=f"phone {phone} is not valid", details=[detail]
        )
        context.abort_with_status(rpc_status.to_status(status))


@pytest.fixture(scope="module")
def sales():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    leads_pb2_grpc.add_LeadServiceServicer_to_server(Leads(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


@pytest.fixture(scope="module")
def http(sales):
    client, clients = gateway_client(sales=sales)
    try:
        yield client
    finally:
        clients.close()


def direct(target: str, phone: str) -> grpc.RpcError:
    """The call as the gateway's channel (chassis make_channel) sees it."""
    channel = make_channel(target)
    try:
        leads_pb2_grpc.LeadServiceStub(channel).CreateLead(
            leads_pb2.CreateLeadRequest(lead={"given_name": "a", "family_name": "b", "phone": phone}), timeout=10
        )
    except grpc.RpcError as err:
        return err
    finally:
        channel.close()
    raise AssertionError("the call succeeded")


def post(http, phone: str):
    return http.post(
        "/v1/leads",
        json={"givenName": "a", "familyName": "b", "phone": phone},
        headers={"Authorization": f"Bearer {token()}"},
    )


def problem_of(resp, status: int) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)[:500]
    assert resp.mimetype == "application/problem+json"
    doc = resp.get_json()
    assert doc["status"] == status and doc["detail"]
    return doc


def test_trailers_over_the_metadata_limit_with_an_invalid_argument_status_are_400(sales, http):
    phone = "س" * 2000
    err = direct(sales, phone)  # the condition the fuzz met: the code and the status proto disagree
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "received metadata size exceeds" in err.details()
    with pytest.raises(ValueError, match="doesn't match status code"):
        rpc_status.from_call(err)
    doc = problem_of(post(http, phone), 400)
    assert doc["code"] == "INVALID_ARGUMENT"
    assert [e["field"] for e in doc["errors"]] == ["phone"]  # the service's violation, as HTTP names it
    assert "metadata" not in doc["detail"]


def test_trailers_dropped_over_the_metadata_limit_are_a_neutral_502_not_a_429(sales, http):
    phone = "س" * 6000
    err = direct(sales, phone)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and rpc_status.from_call(err) is None
    resp = post(http, phone)
    doc = problem_of(resp, 502)
    assert "metadata" not in doc["detail"] and "Stream removed" not in doc["detail"]
    assert "code" not in doc and "Retry-After" not in resp.headers


def test_a_status_proto_that_disagrees_with_the_call_falls_back_to_the_calls_code(sales, http):
    with pytest.raises(ValueError):
        rpc_status.from_call(direct(sales, "mismatch"))
    doc = problem_of(post(http, "mismatch"), 400)
    assert doc["code"] == "FAILED_PRECONDITION" and doc["detail"] == "the lead is closed"


def test_a_short_invalid_argument_is_read_as_before(http):
    doc = problem_of(post(http, "abc"), 400)
    assert doc["code"] == "INVALID_ARGUMENT" and doc["detail"] == "phone abc is not valid"
    assert doc["errors"] == [{"field": "phone", "description": "not a phone: abc"}]
