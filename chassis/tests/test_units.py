"""Units of the chassis that need no server: settings, page tokens, tokens and permissions, errors."""

from __future__ import annotations

import grpc
import pytest

from crm_chassis.auth import Principal, TokenVerifier
from crm_chassis.config import ConfigError, load_settings
from crm_chassis.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from crm_chassis.pagination import PageTokens, page_size

GOOD = {"SERVICE_NAME": "customer-svc", "GRPC_PORT": "50051"}


def test_settings_defaults():
    s = load_settings(env=GOOD)
    assert (s.service_name, s.grpc_port, s.database_url, s.embedded_db_name) == (
        "customer-svc",
        50051,
        None,
        "customer_svc",
    )
    assert s.amqp_url.startswith("amqp://")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"GRPC_PORT": "http"}, "GRPC_PORT"),
        ({"GRPC_PORT": "70000"}, "GRPC_PORT"),
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL"),
        ({"AMQP_URL": "http://broker"}, "AMQP_URL"),
        ({"JWT_SECRET": "short"}, "JWT_SECRET"),
        ({"JWT_ALGORITHM": "none"}, "JWT_ALGORITHM"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"OUTBOX_POLL_SECONDS": "-1"}, "OUTBOX_POLL_SECONDS"),
        ({"SERVICE_NAME": "bad name"}, "SERVICE_NAME"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
    ],
)
def test_a_bad_setting_stops_start_naming_it(env, named):
    with pytest.raises(ConfigError) as info:
        load_settings(env={**GOOD, **env})
    assert named in str(info.value)
    assert isinstance(info.value, SystemExit)  # the process exits with the message


def test_all_bad_settings_are_reported_together():
    with pytest.raises(ConfigError) as info:
        load_settings(env={"GRPC_PORT": "x", "LOG_LEVEL": "LOUD"})
    assert len(info.value.problems) == 3  # SERVICE_NAME, GRPC_PORT, LOG_LEVEL


def test_page_tokens_round_trip_and_reject_tampering_and_other_queries():
    tokens = PageTokens("secret-secret-secret-secret-secret", "customers.list")
    t = tokens.encode(["2026-01-01T00:00:00+00:00", "abc"], "q1")
    assert tokens.decode(t, "q1") == ["2026-01-01T00:00:00+00:00", "abc"]
    assert tokens.decode("", "q1") is None
    body, _, sig = t.partition(".")
    for bad in (body, f"{body}.{sig[:-1]}x", f"{body[:-1]}A.{sig}", "!!!.???"):
        with pytest.raises(InvalidArgument) as info:
            tokens.decode(bad, "q1")
        assert info.value.violations[0].field == "page_token"
    with pytest.raises(InvalidArgument):
        tokens.decode(t, "q2")  # a token is bound to its query
    other = PageTokens("secret-secret-secret-secret-secret", "orders.list")
    with pytest.raises(InvalidArgument):
        other.decode(t, "q1")  # and to its list


def test_page_size_rules():
    assert page_size(0) == 50 and page_size(7) == 7 and page_size(5000) == 1000
    with pytest.raises(InvalidArgument):
        page_size(-1)


def test_tokens_and_permissions():
    v = TokenVerifier("x" * 40)
    p = v.verify_header("Bearer " + v.mint("ann", ["sales_rep"]))
    assert p == Principal("ann", ("sales_rep",))
    assert p.has("customers.write") and not p.has("reports.read")
    with pytest.raises(PermissionDenied):
        p.require("reports.read")
    assert Principal("root", ("admin",)).has("anything.at.all")
    assert not Principal("x", ("no_such_role",)).has("customers.read")
    with pytest.raises(ValueError):
        v.mint("ann", ["wizard"])
    for header in (None, "", "Bearer", "Token abc", "Bearer abc"):
        with pytest.raises(Unauthenticated):
            v.verify_header(header)
    with pytest.raises(Unauthenticated):
        TokenVerifier("y" * 40).verify(v.mint("ann", ["admin"]))


def test_domain_errors_carry_rich_status():
    st = InvalidArgument.field("customer.email", "bad").to_status()
    assert st.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert len(st.details) == 2  # BadRequest + ErrorInfo
    assert NotFound("x", reason="CUSTOMER_NOT_FOUND").to_status().code == grpc.StatusCode.NOT_FOUND.value[0]
