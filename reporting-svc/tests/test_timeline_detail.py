"""Customer 360's entry details (timeline._detail) equal json_format's JSON of the same fields:
the scalars it converts itself (strings, bools, 32- and 64-bit integers, enums, known or not)
and what it leaves to json_format (messages, lists, floats, bytes), for every event message
the timeline reads, each field set to a value other than its default."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor, json_format

from crm.campaign.v1 import campaign_events_pb2 as cev
from crm.customer.v1 import customer_events_pb2 as cust
from crm.sales.v1 import sales_events_pb2 as sev
from crm.support.v1 import support_events_pb2 as tev
from reporting_svc import timeline

FD = descriptor.FieldDescriptor
MESSAGES = [
    cls
    for mod in (cev, cust, sev, tev)
    for name in dir(mod)
    if isinstance(cls := getattr(mod, name), type) and hasattr(cls, "DESCRIPTOR") and hasattr(cls, "ListFields")
]


def _scalar(fd, i: int, unknown_enum: bool):
    if fd.cpp_type == FD.CPPTYPE_STRING:
        return b"\x00\xffbytes" if fd.type == FD.TYPE_BYTES else f"value {i} ü"
    if fd.cpp_type == FD.CPPTYPE_BOOL:
        return True
    if fd.cpp_type in (FD.CPPTYPE_INT64, FD.CPPTYPE_UINT64):
        return 2**53 + i if fd.cpp_type == FD.CPPTYPE_UINT64 else -(2**53) - i
    if fd.cpp_type == FD.CPPTYPE_INT32:
        return -7 - i
    if fd.cpp_type == FD.CPPTYPE_UINT32:
        return 7 + i
    if fd.cpp_type in (FD.CPPTYPE_FLOAT, FD.CPPTYPE_DOUBLE):
        return 0.1 + i
    if fd.cpp_type == FD.CPPTYPE_ENUM:
        numbers = sorted(fd.enum_type.values_by_number)
        if unknown_enum and not fd.enum_type.is_closed:
            return max(numbers) + 40
        return numbers[-1]
    raise AssertionError(fd)


def _fill(msg, unknown_enum: bool, depth: int = 0) -> None:
    for i, fd in enumerate(msg.DESCRIPTOR.fields):
        if fd.containing_oneof is not None and msg.WhichOneof(fd.containing_oneof.name):
            continue
        if fd.message_type is not None:
            if fd.message_type.GetOptions().map_entry:
                continue  # maps: none in these events that the detail names
            if depth < 2 and not fd.message_type.full_name.startswith("google.protobuf."):
                sub = getattr(msg, fd.name).add() if fd.is_repeated else getattr(msg, fd.name)
                _fill(sub, unknown_enum, depth + 1)
            elif fd.message_type.full_name == "google.protobuf.Timestamp" and not fd.is_repeated:
                getattr(msg, fd.name).FromSeconds(1_790_000_000 + i)
        elif fd.is_repeated:
            getattr(msg, fd.name).extend([_scalar(fd, i, unknown_enum), _scalar(fd, i + 1, False)])
        else:
            setattr(msg, fd.name, _scalar(fd, i, unknown_enum))


@pytest.mark.parametrize("unknown_enum", [False, True])
@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.DESCRIPTOR.full_name)
def test_detail_equals_json_format(cls, unknown_enum):
    msg = cls()
    _fill(msg, unknown_enum)
    names = [fd.name for fd in msg.DESCRIPTOR.fields]
    assert timeline._detail(msg, *names) == json_format.MessageToDict(msg, preserving_proto_field_name=True)
    some = names[::2]
    want = {k: v for k, v in json_format.MessageToDict(msg, preserving_proto_field_name=True).items() if k in some}
    assert timeline._detail(msg, *some) == want


def test_detail_of_defaults_and_none_named():
    msg = tev.TicketEvent(ticket="tickets/1")
    assert timeline._detail(msg, "number", "complaint", "channel") == {}
    assert timeline._detail(msg) == {}
    msg.channel, msg.complaint = 2, True
    assert timeline._detail(msg, "channel", "complaint") == json_format.MessageToDict(
        tev.TicketEvent(channel=2, complaint=True), preserving_proto_field_name=True
    )
