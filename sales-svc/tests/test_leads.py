"""Leads over real gRPC on a fresh database: validation naming fields, idempotent create,
etags, the status flow, duplicates, record-level access (get, list, search, export), the
managed list of disqualification reasons, ConvertLead's mark_converted, and one HTTP route."""

from __future__ import annotations

import csv
import io
import uuid

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from crm.customer.v1 import customer_events_pb2, customer_pb2
from crm.sales.v1 import leads_pb2 as pb
from crm.sales.v1 import leads_pb2_grpc, sales_events_pb2
from crm_chassis.audit import audit_entries
from crm_chassis.errors import read_rpc_error
from crm_chassis.messaging.envelope import new_event
from sales_svc import customer_projection
from sales_svc.leads import mark_converted
from sales_svc.runtime import sales
from sales_svc.tables import leads, product_lines
from tests.support.harness import assert_problem, token

from .conftest import ADMIN, events, make_team, manager, rep


@pytest.fixture(scope="module")
def stub(ch):
    return leads_pb2_grpc.LeadServiceStub(ch)


def fails(call, code: grpc.StatusCode):
    """The error view of a call that must fail with `code`."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return read_rpc_error(info.value)


def fields_of(view) -> list[str]:
    return [v.field for v in view.field_violations]


def new_lead(stub, md=ADMIN, **fields) -> pb.Lead:
    fields.setdefault("family_name", "رضایی")
    return stub.CreateLead(pb.CreateLeadRequest(lead=pb.Lead(**fields)), metadata=md)


def unique_email() -> str:
    return f"u{uuid.uuid4().hex[:10]}@example.ir"


# -- create and validation -----------------------------------------------------------------


def test_create_normalises_and_defaults_the_owner_to_the_caller(svc, stub):
    lead = new_lead(
        stub,
        rep("rep-create"),
        given_name="علی",
        email="  Ali.Rezaei@Example.IR ",
        mobile="۰۹۱۲ ۳۴۵ ۶۷۸۹",
        phone="021-88887777",
        national_id="0499370899",
        source="Exhibition",
        campaign_id="c-1",
        utm_source="google",
        tags=["vip", "vip", " b2b "],
    )
    assert lead.name.startswith("leads/")
    assert lead.email == "ali.rezaei@example.ir"
    assert lead.mobile == "+989123456789" and lead.phone == "+982188887777"
    assert lead.source == "exhibition" and list(lead.tags) == ["vip", "b2b"]
    assert lead.owner == "rep-create" and lead.status == pb.LEAD_STATUS_NEW
    assert lead.etag == '"1"' and lead.HasField("assign_time") and lead.HasField("create_time")
    created = [e for e in events(svc, "lead.created.v1", sales_events_pb2.LeadEvent) if e.lead == lead.name]
    assert len(created) == 1
    ev = created[0]
    assert (ev.status, ev.owner, ev.source, ev.campaign_id, ev.utm_source) == (
        "new",
        "rep-create",
        "exhibition",
        "c-1",
        "google",
    )
    with svc.ctx.engine.connect() as conn:
        entry = conn.execute(sa.select(audit_entries).where(audit_entries.c.resource == lead.name)).one()
    assert entry.action == "create" and entry.actor == "rep-create"
    assert {"email", "mobile", "owner"} <= {c["field"] for c in entry.changes}


def test_bad_values_are_invalid_argument_naming_every_field(stub):
    view = fails(
        lambda: stub.CreateLead(
            pb.CreateLeadRequest(
                lead=pb.Lead(
                    family_name="x",
                    email="not-an-email",
                    mobile="12",
                    national_id="1234567890",
                    source="Bad Key!",
                    team="team-7",
                    product_line="lines/1",
                    website="not a site",
                )
            ),
            metadata=ADMIN,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(fields_of(view)) == {
        "lead.email",
        "lead.mobile",
        "lead.national_id",
        "lead.source",
        "lead.team",
        "lead.product_line",
        "lead.website",
    }
    view = fails(
        lambda: stub.CreateLead(pb.CreateLeadRequest(lead=pb.Lead(city="Tehran")), metadata=ADMIN),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields_of(view) == ["lead.family_name"]


def test_unknown_product_line_or_team_is_invalid_argument_naming_it(svc, stub):
    missing = f"productLines/{uuid.uuid4()}"
    view = fails(lambda: new_lead(stub, product_line=missing), grpc.StatusCode.INVALID_ARGUMENT)
    assert fields_of(view) == ["lead.product_line"]
    view = fails(lambda: new_lead(stub, team=f"teams/{uuid.uuid4()}"), grpc.StatusCode.INVALID_ARGUMENT)
    assert fields_of(view) == ["lead.team"]
    with svc.ctx.engine.begin() as conn:
        pl = conn.execute(product_lines.insert().values(code="erp", name="ERP").returning(product_lines.c.id)).scalar()
    lead = new_lead(stub, product_line=f"productLines/{pl}", website="https://شرکت.ir/fa")
    assert lead.product_line == f"productLines/{pl}"
    listed = stub.ListLeads(pb.ListLeadsRequest(filter=f'product_line = "productLines/{pl}"'), metadata=ADMIN)
    assert [x.name for x in listed.leads] == [lead.name]


def test_create_with_the_same_request_id_returns_the_same_lead_once(svc, stub):
    rid = str(uuid.uuid4())
    email = unique_email()
    req = pb.CreateLeadRequest(lead=pb.Lead(family_name="Karimi", email=email), request_id=rid)
    first = stub.CreateLead(req, metadata=rep("rep-idem"))
    again = stub.CreateLead(req, metadata=rep("rep-idem"))
    assert again.name == first.name and not again.possible_duplicates  # not a duplicate of itself
    rid2 = str(uuid.uuid4())  # no contact details: the INSERT's conflict is the only check
    a = stub.CreateLead(pb.CreateLeadRequest(lead=pb.Lead(family_name="Bare"), request_id=rid2), metadata=ADMIN)
    b = stub.CreateLead(pb.CreateLeadRequest(lead=pb.Lead(family_name="Bare"), request_id=rid2), metadata=ADMIN)
    assert a.name == b.name
    with svc.ctx.engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).where(leads.c.request_id.in_([rid, rid2]))).scalar()
    assert n == 2
    assert len([e for e in events(svc, "lead.created.v1") if e.subject in (first.name, a.name)]) == 2


def test_concurrent_creates_with_one_request_id_make_one_lead(svc, stub):
    from concurrent.futures import ThreadPoolExecutor

    rid = str(uuid.uuid4())
    req = pb.CreateLeadRequest(lead=pb.Lead(family_name="Race", email=unique_email()), request_id=rid)
    with ThreadPoolExecutor(6) as pool:
        names = set(pool.map(lambda _: stub.CreateLead(req, metadata=rep("rep-race")).name, range(6)))
    assert len(names) == 1
    with svc.ctx.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).where(leads.c.request_id == rid)).scalar() == 1
    assert len([e for e in events(svc, "lead.created.v1") if e.subject in names]) == 1


def test_owner_changes_follow_the_assignment_rule(svc, stub):
    fails(lambda: new_lead(stub, rep("rep-a1"), owner="rep-b1"), grpc.StatusCode.PERMISSION_DENIED)
    make_team(svc, "assign-team", "mgr-assign", ["rep-in-team"])
    lead = new_lead(stub, manager("mgr-assign"), owner="rep-in-team")
    assert lead.owner == "rep-in-team"
    fails(lambda: new_lead(stub, manager("mgr-assign"), owner="rep-elsewhere"), grpc.StatusCode.PERMISSION_DENIED)
    mine = new_lead(stub, rep("rep-a1"))
    fails(
        lambda: stub.UpdateLead(
            pb.UpdateLeadRequest(
                lead=pb.Lead(name=mine.name, owner="rep-b1"), update_mask=field_mask_pb2.FieldMask(paths=["owner"])
            ),
            metadata=rep("rep-a1"),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )


# -- update --------------------------------------------------------------------------------


def test_update_with_mask_and_etag_and_a_stale_etag_is_aborted(svc, stub):
    lead = new_lead(stub, rep("rep-upd"), city="Tehran")
    mask = field_mask_pb2.FieldMask(paths=["city", "email"])
    updated = stub.UpdateLead(
        pb.UpdateLeadRequest(
            lead=pb.Lead(name=lead.name, city="اصفهان", email="New@Example.IR", etag=lead.etag), update_mask=mask
        ),
        metadata=rep("rep-upd"),
    )
    assert (updated.city, updated.email, updated.etag) == ("اصفهان", "new@example.ir", '"2"')
    assert updated.family_name == lead.family_name  # not in the mask: kept
    view = fails(
        lambda: stub.UpdateLead(
            pb.UpdateLeadRequest(lead=pb.Lead(name=lead.name, city="Shiraz", etag=lead.etag), update_mask=mask),
            metadata=rep("rep-upd"),
        ),
        grpc.StatusCode.ABORTED,
    )
    assert view.metadata["current_etag"] == '"2"'
    view = fails(
        lambda: stub.UpdateLead(
            pb.UpdateLeadRequest(
                lead=pb.Lead(name=lead.name, status=pb.LEAD_STATUS_QUALIFIED),
                update_mask=field_mask_pb2.FieldMask(paths=["status"]),
            ),
            metadata=rep("rep-upd"),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields_of(view) == ["update_mask"] and "QualifyLead" in view.message
    view = fails(
        lambda: stub.UpdateLead(
            pb.UpdateLeadRequest(lead=pb.Lead(name=lead.name, email="x@"), update_mask=mask), metadata=rep("rep-upd")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields_of(view) == ["lead.email"]
    view = fails(
        lambda: stub.UpdateLead(
            pb.UpdateLeadRequest(
                lead=pb.Lead(name=lead.name), update_mask=field_mask_pb2.FieldMask(paths=["family_name"])
            ),
            metadata=rep("rep-upd"),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields_of(view) == ["lead.family_name"]  # it would have no name left
    ev = [e for e in events(svc, "lead.updated.v1", sales_events_pb2.LeadEvent) if e.lead == lead.name]
    assert [(e.city, e.version) for e in ev] == [("اصفهان", 2)]
    # The search key follows: the new city finds it.
    hits = stub.SearchLeads(pb.SearchLeadsRequest(query="اصفهان"), metadata=rep("rep-upd")).results
    assert lead.name in [h.lead.name for h in hits]


def test_update_star_replaces_every_writable_field(stub):
    lead = new_lead(stub, rep("rep-star"), city="Tehran", email=unique_email(), tags=["a"])
    out = stub.UpdateLead(
        pb.UpdateLeadRequest(
            lead=pb.Lead(name=lead.name, organization_name="Parsian Co", owner="rep-star"),
            update_mask=field_mask_pb2.FieldMask(paths=["*"]),
        ),
        metadata=rep("rep-star"),
    )
    assert (out.organization_name, out.family_name, out.city, out.email, list(out.tags)) == (
        "Parsian Co",
        "",
        "",
        "",
        [],
    )
    view = fails(
        lambda: stub.UpdateLead(
            pb.UpdateLeadRequest(lead=pb.Lead(name=lead.name), update_mask=field_mask_pb2.FieldMask(paths=["*"])),
            metadata=rep("rep-star"),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields_of(view) == ["lead.owner"]  # "*" with an empty owner: a lead always has one


def test_delete_and_undelete(stub):
    lead = new_lead(stub, rep("rep-del"))
    deleted = stub.DeleteLead(pb.DeleteLeadRequest(name=lead.name, etag=lead.etag), metadata=rep("rep-del"))
    assert deleted.HasField("delete_time")
    names = [x.name for x in stub.ListLeads(pb.ListLeadsRequest(), metadata=rep("rep-del")).leads]
    assert lead.name not in names
    shown = stub.ListLeads(pb.ListLeadsRequest(show_deleted=True), metadata=rep("rep-del")).leads
    assert lead.name in [x.name for x in shown]
    fails(
        lambda: stub.QualifyLead(pb.QualifyLeadRequest(name=lead.name), metadata=rep("rep-del")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    back = stub.UndeleteLead(pb.UndeleteLeadRequest(name=lead.name), metadata=rep("rep-del"))
    assert not back.HasField("delete_time")


# -- status flow -----------------------------------------------------------------------------


def test_the_status_flow_and_its_illegal_moves(svc, stub):
    md = rep("rep-flow")
    lead = new_lead(stub, md)
    contacted = stub.MarkLeadContacted(pb.MarkLeadContactedRequest(name=lead.name, etag=lead.etag), metadata=md)
    assert contacted.status == pb.LEAD_STATUS_CONTACTED
    again = stub.MarkLeadContacted(pb.MarkLeadContactedRequest(name=lead.name), metadata=md)
    assert again.etag == contacted.etag  # the same status again: a no-op
    fails(
        lambda: stub.QualifyLead(pb.QualifyLeadRequest(name=lead.name, etag=lead.etag), metadata=md),
        grpc.StatusCode.ABORTED,
    )
    qualified = stub.QualifyLead(pb.QualifyLeadRequest(name=lead.name), metadata=md)
    assert qualified.status == pb.LEAD_STATUS_QUALIFIED
    view = fails(
        lambda: stub.MarkLeadContacted(pb.MarkLeadContactedRequest(name=lead.name), metadata=md),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert view.reason == "LEAD_STATUS_TRANSITION"
    assert (view.metadata["from"], view.metadata["to"]) == ("qualified", "contacted")
    view = fails(
        lambda: stub.ReopenLead(pb.ReopenLeadRequest(name=lead.name), metadata=md), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (view.reason, view.metadata["to"]) == ("LEAD_STATUS_TRANSITION", "new")
    out = stub.DisqualifyLead(pb.DisqualifyLeadRequest(name=lead.name, reason="no_budget"), metadata=md)
    assert (out.status, out.disqualify_reason) == (pb.LEAD_STATUS_DISQUALIFIED, "no_budget")
    view = fails(
        lambda: stub.QualifyLead(pb.QualifyLeadRequest(name=lead.name), metadata=md),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert (view.metadata["from"], view.metadata["to"]) == ("disqualified", "qualified")
    reopened = stub.ReopenLead(pb.ReopenLeadRequest(name=lead.name), metadata=md)
    assert (reopened.status, reopened.disqualify_reason) == (pb.LEAD_STATUS_NEW, "")
    q = [e for e in events(svc, "lead.qualified.v1", sales_events_pb2.LeadEvent) if e.lead == lead.name]
    d = [e for e in events(svc, "lead.disqualified.v1", sales_events_pb2.LeadEvent) if e.lead == lead.name]
    assert [e.status for e in q] == ["qualified"] and [e.disqualify_reason for e in d] == ["no_budget"]
    with svc.ctx.engine.connect() as conn:
        actions = conn.execute(
            sa.select(audit_entries.c.action).where(audit_entries.c.resource == lead.name).order_by(audit_entries.c.id)
        ).scalars()
        assert list(actions) == ["create", "mark_contacted", "qualify", "disqualify", "reopen"]


def test_disqualify_needs_an_existing_active_reason(stub):
    md = rep("rep-dq")
    lead = new_lead(stub, md)
    for reason, why in (("", "required"), ("no_such_reason", "no such"), ("Bad Key!", "not a")):
        view = fails(
            lambda r=reason: stub.DisqualifyLead(pb.DisqualifyLeadRequest(name=lead.name, reason=r), metadata=md),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert fields_of(view) == ["reason"] and why in view.message
    stub.CreateDisqualifyReason(
        pb.CreateDisqualifyReasonRequest(disqualify_reason=pb.DisqualifyReason(key="too_small", title="کوچک")),
        metadata=ADMIN,
    )
    stub.UpdateDisqualifyReason(
        pb.UpdateDisqualifyReasonRequest(
            disqualify_reason=pb.DisqualifyReason(name="disqualifyReasons/too_small", active=False),
            update_mask=field_mask_pb2.FieldMask(paths=["active"]),
        ),
        metadata=ADMIN,
    )
    view = fails(
        lambda: stub.DisqualifyLead(pb.DisqualifyLeadRequest(name=lead.name, reason="too_small"), metadata=md),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "retired" in view.message
    out = stub.DisqualifyLead(pb.DisqualifyLeadRequest(name=lead.name, reason="disqualifyReasons/spam"), metadata=md)
    assert out.disqualify_reason == "spam"


def test_the_managed_list_of_reasons(stub):
    keys = [
        r.key
        for r in stub.ListDisqualifyReasons(pb.ListDisqualifyReasonsRequest(), metadata=rep("r")).disqualify_reasons
    ]
    assert {"no_budget", "no_need", "competitor", "unreachable", "duplicate", "spam"} <= set(keys)
    made = stub.CreateDisqualifyReason(
        pb.CreateDisqualifyReasonRequest(
            disqualify_reason=pb.DisqualifyReason(key="Wrong_Timing", title="زمان نامناسب")
        ),
        metadata=ADMIN,
    )
    assert (made.name, made.key, made.active) == ("disqualifyReasons/wrong_timing", "wrong_timing", True)
    fails(
        lambda: stub.CreateDisqualifyReason(
            pb.CreateDisqualifyReasonRequest(disqualify_reason=pb.DisqualifyReason(key="wrong_timing", title="x")),
            metadata=ADMIN,
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    view = fails(
        lambda: stub.CreateDisqualifyReason(
            pb.CreateDisqualifyReasonRequest(disqualify_reason=pb.DisqualifyReason(key="ok_key")), metadata=ADMIN
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields_of(view) == ["disqualify_reason.title"]
    fails(
        lambda: stub.CreateDisqualifyReason(
            pb.CreateDisqualifyReasonRequest(disqualify_reason=pb.DisqualifyReason(key="k2", title="t")),
            metadata=rep("r"),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    stub.UpdateDisqualifyReason(
        pb.UpdateDisqualifyReasonRequest(
            disqualify_reason=pb.DisqualifyReason(name="disqualifyReasons/wrong_timing", active=False),
            update_mask=field_mask_pb2.FieldMask(paths=["active"]),
        ),
        metadata=ADMIN,
    )
    active = [
        r.key for r in stub.ListDisqualifyReasons(pb.ListDisqualifyReasonsRequest(), metadata=ADMIN).disqualify_reasons
    ]
    every = stub.ListDisqualifyReasons(pb.ListDisqualifyReasonsRequest(show_retired=True), metadata=ADMIN)
    assert "wrong_timing" not in active and "wrong_timing" in [r.key for r in every.disqualify_reasons]
    fails(
        lambda: stub.UpdateDisqualifyReason(
            pb.UpdateDisqualifyReasonRequest(
                disqualify_reason=pb.DisqualifyReason(name="disqualifyReasons/nope", title="x"),
                update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            ),
            metadata=ADMIN,
        ),
        grpc.StatusCode.NOT_FOUND,
    )


def test_mark_converted_sets_the_conversion_once(svc, stub):
    lead = new_lead(stub, rep("rep-conv"))
    s = sales(svc.ctx)
    customer_id, opportunity_id = str(uuid.uuid4()), str(uuid.uuid4())
    with s.uow.begin() as tx:
        out = mark_converted(tx, lead.name.split("/")[1], customer_id, opportunity_id, "converter")
    assert out.status == pb.LEAD_STATUS_CONVERTED
    assert (out.customer, out.opportunity) == (f"customers/{customer_id}", f"opportunities/{opportunity_id}")
    assert out.HasField("convert_time")
    with s.uow.begin() as tx:  # a retried conversion: unchanged, no second event
        again = mark_converted(tx, lead.name.split("/")[1], customer_id, opportunity_id, "converter")
    assert again.etag == out.etag
    conv = [e for e in events(svc, "lead.converted.v1", sales_events_pb2.LeadEvent) if e.lead == lead.name]
    assert [(e.status, e.customer, e.opportunity) for e in conv] == [
        ("converted", f"customers/{customer_id}", f"opportunities/{opportunity_id}")
    ]
    with pytest.raises(Exception) as info, s.uow.begin() as tx:
        mark_converted(tx, lead.name.split("/")[1], str(uuid.uuid4()), None, "converter")
    assert getattr(info.value, "reason", "") == "LEAD_STATUS_TRANSITION"
    view = fails(
        lambda: stub.QualifyLead(pb.QualifyLeadRequest(name=lead.name), metadata=rep("rep-conv")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert view.metadata["from"] == "converted"
    # A disqualified lead does not convert.
    other = new_lead(stub, rep("rep-conv"))
    stub.DisqualifyLead(pb.DisqualifyLeadRequest(name=other.name, reason="spam"), metadata=rep("rep-conv"))
    with pytest.raises(Exception) as info, s.uow.begin() as tx:
        mark_converted(tx, other.name.split("/")[1], customer_id, None, "converter")
    assert getattr(info.value, "reason", "") == "LEAD_STATUS_TRANSITION"


# -- duplicates ------------------------------------------------------------------------------


def _project_customer(svc, **fields) -> str:
    """A customer in customer_refs the way the consumer puts it there: its created event."""
    cid = str(uuid.uuid4())
    c = customer_pb2.Customer(name=f"customers/{cid}", etag='"1"', **fields)
    c.create_time.GetCurrentTime()
    event = new_event(
        domain="customer",
        source_service="customer-svc",
        routing_key="customer.created.v1",
        subject=c.name,
        message=customer_events_pb2.CustomerCreated(customer=c),
    )
    with svc.ctx.engine.begin() as conn:
        customer_projection.on_customer(conn, event)
    return cid


def test_duplicates_against_leads_and_projected_customers(svc, stub):
    email, mobile = unique_email(), "+98912" + str(uuid.uuid4().int)[:7]
    first = new_lead(stub, rep("rep-dup-a"), email=email)
    cid = _project_customer(svc, family_name="Moradi", mobile=mobile, email="Other." + email)
    second = new_lead(stub, rep("rep-dup-b"), email=email.upper(), phone=mobile)
    got = {(d.record, d.matched_field) for d in second.possible_duplicates}
    assert got == {(first.name, "email"), (f"customers/{cid}", "phone")}
    view = fails(
        lambda: stub.CreateLead(
            pb.CreateLeadRequest(lead=pb.Lead(family_name="X", mobile=mobile), reject_duplicates=True), metadata=ADMIN
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert view.reason == "LEAD_DUPLICATE" and view.metadata["field"] == "mobile"
    assert view.metadata["record"] in (second.name, f"customers/{cid}")
    # A deleted lead is no longer a duplicate; the customer still is.
    stub.DeleteLead(pb.DeleteLeadRequest(name=second.name), metadata=rep("rep-dup-b"))
    third = new_lead(stub, ADMIN, mobile=mobile)
    assert [(d.record, d.matched_field) for d in third.possible_duplicates] == [(f"customers/{cid}", "mobile")]
    # The national id, against a customer and a lead.
    nid_customer = _project_customer(svc, family_name="Nadi", national_id="0084575948")
    by_id = new_lead(stub, ADMIN, national_id="۰۰۸۴۵۷۵۹۴۸")
    assert [(d.record, d.matched_field) for d in by_id.possible_duplicates] == [
        (f"customers/{nid_customer}", "national_id")
    ]
    again = new_lead(stub, ADMIN, national_id="0084575948")
    assert {d.record for d in again.possible_duplicates} == {by_id.name, f"customers/{nid_customer}"}


# -- access ----------------------------------------------------------------------------------


def _export(stub, md, **kw) -> list[dict]:
    chunks = list(stub.ExportLeads(pb.ExportLeadsRequest(format=pb.LEAD_EXPORT_FORMAT_CSV, **kw), metadata=md))
    assert chunks[0].content_type.startswith("text/csv") and chunks[0].filename.endswith(".csv")
    text = b"".join(c.data for c in chunks).decode("utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert chunks[0].row_count == len(rows)
    return rows


def test_a_rep_sees_only_own_leads_and_a_manager_their_teams(svc, stub):
    tag = uuid.uuid4().hex[:8]
    team = make_team(svc, f"north-{tag}", f"mgr-{tag}", [f"amir-{tag}"])
    amir = new_lead(stub, rep(f"amir-{tag}"), family_name=f"Zand{tag}", tags=[tag])
    bahar = new_lead(stub, rep(f"bahar-{tag}"), family_name=f"Zand{tag}", tags=[tag])
    boss = new_lead(stub, manager(f"mgr-{tag}"), family_name=f"Zand{tag}", tags=[tag])
    # Owned by someone outside the team but assigned to it: the team's manager sees it.
    teamed = new_lead(stub, ADMIN, owner=f"outsider-{tag}", team=f"teams/{team}", family_name=f"Zand{tag}", tags=[tag])
    flt = f'tags:"{tag}"'

    def visible(md):
        listed = {x.name for x in stub.ListLeads(pb.ListLeadsRequest(filter=flt), metadata=md).leads}
        found = {h.lead.name for h in stub.SearchLeads(pb.SearchLeadsRequest(query=f"zand{tag}"), metadata=md).results}
        exported = {r["Lead"] for r in _export(stub, md, filter=flt, fields=["name", "family_name"])}
        assert listed == found == exported
        return listed

    assert visible(rep(f"amir-{tag}")) == {amir.name}
    assert visible(rep(f"bahar-{tag}")) == {bahar.name}
    assert visible(manager(f"mgr-{tag}")) == {amir.name, boss.name, teamed.name}
    assert visible(ADMIN) == {amir.name, bahar.name, boss.name, teamed.name}
    assert visible(rep(f"outsider-{tag}")) == {teamed.name}
    in_team = stub.ListLeads(pb.ListLeadsRequest(filter=f'team = "teams/{team}"'), metadata=manager(f"mgr-{tag}"))
    assert [x.name for x in in_team.leads] == [teamed.name]
    view = fails(
        lambda: stub.GetLead(pb.GetLeadRequest(name=bahar.name), metadata=rep(f"amir-{tag}")), grpc.StatusCode.NOT_FOUND
    )
    assert view.reason == "LEAD_NOT_FOUND"
    fails(
        lambda: stub.GetLead(pb.GetLeadRequest(name=bahar.name), metadata=manager(f"mgr-{tag}")),
        grpc.StatusCode.NOT_FOUND,
    )
    assert stub.GetLead(pb.GetLeadRequest(name=amir.name), metadata=manager(f"mgr-{tag}")).name == amir.name
    for call in (
        lambda: stub.QualifyLead(pb.QualifyLeadRequest(name=bahar.name), metadata=rep(f"amir-{tag}")),
        lambda: stub.DeleteLead(pb.DeleteLeadRequest(name=bahar.name), metadata=rep(f"amir-{tag}")),
        lambda: stub.UpdateLead(
            pb.UpdateLeadRequest(
                lead=pb.Lead(name=bahar.name, city="x"), update_mask=field_mask_pb2.FieldMask(paths=["city"])
            ),
            metadata=rep(f"amir-{tag}"),
        ),
    ):
        fails(call, grpc.StatusCode.NOT_FOUND)


# -- list, search, export ------------------------------------------------------------------


def test_list_filters_orders_and_pages(stub):
    tag = uuid.uuid4().hex[:8]
    made = [
        new_lead(
            stub,
            ADMIN,
            family_name=f"L{i}",
            tags=[tag],
            campaign_id=f"camp-{tag}",
            utm_medium="email" if i % 2 else "cpc",
        )
        for i in range(5)
    ]
    seen, token = [], ""
    while True:
        page = stub.ListLeads(
            pb.ListLeadsRequest(filter=f'tags:"{tag}"', page_size=2, page_token=token), metadata=ADMIN
        )
        seen += [x.name for x in page.leads]
        token = page.next_page_token
        if not token:
            break
    assert seen == [m.name for m in reversed(made)]  # newest first, each once
    by_name = stub.ListLeads(
        pb.ListLeadsRequest(filter=f'campaign_id = "camp-{tag}" AND utm_medium = "email"', order_by="family_name"),
        metadata=ADMIN,
    ).leads
    assert [x.family_name for x in by_name] == ["L1", "L3"]
    status = stub.ListLeads(pb.ListLeadsRequest(filter=f'tags:"{tag}" AND status = NEW AND score >= 0'), metadata=ADMIN)
    assert len(status.leads) == 5
    for bad, field in (("colour = 1", "filter"), ('team = "x"', "filter"), ("score = abc", "filter")):
        view = fails(
            lambda b=bad: stub.ListLeads(pb.ListLeadsRequest(filter=b), metadata=ADMIN),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert fields_of(view) == [field]
    view = fails(
        lambda: stub.ListLeads(pb.ListLeadsRequest(order_by="national_id"), metadata=ADMIN),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields_of(view) == ["order_by"]
    view = fails(
        lambda: stub.ListLeads(
            pb.ListLeadsRequest(filter=f'tags:"{tag}"', page_token=token or "bogus"), metadata=ADMIN
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields_of(view) == ["page_token"]


def test_search_is_persian_normalised_and_ranked(stub):
    tag = uuid.uuid4().hex[:6]
    whole = new_lead(stub, ADMIN, given_name="علی", family_name=f"كريمي{tag}")  # Arabic kaf and yeh
    prefix = new_lead(stub, ADMIN, organization_name=f"کریمی{tag}زاده")
    hits = stub.SearchLeads(pb.SearchLeadsRequest(query=f"کریمی{tag}"), metadata=ADMIN).results
    assert [h.lead.name for h in hits][:2] == [whole.name, prefix.name]
    assert hits[0].relevance > hits[1].relevance
    # Pages: one hit per page still reaches both, best first.
    p1 = stub.SearchLeads(pb.SearchLeadsRequest(query=f"کریمی{tag}", page_size=1), metadata=ADMIN)
    p2 = stub.SearchLeads(
        pb.SearchLeadsRequest(query=f"کریمی{tag}", page_size=1, page_token=p1.next_page_token), metadata=ADMIN
    )
    assert [p1.results[0].lead.name, p2.results[0].lead.name] == [whole.name, prefix.name]
    typo = new_lead(stub, ADMIN, family_name=f"Rezaei{tag}")
    found = stub.SearchLeads(pb.SearchLeadsRequest(query=f"Rezaie{tag}"), metadata=ADMIN).results
    assert typo.name in [h.lead.name for h in found]
    mobile = new_lead(stub, ADMIN, mobile="09127654" + str(uuid.uuid4().int)[:3])
    by_phone = stub.SearchLeads(pb.SearchLeadsRequest(query=mobile.mobile.replace("+98", "0")), metadata=ADMIN)
    assert mobile.name in [h.lead.name for h in by_phone.results]
    view = fails(
        lambda: stub.SearchLeads(pb.SearchLeadsRequest(query="  "), metadata=ADMIN), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert fields_of(view) == ["query"]


def test_export_formats_and_bad_requests(stub):
    tag = uuid.uuid4().hex[:8]
    new_lead(stub, ADMIN, family_name="صادقی", city="تبریز", tags=[tag])
    rows = _export(stub, ADMIN, filter=f'tags:"{tag}"', language_code="fa")
    assert rows[0]["نام خانوادگی"] == "صادقی" and rows[0]["شهر"] == "تبریز" and rows[0]["وضعیت"] == "new"
    xlsx = list(
        stub.ExportLeads(
            pb.ExportLeadsRequest(format=pb.LEAD_EXPORT_FORMAT_XLSX, filter=f'tags:"{tag}"'), metadata=ADMIN
        )
    )
    assert xlsx[0].filename.endswith(".xlsx") and b"".join(c.data for c in xlsx)[:2] == b"PK"
    for req, field in (
        (pb.ExportLeadsRequest(), "format"),
        (pb.ExportLeadsRequest(format=pb.LEAD_EXPORT_FORMAT_CSV, fields=["password"]), "fields"),
        (pb.ExportLeadsRequest(format=pb.LEAD_EXPORT_FORMAT_CSV, filter="nope = 1"), "filter"),
    ):
        view = fails(lambda r=req: list(stub.ExportLeads(r, metadata=ADMIN)), grpc.StatusCode.INVALID_ARGUMENT)
        assert fields_of(view) == [field]


# -- HTTP ------------------------------------------------------------------------------------


def test_http_create_and_a_bad_field(svc):
    from crm_gateway import create_app
    from crm_gateway.clients import Clients

    app = create_app(Clients({"customer": "127.0.0.1:9", "sales": f"127.0.0.1:{svc.port}", "reporting": "127.0.0.1:9"}))
    http = app.test_client()
    auth = {"Authorization": f"Bearer {token('sales_rep', 'rep-http')}"}
    resp = http.post(
        "/v1/leads",
        json={"familyName": "نوری", "mobile": "09121112233", "source": "web"},
        headers={**auth, "Idempotency-Key": str(uuid.uuid4())},
    )
    assert resp.status_code == 201, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["mobile"] == "+989121112233" and body["owner"] == "rep-http" and body["status"] == "LEAD_STATUS_NEW"
    got = http.get(f"/v1/{body['name']}", headers=auth)
    assert got.status_code == 200 and got.get_json()["name"] == body["name"]
    qualified = http.post(f"/v1/{body['name']}:qualify", json={}, headers=auth)
    assert qualified.status_code == 200 and qualified.get_json()["status"] == "LEAD_STATUS_QUALIFIED"
    assert_problem(http.post("/v1/leads", json={"familyName": "x", "email": "nope"}, headers=auth), 400, "email")
    assert_problem(http.post(f"/v1/{body['name']}:disqualify", json={}, headers=auth), 400, "reason")
    export = http.get("/v1/leads:export?format=LEAD_EXPORT_FORMAT_CSV", headers=auth)
    assert export.status_code == 200 and export.content_type.startswith("text/csv")
