"""OpenTelemetry set-up: one TracerProvider per process, OTLP export when
OTEL_EXPORTER_OTLP_ENDPOINT is set (without it no span is recorded, but trace ids still cross
every hop for the logs), and W3C trace context carried through AMQP headers. With an endpoint,
a MeterProvider exports the messaging metrics (crm_chassis.metrics) there too."""

from __future__ import annotations

import logging

from opentelemetry import metrics, propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

log = logging.getLogger("crm.telemetry")


def setup_telemetry(service_name: str, endpoint: str | None = None) -> trace.TracerProvider:
    """Install the process's tracer provider (idempotent: an existing SDK provider is kept,
    which is how tests plug in an in-memory exporter)."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    resource = Resource.create({"service.name": service_name})
    setup_metrics(resource, endpoint)
    if not endpoint:
        # Nowhere to send spans: make none (a recorded span costs ~0.2 ms, and the gateway and
        # every SQL statement make several per request), but keep trace ids, so traceparent
        # still crosses every hop and the logs of one request share its trace id.
        provider = TracerProvider(resource=resource, sampler=ALWAYS_OFF)
        trace.set_tracer_provider(provider)
        return provider
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER, default parent-based
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    log.info("exporting traces", extra={"otlp_endpoint": endpoint})
    trace.set_tracer_provider(provider)
    return provider


def setup_metrics(resource: Resource, endpoint: str | None) -> None:
    """A MeterProvider exporting over OTLP, when there is an endpoint and no SDK provider yet
    (tests install one with an in-memory reader)."""
    if not endpoint or isinstance(metrics.get_meter_provider(), MeterProvider):
        return
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    from . import metrics as _instruments  # noqa: F401 - the instruments exist before the first export

    reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint))
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))


def tracer(name: str = "crm") -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers(carrier: dict | None = None, context=None) -> dict:
    """The current (or the given) trace context as W3C headers (traceparent, tracestate)."""
    carrier = {} if carrier is None else carrier
    propagate.inject(carrier, context=context)
    return carrier


def extract_context(headers: dict | None):
    return propagate.extract({k: v for k, v in (headers or {}).items() if isinstance(v, str)})
