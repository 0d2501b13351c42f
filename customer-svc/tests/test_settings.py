"""customer-svc's own settings: DEFAULT_PHONE_REGION (moved here from the chassis' Settings)."""

from __future__ import annotations

import pytest

from crm.customer.v1 import customer_pb2
from crm.customer.v1 import customer_service_pb2 as pb
from crm.customer.v1 import customer_service_pb2_grpc as pbg
from crm_chassis.config import ConfigError
from customer_svc.__main__ import SPEC
from customer_svc.settings import load_customer_settings
from tests.support.harness import channel, md, start_service


def test_phone_region_default_case_and_check(monkeypatch):
    monkeypatch.delenv("DEFAULT_PHONE_REGION", raising=False)
    assert load_customer_settings().phone_region == "IR"
    monkeypatch.setenv("DEFAULT_PHONE_REGION", "de")
    assert load_customer_settings().phone_region == "DE"
    for bad in ("IRN", "1R"):
        monkeypatch.setenv("DEFAULT_PHONE_REGION", bad)
        with pytest.raises(ConfigError) as info:
            load_customer_settings()
        assert "DEFAULT_PHONE_REGION" in info.value.problems[0]


def test_the_service_reads_numbers_in_its_region(monkeypatch, databases, broker):
    monkeypatch.setenv("DEFAULT_PHONE_REGION", "de")
    service = start_service(SPEC, databases.fresh("region"), broker.url, relay=False)
    try:
        with channel(service) as ch:
            made = pbg.CustomerServiceStub(ch).CreateCustomer(
                pb.CreateCustomerRequest(
                    customer=customer_pb2.Customer(
                        type=customer_pb2.CUSTOMER_TYPE_PERSON, family_name="Berliner", phone="030 1234567"
                    )
                ),
                metadata=md(),
            )
        assert made.phone == "+49301234567"  # a German number, not an Iranian one
    finally:
        service.stop(0)
    monkeypatch.setenv("DEFAULT_PHONE_REGION", "Iran")
    with pytest.raises(ConfigError, match="DEFAULT_PHONE_REGION"):
        start_service(SPEC, databases.fresh("region"), broker.url, relay=False)
