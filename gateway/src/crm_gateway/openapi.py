"""The OpenAPI 3 document at /openapi.json, generated from the routes (the contracts'
google.api.http annotations, routes.py) and the protobuf descriptors of the messages each route
carries (field names in the protobuf JSON mapping). Summaries are the RPCs' proto comments;
every error the gateway or its server answers is listed, each an application/problem+json."""

from __future__ import annotations

from functools import lru_cache

from google.protobuf import descriptor

from .problem_doc import MEDIA_TYPE
from .routes import ROUTES, SERVICES, Route
from .transcode import DEFAULT_MAX_BODY_BYTES, FORMAT_FIELD, MAX_BODY_BYTES, MAX_UPLOAD_BYTES, UPLOAD_PART
from .worker import LIMIT_REQUEST_FIELD_SIZE, LIMIT_REQUEST_FIELDS, LIMIT_REQUEST_LINE

FD = descriptor.FieldDescriptor
_MIB = 1024 * 1024
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
# Every error status the gateway answers (problems.py, transcode.py, and gunicorn's own through
# worker.py), each a problem document. 405 belongs to a path rather than an operation.
_PROBLEMS = {
    "400": "Invalid input; `errors` names each bad field (JSON nested too deeply, a scalar query "
    "parameter given twice). Also a request line that is not HTTP: a URL must be ASCII, "
    "percent-encode the rest (`curl -G --data-urlencode 'query=…'`), or a body whose chunked "
    "encoding is not valid",
    "401": "Missing or invalid bearer token",
    "403": "The caller's roles lack the permission",
    "404": "Not found",
    "405": "The path does not take this method",
    "409": "Conflict: already exists, or a stale etag",
    "413": f"Too large, refused before the body is read: a body over {DEFAULT_MAX_BODY_BYTES // _MIB} MiB "
    f"(GATEWAY_MAX_BODY_BYTES), {MAX_BODY_BYTES // _MIB} MiB for a request that carries a file (an "
    f"import, attachments), or a multipart file over {MAX_UPLOAD_BYTES // _MIB} MiB",
    "414": f"The request line (method, URL, version) is longer than {LIMIT_REQUEST_LINE} bytes",
    "429": "A service refused the call for now (RESOURCE_EXHAUSTED); retry later",
    "431": f"Request headers too large (over {LIMIT_REQUEST_FIELDS} headers, or one over "
    f"{LIMIT_REQUEST_FIELD_SIZE} bytes)",
    "500": "Internal error (the request id finds it in the logs)",
    "501": "Not implemented (an unsupported Transfer-Encoding)",
    "502": "A service's answer could not be read (its error was too large for the gateway's channel)",
    "503": "A service behind the gateway, or its database, is unavailable; retry",
    "504": "A service did not answer in time",
}
_ALWAYS = ("400", "401", "403", "404", "409", "414", "429", "431", "500", "501", "502", "503", "504")
_NO_TOKEN = ("400", "414", "431", "500", "501")  # /healthz, /readyz, /openapi.json


def _problems(codes) -> dict:
    return {code: {"$ref": f"#/components/responses/Problem{code}"} for code in codes}


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


def _query_fields(desc: descriptor.Descriptor, prefix: str, depth: int = 0):
    """(parameter name, field) of every field a query parameter can fill: scalars, lists of
    scalars, dates and well-known types by name, and the fields of a singular nested message
    dotted (`amount.units`), as the gateway reads them (transcode._query_field)."""
    for fd in desc.fields:
        name = prefix + fd.name
        nested = fd.type == FD.TYPE_MESSAGE and fd.message_type.full_name not in _WELL_KNOWN
        if not nested or fd.message_type.full_name == "crm.type.v1.Date":
            yield name, fd
        elif not fd.is_repeated and depth < 2:  # lists and maps of messages do not fit a query
            yield from _query_fields(fd.message_type, name + ".", depth + 1)


