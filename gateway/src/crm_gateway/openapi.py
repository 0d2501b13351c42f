"""The OpenAPI 3 document at /openapi.json, generated from the route table and the protobuf
descriptors of the messages each route carries (field names in the protobuf JSON mapping)."""

from __future__ import annotations

from functools import lru_cache

from google.protobuf import descriptor

from .routes import ROUTES, Route
from .transcode import FORMAT_FIELD, MAX_UPLOAD_BYTES, UPLOAD_PART

FD = descriptor.FieldDescriptor
_SCALARS = {
    FD.TYPE_STRING: {"type": "string"},
    FD.TYPE_BOOL: {"type": "boolean"},
    FD.TYPE_INT32: {"type": "integer", "format": "int32"},
    FD.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FD.TYPE_UINT32: {"type": "integer", "format": "int32"},
    FD.TYPE_INT64: {"type": "string", "format": "int64"},  # the JSON mapping writes 64-bit integers as strings
    FD.TYPE_SINT64: {"type": "string", "format": "int64"},
    FD.TYPE_UINT64: {"type": "string", "format": "int64"},
    FD.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FD.TYPE_FLOAT: {"type": "number", "format": "float"},
    FD.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WELL_KNOWN = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.FieldMask": {"type": "string", "description": "comma-separated field paths"},
}
_PROBLEMS = {
    "400": "Invalid input; `errors` names each bad field",
    "401": "Missing or invalid bearer token",
    "403": "The caller's roles lack the permission",
    "404": "Not found",
    "409": "Conflict: already exists, or a stale etag",
    "503": "A service behind the gateway is unavailable",
}


class _Builder:
    def __init__(self):
        self.schemas: dict[str, dict] = {}

    def field(self, fd: FD) -> dict:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            value = fd.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.single(value)}
        single = self.single(fd)
        return {"type": "array", "items": single} if fd.is_repeated else single

    def single(self, fd: FD) -> dict:
        if fd.type == FD.TYPE_ENUM:
            return {"type": "string", "enum": [v.name for v in fd.enum_type.values]}
        if fd.type == FD.TYPE_MESSAGE:
            return self.message(fd.message_type)
        return dict(_SCALARS[fd.type])

    def message(self, desc: descriptor.Descriptor) -> dict:
        if desc.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[desc.full_name])
        if desc.full_name not in self.schemas:
            self.schemas[desc.full_name] = {}  # placeholder: recursion stops here
            self.schemas[desc.full_name] = {
                "type": "object",
                "properties": {fd.json_name: self.field(fd) for fd in desc.fields},
            }
        return {"$ref": f"#/components/schemas/{desc.full_name}"}


def _operation(b: _Builder, route: Route, method: descriptor.MethodDescriptor) -> dict:
    req = method.input_type
    bound = {path.split(".")[0] for path in route.bind}
    params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in route.path_params]
    for fd in req.fields:
        if fd.name in bound or fd.name == route.body or route.body == "*":
            continue
        if fd.type == FD.TYPE_MESSAGE and fd.message_type.full_name not in _WELL_KNOWN:
            continue
        params.append({"name": fd.name, "in": "query", "required": False, "schema": b.field(fd)})
    if "request_id" in req.fields_by_name:
        params.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "A retry with the same key returns the first result",
            }
        )
    op = {
        "operationId": method.name[0].lower() + method.name[1:],
        "summary": route.summary,
        "security": [{"bearerAuth": []}],
        "parameters": params,
        "responses": {
            **{
                code: {
                    "description": text,
                    "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
                }
                for code, text in _PROBLEMS.items()
            },
        },
    }
    if route.stream:
        op["responses"]["200"] = {
            "description": "The file",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    else:
        op["responses"][str(route.status)] = {
            "description": "OK",
            "content": {"application/json": {"schema": b.message(method.output_type)}},
        }
    if route.body is not None:
        body = req if route.body == "*" else req.fields_by_name[route.body].message_type
        op["requestBody"] = {
            "required": route.body != "*",
            "content": {"application/json": {"schema": b.message(body)}},
        }
        if route.upload:
            op["requestBody"]["content"]["multipart/form-data"] = {"schema": _upload_form(b, route, body, bound)}
            op["responses"]["413"] = {
                "description": f"Too large: a multipart file over {MAX_UPLOAD_BYTES // (1024 * 1024)} MiB",
                "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
            }
    return op


def _upload_form(b: _Builder, route: Route, body: descriptor.Descriptor, bound: set[str]) -> dict:
    """The multipart alternative of an upload route: the file part, then every other field of the
    body by its proto name (what transcode._read_form accepts)."""
    file_doc = f"The file, as it is; it becomes `{route.upload}`."
    if FORMAT_FIELD in body.fields_by_name:
        file_doc += f" Without `{FORMAT_FIELD}`, the file name's extension (.csv, .xlsx) or content type gives it."
    props = {UPLOAD_PART: {"type": "string", "format": "binary", "description": file_doc}}
    for fd in body.fields:
        if fd.name == route.upload or fd.name in bound:
            continue
        schema = b.field(fd)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            schema["description"] = f"A JSON object, or one form field per entry: `{fd.name}[KEY]=VALUE`"
        props[fd.name] = schema
    return {"type": "object", "required": [UPLOAD_PART], "properties": props}


@lru_cache(maxsize=1)
def openapi_document() -> dict:
    from .app import SERVICES

    b = _Builder()
    paths: dict[str, dict] = {}
    for route in ROUTES:
        method = SERVICES[route.service].methods_by_name[route.rpc]
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(b, route, method)
    plain = {"security": [], "responses": {"200": {"description": "OK"}}}
    paths["/healthz"] = {"get": {**plain, "operationId": "healthz", "summary": "Liveness"}}
    paths["/readyz"] = {
        "get": {
            **plain,
            "operationId": "readyz",
            "summary": "Every service the gateway calls is SERVING",
            "responses": {"200": {"description": "Ready"}, "503": {"description": "Not ready"}},
        }
    }
    paths["/openapi.json"] = {"get": {**plain, "operationId": "openapi", "summary": "This document"}}
    b.schemas["Problem"] = {
        "type": "object",
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "code": {"type": "string"},
            "reason": {"type": "string"},
            "request_id": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"field": {"type": "string"}, "description": {"type": "string"}},
                },
            },
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "CRM gateway",
            "version": "1.0.0",
            "description": (
                "JSON over the CRM services' gRPC APIs. Field names follow the protobuf JSON mapping "
                "(lowerCamelCase); 64-bit integers are strings; errors are application/problem+json."
            ),
        },
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": b.schemas,
        },
        "paths": paths,
    }
