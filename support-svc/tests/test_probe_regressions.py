"""Regressions found by probing a running suite from outside (HTTP, gRPC, SMTP): each test is
one bug seen there, reproduced against the in-process service."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json

import grpc
import pytest

from crm.support.v1 import calls_pb2 as calls_pb
from crm.support.v1 import calls_pb2_grpc
from crm_chassis.errors import read_rpc_error
from tests.support.harness import md

PUBLIC = md("public_channel", "gateway:public")
CTI_KEY = b"dev-cti-key"


def _signed(body: bytes) -> str:
    return "sha256=" + hmac.new(CTI_KEY, body, hashlib.sha256).hexdigest()


def test_a_cti_event_with_a_nul_character_is_invalid_argument_not_internal(ch):
    """A PBX event whose call_id (or queue, agent) held U+0000 reached the INSERT and failed
    there: INTERNAL (HTTP 500). It is a bad field like any other."""
    stub = calls_pb2_grpc.CallServiceStub(ch)
    at = dt.datetime(2026, 3, 1, 10, 0, tzinfo=dt.UTC).isoformat()
    for field in ("call_id", "queue", "agent"):
        data = {"call_id": "nul-1", "event": "answered", "direction": "inbound", "caller": "09121234567"}
        data.update({"time": at, "agent": "omid", field: "a\x00b"})
        body = json.dumps(data).encode()
        req = calls_pb.PostCallEventRequest(pbx="dev-pbx", body=body, signature=_signed(body))
        with pytest.raises(grpc.RpcError) as err:
            stub.PostCallEvent(req, metadata=PUBLIC)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())
        assert [v.field for v in read_rpc_error(err.value).field_violations] == [field]
