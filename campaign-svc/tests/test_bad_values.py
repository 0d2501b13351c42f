"""Values an outside-in fuzz of the running suite found answering INTERNAL, each now the error
that names it: a time zone name too long for the file system (ZoneInfo raised OSError), a
request_id past a unique index's key size, a template version past its column's range, a
programme amount past numeric(18, 2)."""

from __future__ import annotations

import grpc
import pytest

from crm.campaign.v1 import campaign_service_pb2 as cpb
from crm.campaign.v1 import campaign_service_pb2_grpc, loyalty_pb2, loyalty_pb2_grpc, templates_pb2, templates_pb2_grpc
from crm.type.v1 import money_pb2
from crm_chassis.errors import read_rpc_error

from .conftest import ADMIN, MARKETER


def refused(call) -> tuple[grpc.StatusCode, list[str]]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    view = read_rpc_error(info.value)
    return view.code, [v.field for v in view.field_violations]


def test_a_long_time_zone_and_a_long_request_id_are_named(ch):
    api = campaign_service_pb2_grpc.CampaignServiceStub(ch)
    for zone in ("A" * 300, "Asia", "../../etc/passwd"):
        c = cpb.Campaign(display_name="x", channel="email", time_zone=zone, cron="0 9 * * *")
        got = refused(lambda c=c: api.CreateCampaign(cpb.CreateCampaignRequest(campaign=c), metadata=MARKETER))
        assert got == (grpc.StatusCode.INVALID_ARGUMENT, ["campaign.time_zone"]), zone
    c = cpb.Campaign(display_name="x", channel="email")
    got = refused(
        lambda: api.CreateCampaign(cpb.CreateCampaignRequest(campaign=c, request_id="r" * 3000), metadata=MARKETER)
    )
    assert got == (grpc.StatusCode.INVALID_ARGUMENT, ["request_id"])


def test_a_template_version_past_its_range_is_not_found(ch):
    api = templates_pb2_grpc.TemplateServiceStub(ch)
    t = api.CreateTemplate(
        templates_pb2.CreateTemplateRequest(
            template=templates_pb2.Template(display_name="t", channel="sms", text_body="سلام")
        ),
        metadata=MARKETER,
    )
    for version in (2**31, 2**63 - 1):
        code, _ = refused(
            lambda v=version: api.RenderTemplate(
                templates_pb2.RenderTemplateRequest(name=t.name, version=v), metadata=MARKETER
            )
        )
        assert code == grpc.StatusCode.NOT_FOUND
    code, _ = refused(
        lambda: api.GetTemplateVersion(
            templates_pb2.GetTemplateVersionRequest(name=f"{t.name}/versions/{2**40}"), metadata=MARKETER
        )
    )
    assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)  # the name's own check may say it
    assert api.RenderTemplate(templates_pb2.RenderTemplateRequest(name=t.name), metadata=MARKETER).text


def test_a_programme_amount_past_what_the_ledger_holds_is_named(ch):
    api = loyalty_pb2_grpc.LoyaltyServiceStub(ch)
    p = loyalty_pb2.Program(
        display_name="club",
        currency_code="IRR",
        earn_amount=money_pb2.Money(currency_code="IRR", units=2**63 - 1),
        earn_points=1,
    )
    got = refused(lambda: api.CreateProgram(loyalty_pb2.CreateProgramRequest(program=p), metadata=ADMIN))
    assert got == (grpc.StatusCode.INVALID_ARGUMENT, ["program.earn_amount.units"])
