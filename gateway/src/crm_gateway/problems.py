"""gRPC status -> HTTP status with an application/problem+json body (RFC 9457)."""

from __future__ import annotations

import logging

import grpc
from flask import Response, json
from google.rpc import code_pb2, status_pb2

from crm_chassis.errors import ErrorView, read_rpc_error
from crm_chassis.logging import request_id_var

from .problem_doc import MEDIA_TYPE, TITLES, problem_document

__all__ = ["HTTP_STATUS", "TITLES", "from_rpc_error", "problem", "read_error"]

log = logging.getLogger("crm.gateway")

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def problem(
    status: int,
    detail: str,
    *,
    code: str | None = None,
    reason: str | None = None,
    errors: list[dict] | None = None,
    headers: dict | None = None,
) -> Response:
    body = problem_document(
        status, detail, code=code, reason=reason, errors=errors, request_id=request_id_var.get() or None
    )
    resp = Response(json.dumps(body, ensure_ascii=False), status=status, mimetype=MEDIA_TYPE)
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="crm"'
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


# What gRPC core says when a response's headers or trailers pass the channel's
# grpc.max_metadata_size: a transport failure, not the service's rate limit or quota.
METADATA_TOO_LARGE = "received metadata size exceeds"
_DETAILS_KEY = "grpc-status-details-bin"


def _call_status(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The call's own code and details (UNKNOWN for an RpcError that is not a call)."""
    try:
        code, details = err.code(), err.details()
    except Exception:
        return grpc.StatusCode.UNKNOWN, ""
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return code, details if isinstance(details, str) else ""


def _sent_status(err: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status the service sent in the trailers, if it arrived and parses."""
    try:
        for key, value in err.trailing_metadata() or ():
            if key == _DETAILS_KEY:
                return status_pb2.Status.FromString(value)
    except Exception:
        pass
    return None


class _AsSent:
    """The failed call as its status proto tells it (for read_rpc_error, which insists that the
    call's code and details agree with the proto's)."""

    def __init__(self, err: grpc.RpcError, sent: status_pb2.Status):
        self._err, self._sent = err, sent

    def code(self) -> grpc.StatusCode:
        return next(c for c in grpc.StatusCode if c.value[0] == self._sent.code)

    def details(self) -> str:
        return self._sent.message

    def trailing_metadata(self):
        return self._err.trailing_metadata()


def read_error(err: grpc.RpcError) -> ErrorView | None:
    """What a failed call says, never raising; None when the service's answer did not arrive in
    a readable form (its trailers were too large for the channel).

    A status proto that disagrees with the call's code (gRPC core replaces the code with
    RESOURCE_EXHAUSTED when the trailers pass the channel's metadata limit, and keeps what of
    them it read) makes grpc_status.from_call raise ValueError: then the call's own code and
    details answer. A call cut short that way is a transport failure: if the service's status
    still arrived and says INVALID_ARGUMENT that is the answer (the client's input was bad), else
    there is none to give (502), and never gRPC core's text as a 429."""
    code, details = _call_status(err)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and METADATA_TOO_LARGE in details:
        log.warning("a service's error answer passed the gateway's metadata limit", extra={"grpc_code": code.name})
        sent = _sent_status(err)
        if sent is None or sent.code != code_pb2.INVALID_ARGUMENT:
            return None
        try:
            return read_rpc_error(_AsSent(err, sent))
        except Exception:
            return ErrorView(code=grpc.StatusCode.INVALID_ARGUMENT, message=sent.message)
    try:
        return read_rpc_error(err)
    except Exception:
        log.warning("unreadable status details of a failed call", extra={"grpc_code": code.name}, exc_info=True)
        return ErrorView(code=code, message=details)


def from_rpc_error(err: grpc.RpcError, field_map=None) -> Response:
    view = read_error(err)
    if view is None:
        return problem(502, "the service's answer could not be read", reason="BAD_GATEWAY")
    status = HTTP_STATUS.get(view.code, 500)
    detail = view.message
    if status == 500:
        detail = "internal error"  # never leak internals of a service
    errors = [
        {"field": field_map(v.field) if field_map else v.field, "description": v.description}
        for v in view.field_violations
    ]
    return problem(status, detail, code=view.code.name, reason=view.reason, errors=errors or None)
