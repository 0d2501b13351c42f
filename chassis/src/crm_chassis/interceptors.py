"""The server interceptor every service runs: request id, JSON access log, JWT authentication,
per-RPC permission check, text fields checked for NUL characters, and domain errors mapped to
google.rpc.Status (a database that cannot be reached answers UNAVAILABLE).

Health and reflection stay open (probes and tools carry no token); every other method must
declare its permission in its proto (crm.options.v1.permission), or the server refuses to start.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import Callable

import grpc
from google.protobuf.descriptor import FieldDescriptor
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from .auth import Principal, TokenVerifier
from .db import error_line, is_database_unavailable
from .errors import DomainError, FieldViolation, InvalidArgument, Unauthenticated, Unavailable, internal_status
from .logging import request_id_var

log = logging.getLogger("crm.rpc")

principal_var: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)

PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def current_principal() -> Principal:
    principal = principal_var.get()
    if principal is None:  # only reachable if a servicer runs outside the interceptor
        raise Unauthenticated("no authenticated caller")
    return principal


def _metadata(details) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in details.invocation_metadata or ():
        if isinstance(value, str):
            out[key] = value
    return out


# -- NUL characters ---------------------------------------------------------------------------
# PostgreSQL cannot store U+0000 in text, so a NUL in any string of a request would fail deep
# in a query (INTERNAL). Every request is checked here once, before the servicer runs.

_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE
_holds_checked: dict = {}  # message Descriptor -> can it (or a message inside it) hold a checked value?
_map_values: dict = {}  # map-entry Descriptor -> its value field; other message Descriptors -> None

# google.protobuf.Timestamp's range (0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z) and
# Duration's (+-10,000 years), as protobuf documents them. A value outside them cannot become a
# datetime or a timedelta: ToDatetime() raises ValueError deep inside a handler (an INTERNAL).
_TIMESTAMP_SECONDS = (-62_135_596_800, 253_402_300_799)
_DURATION_SECONDS = 315_576_000_000
_NANOS = 999_999_999


def _timestamp_problem(ts) -> str | None:
    if not _TIMESTAMP_SECONDS[0] <= ts.seconds <= _TIMESTAMP_SECONDS[1]:
        return "is not a valid timestamp: it must lie between 0001-01-01 and 9999-12-31 (UTC)"
    if not 0 <= ts.nanos <= _NANOS:
        return "is not a valid timestamp: nanos must be 0..999999999"
    return None


def _duration_problem(d) -> str | None:
    if not -_DURATION_SECONDS <= d.seconds <= _DURATION_SECONDS or not -_NANOS <= d.nanos <= _NANOS:
        return "is not a valid duration: at most 10,000 years, nanos within +-999999999"
    if (d.seconds > 0 and d.nanos < 0) or (d.seconds < 0 and d.nanos > 0):
        return "is not a valid duration: seconds and nanos must have the same sign"
    return None


_WELL_KNOWN = {"google.protobuf.Timestamp": _timestamp_problem, "google.protobuf.Duration": _duration_problem}


def _map_value(descriptor):
    try:
        return _map_values[descriptor]
    except KeyError:
        value = descriptor.fields_by_name["value"] if descriptor.GetOptions().map_entry else None
        _map_values[descriptor] = value
        return value


def _may_hold_checked(descriptor) -> bool:
    """Whether a message of this type can hold a string (NUL check) or a Timestamp / Duration
    (range check), itself or in a message inside it."""
    known = _holds_checked.get(descriptor)
    if known is None:
        _holds_checked[descriptor] = True  # provisional: recursive types (Struct, Value) refer to themselves
        known = descriptor.full_name in _WELL_KNOWN or any(
            f.type == _STRING or (f.type == _MESSAGE and _may_hold_checked(f.message_type)) for f in descriptor.fields
        )
        _holds_checked[descriptor] = known
    return known


def request_violations(message, prefix: str = "") -> list[FieldViolation]:
    """Every field of `message` (nested, repeated and map fields included) that no handler can
    take, by field path (`customer.given_name`, `emails[1].address`, `labels["k"]`,
    `activity.due_time`): a string holding a NUL character, a Timestamp or Duration out of range."""
    out: list[FieldViolation] = []
    if _may_hold_checked(message.DESCRIPTOR):
        _walk(message, prefix, out)
    return out


def _nul(path: str) -> FieldViolation:
    return FieldViolation(path, "must not contain NUL characters (U+0000)")


def _check_message(value, fd, path: str, out: list[FieldViolation]) -> None:
    problem = _WELL_KNOWN.get(fd.message_type.full_name)
    if problem is not None:
        why = problem(value)
        if why:
            out.append(FieldViolation(path, why))
    else:
        _walk(value, path + ".", out)


def _walk(message, prefix: str, out: list[FieldViolation]) -> None:
    for fd, value in message.ListFields():  # only the fields that are set
        kind = fd.type
        if kind == _STRING:
            if not fd.is_repeated:
                if "\x00" in value:
                    out.append(_nul(prefix + fd.name))
            else:
                out.extend(_nul(f"{prefix}{fd.name}[{i}]") for i, v in enumerate(value) if "\x00" in v)
        elif kind == _MESSAGE and _may_hold_checked(fd.message_type):
            value_fd = _map_value(fd.message_type)
            if value_fd is not None:
                for key, item in value.items():
                    if isinstance(key, str) and "\x00" in key:
                        out.append(_nul(prefix + fd.name))  # the key itself: name the map
                        continue
                    path = f'{prefix}{fd.name}["{key}"]' if isinstance(key, str) else f"{prefix}{fd.name}[{key}]"
                    if value_fd.type == _STRING:
                        if "\x00" in item:
                            out.append(_nul(path))
                    elif value_fd.type == _MESSAGE:
                        _check_message(item, value_fd, path, out)
            elif fd.is_repeated:
                for i, item in enumerate(value):
                    _check_message(item, fd, f"{prefix}{fd.name}[{i}]", out)
            else:
                _check_message(value, fd, prefix + fd.name, out)


def check_request(request) -> None:
    """Raise INVALID_ARGUMENT naming every field of the request no handler can take (a NUL in a
    string, a Timestamp or Duration out of its range)."""
    violations = request_violations(request)
    if violations:
        raise InvalidArgument(violations)


# SQLSTATEs of a value PostgreSQL cannot keep: a key too long for a btree index (54000), a number
# past its column's type (22003), a string past a varchar's length (22001).
_VALUE_REFUSED = {
    "54000": "a value is too long to be stored (it is indexed): shorten it",
    "22003": "a number is out of the range this field takes",
    "22001": "a value is longer than this field takes",
}


def value_refused(err) -> InvalidArgument | None:
    """The database refused a value of the request that a handler did not bound first: the
    caller's input all the same, so INVALID_ARGUMENT (which field, the handler should have
    said: the log line names the constraint), not INTERNAL."""
    why = _VALUE_REFUSED.get(getattr(getattr(err, "orig", None), "sqlstate", None) or "")
    return InvalidArgument(FieldViolation("request", why)) if why else None


class ServerInterceptor(grpc.ServerInterceptor):
    def __init__(
        self,
        verifier: TokenVerifier,
        permissions: dict[str, str],
        on_database_unavailable: Callable[[], None] | None = None,
    ):
        self.verifier = verifier
        self.permissions = permissions
        self.on_database_unavailable = on_database_unavailable  # e.g. the readiness probe's nudge

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        permission = self.permissions.get(method)
        md = _metadata(handler_call_details)
        kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}

        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            def unary(request, context):
                with self._guard(method, permission, md, context):
                    check_request(request)
                    return behavior(request, context)
                return None  # not reached: _guard aborted

            return grpc.unary_unary_rpc_method_handler(unary, **kw)
        if handler.unary_stream is not None:
            stream_behavior = handler.unary_stream

            def unary_stream(request, context):
                with self._guard(method, permission, md, context):
                    check_request(request)
                    yield from stream_behavior(request, context)

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)

        # Client-streaming methods would need the same guard; fail closed until one exists.
        def refuse(_request, context):
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "client-streaming methods are not enabled")

        return grpc.unary_unary_rpc_method_handler(refuse)

    @contextlib.contextmanager
    def _guard(self, method: str, permission: str | None, md: dict[str, str], context: grpc.ServicerContext):
        """Request id, authentication, permission, error mapping and the access log of one call."""
        request_id = md.get("x-request-id") or uuid.uuid4().hex
        rid_token = request_id_var.set(request_id)
        principal_token = None
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        subject = None
        try:
            context.send_initial_metadata((("x-request-id", request_id),))
            principal = self.verifier.verify_header(md.get("authorization"))
            subject = principal.subject
            principal_token = principal_var.set(principal)
            if permission is None:
                raise Unauthenticated(f"method {method} has no permission rule")
            principal.require(permission)
            yield
        except DomainError as err:
            code = err.code
            context.abort_with_status(err.to_grpc_status())
        except (DBAPIError, PoolTimeout) as err:
            refused = value_refused(err)
            if refused is not None:  # a value the handler should have bounded: still the caller's input
                code = refused.code
                log.warning("database refused a value in %s", method, extra={"error": error_line(err)})
                context.abort_with_status(refused.to_grpc_status())
            if not is_database_unavailable(err):
                code = grpc.StatusCode.INTERNAL
                log.exception("database error in %s", method)
                context.abort_with_status(internal_status(f"internal error (request id {request_id})"))
            # Down, restarting, refusing or dropping connections: retryable, and no stack trace.
            code = grpc.StatusCode.UNAVAILABLE
            log.warning("database unavailable in %s", method, extra={"error": error_line(err)})
            if self.on_database_unavailable is not None:
                self.on_database_unavailable()
            context.abort_with_status(Unavailable("the database is unavailable; retry later").to_grpc_status())
        except GeneratorExit:
            code = grpc.StatusCode.CANCELLED  # the client went away mid-stream
            raise
        except Exception:
            if context.code() not in (None, grpc.StatusCode.OK):
                code = context.code()  # the servicer aborted on its own
                raise
            code = grpc.StatusCode.INTERNAL
            log.exception("unhandled error in %s", method)
            context.abort_with_status(internal_status(f"internal error (request id {request_id})"))
        finally:
            log.info(
                "rpc",
                extra={
                    "rpc_method": method,
                    "rpc_code": code.name,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                    "subject": subject,
                },
            )
            if principal_token is not None:
                principal_var.reset(principal_token)
            request_id_var.reset(rid_token)


class ClientAuthInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Adds a bearer token and request id to outgoing calls (used by the gateway and by services
    that call each other on behalf of a caller)."""

    def __init__(self, token_getter):
        self.token_getter = token_getter

    def intercept_unary_unary(self, continuation, client_call_details, request):
        metadata = list(client_call_details.metadata or ())
        token = self.token_getter()
        if token and not any(k == "authorization" for k, _ in metadata):
            metadata.append(("authorization", f"Bearer {token}"))
        rid = request_id_var.get()
        if rid and not any(k == "x-request-id" for k, _ in metadata):
            metadata.append(("x-request-id", rid))
        details = (
            client_call_details._replace(metadata=metadata)
            if hasattr(client_call_details, "_replace")
            else client_call_details
        )
        return continuation(details, request)
