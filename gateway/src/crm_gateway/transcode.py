"""Generic JSON <-> protobuf transcoding for the route table (routes.py).

A request message is built from, in order: the body (the whole request, or one field of it),
the query string (scalar and repeated fields by their proto names, dotted for nested ones),
the path parameters (through the route's templates) and headers (Idempotency-Key ->
request_id, If-Match -> etag). For a PATCH without an update_mask the mask is the set of
top-level fields present in the body (AIP-134).

A route with an `upload` field also takes multipart/form-data: the file part `file` fills that
bytes field as it is (no base64), and every other form field fills the request field of the
same name through the descriptor, so fields added to the message later need no change here.
"""

from __future__ import annotations

import json
import pathlib
import re

from flask import current_app, request
from google.protobuf import descriptor, json_format
from werkzeug.exceptions import RequestEntityTooLarge

from .routes import Route

_INTS = {
    descriptor.FieldDescriptor.TYPE_INT32,
    descriptor.FieldDescriptor.TYPE_INT64,
    descriptor.FieldDescriptor.TYPE_UINT32,
    descriptor.FieldDescriptor.TYPE_UINT64,
    descriptor.FieldDescriptor.TYPE_SINT32,
    descriptor.FieldDescriptor.TYPE_SINT64,
}


# The file part of a multipart upload, and the largest file it may carry: customer-svc's
# import limit (the app's MAX_UPLOAD_BYTES config, lowered in tests).
UPLOAD_PART = "file"
MAX_UPLOAD_BYTES = 64 * 1024 * 1024
# The body of a route whose request carries a file (a bytes field: an import's content, a ticket
# message's attachments): an import's file base64-encoded in JSON, 64 MiB of file is ~86 MiB.
MAX_BODY_BYTES = 90 * 1024 * 1024
# Any other body (GATEWAY_MAX_BODY_BYTES, app.max_body_bytes): no record is anywhere near it, and
# over it the gateway answers 413 before reading the body, rather than parse and forward tens of
# MiB to a service that refuses them.
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
FORM_OVERHEAD = 1024 * 1024  # the other form fields and the multipart framing around the file
# The enum field an upload's format is inferred into when the form does not give it, and the
# content types that name a format (else the file name's extension does).
FORMAT_FIELD = "file_format"
_FORMAT_BY_CONTENT_TYPE = {
    "text/csv": "csv",
    "application/csv": "csv",
    "text/comma-separated-values": "csv",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx",
}
TOO_DEEP = "is not valid JSON: nested too deeply"
_MAP_ENTRY = re.compile(r"^(\w+)\[(.*)\]$", re.DOTALL)


class BadRequest(Exception):
    """Input the gateway refuses before any service sees it: 400, naming each bad field."""

    status = 400
    reason: str | None = None

    def __init__(self, field: str, description: str, *more: tuple[str, str]):
        self.violations = [(field, description), *more]
        super().__init__("; ".join(f"{f}: {d}" for f, d in self.violations))
        self.field, self.description = field, description


class TooLarge(BadRequest):
    """An upload over the limit: 413."""

    status = 413
    reason = "UPLOAD_TOO_LARGE"


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


_NO_FIELD = re.compile(r'has no field named "([^"]+)" at "([^"]+)"')
_AT_PATH = re.compile(r'at "?[A-Za-z_]\w*((?:\.\w+|\[\d+\])+)"?\.?$')
_FAILED = re.compile(r"Failed to parse (\w+) field: ")


def _body_error(err: json_format.ParseError) -> tuple[str, str]:
    """The body field a json_format error is about (snake_case, relative to the body, as the
    services name them: `lines[0].unit_price.units`) and a one-line description, rather than
    "body" and protobuf's message with its list of every field."""
    text = str(err).split("\n", 1)[0].strip()
    if m := _NO_FIELD.search(text):
        at = m.group(2).partition(".")[2]
        path = f"{at}.{m.group(1)}" if at else m.group(1)
        detail = "is not a field of this message (see /openapi.json)"
    elif m := _AT_PATH.search(text):
        path = m.group(1).lstrip(".")
        detail = _FAILED.sub("", text[: m.start()]).strip().rstrip(".")
    else:
        path = ".".join(_FAILED.findall(text))
        detail = _FAILED.sub("", text).strip().rstrip(".")
    field = ".".join(_snake(part) for part in path.split(".")) if path else "body"
    return field, detail or "is not valid"


