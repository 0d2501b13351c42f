"""gRPC status -> HTTP status with an application/problem+json body (RFC 9457)."""

from __future__ import annotations

import grpc
from flask import Response, json

from crm_chassis.errors import read_rpc_error
from crm_chassis.logging import request_id_var

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
TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    499: "Client Closed Request",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    504: "Gateway Timeout",
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
    body = {
        "type": "about:blank",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if code:
        body["code"] = code
    if reason:
        body["reason"] = reason
    if errors:
        body["errors"] = errors
    rid = request_id_var.get()
    if rid:
        body["request_id"] = rid
    resp = Response(json.dumps(body, ensure_ascii=False), status=status, mimetype="application/problem+json")
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="crm"'
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def from_rpc_error(err: grpc.RpcError, field_map=None) -> Response:
    view = read_rpc_error(err)
    status = HTTP_STATUS.get(view.code, 500)
    detail = view.message
    if status == 500:
        detail = "internal error"  # never leak internals of a service
    errors = [
        {"field": field_map(v.field) if field_map else v.field, "description": v.description}
        for v in view.field_violations
    ]
    return problem(status, detail, code=view.code.name, reason=view.reason, errors=errors or None)
