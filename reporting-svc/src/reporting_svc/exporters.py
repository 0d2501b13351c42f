"""The reports a schedule can send: every Export RPC of ReportingService and ValueService (a
server-streaming method answering ExportReportResponse), by a name made from the method's
(ExportAcquisitionReport -> acquisition, ExportCustomersBySource -> customers-by-source), with
the request type it takes and the servicer that answers it. An Export RPC added to either
service is schedulable without a change here.

    ex = exporter("acquisition")                  # INVALID_ARGUMENT naming `field` if unknown
    req = ex.request(parameters, fmt, "fa", "report_schedule.parameters")  # checked, as sent
    out = ex.render(rt, req, Principal("maryam", ("sales_manager",)))       # the file, in process

`render` calls the servicer's method in this process (no RPC) with the owner's identity: the
method's declared permission is checked against the owner's roles first, and the owner is the
current principal while it runs, as behind the server interceptor.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from google.protobuf import descriptor, json_format
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from crm.reporting.v1 import reporting_service_pb2, value_pb2
from crm_chassis import dates
from crm_chassis.auth import Principal
from crm_chassis.errors import InvalidArgument
from crm_chassis.interceptors import principal_var
from crm_chassis.permissions import method_permission

from . import acquisition_report, api, support_report, value_api

# What a mail may carry; the report's exporter must take it too (api.EXPORT_FORMATS, read when
# a schedule is checked: other formats may be added there).
MAIL_FORMATS = ("pdf", "xlsx", "csv")
# Fields of every Export request that are the schedule's own, not parameters.
OWN_FIELDS = ("format", "language_code")
# A request's period, by day (crm.type.v1.Date, both days included) or by instant (from, before).
DAY_RANGE = ("start_date", "end_date")
TIME_RANGE = ("start_time", "end_time")


def _services() -> list[tuple[descriptor.ServiceDescriptor, Callable]]:
    return [
        (reporting_service_pb2.DESCRIPTOR.services_by_name["ReportingService"], api.ReportingServicer),
        (value_pb2.DESCRIPTOR.services_by_name["ValueService"], value_api.ValueServicer),
    ]


def _value_report(req, prefix: str) -> None:
    if req.report.strip().lower() not in value_api.REPORTS:
        raise InvalidArgument.field(f"{prefix}report", f"choose {', '.join(value_api.REPORTS)}")


# More checks of a report's request than its JSON form (the ones its RPC makes first).
VALIDATORS: Mapping[str, Callable[[Any, str], Any]] = {
    "acquisition": acquisition_report.parse,
    "support": support_report.parse,
    "value": _value_report,
}


def report_name(method_name: str) -> str:
    """ExportAcquisitionReport -> acquisition; ExportCustomersBySource -> customers-by-source."""
    core = method_name.removeprefix("Export")
    if core.endswith("Report") and core != "Report":
        core = core.removesuffix("Report")
    return re.sub(r"(?<!^)([A-Z])", r"-\1", core).lower()


@dataclass(frozen=True)
class Rendered:
    filename: str
    content_type: str
    data: bytes
    row_count: int


@dataclass(frozen=True)
class Exporter:
    name: str
    method: descriptor.MethodDescriptor
    request_type: type[Message]
    servicer: Callable  # the servicer class: made once per process (rt.once)

    @property
    def permission(self) -> str:
        return method_permission(self.method)

    def formats(self) -> tuple[str, ...]:
        """What a schedule of this report may send: the mail formats its exporter takes."""
        return tuple(f for f in MAIL_FORMATS if f in api.EXPORT_FORMATS)

    def check_format(self, value: str, field: str) -> str:
        fmt = (value or "xlsx").strip().lower()
        allowed = self.formats()
        if fmt not in allowed:
            raise InvalidArgument.field(field, f"the {self.name} report is sent as {' or '.join(allowed)}")
        return fmt

    def parameters(self, params: Mapping[str, Any], field: str) -> dict[str, Any]:
        """The parameters as the request's JSON (proto field names), checked: an unknown field
        or a bad value is INVALID_ARGUMENT naming `field`.<name>."""
        fields = self.request_type.DESCRIPTOR.fields
        known = {f.name: f for f in fields} | {f.json_name: f for f in fields}
        for key in params:
            f = known.get(key)
            if f is None:
                raise InvalidArgument.field(
                    f"{field}.{key}",
                    f"{self.request_type.DESCRIPTOR.name} has no field {key!r}; it has "
                    + ", ".join(x.name for x in fields if x.name not in OWN_FIELDS),
                )
            if f.name in OWN_FIELDS:
                raise InvalidArgument.field(f"{field}.{key}", f"set the schedule's {f.name} instead")
        msg = self.request_type()
        for key, value in params.items():  # one field at a time, so an error names its field
            try:
                json_format.ParseDict({key: value}, msg, ignore_unknown_fields=False)
            except json_format.ParseError as exc:
                raise InvalidArgument.field(f"{field}.{key}", str(exc).split("\n")[0][:300]) from None
        check = VALIDATORS.get(self.name)
        if check is not None:
            check(msg, f"{field}.")
        return json_format.MessageToDict(msg, preserving_proto_field_name=True)

    def range_fields(self) -> tuple[str, str] | None:
        """The request's period fields (DAY_RANGE or TIME_RANGE), if it has them."""
        names = self.request_type.DESCRIPTOR.fields_by_name
        for pair in (DAY_RANGE, TIME_RANGE):
            if all(f in names and names[f].message_type is not None for f in pair):
                return pair
        return None

    def request(
        self,
        params: Mapping[str, Any],
        fmt: str,
        language_code: str,
        window: tuple[dt.datetime, dt.datetime] | None = None,
    ) -> Message:
        """The Export request a run sends (parameters as stored, plus the schedule's own, and
        the period `window` (local midnights, the second excluded) when given); INVALID_ARGUMENT
        if the stored parameters no longer fit the request type."""
        try:
            msg = json_format.ParseDict(dict(params), self.request_type(), ignore_unknown_fields=False)
        except json_format.ParseError as exc:
            raise InvalidArgument.field("parameters", str(exc).split("\n")[0][:300]) from None
        names = self.request_type.DESCRIPTOR.fields_by_name
        if "format" in names:
            msg.format = fmt
        if "language_code" in names:
            msg.language_code = language_code
        pair = self.range_fields() if window is not None else None
        if pair == DAY_RANGE:
            start, end = window[0].date(), window[1].date() - dt.timedelta(days=1)
            msg.start_date.CopyFrom(dates.to_proto(start))
            msg.end_date.CopyFrom(dates.to_proto(end))
        elif pair == TIME_RANGE:
            msg.start_time.FromDatetime(window[0].astimezone(dt.UTC))
            msg.end_time.FromDatetime(window[1].astimezone(dt.UTC))
        return msg

    def render(self, rt, request: Message, owner: Principal) -> Rendered:
        """The report's file, made by its servicer in this process as `owner` would get it
        (PermissionDenied when the owner's roles lack the RPC's permission)."""
        owner.require(self.permission)
        servicer = rt.once(f"exporter:{self.servicer.__qualname__}", lambda: self.servicer(rt))
        token = principal_var.set(owner)
        try:
            head, parts = None, []
            for chunk in getattr(servicer, self.method.name)(request, None):
                if head is None:
                    head = chunk
                parts.append(chunk.data)
        finally:
            principal_var.reset(token)
        if head is None:
            raise RuntimeError(f"{self.method.full_name} answered nothing")
        return Rendered(head.filename, head.content_type, b"".join(parts), int(getattr(head, "row_count", 0) or 0))


@lru_cache(maxsize=1)
def exporters() -> dict[str, Exporter]:
    """Every schedulable report by name."""
    out: dict[str, Exporter] = {}
    for service, servicer in _services():
        for m in service.methods:
            if not m.server_streaming or m.output_type.full_name != "crm.reporting.v1.ExportReportResponse":
                continue
            name = report_name(m.name)
            if name in out:
                raise ValueError(f"two Export RPCs make the report name {name!r}")
            out[name] = Exporter(name, m, GetMessageClass(m.input_type), servicer)
    return out


def exporter(name: str, field: str = "report") -> Exporter:
    found = exporters().get((name or "").strip().lower())
    if found is None:
        head = f"unknown report {name!r}" if name else "is required"
        raise InvalidArgument.field(field, f"{head}; choose {', '.join(sorted(exporters()))}")
    return found
