"""Session-wide fixtures shared by every test directory (see tests/support/harness.py)."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support.harness import Broker, Databases

# One in-memory exporter for the whole run (a process has one tracer provider); the trace
# test filters it by trace id.
SPANS = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(SPANS))
trace.set_tracer_provider(_provider)


@pytest.fixture(scope="session")
def spans() -> InMemorySpanExporter:
    return SPANS


@pytest.fixture(scope="session")
def databases():
    dbs = Databases()
    yield dbs
    dbs.drop_all()


@pytest.fixture(scope="session")
def broker():
    b = Broker()
    yield b
    b.close()


@pytest.fixture(scope="session")
def suite(databases, broker):
    from tests.support.harness import Suite

    s = Suite(databases, broker)
    yield s
    s.stop()