def _set_path(msg, path: str, value: str) -> None:
    *parents, last = path.split(".")
    for p in parents:
        msg = getattr(msg, p)
    setattr(msg, last, value)


_ISO_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")


def _query_value(fd: descriptor.FieldDescriptor, raw: str, name: str):
    if fd.type == descriptor.FieldDescriptor.TYPE_MESSAGE and fd.message_type.full_name == "crm.type.v1.Date":
        m = _ISO_DATE.fullmatch(raw.strip())
        if m is None:
            raise BadRequest(name, "must be a date, YYYY-MM-DD")
        return {"year": int(m.group(1)), "month": int(m.group(2)), "day": int(m.group(3))}
    if fd.type in _INTS:
        try:
            return int(raw)
        except ValueError:
            raise BadRequest(name, "must be an integer") from None
    if fd.type == descriptor.FieldDescriptor.TYPE_BOOL:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise BadRequest(name, "must be true or false")
        return raw.lower() in ("true", "1")
    if fd.type in (descriptor.FieldDescriptor.TYPE_FLOAT, descriptor.FieldDescriptor.TYPE_DOUBLE):
        try:
            return float(raw)
        except ValueError:
            raise BadRequest(name, "must be a number") from None
    return raw  # strings, enum names, Timestamps (RFC 3339) and FieldMasks (comma-separated) parse from JSON strings
    # (a crm.type.v1.Date is YYYY-MM-DD, above)


def _query_field(message: descriptor.Descriptor, key: str) -> list[descriptor.FieldDescriptor] | None:
    """The fields a query parameter names, outermost first: `page_size`, or dotted through
    singular message fields for a nested one (`period.unit`); None if it names none."""
    chain: list[descriptor.FieldDescriptor] = []
    for i, part in enumerate(key.split(".")):
        if i:
            prev = chain[-1]
            if prev.type != descriptor.FieldDescriptor.TYPE_MESSAGE or prev.is_repeated:
                return None  # only a singular message has fields to name (no maps, no lists)
            message = prev.message_type
        fd = message.fields_by_name.get(part)
        if fd is None:
            return None
        chain.append(fd)
    return chain


def _has_bytes(message: descriptor.Descriptor, seen: set[str]) -> bool:
    if message.full_name in seen:
        return False
    seen.add(message.full_name)
    for fd in message.fields:
        if fd.type == descriptor.FieldDescriptor.TYPE_BYTES:
            return True
        if fd.type == descriptor.FieldDescriptor.TYPE_MESSAGE and _has_bytes(fd.message_type, seen):
            return True
    return False


def carries_file(route: Route, request_desc: descriptor.Descriptor) -> bool:
    """Whether the route's body can carry a file: a multipart upload, or a bytes field anywhere in
    the part of the request the body fills (base64 in JSON)."""
    if route.upload is not None:
        return True
    if route.body is None:
        return False
    desc = request_desc if route.body == "*" else request_desc.fields_by_name[route.body].message_type
    return desc is not None and _has_bytes(desc, set())


def is_upload(route: Route) -> bool:
    return route.upload is not None and request.mimetype == "multipart/form-data"


