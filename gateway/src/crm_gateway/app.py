"""The gateway's Flask app factory: JSON routes over the services' gRPC APIs.

The gateway authenticates the bearer token itself (a missing or bad token never reaches a
service), then forwards it: every service checks the caller again.
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
import uuid
from urllib.parse import quote

import grpc
from flask import Flask, Response, g, json, request
from google.protobuf import json_format, message_factory
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind, Status, StatusCode
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from crm_chassis.auth import TokenVerifier
from crm_chassis.config import load_settings
from crm_chassis.errors import DomainError
from crm_chassis.logging import configure_logging, request_id_var
from crm_chassis.telemetry import setup_telemetry

from . import clients as clients_mod
from .openapi import openapi_document
from .problems import from_rpc_error, problem
from .public import PublicToken, RateLimiter
from .routes import ROUTES, SERVICES, Route
from .transcode import (
    DEFAULT_MAX_BODY_BYTES,
    MAX_BODY_BYTES,
    MAX_UPLOAD_BYTES,
    BadRequest,
    build_request,
    carries_file,
    error_field,
)

try:  # what gunicorn raises while the app reads a body that is not valid HTTP/1.1 (a bad chunk)
    from gunicorn.http.errors import NoMoreData as _NoMoreData
    from gunicorn.http.errors import ParseException as _ParseException

    _BAD_BODY: tuple[type[BaseException], ...] = (_ParseException, _NoMoreData)
except ImportError:  # pragma: no cover - the gateway runs under gunicorn, tests may not
    _BAD_BODY = ()

log = logging.getLogger("crm.gateway")

SERVICE_NAME = "gateway"
_TRACER = trace.get_tracer("crm.gateway")
EXPORT_TIMEOUT = 600.0


def init_worker() -> None:
    """Per-process set-up, run in gunicorn's post_fork (and on first use elsewhere)."""
    settings = load_settings(SERVICE_NAME, 8080)
    configure_logging(SERVICE_NAME, settings.log_level)
    setup_telemetry(SERVICE_NAME, settings.otel_endpoint)


def _json(message, status: int = 200, headers: dict | None = None) -> Response:
    body = json_format.MessageToDict(message, preserving_proto_field_name=False)
    resp = Response(json.dumps(body, ensure_ascii=False), status=status, mimetype="application/json")
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _handler(route: Route, clients):
    """The view function of one route: build the request, call the service, answer JSON."""
    service = SERVICES[route.service]
    method = service.methods_by_name[route.rpc]
    request_cls = message_factory.GetMessageClass(method.input_type)

    def view(**path_args):
        g.route = route
        req = build_request(route, request_cls, path_args)
        call = getattr(clients().stub(route.service), route.rpc)
        if route.stream:
            # The tracing interceptor of a server-streaming call keeps its span current from the
            # first chunk to the last; the stream outlives this request's context, so every step
            # runs in a private copy of the context and nothing leaks into the worker thread.
            private = contextvars.copy_context()
            chunks = private.run(call, req, metadata=_metadata(), timeout=EXPORT_TIMEOUT)
            head = private.run(next, chunks)  # errors (bad filter, no permission) surface here, before any byte

            def body():
                while True:
                    try:
                        yield private.run(next, chunks).data
                    except StopIteration:
                        return

            headers = {"Content-Disposition": _disposition(head.filename)}
            if "row_count" in head.DESCRIPTOR.fields_by_name:
                headers["X-Row-Count"] = str(head.row_count)
            # content_type, not mimetype: the service's type already carries its charset (Flask
            # would append a second one to a text/* mimetype).
            return Response(body(), content_type=head.content_type, headers=headers)
        resp = call(req, metadata=_metadata(), timeout=clients_mod.CALL_TIMEOUT)
        if route.public is not None and (route.public.raw_response or route.public.redirect):
            return _raw(route.public, resp)
        headers = {}
        if "etag" in resp.DESCRIPTOR.fields_by_name and resp.etag:
            headers["ETag"] = resp.etag
        if route.status == 201 and "name" in resp.DESCRIPTOR.fields_by_name:
            headers["Location"] = "/v1/" + resp.name
        return _json(resp, route.status, headers)

    return view


def _raw(public, resp) -> Response:
    """A public route's raw answer: the bytes of `raw_response` with the response's content_type,
    or a 302 to the `redirect` field's URL (the service vouches for it: a signed link's)."""
    headers = {"Cache-Control": public.cache_control} if public.cache_control else {}
    if public.redirect:
        location = getattr(resp, public.redirect)
        if not location:
            return problem(404, "no such link", code="NOT_FOUND")
        return Response(b"", status=302, headers={**headers, "Location": location})
    fields = resp.DESCRIPTOR.fields_by_name
    content_type = resp.content_type if "content_type" in fields and resp.content_type else OCTET
    return Response(getattr(resp, public.raw_response), content_type=content_type, headers=headers)


