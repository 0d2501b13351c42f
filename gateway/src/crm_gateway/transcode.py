"""Generic JSON <-> protobuf transcoding for the route table (routes.py).

A request message is built from, in order: the body (the whole request, or one field of it),
the query string (scalar and repeated fields by their proto names, dotted for nested ones),
the path parameters (through the route's templates) and headers (Idempotency-Key ->
request_id, If-Match -> etag). For a PATCH without an update_mask the mask is the set of
top-level fields present in the body (AIP-134).
"""

from __future__ import annotations

import re

from flask import request
from google.protobuf import descriptor, json_format

from .routes import Route

_INTS = {
    descriptor.FieldDescriptor.TYPE_INT32,
    descriptor.FieldDescriptor.TYPE_INT64,
    descriptor.FieldDescriptor.TYPE_UINT32,
    descriptor.FieldDescriptor.TYPE_UINT64,
    descriptor.FieldDescriptor.TYPE_SINT32,
    descriptor.FieldDescriptor.TYPE_SINT64,
}


class BadRequest(Exception):
    def __init__(self, field: str, description: str):
        super().__init__(f"{field}: {description}")
        self.field, self.description = field, description


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _set_path(msg, path: str, value: str) -> None:
    *parents, last = path.split(".")
    for p in parents:
        msg = getattr(msg, p)
    setattr(msg, last, value)


def _query_value(fd: descriptor.FieldDescriptor, raw: str, name: str):
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


def build_request(route: Route, request_cls, path_args: dict[str, str]):
    msg = request_cls()
    body_keys: list[str] = []
    if route.body is not None:
        data = request.get_json(silent=True) if request.get_data() else {}
        if not isinstance(data, dict):
            raise BadRequest("body", "must be a JSON object (Content-Type: application/json)")
        target = msg if route.body == "*" else getattr(msg, route.body)
        try:
            json_format.ParseDict(data, target, ignore_unknown_fields=False)
        except json_format.ParseError as err:
            raise BadRequest("body", str(err)) from None
        body_keys = [_snake(k) for k in data]
    for key in request.args:
        fd = request_cls.DESCRIPTOR.fields_by_name.get(key)
        if fd is None or key == route.body or route.body == "*":
            raise BadRequest(key, "is not a query parameter of this route")
        values = request.args.getlist(key)
        value = [_query_value(fd, v, key) for v in values] if fd.is_repeated else _query_value(fd, values[-1], key)
        try:
            json_format.ParseDict({fd.json_name: value}, msg, ignore_unknown_fields=False)
        except json_format.ParseError as err:
            raise BadRequest(key, f"is not valid: {err}") from None
    for fieldpath, template in route.bind.items():
        _set_path(msg, fieldpath, template.format(**path_args))
    fields = request_cls.DESCRIPTOR.fields_by_name
    if "request_id" in fields and request.headers.get("Idempotency-Key"):
        msg.request_id = request.headers["Idempotency-Key"]
    if request.headers.get("If-Match"):
        if "etag" in fields:
            msg.etag = request.headers["If-Match"]
        elif route.body and route.body != "*" and "etag" in getattr(msg, route.body).DESCRIPTOR.fields_by_name:
            getattr(msg, route.body).etag = request.headers["If-Match"]
    if route.method == "PATCH" and "update_mask" in fields and not msg.update_mask.paths:
        msg.update_mask.paths.extend(k for k in body_keys if k not in ("name", "etag"))
    return msg


def error_field(route: Route, field: str) -> str:
    """A service's field path as the HTTP caller knows it: path parameters by their names,
    body fields without the body's prefix."""
    for fieldpath, template in route.bind.items():
        if field == fieldpath:
            params = re.findall(r"{(\w+)}", template)
            return params[-1] if params else field
    if route.body and route.body != "*" and field.startswith(route.body + "."):
        return field[len(route.body) + 1 :]
    return field