def _operation(b: _Builder, route: Route, method: descriptor.MethodDescriptor) -> dict:
    req = method.input_type
    bound = {path.split(".")[0] for path in route.bind}
    params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in route.path_params]
    for name, fd in _query_fields(req, ""):
        if name.split(".")[0] in bound or name.split(".")[0] == route.body or route.body == "*":
            continue
        if fd.type == FD.TYPE_MESSAGE and fd.message_type.full_name == "crm.type.v1.Date":
            date = {"type": "string", "format": "date", "description": "YYYY-MM-DD"}
            params.append({"name": name, "in": "query", "required": False, "schema": date})
            continue
        params.append({"name": name, "in": "query", "required": False, "schema": b.field(fd)})
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
        "responses": _problems(_ALWAYS + (("413",) if route.body is not None else ())),
    }
    if route.description and route.description != route.summary:
        op["description"] = route.description
    if route.stream:
        headers = {
            "Content-Disposition": {
                "description": 'attachment; filename="…"',
                "schema": {"type": "string"},
            }
        }
        if "row_count" in method.output_type.fields_by_name:
            headers["X-Row-Count"] = {"description": "Rows in the file", "schema": {"type": "integer"}}
        op["responses"]["200"] = {
            "description": "The file, streamed",
            "headers": headers,
            "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in route.media_types},
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
    if route.public:
        _public(op, route)
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


def _public(op: dict, route: Route) -> None:
    """A public route: no bearer token; its limits, headers and raw body documented."""
    pub = route.public
    op["security"] = []
    op["responses"].pop("403", None)  # the gateway's own role is granted the RPC
    # 401 stays: the service answers it for a bad signature, secret or site key
    op["responses"].update(_problems(("401", "413", "429")))
    limits = f"Public: no bearer token. At most {pub.per_minute} requests a minute per client, bodies up to {pub.max_bytes} bytes."
    op["description"] = " ".join(x for x in (op.get("description", ""), pub.description, limits) if x)
    for name, header in pub.headers.items():
        op["parameters"] = [p for p in op["parameters"] if p["name"] != name]
        op["parameters"].append({"name": header, "in": "header", "required": False, "schema": {"type": "string"}})
    if pub.raw_response:
        op["responses"]["200"] = {
            "description": "The bytes as they are (Content-Type: the service's)",
            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
        }
    if pub.redirect:
        op["responses"].pop("200", None)
        op["responses"]["302"] = {
            "description": "A redirect to the link's target",
            "headers": {"Location": {"schema": {"type": "string", "format": "uri"}}},
        }
    if pub.raw_body:
        op["parameters"] = [p for p in op["parameters"] if p["name"] != pub.raw_body]
        op["requestBody"] = {
            "required": True,
            # the service reads the exact bytes (a signature is over them); the senders post JSON
            "content": {"application/json": {"schema": {"type": "object"}}},
        }


@lru_cache(maxsize=1)
def openapi_document() -> dict:
    b = _Builder()
    paths: dict[str, dict] = {}
    taken: dict[str, int] = {}
    for route in ROUTES:
        method = SERVICES[route.service].methods_by_name[route.rpc]
        op = _operation(b, route, method)
        n = taken[op["operationId"]] = taken.get(op["operationId"], 0) + 1
        if n > 1:  # an RPC's additional binding: operationIds must be unique
            op["operationId"] += str(n)
        paths.setdefault(route.path, {})[route.method.lower()] = op
    plain = {"security": [], "responses": {"200": {"description": "OK"}, **_problems(_NO_TOKEN)}}
    paths["/healthz"] = {"get": {**plain, "operationId": "healthz", "summary": "Liveness"}}
    paths["/readyz"] = {
        "get": {
            **plain,
            "operationId": "readyz",
            "summary": "Every service the gateway calls is SERVING",
            "responses": {
                "200": {"description": "Ready"},
                "503": {"description": "Not ready"},
                **_problems(_NO_TOKEN),
            },
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
                "(lowerCamelCase); 64-bit integers are strings; every error, the HTTP server's own "
                "included, is application/problem+json (a path answers 405 to a method it does not take)."
            ),
        },
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": b.schemas,
            "responses": {
                f"Problem{code}": {
                    "description": text,
                    "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
                }
                for code, text in _PROBLEMS.items()
            },
        },
        "paths": paths,
    }
