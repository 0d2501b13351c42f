"""The OpenAPI 3 document served at /openapi.json. A test checks it lists exactly the app's routes."""

from __future__ import annotations

from functools import lru_cache


def _problem_responses(*codes: int) -> dict:
    text = {
        400: "Invalid input; `errors` names each bad field",
        401: "Missing or invalid bearer token",
        403: "The caller's roles lack the permission",
        404: "Not found",
        409: "Conflict",
        503: "A service behind the gateway is unavailable",
    }
    return {
        str(c): {
            "description": text[c],
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for c in codes
    }


_TS = {"type": "string", "format": "date-time"}

CUSTOMER = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "readOnly": True, "example": "customers/0b1c..."},
        "type": {"type": "string", "enum": ["CUSTOMER_TYPE_PERSON", "CUSTOMER_TYPE_ORGANIZATION"]},
        "givenName": {"type": "string"},
        "familyName": {"type": "string"},
        "organizationName": {"type": "string"},
        "displayName": {"type": "string", "readOnly": True},
        "email": {"type": "string", "format": "email"},
        "phone": {"type": "string"},
        "acquisitionSource": {"type": "string", "example": "website"},
        "createTime": {**_TS, "readOnly": True},
        "updateTime": {**_TS, "readOnly": True},
        "etag": {"type": "string", "readOnly": True},
    },
    "required": ["type"],
}


@lru_cache(maxsize=1)
def openapi_document() -> dict:
    bearer = [{"bearerAuth": []}]
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "CRM gateway",
            "version": "1.0.0",
            "description": "JSON over the CRM services' gRPC APIs. Field names follow the protobuf JSON mapping (lowerCamelCase); 64-bit integers are strings.",
        },
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {
                "Customer": CUSTOMER,
                "ListCustomersResponse": {
                    "type": "object",
                    "properties": {
                        "customers": {"type": "array", "items": {"$ref": "#/components/schemas/Customer"}},
                        "nextPageToken": {"type": "string"},
                    },
                },
                "CustomersBySource": {
                    "type": "object",
                    "properties": {
                        "sources": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "acquisitionSource": {"type": "string"},
                                    "customerCount": {"type": "string", "format": "int64"},
                                },
                            },
                        },
                        "totalCustomers": {"type": "string", "format": "int64"},
                    },
                },
                "Problem": {
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
                },
            },
        },
        "paths": {
            "/v1/customers": {
                "post": {
                    "operationId": "createCustomer",
                    "summary": "Create a customer",
                    "security": bearer,
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "description": "A retry with the same key returns the first result",
                            "schema": {"type": "string", "maxLength": 128},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Customer"}}},
                    },
                    "responses": {
                        "201": {
                            "description": "Created",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Customer"}}},
                        },
                        **_problem_responses(400, 401, 403, 503),
                    },
                },
                "get": {
                    "operationId": "listCustomers",
                    "summary": "List customers, newest first",
                    "security": bearer,
                    "parameters": [
                        {
                            "name": "page_size",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 0, "maximum": 1000},
                        },
                        {"name": "page_token", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {
                            "description": "A page",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/ListCustomersResponse"}}
                            },
                        },
                        **_problem_responses(400, 401, 403, 503),
                    },
                },
            },
            "/v1/customers/{customer_id}": {
                "get": {
                    "operationId": "getCustomer",
                    "summary": "Get one customer",
                    "security": bearer,
                    "parameters": [
                        {
                            "name": "customer_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "format": "uuid"},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "The customer",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Customer"}}},
                        },
                        **_problem_responses(400, 401, 403, 404, 503),
                    },
                },
            },
            "/v1/reports/customers-by-source": {
                "get": {
                    "operationId": "countCustomersBySource",
                    "summary": "Customers per acquisition source",
                    "security": bearer,
                    "parameters": [
                        {"name": "start_time", "in": "query", "schema": _TS, "description": "inclusive"},
                        {"name": "end_time", "in": "query", "schema": _TS, "description": "exclusive"},
                    ],
                    "responses": {
                        "200": {
                            "description": "The report",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/CustomersBySource"}}
                            },
                        },
                        **_problem_responses(400, 401, 403, 503),
                    },
                },
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "Liveness",
                    "security": [],
                    "responses": {"200": {"description": "The process is up"}},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Readiness: every service the gateway calls is SERVING",
                    "security": [],
                    "responses": {"200": {"description": "Ready"}, "503": {"description": "A service is not serving"}},
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3 document"}},
                }
            },
        },
    }
