"""customer-svc started in-process on a fresh database per test module, and a stub for it."""

from __future__ import annotations

import pytest

from crm.customer.v1 import customer_service_pb2_grpc as pbg
from customer_svc.__main__ import SPEC
from tests.support.harness import channel, start_service


@pytest.fixture(scope="module")
def svc(request, databases, broker):
    service = start_service(
        SPEC, databases.fresh(request.module.__name__.rsplit(".", 1)[-1][:20]), broker.url, relay=False
    )
    yield service
    service.stop(0)


@pytest.fixture(scope="module")
def stub(svc):
    with channel(svc) as ch:
        yield pbg.CustomerServiceStub(ch)
