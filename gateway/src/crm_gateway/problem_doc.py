"""The application/problem+json document (RFC 9457) of every error the gateway answers.

Standard library only: gunicorn's worker (worker.py) builds the same document for the errors
gunicorn answers itself, before any of the app is imported.
"""

from __future__ import annotations

MEDIA_TYPE = "application/problem+json"
TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    417: "Expectation Failed",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    499: "Client Closed Request",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def problem_document(
    status: int,
    detail: str,
    *,
    code: str | None = None,
    reason: str | None = None,
    errors: list[dict] | None = None,
    request_id: str | None = None,
) -> dict:
    body = {"type": "about:blank", "title": TITLES.get(status, "Error"), "status": status, "detail": detail}
    if code:
        body["code"] = code
    if reason:
        body["reason"] = reason
    if errors:
        body["errors"] = errors
    if request_id:
        body["request_id"] = request_id
    return body
