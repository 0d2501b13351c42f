"""gRPC status -> HTTP status with an application/problem+json body (RFC 9457)."""

from __future__ import annotations

import logging

import grpc
from flask import Response, json

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


def read_error(err: grpc.RpcError) -> ErrorView | None:
    """What a failed call says (crm_chassis.errors.read_rpc_error); None when the service's
    answer did not arrive in a readable form (its trailers passed the channel's metadata limit):
    502, never gRPC core's RESOURCE_EXHAUSTED text as a 429."""
    view = read_rpc_error(err)
    if view.unreadable:
        log.warning("a service's error answer passed the gateway's metadata limit", extra={"grpc_code": view.code.name})
        return None
    return view


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
