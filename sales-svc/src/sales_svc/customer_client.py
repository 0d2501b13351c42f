"""sales-svc's client of customer-svc (crm.customer.v1.CustomerService): what ConvertLead
needs to create or link a customer, on behalf of the caller.

- The caller's own bearer token is forwarded (customer-svc checks it again: zero trust), so
  what a rep may do there is what their roles allow. The chassis interceptor keeps only the
  verified Principal, not the raw token, so the servicer hands it over:
  `authorization_of(context)` reads it from the incoming call's metadata.
- Every call has a deadline (CUSTOMER_SVC_TIMEOUT_SECONDS, default 5) and the request id of the
  incoming call (x-request-id), so one request is traceable across both services.
- customer-svc's errors come back as sales-svc's domain errors: UNAVAILABLE and
  DEADLINE_EXCEEDED as `Unavailable` (retryable), INVALID_ARGUMENT as `InvalidArgument`
  with its field violations under the caller's prefix ("customer.email"), NOT_FOUND,
  ALREADY_EXISTS, FAILED_PRECONDITION, ABORTED and PERMISSION_DENIED as the same kind with
  customer-svc's reason and metadata.

CreateCustomer is idempotent by request_id in customer-svc: a retry with the same request_id
returns the customer the first call created, so a ConvertLead that is retried after a timeout
(its transaction rolled back, the customer perhaps created) should derive the request_id from
the lead (e.g. f"lead-{lead_id}-convert") and never creates a second customer.

    client = customer_client(sales)              # one channel per process (sales.extra)
    customer = client.create_customer(pb, request_id, authorization_of(context))
"""

from __future__ import annotations

import os

import grpc

from crm.customer.v1 import customer_pb2, customer_service_pb2, customer_service_pb2_grpc
from crm_chassis import errors
from crm_chassis.config import ConfigError
from crm_chassis.errors import DomainError, FieldViolation, read_rpc_error
from crm_chassis.grpc_client import make_channel
from crm_chassis.logging import request_id_var

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_SECONDS = 5.0


class UpstreamError(DomainError):
    """customer-svc failed in a way that is not the caller's input (INTERNAL, UNKNOWN, ...)."""

    code = grpc.StatusCode.INTERNAL
    reason = "CUSTOMER_SVC_ERROR"


_SAME_KIND = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.ABORTED: errors.Aborted,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
}
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)


def authorization_of(context: grpc.ServicerContext) -> str:
    """The incoming call's `authorization` metadata ("Bearer ..."), to forward; "" if none."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return value
    return ""


def settings_from_env(env=None) -> tuple[str, float]:
    """CUSTOMER_SVC_ADDR (host:port, default localhost:50051) and CUSTOMER_SVC_TIMEOUT_SECONDS
    (default 5); ConfigError naming a bad one."""
    env = os.environ if env is None else env
    target = env.get("CUSTOMER_SVC_ADDR") or DEFAULT_TARGET
    raw = env.get("CUSTOMER_SVC_TIMEOUT_SECONDS") or ""
    try:
        timeout = float(raw) if raw else DEFAULT_TIMEOUT_SECONDS
    except ValueError:
        raise ConfigError([f"CUSTOMER_SVC_TIMEOUT_SECONDS={raw!r} is not a number"]) from None
    if not 0 < timeout <= 300:
        raise ConfigError([f"CUSTOMER_SVC_TIMEOUT_SECONDS={raw!r} must be above 0 and at most 300"])
    return target, timeout


def _prefixed(field: str, prefix: str) -> str:
    """customer-svc's field path under the caller's prefix: "email" -> "customer.email" (a path
    customer-svc already starts with the prefix is kept)."""
    if not prefix or not field:
        return field or prefix
    return field if field == prefix or field.startswith(prefix + ".") else f"{prefix}.{field}"


def map_error(err: grpc.RpcError, target: str, what: str, field_prefix: str = "customer") -> DomainError:
    """The domain error for a failed call to customer-svc."""
    view = read_rpc_error(err)
    code = view.code
    if code in _RETRYABLE:
        why = "did not answer in time" if code == grpc.StatusCode.DEADLINE_EXCEEDED else "is unavailable"
        return errors.Unavailable(
            f"customer-svc ({target}) {why} for {what}; retry later",
            reason="CUSTOMER_SVC_UNAVAILABLE",
            metadata={"service": "customer-svc", "code": code.name},
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        violations = [FieldViolation(_prefixed(v.field, field_prefix), v.description) for v in view.field_violations]
        if not violations:
            violations = [FieldViolation(field_prefix, view.message or "is not valid for customer-svc")]
        return errors.InvalidArgument(violations, reason=view.reason or None, metadata=view.metadata)
    kind = _SAME_KIND.get(code)
    if kind is not None:
        return kind(f"customer-svc: {view.message}", reason=view.reason or None, metadata=view.metadata)
    return UpstreamError(
        f"customer-svc failed {what} ({code.name if code else 'no status'}): {view.message}",
        metadata={"service": "customer-svc"},
    )


class CustomerClient:
    def __init__(self, target: str = DEFAULT_TARGET, timeout: float = DEFAULT_TIMEOUT_SECONDS):
        self.target = target
        self.timeout = timeout
        self.channel = make_channel(target)
        self.stub = customer_service_pb2_grpc.CustomerServiceStub(self.channel)

    def _metadata(self, authorization: str) -> list[tuple[str, str]]:
        md = []
        if authorization:
            md.append(("authorization", authorization if " " in authorization else f"Bearer {authorization}"))
        rid = request_id_var.get()
        if rid:
            md.append(("x-request-id", rid))
        return md

    def _call(self, method, request, authorization: str, what: str, field_prefix: str):
        try:
            # wait_for_ready: a call while the channel reconnects (customer-svc restarting) waits
            # for it within the deadline instead of failing at once.
            return method(request, metadata=self._metadata(authorization), timeout=self.timeout, wait_for_ready=True)
        except grpc.RpcError as err:
            raise map_error(err, self.target, what, field_prefix) from None

    def create_customer(
        self,
        customer: customer_pb2.Customer,
        request_id: str,
        authorization: str,
        field_prefix: str = "customer",
    ) -> customer_pb2.Customer:
        """CreateCustomer: the same request_id returns the same customer (customer-svc keeps
        the key). Field violations come back under `field_prefix` ("customer.email")."""
        request = customer_service_pb2.CreateCustomerRequest(customer=customer, request_id=request_id)
        return self._call(self.stub.CreateCustomer, request, authorization, "creating a customer", field_prefix)

    def get_customer(self, name: str, authorization: str, field_prefix: str = "customer") -> customer_pb2.Customer:
        """GetCustomer by name (customers/{id}); NotFound if it does not exist."""
        request = customer_service_pb2.GetCustomerRequest(name=name)
        return self._call(self.stub.GetCustomer, request, authorization, f"reading {name}", field_prefix)

    def find_duplicates(self, name: str, authorization: str, page_size: int = 50) -> list:
        """FindDuplicates of one customer: its DuplicateSets (customers probably the same)."""
        request = customer_service_pb2.FindDuplicatesRequest(customer=name, page_size=page_size)
        resp = self._call(self.stub.FindDuplicates, request, authorization, f"finding duplicates of {name}", "")
        return list(resp.duplicate_sets)

    def close(self) -> None:
        self.channel.close()


def customer_client(sales) -> CustomerClient:
    """The process' client (made on first use from the environment's settings)."""
    return sales.once("customer_client", lambda: CustomerClient(*settings_from_env()))
