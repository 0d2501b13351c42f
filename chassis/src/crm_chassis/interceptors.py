"""The server interceptor every service runs: request id, JSON access log, JWT authentication,
per-RPC permission check, and domain errors mapped to google.rpc.Status.

Health and reflection stay open (probes and tools carry no token); every other method must
declare its permission in its proto (crm.options.v1.permission), or the server refuses to start.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
import uuid

import grpc
from sqlalchemy.exc import DBAPIError

from .auth import Principal, TokenVerifier
from .errors import DomainError, Unauthenticated, Unavailable, internal_status
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


class ServerInterceptor(grpc.ServerInterceptor):
    def __init__(self, verifier: TokenVerifier, permissions: dict[str, str]):
        self.verifier = verifier
        self.permissions = permissions

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
                    return behavior(request, context)
                return None  # not reached: _guard aborted

            return grpc.unary_unary_rpc_method_handler(unary, **kw)
        if handler.unary_stream is not None:
            stream_behavior = handler.unary_stream

            def unary_stream(request, context):
                with self._guard(method, permission, md, context):
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
        except DBAPIError as err:
            if not err.connection_invalidated:
                code = grpc.StatusCode.INTERNAL
                log.exception("database error in %s", method)
                context.abort_with_status(internal_status(f"internal error (request id {request_id})"))
            code = grpc.StatusCode.UNAVAILABLE
            log.warning("database connection lost in %s", method)
            context.abort_with_status(Unavailable("database connection lost; retry").to_grpc_status())
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
