"""Regressions found by driving the running suite from outside (HTTP through the gateway and
gRPC): each test names what was sent, what came back and what it should be."""

from __future__ import annotations

import csv
import io
import uuid

import grpc
import pytest

from crm.sales.v1 import leads_pb2, leads_pb2_grpc, opportunities_pb2_grpc
from crm.sales.v1 import opportunities_pb2 as pb
from crm.type.v1.date_pb2 import Date
from crm_chassis.errors import read_rpc_error

from .conftest import ADMIN
from .test_opportunities import STANDARD, irr, make_pipeline, make_product, mask, stage_name


@pytest.fixture(scope="module")
def opps(ch):
    return opportunities_pb2_grpc.OpportunityServiceStub(ch)


@pytest.fixture(scope="module")
def leads_stub(ch):
    return leads_pb2_grpc.LeadServiceStub(ch)


@pytest.fixture(scope="module")
def std(svc):
    return make_pipeline(svc, STANDARD)  # the migration's "Standard" stays the default


def _error(call, *args, **kw):
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kw)
    return info.value.code(), read_rpc_error(info.value)


def test_a_stage_that_requires_lines_is_entered_once_the_opportunity_has_lines(svc, opps, std):
    """Sent: an opportunity with two lines, moved to a stage requiring `lines`. Came back:
    FAILED_PRECONDITION STAGE_REQUIREMENTS "requires lines to be set first" (the stage entry
    counted no lines). Should be: the move succeeds; without lines it is still refused."""
    pid, sids = std
    product = make_product(svc)
    made = opps.CreateOpportunity(
        pb.CreateOpportunityRequest(
            opportunity=pb.Opportunity(
                display_name="With lines",
                pipeline=f"pipelines/{pid}",
                contact_name="Sara",
                next_step="call",
                lines=[
                    pb.OpportunityLine(product=f"products/{product}", quantity="2", unit_price=irr(1_000)),
                    pb.OpportunityLine(description="Setup", quantity="1", unit_price=irr(500)),
                ],
                expected_close_date=Date(year=2026, month=12, day=20),
            )
        ),
        metadata=ADMIN,
    )
    moved = opps.MoveOpportunityStage(
        pb.MoveOpportunityStageRequest(name=made.name, stage=stage_name(pid, sids[2])), metadata=ADMIN
    )
    assert moved.stage == stage_name(pid, sids[2]) and len(moved.lines) == 2
    # reopening into it after a loss checks the lines too (the same stage entry)
    lost = opps.LoseOpportunity(pb.LoseOpportunityRequest(name=made.name, reason="price"), metadata=ADMIN)
    back = opps.ReopenOpportunity(
        pb.ReopenOpportunityRequest(name=lost.name, stage=stage_name(pid, sids[2])), metadata=ADMIN
    )
    assert back.state == pb.Opportunity.STATE_OPEN and back.stage == stage_name(pid, sids[2])

    bare = opps.CreateOpportunity(
        pb.CreateOpportunityRequest(
            opportunity=pb.Opportunity(
                display_name="No lines", pipeline=f"pipelines/{pid}", contact_name="Sara", next_step="call"
            )
        ),
        metadata=ADMIN,
    )
    code, err = _error(
        opps.MoveOpportunityStage,
        pb.MoveOpportunityStageRequest(name=bare.name, stage=stage_name(pid, sids[2])),
        metadata=ADMIN,
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and err.metadata["missing_fields"] == "lines"


def test_the_export_writes_a_whole_probability_as_a_plain_number(opps):
    """Sent: a CSV export of a won opportunity. Came back: probability `1E+2`. Should be `100`
    (and `12.5` stays `12.5`)."""
    tag = uuid.uuid4().hex[:8]
    won = opps.CreateOpportunity(
        pb.CreateOpportunityRequest(opportunity=pb.Opportunity(display_name=f"exp-{tag}-won", amount=irr(1_000))),
        metadata=ADMIN,
    )
    opps.WinOpportunity(pb.WinOpportunityRequest(name=won.name), metadata=ADMIN)
    part = opps.CreateOpportunity(
        pb.CreateOpportunityRequest(opportunity=pb.Opportunity(display_name=f"exp-{tag}-part", amount=irr(1_000))),
        metadata=ADMIN,
    )
    opps.UpdateOpportunity(
        pb.UpdateOpportunityRequest(
            opportunity=pb.Opportunity(name=part.name, probability=12.5), update_mask=mask("probability")
        ),
        metadata=ADMIN,
    )
    chunks = opps.ExportOpportunities(
        pb.ExportOpportunitiesRequest(
            format=pb.OPPORTUNITY_EXPORT_FORMAT_CSV,
            filter=f'display_name = "exp-{tag}*"',
            fields=["display_name", "probability"],
        ),
        metadata=ADMIN,
    )
    text = b"".join(c.data for c in chunks).decode("utf-8-sig")
    rows = {r[0]: r[1] for r in list(csv.reader(io.StringIO(text)))[1:]}
    assert rows == {f"exp-{tag}-won": "100", f"exp-{tag}-part": "12.5"}


@pytest.mark.parametrize("number", ["۰۹۱۲", "09123", "912345", "021123"])
def test_a_lead_phone_that_cannot_be_dialled_is_refused(leads_stub, number):
    """Sent: a lead with mobile "۰۹۱۲". Came back: created with mobile "+980912" (any possible
    length passed). Should be: INVALID_ARGUMENT naming lead.mobile (and lead.phone)."""
    for field in ("mobile", "phone"):
        code, err = _error(
            leads_stub.CreateLead,
            leads_pb2.CreateLeadRequest(lead=leads_pb2.Lead(family_name="Short", **{field: number})),
            metadata=ADMIN,
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in err.field_violations] == [f"lead.{field}"]
    made = leads_stub.CreateLead(
        leads_pb2.CreateLeadRequest(
            lead=leads_pb2.Lead(family_name="Whole", mobile="۰۹۱۲ ۳۴۵ ۶۷۸۹", phone="021-88887777")
        ),
        metadata=ADMIN,
    )
    assert made.mobile == "+989123456789" and made.phone == "+982188887777"
