"""The gateway's Flask app factory: JSON routes over the services' gRPC APIs.

The gateway authenticates the bearer token itself (a missing or bad token never reaches a
service), then forwards it: every service checks the caller again.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid

import grpc
from flask import Flask, Response, g, json, request
from google.protobuf import json_format, timestamp_pb2
from werkzeug.exceptions import HTTPException

from crm.customer.v1 import customer_pb2, customer_service_pb2
from crm.reporting.v1 import reporting_service_pb2
from crm_chassis.auth import TokenVerifier
from crm_chassis.config import load_settings
from crm_chassis.errors import DomainError
from crm_chassis.logging import configure_logging, request_id_var
from crm_chassis.telemetry import setup_telemetry

from . import clients as clients_mod
from .openapi import openapi_document
from .problems import from_rpc_error, problem

log = logging.getLogger("crm.gateway")

SERVICE_NAME = "gateway"


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


def _metadata() -> list[tuple[str, str]]:
    return [("authorization", request.headers["Authorization"]), ("x-request-id", g.request_id)]


def _int_arg(name: str) -> int:
    raw = request.args.get(name, "0")
    try:
        return int(raw)
    except ValueError:
        raise _BadParam(name, "must be an integer") from None


def _time_arg(name: str):
    raw = request.args.get(name)
    if not raw:
        return None
    try:
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise _BadParam(name, "must be an RFC 3339 timestamp, e.g. 2026-01-31T00:00:00Z") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


class _BadParam(Exception):
    def __init__(self, field: str, description: str):
        self.field, self.description = field, description


def create_app(clients: clients_mod.Clients | None = None) -> Flask:
    settings = load_settings(SERVICE_NAME, 8080)
    verifier = TokenVerifier.from_settings(settings)
    app = Flask("crm_gateway")
    app.json.ensure_ascii = False

    def cl() -> clients_mod.Clients:
        # Given clients (tests, benchmarks) or this worker process's own (made after the fork).
        return clients if clients is not None else clients_mod.get_clients()

    try:
        from opentelemetry.instrumentation.flask import FlaskInstrumentor

        FlaskInstrumentor().instrument_app(app, excluded_urls="healthz,readyz")
    except ImportError:  # pragma: no cover
        pass

    public = {"/healthz", "/readyz", "/openapi.json"}

    @app.before_request
    def _before():
        g.started = time.perf_counter()
        g.request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        g.rid_token = request_id_var.set(g.request_id)
        g.subject = None
        if request.path in public:
            return None
        try:
            g.principal = verifier.verify_header(request.headers.get("Authorization"))
            g.subject = g.principal.subject
        except DomainError as err:
            return problem(401, err.message, code="UNAUTHENTICATED", reason=err.reason)
        return None

    @app.after_request
    def _after(resp: Response):
        resp.headers["X-Request-Id"] = g.get("request_id", "")
        if request.path not in ("/healthz", "/readyz"):
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

    @app.errorhandler(grpc.RpcError)
    def _rpc_error(err):
        return from_rpc_error(err, strip_prefix=g.get("strip_prefix", ""))

    @app.errorhandler(_BadParam)
    def _bad_param(err: _BadParam):
        return problem(
            400,
            f"{err.field}: {err.description}",
            code="INVALID_ARGUMENT",
            errors=[{"field": err.field, "description": err.description}],
        )

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException):
        return problem(err.code or 500, err.description or err.name)

    @app.errorhandler(Exception)
    def _unexpected(err):
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

    # -- customers ---------------------------------------------------------------------------
    @app.post("/v1/customers")
    def create_customer():
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            return problem(
                400, "the body must be a JSON object (Content-Type: application/json)", code="INVALID_ARGUMENT"
            )
        customer = customer_pb2.Customer()
        try:
            json_format.ParseDict(data, customer, ignore_unknown_fields=False)
        except json_format.ParseError as err:
            return problem(
                400, f"body: {err}", code="INVALID_ARGUMENT", errors=[{"field": "body", "description": str(err)}]
            )
        request_id = request.headers.get("Idempotency-Key", "")
        g.strip_prefix = "customer."
        created = cl().customers.CreateCustomer(
            customer_service_pb2.CreateCustomerRequest(customer=customer, request_id=request_id),
            metadata=_metadata(),
            timeout=clients_mod.CALL_TIMEOUT,
        )
        cid = created.name.removeprefix("customers/")
        return _json(created, 201, {"Location": f"/v1/customers/{cid}", "ETag": created.etag})

    @app.get("/v1/customers")
    def list_customers():
        resp = cl().customers.ListCustomers(
            customer_service_pb2.ListCustomersRequest(
                page_size=_int_arg("page_size"), page_token=request.args.get("page_token", "")
            ),
            metadata=_metadata(),
            timeout=clients_mod.CALL_TIMEOUT,
        )
        return _json(resp)

    @app.get("/v1/customers/<customer_id>")
    def get_customer(customer_id: str):
        g.strip_prefix = ""
        try:
            found = cl().customers.GetCustomer(
                customer_service_pb2.GetCustomerRequest(name=f"customers/{customer_id}"),
                metadata=_metadata(),
                timeout=clients_mod.CALL_TIMEOUT,
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                return problem(
                    400,
                    "customer_id: must be a UUID",
                    code="INVALID_ARGUMENT",
                    errors=[{"field": "customer_id", "description": "must be a UUID"}],
                )
            raise
        return _json(found, headers={"ETag": found.etag})

    # -- reports -----------------------------------------------------------------------------
    @app.get("/v1/reports/customers-by-source")
    def customers_by_source():
        req = reporting_service_pb2.CountCustomersBySourceRequest()
        start, end = _time_arg("start_time"), _time_arg("end_time")
        if start is not None:
            req.start_time.CopyFrom(start)
        if end is not None:
            req.end_time.CopyFrom(end)
        resp = cl().reporting.CountCustomersBySource(req, metadata=_metadata(), timeout=clients_mod.CALL_TIMEOUT)
        return _json(resp)

    return app
