"""ImportCustomers (placeholder until the importer lands): the interface the servicer uses."""

from __future__ import annotations

import grpc

from crm_chassis.errors import DomainError


class Unimplemented(DomainError):
    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "NOT_IMPLEMENTED"


class Importer:
    def __init__(self, use_cases):
        self.uc = use_cases

    def start(self, request, principal):
        raise Unimplemented("imports are not available yet")

    def get(self, name):
        raise Unimplemented("imports are not available yet")

    def error_report(self, name, fmt):
        raise Unimplemented("imports are not available yet")
        yield  # pragma: no cover
