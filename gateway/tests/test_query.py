"""Query parameters fill request fields by their proto names, dotted for a field of a nested
message (google.api.http's rule for fields bound neither by the path nor by the body)."""

from __future__ import annotations

import pytest
from flask import Flask

from crm.sales.v1 import conversion_pb2
from crm_gateway.routes import Route
from crm_gateway.transcode import BadRequest, build_request

ROUTE = Route(method="GET", path="/v1/x", service="crm.sales.v1.ConversionService", rpc="ConvertLead", summary="")


def built(query: str):
    with Flask(__name__).test_request_context("/v1/x?" + query):
        return build_request(ROUTE, conversion_pb2.ConvertLeadRequest, {})


def test_dotted_parameters_fill_nested_fields_and_merge():
    got = built("name=leads/1&amount.currency_code=IRR&amount.units=5000")
    assert (got.name, got.amount.currency_code, got.amount.units) == ("leads/1", "IRR", 5000)


@pytest.mark.parametrize(
    "query, field",
    [
        ("amount.nope=1", "amount.nope"),  # no such field in Money
        ("name.x=1", "name.x"),  # a string has no fields
        ("amount.units=many", "amount.units"),  # the leaf's type is checked as for any parameter
        ("nope.units=1", "nope.units"),
    ],
)
def test_a_dotted_parameter_naming_no_field_is_a_bad_request_naming_it(query, field):
    with pytest.raises(BadRequest) as info:
        built(query)
    assert [f for f, _ in info.value.violations] == [field]


@pytest.mark.parametrize(
    "query, field", [("name=leads/1&name=leads/2", "name"), ("amount.units=1&amount.units=3", "amount.units")]
)
def test_a_scalar_parameter_given_twice_is_a_bad_request_naming_it(query, field):
    # not the last one silently winning
    with pytest.raises(BadRequest) as info:
        built(query)
    assert [f for f, _ in info.value.violations] == [field]
    assert "more than once" in info.value.description


def test_a_repeated_field_takes_the_parameter_repeated():
    from crm.customer.v1 import customer_service_pb2

    route = Route(
        method="GET", path="/v1/x", service="crm.customer.v1.CustomerService", rpc="ExportCustomers", summary=""
    )
    with Flask(__name__).test_request_context("/v1/x?fields=email&fields=phone"):
        got = build_request(route, customer_service_pb2.ExportCustomersRequest, {})
    assert list(got.fields) == ["email", "phone"]