def build_request(route: Route, request_cls, path_args: dict[str, str]):
    msg = request_cls()
    body_keys: list[str] = []
    public = route.public
    if public is not None and public.raw_body:
        # The exact bytes, for the service to check a signature over them.
        setattr(msg, public.raw_body, request.get_data())
    elif is_upload(route):
        target = msg if route.body == "*" else getattr(msg, route.body)
        body_keys = _read_form(route, target)
    elif route.body is not None:
        try:  # json's parser recurses: "[" * 1000 is a RecursionError, not a ValueError
            data = request.get_json(silent=True) if request.get_data() else {}
        except RecursionError:
            raise BadRequest("body", TOO_DEEP) from None
        if not isinstance(data, dict):
            raise BadRequest("body", "must be a JSON object (Content-Type: application/json)")
        target = msg if route.body == "*" else getattr(msg, route.body)
        try:
            json_format.ParseDict(data, target, ignore_unknown_fields=False)
        except json_format.ParseError as err:
            raise BadRequest(*_body_error(err)) from None
        except RecursionError:  # a google.protobuf.Struct / Value field nested too deeply
            raise BadRequest("body", TOO_DEEP) from None
        body_keys = [_snake(k) for k in data]
    for key in request.args:
        chain = _query_field(request_cls.DESCRIPTOR, key)
        if chain is None or key.split(".")[0] == route.body or route.body == "*":
            raise BadRequest(key, "is not a query parameter of this route")
        fd = chain[-1]
        values = request.args.getlist(key)
        if len(values) > 1 and not fd.is_repeated:
            raise BadRequest(key, "is given more than once (it takes one value)")
        value = [_query_value(fd, v, key) for v in values] if fd.is_repeated else _query_value(fd, values[-1], key)
        for parent in reversed(chain):
            value = {parent.json_name: value}
        try:  # ParseDict merges into the message fields already set (a.b=1&a.c=2)
            json_format.ParseDict(value, msg, ignore_unknown_fields=False)
        except json_format.ParseError as err:
            raise BadRequest(key, f"is not valid: {err}") from None
    for fieldpath, template in route.bind.items():
        _set_path(msg, fieldpath, template.format(**path_args))
    fields = request_cls.DESCRIPTOR.fields_by_name
    if "request_id" in fields and request.headers.get("Idempotency-Key"):
        msg.request_id = request.headers["Idempotency-Key"]
    # "If-Match: *" (RFC 9110: any current representation) asks for no etag check
    if request.headers.get("If-Match") and request.headers["If-Match"].strip() != "*":
        if "etag" in fields:
            msg.etag = request.headers["If-Match"]
        elif route.body and route.body != "*" and "etag" in getattr(msg, route.body).DESCRIPTOR.fields_by_name:
            getattr(msg, route.body).etag = request.headers["If-Match"]
    if route.method == "PATCH" and "update_mask" in fields and not msg.update_mask.paths:
        msg.update_mask.paths.extend(k for k in body_keys if k not in ("name", "etag"))
    if public is not None:
        # Last, so that a value the caller put in the body or the query cannot stand in for them.
        for name, header in public.headers.items():
            setattr(msg, name, request.headers.get(header, ""))
        if public.client_address:  # the client as the trusted proxies saw it (app.proxy_hops)
            setattr(msg, public.client_address, request.remote_addr or "")
    return msg


