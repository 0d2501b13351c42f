"""OpenTelemetry set-up: one TracerProvider per process, OTLP export when
OTEL_EXPORTER_OTLP_ENDPOINT is set, and W3C trace context carried through AMQP headers."""

from __future__ import annotations

import logging

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger("crm.telemetry")


def setup_telemetry(service_name: str, endpoint: str | None = None) -> trace.TracerProvider:
    """Install the process's tracer provider (idempotent: an existing SDK provider is kept,
    which is how tests plug in an in-memory exporter)."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        log.info("exporting traces", extra={"otlp_endpoint": endpoint})
    trace.set_tracer_provider(provider)
    return provider


def tracer(name: str = "crm") -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers(carrier: dict | None = None, context=None) -> dict:
    """The current (or the given) trace context as W3C headers (traceparent, tracestate)."""
    carrier = {} if carrier is None else carrier
    propagate.inject(carrier, context=context)
    return carrier


def extract_context(headers: dict | None):
    return propagate.extract({k: v for k, v in (headers or {}).items() if isinstance(v, str)})
