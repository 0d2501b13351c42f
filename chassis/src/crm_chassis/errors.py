"""Domain errors and their mapping to google.rpc.Status (ErrorInfo / BadRequest).

Use cases raise these; the server interceptor turns them into a gRPC status with rich
details, so clients get INVALID_ARGUMENT naming the field, NOT_FOUND, ALREADY_EXISTS or
ABORTED, never UNKNOWN or a stack trace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "crm.example.org"

# A status travels in the trailing metadata (grpc-message, percent-encoded, and the details),
# which clients cap at 8 KiB: an error quoting a 3,000-character value would arrive as
# RESOURCE_EXHAUSTED instead of itself. Texts are kept short: a run of more than 120 characters
# without a space (a quoted value; resource names are shorter) is cut to its first 80, then the
# text to its limit; violations go while their UTF-8 text stays within VIOLATIONS_BYTES (every
# bad field of a form is named; a list of 5,000 bad values is not), the message saying how many
# there were. Worst case (Persian text, every limit reached) about 7 KiB.
MESSAGE_LIMIT = 300
DESCRIPTION_LIMIT = 160
FIELD_LIMIT = 100
METADATA_LIMIT = 200
VIOLATIONS_BYTES = 3000
_LONG_RUN = re.compile(r"\S{121,}")


def brief(text: str, limit: int) -> str:
    """`text` short enough for a status: long unbroken runs cut, then the whole to `limit`."""
    if len(text) <= 120:
        return text
    text = _LONG_RUN.sub(lambda m: m.group()[:80] + "…", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION
    reason: str = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason
        self.metadata = metadata or {}

    def details(self) -> list:
        metadata = {
            k: v if len(v) <= METADATA_LIMIT else v[: METADATA_LIMIT - 1] + "…" for k, v in self.metadata.items()
        }
        return [error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN, metadata=metadata)]

    def to_status(self) -> status_pb2.Status:
        packed = []
        for d in self.details():
            a = any_pb2.Any()
            a.Pack(d)
            packed.append(a)
        return status_pb2.Status(code=self.code.value[0], message=brief(self.message, MESSAGE_LIMIT), details=packed)

    def to_grpc_status(self) -> grpc.Status:
        return rpc_status.to_status(self.to_status())


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation] | FieldViolation, message: str | None = None, **kw):
        if isinstance(violations, FieldViolation):
            violations = [violations]
        self.violations = violations
        if message is None:
            shown = self.shown()
            message = "; ".join(f"{v.field}: {v.description}" for v in shown)
            if len(violations) > len(shown):
                message = f"{len(violations)} invalid values, the first {len(shown)}: {message}"
        super().__init__(message, **kw)

    def shown(self) -> list[FieldViolation]:
        """The violations a status carries, their texts kept short: the first ones, while they
        fit VIOLATIONS_BYTES (at least one)."""
        out, used = [], 0
        for v in self.violations:
            short = FieldViolation(brief(v.field, FIELD_LIMIT), brief(v.description, DESCRIPTION_LIMIT))
            used += len(short.field.encode()) + len(short.description.encode()) + 4
            if out and used > VIOLATIONS_BYTES:
                break
            out.append(short)
        return out

    @classmethod
    def field(cls, field_name: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field_name, description)])

    def details(self) -> list:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.shown()
            ]
        )
        return [bad, *super().details()]


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class Aborted(DomainError):
    """A stale etag or a concurrent change: the caller should re-read and retry."""

    code = grpc.StatusCode.ABORTED
    reason = "ETAG_MISMATCH"


class FailedPrecondition(DomainError):
    """The resource is not in a state that allows the operation (e.g. cancelling a finished job)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Unavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


def internal_status(message: str = "internal error") -> grpc.Status:
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.INTERNAL, message=message))


@dataclass
class ErrorView:
    """What a client (the gateway) reads back from a failed call's rich status."""

    code: grpc.StatusCode
    message: str
    reason: str | None = None
    field_violations: list[FieldViolation] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    # the answer did not arrive in a readable form: gRPC core cut the call short because its
    # trailers passed the channel's metadata limit, and no status proto of the service's survived
    unreadable: bool = False


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


def read_rpc_error(err: grpc.RpcError) -> ErrorView:
    """What a failed call says; never raises. The details come from the status proto the
    service sent, when it agrees with the call's code. A call gRPC core cut short because its
    trailers passed the metadata limit (RESOURCE_EXHAUSTED "received metadata size exceeds")
    is a transport failure: if the service's status still arrived and says INVALID_ARGUMENT,
    that is the answer (the caller's input was bad); else the view is `unreadable`. Any other
    status proto that disagrees with the call's code is ignored: the code wins."""
    code, details = _call_status(err)
    cut_short = code == grpc.StatusCode.RESOURCE_EXHAUSTED and METADATA_TOO_LARGE in details
    sent = _sent_status(err)
    if sent is not None and sent.code != code.value[0]:
        if cut_short and sent.code == code_pb2.INVALID_ARGUMENT:
            code, details, cut_short = grpc.StatusCode.INVALID_ARGUMENT, sent.message, False
        else:
            sent = None
    view = ErrorView(code=code, message=details, unreadable=cut_short)
    for detail in sent.details if sent is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            view.field_violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            view.reason = info.reason
            view.metadata = dict(info.metadata)
    return view