def _size(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n % (1024 * 1024) == 0 else f"{n} bytes"


def _read_form(route: Route, target) -> list[str]:
    """Fill `target` from a multipart/form-data body; the names of the fields set."""
    limit = current_app.config.get("MAX_UPLOAD_BYTES", MAX_UPLOAD_BYTES)
    # Werkzeug streams the file part into a temporary file (on disk past 500 KB, never the whole
    # body in memory) and stops with 413 once the body passes the file's limit plus the fields.
    request.max_content_length = limit + FORM_OVERHEAD
    try:
        form, files = request.form, request.files
    except RequestEntityTooLarge:
        if request.content_length is None or request.content_length > request.max_content_length:
            raise TooLarge(UPLOAD_PART, f"the file may be at most {_size(limit)}") from None
        raise TooLarge("body", "a form field is too long, or the form has too many parts") from None
    bad: list[tuple[str, str]] = []
    set_fields: list[str] = []

    parts = files.getlist(UPLOAD_PART)
    if UPLOAD_PART in form:
        bad.append((UPLOAD_PART, "must be a file part (curl -F file=@people.csv), not a text field"))
    elif not parts:
        bad.append((UPLOAD_PART, "is required: the file, as a multipart file part"))
    elif len(parts) > 1:
        bad.append((UPLOAD_PART, "send one file"))
    else:
        # Read from the spooled part once, straight into the message (at most one byte past the limit).
        content = parts[0].stream.read(limit + 1)
        if len(content) > limit:
            raise TooLarge(UPLOAD_PART, f"the file may be at most {_size(limit)}")
        setattr(target, route.upload, content)
        set_fields.append(route.upload)
    bad.extend(
        (name, f"is not a file part of this request: send the file as `{UPLOAD_PART}`")
        for name in files
        if name != UPLOAD_PART
    )

    desc = target.DESCRIPTOR
    by_name = {**{fd.json_name: fd for fd in desc.fields}, **desc.fields_by_name}
    maps: dict[str, tuple[descriptor.FieldDescriptor, dict]] = {}
    for name, raws in form.lists():
        if name == UPLOAD_PART:
            continue
        entry = _MAP_ENTRY.match(name)
        fd = by_name.get(entry.group(1) if entry else name)
        if fd is not None and fd.name == route.upload:
            bad.append((name, f"send the file as the `{UPLOAD_PART}` part"))
            continue
        if fd is None or (entry and not _is_map(fd)):
            bad.append((name, "is not a field of this request"))
            continue
        if len(raws) > 1 and (not fd.is_repeated or _is_map(fd)):
            bad.append((name, "is given more than once"))
            continue
        try:
            if _is_map(fd):
                _, entries = maps.setdefault(fd.name, (fd, {}))
                given = {entry.group(2): raws[0]} if entry else _json_object(raws[0], name)
                value_fd = fd.message_type.fields_by_name["value"]
                for key, raw in given.items():
                    where = f"{fd.name}[{key}]"
                    if key in entries:
                        raise BadRequest(where, "is given more than once")
                    entries[key] = _form_value(value_fd, raw, where) if isinstance(raw, str) else raw
                continue
            oneof = fd.containing_oneof
            if oneof is not None and target.WhichOneof(oneof.name) not in (None, fd.name):
                raise BadRequest(name, f"cannot be given with {target.WhichOneof(oneof.name)} (one of {oneof.name})")
            values = [_form_value(fd, raw, name) for raw in raws]
            _parse_into(target, fd, values if fd.is_repeated else values[0], name)
            set_fields.append(fd.name)
        except BadRequest as err:
            bad.extend(err.violations)
    for name, (fd, entries) in maps.items():
        try:
            _parse_into(target, fd, entries, name)
            set_fields.append(fd.name)
        except BadRequest as err:
            bad.extend(err.violations)
    if bad:
        raise BadRequest(*bad[0], *bad[1:])

    fmt = desc.fields_by_name.get(FORMAT_FIELD)
    if fmt is not None and fmt.type == descriptor.FieldDescriptor.TYPE_ENUM and FORMAT_FIELD not in set_fields:
        value = _infer_format(fmt, parts[0])
        if value is not None:  # else left unset: the service names the field
            setattr(target, FORMAT_FIELD, value)
    return set_fields


def _is_map(fd: descriptor.FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _json_object(raw: str, name: str) -> dict:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise BadRequest(name, "must be a JSON object")
    return value


def _form_value(fd: descriptor.FieldDescriptor, raw: str, name: str):
    """A form field's text as the JSON value of its proto field."""
    if fd.type == descriptor.FieldDescriptor.TYPE_ENUM:
        enum = fd.enum_type
        if raw in enum.values_by_name:
            return raw
        if re.fullmatch(r"-?\d+", raw) and int(raw) in enum.values_by_number:
            return int(raw)
        named = [v.name for v in enum.values if v.number != 0] or [v.name for v in enum.values]
        raise BadRequest(name, f"must be one of {', '.join(named)} (or its number)")
    if fd.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
        if fd.message_type.full_name.startswith("google.protobuf."):
            return raw  # Timestamp, FieldMask: their JSON form is a string
        return _json_object(raw, name)
    return _query_value(fd, raw, name)


def _parse_into(target, fd: descriptor.FieldDescriptor, value, name: str) -> None:
    try:
        json_format.ParseDict({fd.json_name: value}, target, ignore_unknown_fields=False)
    except json_format.ParseError as err:
        raise BadRequest(name, f"is not valid: {err}") from None
    except RecursionError:
        raise BadRequest(name, TOO_DEEP) from None


def _infer_format(fd: descriptor.FieldDescriptor, part) -> int | None:
    """The value of the format enum named like the file's extension (people.csv -> ..._CSV),
    else like its content type; None if neither names one."""
    suffix = pathlib.PurePosixPath((part.filename or "").replace("\\", "/")).suffix.lower().lstrip(".")
    for kind in (suffix, _FORMAT_BY_CONTENT_TYPE.get(part.mimetype)):
        for v in fd.enum_type.values if kind else ():
            if v.number != 0 and v.name.endswith("_" + kind.upper()):
                return v.number
    return None


def error_field(route: Route, field: str) -> str:
    """A service's field path as the HTTP caller knows it: path parameters by their names,
    body fields without the body's prefix, and an upload's bytes field as the file part."""
    if is_upload(route) and field == route.upload:
        return UPLOAD_PART
    for fieldpath, template in route.bind.items():
        if field == fieldpath:
            params = re.findall(r"{(\w+)}", template)
            return params[-1] if params else field
    if route.body and route.body != "*" and field.startswith(route.body + "."):
        return field[len(route.body) + 1 :]
    return field