OCTET = "application/octet-stream"


def _disposition(filename: str) -> str:
    """Content-Disposition of a download; a non-ASCII name (a Persian attachment's) goes as
    RFC 6266 filename* (UTF-8) beside an ASCII fallback: a header carries latin-1 only."""
    if filename.isascii():
        return f'attachment; filename="{filename}"'
    fallback = "".join(ch if ch.isascii() and ch not in '"\\' else "_" for ch in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _metadata() -> list[tuple[str, str]]:
    public = g.get("public_token")
    if public is not None:  # a public route: the gateway's own token, and who called
        return [("authorization", public), ("x-request-id", g.request_id), ("x-forwarded-for", _client())]
    return [("authorization", request.headers["Authorization"]), ("x-request-id", g.request_id)]


def _client() -> str:
    return request.remote_addr or ""


def proxy_hops(env=os.environ) -> int:
    """GATEWAY_PROXY_HOPS: how many proxies in front of the gateway append to X-Forwarded-For
    (1 behind the Kubernetes ingress; 0, the default, when clients reach it directly). The
    client's address is the entry that many places from the right; the entries to its left are
    what the client itself sent, and a client can write anything there."""
    try:
        return max(0, int(env.get("GATEWAY_PROXY_HOPS", "0")))
    except ValueError:
        return 0


def max_body_bytes(env=os.environ) -> int:
    """GATEWAY_MAX_BODY_BYTES: the largest request body of a route that carries no file (10 MiB
    by default); over it the answer is 413 before the body is read. A route whose request has a
    file (an import, a ticket's attachments) takes up to MAX_BODY_BYTES (90 MiB), a public route
    its own max_bytes."""
    try:
        value = int(env.get("GATEWAY_MAX_BODY_BYTES", str(DEFAULT_MAX_BODY_BYTES)))
    except ValueError:
        return DEFAULT_MAX_BODY_BYTES
    return value if value > 0 else DEFAULT_MAX_BODY_BYTES


def _size(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n % (1024 * 1024) == 0 else f"{n} bytes"


class _Gateway(Flask):
    def make_default_options_response(self) -> Response:
        """OPTIONS on a route: 204 with its Allow header (RFC 9110 9.3.7), not Flask's empty
        200 text/html."""
        resp = super().make_default_options_response()
        resp.status_code = 204
        resp.headers.pop("Content-Type", None)
        return resp


def create_app(
    clients: clients_mod.Clients | None = None, *, hops: int | None = None, max_body: int | None = None
) -> Flask:
    settings = load_settings(SERVICE_NAME, 8080)
    verifier = TokenVerifier.from_settings(settings)
    app = _Gateway("crm_gateway")
    hops = proxy_hops() if hops is None else hops
    if hops:  # werkzeug's ProxyFix: request.remote_addr becomes the trusted hop's client
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops)
    app.json.ensure_ascii = False
    # Any body; a route that carries a file may take up to MAX_BODY_BYTES (file_routes below).
    max_body = max_body_bytes() if max_body is None else max_body
    app.config["MAX_CONTENT_LENGTH"] = max_body
    # A multipart upload's file part (customer-svc's limit); over it the request is a 413.
    app.config["MAX_UPLOAD_BYTES"] = MAX_UPLOAD_BYTES

    def cl() -> clients_mod.Clients:
        # Given clients (tests, benchmarks) or this worker process's own (made after the fork).
        return clients if clients is not None else clients_mod.get_clients()

    public = {"/healthz", "/readyz", "/openapi.json"}
    public_routes = {r.endpoint: r for r in ROUTES if r.public}
    # An import carries its file base64-encoded in the JSON body: 64 MiB of file is ~86 MiB.
    file_routes = {
        r.endpoint
        for r in ROUTES
        if not r.public and carries_file(r, SERVICES[r.service].methods_by_name[r.rpc].input_type)
    }
    limiter = RateLimiter()
    public_token = PublicToken(verifier)
    untraced = {"/healthz", "/readyz"}

    @app.before_request
    def _before():
        g.started = time.perf_counter()
        g.request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        g.rid_token = request_id_var.set(g.request_id)
        g.subject = None
        if request.path not in untraced:
            # One SERVER span per request, continuing the caller's trace (W3C traceparent); the
            # gRPC client spans of the call below are its children. A span of our own instead of
            # opentelemetry-instrumentation-flask: that one cost a third of the gateway's time.
            rule = request.url_rule.rule if request.url_rule is not None else request.path
            span = _TRACER.start_span(
                f"{request.method} {rule}",
                context=extract(request.headers),
                kind=SpanKind.SERVER,
                attributes={"http.request.method": request.method, "url.path": request.path, "http.route": rule},
            )
            g.span = span
            g.span_token = otel_context.attach(trace.set_span_in_context(span))
        if request.path in public:
            return None
        route = public_routes.get(request.endpoint) if request.url_rule is not None else None
        if route is not None:
            size = request.content_length or 0
            if size > route.public.max_bytes:
                return problem(413, f"the body may be at most {route.public.max_bytes} bytes", code="PAYLOAD_TOO_LARGE")
            ok, retry = limiter.allow(route.endpoint, _client(), route.public.per_minute)
            if not ok:
                resp = problem(429, f"at most {route.public.per_minute} requests a minute", code="RESOURCE_EXHAUSTED")
                resp.headers["Retry-After"] = str(retry)
                return resp
            # A chunked body has no Content-Length to refuse it by, and werkzeug cuts a stream at
            # max_content_length without a word: read one byte more than the limit to tell.
            request.max_content_length = route.public.max_bytes + 1
            if request.content_length is None and len(request.get_data()) > route.public.max_bytes:
                return problem(413, f"the body may be at most {route.public.max_bytes} bytes", code="PAYLOAD_TOO_LARGE")
            g.public_token = public_token.header()
            return None
        if request.method == "OPTIONS":
            return None  # Flask's answer: the route's Allow header, and no service is called
        files = request.endpoint in file_routes
        limit = max(MAX_BODY_BYTES, max_body) if files else max_body
        if (request.content_length or 0) > limit:
            return problem(413, f"the body may be at most {_size(limit)}", code="PAYLOAD_TOO_LARGE")
        request.max_content_length = limit
        if (
            request.content_length is None
            and not files
            and "chunked" in request.headers.get("Transfer-Encoding", "").lower()
        ):
            # As for a public route: werkzeug cuts a chunked body at max_content_length without a
            # word, so read one byte more to tell (the JSON body is read whole anyway). A file
            # route's body is an upload, streamed to a temporary file (transcode._read_form).
            request.max_content_length = limit + 1
            if len(request.get_data()) > limit:
                return problem(413, f"the body may be at most {_size(limit)}", code="PAYLOAD_TOO_LARGE")
        try:
            g.principal = verifier.verify_header(request.headers.get("Authorization"))
            g.subject = g.principal.subject
        except DomainError as err:
            return problem(401, err.message, code="UNAUTHENTICATED", reason=err.reason)
        return None

    @app.after_request
    def _after(resp: Response):
        resp.headers["X-Request-Id"] = g.get("request_id", "")
        span = g.get("span")
        if span is not None:
            span.set_attribute("http.response.status_code", resp.status_code)
            if resp.status_code >= 500:
                span.set_status(Status(StatusCode.ERROR))
        if request.path not in untraced:
            log.info(
                "http",
                extra={
                    "http_method": request.method,
                    "path": request.path,
                    "status": resp.status_code,
                    "duration_ms": round((time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 3),
                    "subject": g.get("subject"),
                },
            )
        return resp

    @app.teardown_request
    def _teardown(_exc):
        token = g.pop("rid_token", None)
        if token is not None:
            request_id_var.reset(token)
        span_token = g.pop("span_token", None)
        if span_token is not None:
            otel_context.detach(span_token)
        span = g.pop("span", None)
        if span is not None:
            span.end()

    @app.errorhandler(grpc.RpcError)
    def _rpc_error(err):
        route = g.get("route")
        return from_rpc_error(err, field_map=(lambda f: error_field(route, f)) if route else None)

    @app.errorhandler(BadRequest)
    def _bad_request(err: BadRequest):
        return problem(
            err.status,
            str(err),
            code="INVALID_ARGUMENT" if err.status == 400 else None,
            reason=err.reason,
            errors=[{"field": f, "description": d} for f, d in err.violations],
        )

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException):
        # keep the headers its status requires: a 405's Allow (RFC 9110 15.5.6)
        kept = {k: v for k, v in err.get_headers() if k.lower() == "allow"}
        return problem(err.code or 500, err.description or err.name, headers=kept)

    @app.errorhandler(Exception)
    def _unexpected(err):
        if isinstance(err, _BAD_BODY):  # gunicorn could not read the body: a bad chunk, cut short
            return problem(400, "the request body is not valid HTTP/1.1 (chunked encoding)", reason="INVALID_BODY")
        log.exception("unhandled error")
        return problem(500, "internal error")

    # -- operational -------------------------------------------------------------------------
    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        states = cl().health()
        ready = all(s == "SERVING" for s in states.values())
        return Response(
            json.dumps({"ready": ready, "services": states}), status=200 if ready else 503, mimetype="application/json"
        )

    @app.get("/openapi.json")
    def openapi():
        return openapi_document()

    # -- the API: every route of the table, transcoded to its gRPC method ---------------------
    for route in ROUTES:
        app.add_url_rule(route.flask_path, route.endpoint, _handler(route, cl), methods=[route.method])

    return app
