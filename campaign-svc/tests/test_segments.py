"""Segments over gRPC on loopback against a hand-built audience: dynamic filters over projected
fields and behaviour (relative time on a controlled clock), static lists (by hand, CSV import
with unmatched rows), combined include/exclude, membership kept current from customer and sales
events with its events in the outbox, rebuild diffs, the refresh timer, bad filters and etags."""

from __future__ import annotations

import datetime as dt
import io
import time
import uuid
from decimal import Decimal

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2, timestamp_pb2

from campaign_svc import segments as seg
from campaign_svc.segments_tables import segment_members, segments
from campaign_svc.tables import audience
from crm.campaign.v1 import campaign_events_pb2 as ev
from crm.campaign.v1 import segments_pb2 as pb
from crm.campaign.v1 import segments_pb2_grpc
from crm.sales.v1 import sales_events_pb2 as se
from crm.type.v1 import money_pb2
from crm_chassis import timers
from crm_chassis.errors import read_rpc_error
from tests.support.customers import customer, customer_message, merged_message
from tests.support.harness import md

from .conftest import MARKETER, deliver, event_of, events, rt

NOW = dt.datetime(2026, 6, 15, 9, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def stub(ch):
    return segments_pb2_grpc.SegmentServiceStub(ch)


@pytest.fixture(autouse=True)
def clock(svc):
    """The segments' clock, set by each test (relative filters compile against it)."""
    engine = seg.engine(rt(svc))
    state = {"now": NOW}
    engine.clock = lambda: state["now"]
    yield state
    engine.clock = lambda: dt.datetime.now(dt.UTC)


def tag() -> str:
    """A tag of one test's rows: each test's filters see only its own customers."""
    return f"t{uuid.uuid4().hex[:10]}"


def rows(svc, *items: dict) -> list[str]:
    """Audience rows inserted directly (a hand-built set); returns their customer ids."""
    ids = []
    with svc.ctx.engine.begin() as conn:
        for it in items:
            cid = it.pop("customer_id", str(uuid.uuid4()))
            conn.execute(audience.insert().values(customer_id=cid, **it))
            ids.append(cid)
    return ids


def create(stub, kind, name=None, md=MARKETER, **fields) -> pb.Segment:
    msg = pb.Segment(display_name=name or f"seg {uuid.uuid4().hex[:8]}", kind=kind, **fields)
    return stub.CreateSegment(pb.CreateSegmentRequest(segment=msg), metadata=md)


def ready(stub, name: str, seconds: float = 15) -> pb.Segment:
    deadline = time.monotonic() + seconds
    while True:
        s = stub.GetSegment(pb.GetSegmentRequest(name=name), metadata=MARKETER)
        if s.state == pb.SEGMENT_STATE_READY:
            return s
        assert time.monotonic() < deadline, f"{name} still building"
        time.sleep(0.05)


def members(stub, name: str) -> set[str]:
    out, token = set(), ""
    while True:
        r = stub.ListSegmentMembers(
            pb.ListSegmentMembersRequest(parent=name, page_size=2, page_token=token), metadata=MARKETER
        )
        out |= {m.customer.removeprefix("customers/") for m in r.members}
        token = r.next_page_token
        if not token:
            return out


def member_events(svc, name: str) -> list[tuple[str, str, str]]:
    out = []
    for key in (seg.ADDED, seg.REMOVED):
        for e in events(svc, key, subject=name):
            m = e.parse(ev.SegmentMemberEvent)
            out.append(("+" if key == seg.ADDED else "-", m.customer.removeprefix("customers/"), m.cause))
    return out


def error(call, *args, **kw):
    with pytest.raises(grpc.RpcError) as err:
        call(*args, metadata=kw.pop("md", MARKETER), **kw)
    return read_rpc_error(err.value)


def dynamic(stub, text: str, **kw) -> pb.Segment:
    return ready(stub, create(stub, pb.SEGMENT_KIND_DYNAMIC, filter=text, **kw).name)


# -- dynamic filters ------------------------------------------------------------------------
def test_dynamic_filters_select_the_hand_built_rows(svc, stub):
    t = tag()
    ali, sara, reza, mina, gone = rows(
        svc,
        dict(display_name="علی", province="تهران", city="تهران", tags=[t, "vip"], order_count=5, revenue=Decimal("9000000"),
             last_purchase_time=NOW - 10 * DAY, email_consent="granted", kind="end_consumer", birth_date=dt.date(1990, 6, 2),
             acquisition_source="instagram", groups=["g1"]),
        dict(display_name="سارا", province="فارس", city="شیراز", tags=[t], order_count=1, revenue=Decimal("100000"),
             last_purchase_time=NOW - 200 * DAY, complaint_count=2, last_complaint_time=NOW - 3 * DAY, kind="intermediary",
             birth_date=dt.date(1985, 1, 9), acquisition_source="web"),
        dict(display_name="رضا", province="تهران", city="کرج", tags=[t], order_count=0, email_consent="revoked",
             kind="end_consumer", groups=["g2"]),
        dict(display_name="مینا", province="اصفهان", tags=[t, "vip"], order_count=2, last_purchase_time=NOW - 80 * DAY,
             email_consent="granted", kind="end_consumer", birth_date=dt.date(2001, 6, 30)),
        dict(display_name="حذف", province="تهران", tags=[t, "vip"], order_count=9, deleted=True),
    )  # fmt: skip
    cases = {
        'province = "تهران"': {ali, reza},
        "order_count >= 2 AND tags:vip": {ali, mina},
        "last_purchase_time >= now - 90d": {ali, mina},
        "last_purchase_time >= now - 30d OR complaint_count > 0": {ali, sara},
        "last_complaint_time >= this_month": {sara},
        'revenue > 1000000 AND email_consent = "granted"': {ali},
        "kind = intermediary": {sara},
        'NOT email_consent = "granted"': {sara, reza},
        "birth_month = 6": {ali, mina},
        'birth_date < "2000-01-01"': {ali, sara},
        "source = instagram OR groups:g2": {ali, reza},
        'city = "شیر*"': {sara},
        "last_purchase_time = null": {reza},
    }
    for text, want in cases.items():
        s = dynamic(stub, f"tags:{t} AND ({text})")
        assert members(stub, s.name) == want, text
        assert s.member_count == len(want)
        preview = stub.PreviewSegment(
            pb.PreviewSegmentRequest(segment=pb.Segment(kind=pb.SEGMENT_KIND_DYNAMIC, filter=f"tags:{t} AND ({text})")),
            metadata=MARKETER,
        )
        assert (
            preview.member_count == len(want)
            and {m.customer.removeprefix("customers/") for m in preview.members} == want
        )
    assert s.relative_time is False
    assert dynamic(stub, f"tags:{t} AND last_purchase_time >= now - 90d").relative_time


def test_a_text_filter_matches_arabic_and_persian_yeh_and_kaf_alike(svc, stub):
    """Customers typed on an Arabic keyboard (كرج, علي) were missed by a filter typed on a Persian
    one (کرج) and the other way round: the two spellings of the same letters are one value."""
    t = tag()
    persian_, arabic, other = rows(
        svc,
        dict(display_name="علی", city="کرج", tags=[t]),
        dict(display_name="علي", city="كرج", tags=[t]),
        dict(display_name="مینا", city="تهران", tags=[t]),
    )
    for text, want in {
        'city = "کرج"': {persian_, arabic},
        'city = "كرج"': {persian_, arabic},
        'display_name = "علي"': {persian_, arabic},
        'city != "کرج"': {other},
        'display_name = "عل*"': {persian_, arabic},
        'city = "ک*"': {persian_, arabic},
    }.items():
        preview = stub.PreviewSegment(
            pb.PreviewSegmentRequest(segment=pb.Segment(kind=pb.SEGMENT_KIND_DYNAMIC, filter=f"tags:{t} AND {text}")),
            metadata=MARKETER,
        )
        assert {m.customer.removeprefix("customers/") for m in preview.members} == want, text


def test_a_bad_filter_names_segment_filter_with_the_parsers_message(stub):
    for text, says in (
        ("colour = red", "unknown field 'colour'"),
        ("last_purchase_time >= now - 3m", "minutes are 'min'"),
        ("order_count > many", "'order_count' expects an integer"),
        ("(province = x", "unbalanced"),
    ):
        e = error(
            stub.CreateSegment,
            pb.CreateSegmentRequest(segment=pb.Segment(display_name="bad", kind=pb.SEGMENT_KIND_DYNAMIC, filter=text)),
        )
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in e.field_violations] == ["segment.filter"] and says in e.field_violations[0].description
        e = error(
            stub.PreviewSegment, pb.PreviewSegmentRequest(segment=pb.Segment(kind=pb.SEGMENT_KIND_DYNAMIC, filter=text))
        )
        assert e.field_violations[0].field == "segment.filter"
    e = error(
        stub.CreateSegment,
        pb.CreateSegmentRequest(segment=pb.Segment(display_name="", kind=pb.SEGMENT_KIND_STATIC, filter="x = 1")),
    )
    assert {v.field for v in e.field_violations} == {"segment.display_name", "segment.filter"}
    e = error(stub.CreateSegment, pb.CreateSegmentRequest(segment=pb.Segment(display_name="k")))
    assert e.field_violations[0].field == "segment.kind"


# -- membership from events --------------------------------------------------------------------
def irr(units: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="IRR", units=units)


def order(cid: str, at: dt.datetime):
    e = se.OrderEvent(order=f"orders/{uuid.uuid4()}", customer=f"customers/{cid}", total=irr(1000), state="open")
    e.event_time.FromDatetime(at)
    return event_of("sales", "order.placed.v1", e, e.order)


def test_membership_follows_customer_and_sales_events_with_member_events(svc, stub):
    t = tag()
    s = dynamic(stub, f'tags:{t} AND province = "تهران"')
    buyers = dynamic(stub, f"tags:{t} AND order_count >= 1")
    cid = str(uuid.uuid4())
    deliver(svc, customer_message("customer.created.v1", cid=cid, province="فارس", tags=[t]))
    assert members(stub, s.name) == set()
    deliver(svc, customer_message("customer.updated.v1", cid=cid, version=2, province="تهران", tags=[t]))
    assert members(stub, s.name) == {cid}
    deliver(svc, customer_message("customer.updated.v1", cid=cid, version=3, province="گیلان", tags=[t]))
    assert members(stub, s.name) == set()
    assert member_events(svc, s.name) == [("+", cid, "event"), ("-", cid, "event")]
    assert stub.GetSegment(pb.GetSegmentRequest(name=s.name), metadata=MARKETER).member_count == 0
    # a sales event: the buyer enters the buyers' segment
    deliver(svc, order(cid, NOW))
    assert members(stub, buyers.name) == {cid}
    assert member_events(svc, buyers.name) == [("+", cid, "event")]
    got = stub.ListCustomerSegments(pb.ListCustomerSegmentsRequest(customer=f"customers/{cid}"), metadata=MARKETER)
    assert [x.segment for x in got.segments] == [buyers.name]
    # deleted: leaves
    gone = timestamp_pb2.Timestamp(seconds=int(NOW.timestamp()))
    deliver(
        svc, customer_message("customer.deleted.v1", cid=cid, version=4, province="گیلان", tags=[t], delete_time=gone)
    )
    assert members(stub, buyers.name) == set()


def test_combined_segments_include_and_exclude_and_follow_their_parts(svc, stub):
    t = tag()
    a, b, c, d = (str(uuid.uuid4()) for _ in range(4))
    for cid, prov, n in ((a, "تهران", 1), (b, "تهران", 0), (c, "فارس", 1), (d, "فارس", 0)):
        deliver(svc, customer_message("customer.created.v1", cid=cid, province=prov, tags=[t]))
        if n:
            deliver(svc, order(cid, NOW))
    tehran = dynamic(stub, f'tags:{t} AND province = "تهران"')
    buyers = dynamic(stub, f"tags:{t} AND order_count >= 1")
    blocked = create(stub, pb.SEGMENT_KIND_STATIC)
    stub.AddSegmentMembers(
        pb.AddSegmentMembersRequest(segment=blocked.name, customers=[f"customers/{a}"]), metadata=MARKETER
    )
    either = ready(
        stub,
        create(
            stub, pb.SEGMENT_KIND_COMBINED, include_segments=[tehran.name, buyers.name], exclude_segments=[blocked.name]
        ).name,
    )
    both = ready(
        stub, create(stub, pb.SEGMENT_KIND_COMBINED, include_segments=[tehran.name, buyers.name], include_all=True).name
    )
    assert members(stub, either.name) == {b, c}
    assert members(stub, both.name) == {a}
    # a combination of a combination, then d buys: enters buyers, either, and the outer one
    outer = ready(stub, create(stub, pb.SEGMENT_KIND_COMBINED, include_segments=[either.name]).name)
    assert members(stub, outer.name) == {b, c}
    deliver(svc, order(d, NOW))
    assert members(stub, either.name) == {b, c, d} and members(stub, outer.name) == {b, c, d}
    assert ("+", d, "event") in member_events(svc, outer.name)
    # a removal from the excluded list lets a back in (the combinations follow their static part)
    stub.RemoveSegmentMembers(
        pb.RemoveSegmentMembersRequest(segment=blocked.name, customers=[f"customers/{a}"]), metadata=MARKETER
    )
    assert members(stub, either.name) == {a, b, c, d} and members(stub, outer.name) == {a, b, c, d}
    # a rebuild of a combination changes nothing: the incremental state was right
    job = stub.RebuildSegment(pb.RebuildSegmentRequest(name=outer.name), metadata=MARKETER)
    ready(stub, outer.name)
    job = stub.GetSegmentRebuild(pb.GetSegmentRebuildRequest(name=job.name), metadata=MARKETER)
    assert (job.state, job.added, job.removed) == (pb.SEGMENT_REBUILD_STATE_SUCCEEDED, 0, 0)
    # preview of a combination, cycles refused, parts in use cannot be deleted
    p = stub.PreviewSegment(
        pb.PreviewSegmentRequest(
            segment=pb.Segment(
                kind=pb.SEGMENT_KIND_COMBINED, include_segments=[tehran.name], exclude_segments=[buyers.name]
            )
        ),
        metadata=MARKETER,
    )
    assert p.member_count == 1 and p.members[0].customer == f"customers/{b}"
    e = error(
        stub.UpdateSegment,
        pb.UpdateSegmentRequest(
            segment=pb.Segment(name=either.name, include_segments=[outer.name]),
            update_mask=field_mask_pb2.FieldMask(paths=["include_segments"]),
        ),
    )
    assert e.field_violations[0].field == "segment.include_segments" and "cycle" in e.field_violations[0].description
    e = error(stub.DeleteSegment, pb.DeleteSegmentRequest(name=tehran.name))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and either.name in e.message


# -- static lists ---------------------------------------------------------------------------
def test_static_lists_by_hand_and_csv_import_with_unmatched_rows(svc, stub):
    a, b, c = rows(
        svc,
        dict(display_name="الف", email="alef@x.ir", mobile="+989121111111"),
        dict(display_name="ب", email="be@x.ir", phone="+982188888888"),
        dict(display_name="پ", email="pe@x.ir"),
    )
    s = create(stub, pb.SEGMENT_KIND_STATIC)
    r = stub.AddSegmentMembers(
        pb.AddSegmentMembersRequest(segment=s.name, customers=[f"customers/{c}", f"customers/{c}"]), metadata=MARKETER
    )
    assert (r.changed, r.member_count) == (1, 1)
    csv = (
        b"name,email,mobile\n"
        b"x,ALEF@x.ir,\n"  # 2: by e-mail, case-insensitive
        b"y,unknown@x.ir,09121111111\n"  # 3: the same customer by mobile (the e-mail matches nobody)
        b"z,,021 8888 8888\n"  # 4: by landline phone
        b"w,nobody@x.ir,\n"  # 5: nobody
        b"v,,12\n"  # 6: not a phone number
        b",,\n"  # 7: empty
    )
    r = stub.ImportSegmentMembers(pb.ImportSegmentMembersRequest(segment=s.name, content=csv), metadata=MARKETER)
    assert (r.rows, r.matched, r.added, r.unmatched_count, r.member_count) == (6, 3, 2, 3, 3)
    assert [(u.line, u.value, u.reason) for u in r.unmatched] == [
        (5, "nobody@x.ir", "matches no customer"),
        (6, "12", "not a phone number"),
        (7, "", "the row is empty"),
    ]
    assert members(stub, s.name) == {a, b, c}
    assert sorted(member_events(svc, s.name)) == sorted([("+", c, "manual"), ("+", a, "import"), ("+", b, "import")])
    r = stub.RemoveSegmentMembers(
        pb.RemoveSegmentMembersRequest(segment=s.name, customers=[f"customers/{a}"]), metadata=MARKETER
    )
    assert (r.changed, r.member_count) == (1, 2)
    e = error(
        stub.AddSegmentMembers,
        pb.AddSegmentMembersRequest(segment=s.name, customers=[f"customers/{uuid.uuid4()}", "bob"]),
    )
    assert [v.field for v in e.field_violations] == ["customers[1]"]
    e = error(
        stub.AddSegmentMembers, pb.AddSegmentMembersRequest(segment=s.name, customers=[f"customers/{uuid.uuid4()}"])
    )
    assert e.field_violations[0].field == "customers[0]" and "not a known customer" in e.field_violations[0].description
    e = error(stub.ImportSegmentMembers, pb.ImportSegmentMembersRequest(segment=s.name, content=b"colour\nred\n"))
    assert e.field_violations[0].field == "content"
    d = dynamic(stub, "order_count > 1000000")
    e = error(stub.AddSegmentMembers, pb.AddSegmentMembersRequest(segment=d.name, customers=[f"customers/{a}"]))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION


def test_an_import_with_a_nul_in_a_cell_answers_its_rows_not_internal(svc, stub):
    """A NUL byte in an e-mail cell reached PostgreSQL in the match's text array: INTERNAL."""
    (a,) = rows(svc, dict(display_name="نول", email="nul@x.ir"))
    s = create(stub, pb.SEGMENT_KIND_STATIC)
    csv = b"email\nnul@x.ir\x00\nno\x00body@x.ir\n"
    r = stub.ImportSegmentMembers(pb.ImportSegmentMembersRequest(segment=s.name, content=csv), metadata=MARKETER)
    assert (r.rows, r.matched) == (2, 1) and [u.line for u in r.unmatched] == [3]
    assert members(stub, s.name) == {a}


def test_a_merge_moves_static_memberships_to_the_survivor(svc, stub):
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    for cid in (a, b):
        deliver(svc, customer_message("customer.created.v1", cid=cid))
    s1, s2 = create(stub, pb.SEGMENT_KIND_STATIC), create(stub, pb.SEGMENT_KIND_STATIC)
    stub.AddSegmentMembers(
        pb.AddSegmentMembersRequest(segment=s1.name, customers=[f"customers/{a}", f"customers/{b}"]), metadata=MARKETER
    )
    stub.AddSegmentMembers(
        pb.AddSegmentMembersRequest(segment=s2.name, customers=[f"customers/{b}"]), metadata=MARKETER
    )
    deliver(svc, merged_message(customer(a, 2), [b]))
    assert members(stub, s1.name) == {a} and members(stub, s2.name) == {a}
    assert ("-", b, "event") in member_events(svc, s2.name) and ("+", a, "event") in member_events(svc, s2.name)


# -- rebuilds and the clock -----------------------------------------------------------------
def test_a_first_build_publishes_one_built_event_and_later_changes_member_events(svc, stub, monkeypatch):
    """A new segment's members come into being with it: one segment.built.v1 with the count,
    no member events (over several chunks and in the one-step path); a later rebuild or a
    change of a customer publishes member events again."""
    monkeypatch.setenv("SEGMENT_REBUILD_CHUNK", "1000")
    t = tag()
    ids = rows(svc, *(dict(tags=[t], order_count=i % 2) for i in range(2400)))
    chunked = dynamic(stub, f"tags:{t}")  # 2,400 matches: more than a chunk, walked in pages
    small = dynamic(stub, f"tags:{t} AND order_count >= 1")  # 1,200: still more than a chunk
    tiny = dynamic(stub, f'tags:{t} AND customer_id = "{ids[1]}"')  # one step through the indexes
    for s, n in ((chunked, 2400), (small, 1200), (tiny, 1)):
        assert s.member_count == n and member_events(svc, s.name) == []
        built = [e.parse(ev.SegmentBuilt) for e in events(svc, seg.BUILT, subject=s.name)]
        assert [(b.segment, b.member_count, b.cause) for b in built] == [(s.name, n, "create")]
    assert members(stub, tiny.name) == {ids[1]}
    with svc.ctx.engine.begin() as conn:  # behind the hook's back, then a rebuild
        conn.execute(audience.update().where(audience.c.customer_id == ids[1]).values(order_count=0))
    stub.RebuildSegment(pb.RebuildSegmentRequest(name=small.name), metadata=MARKETER)
    ready(stub, small.name)
    assert member_events(svc, small.name) == [("-", ids[1], "rebuild")]
    assert len(events(svc, seg.BUILT, subject=small.name)) == 1


def test_a_first_build_leaves_out_and_counts_the_members_the_hook_added_before_it(svc, stub):
    """The first build is one INSERT without ON CONFLICT (an anti-join leaves out the members
    already there): a member the hook added between the segment's creation and its build is
    neither inserted twice nor counted twice, and keeps its own member event. Segment ids are
    in creation order (migration 0012), so a first build appends at the key's right edge."""
    from crm_chassis import jobs

    t = tag()
    ids = rows(svc, *(dict(tags=[t], order_count=1) for _ in range(3)), dict(tags=[t], order_count=0))
    with svc.ctx.engine.begin() as conn:  # a segment as CreateSegment writes it, its build not started yet
        sid, later = (
            str(conn.execute(
                segments.insert().values(display_name=f"seg {uuid.uuid4().hex[:8]}", kind=seg.DYNAMIC, filter=f)
                .returning(segments.c.id)
            ).scalar_one())
            for f in (f"tags:{t} AND order_count >= 1", f"tags:{t}")
        )  # fmt: skip
    first, second = uuid.UUID(sid), uuid.UUID(later)  # in creation order, to the millisecond
    assert (first.version, second.version) == (7, 7) and first.int >> 80 <= second.int >> 80
    with svc.ctx.engine.begin() as conn:  # a customer event meanwhile: the hook adds its member
        seg.engine(rt(svc)).audience_changed(conn, [ids[0]], "customer")
    assert member_events(svc, f"segments/{sid}") == [("+", ids[0], "event")]
    with svc.ctx.engine.begin() as conn:
        job = jobs.start(conn, seg.REBUILD_KIND, {"segment_id": sid, "cause": "create"})
        conn.execute(segments.update().where(segments.c.id == sid).values(rebuild_job=job.id))
    seg.engine(rt(svc)).worker.wake()
    s = ready(stub, f"segments/{sid}")
    assert members(stub, s.name) == set(ids[:3]) and s.member_count == 3
    built = [e.parse(ev.SegmentBuilt) for e in events(svc, seg.BUILT, subject=s.name)]
    assert [b.member_count for b in built] == [3]
    assert member_events(svc, s.name) == [("+", ids[0], "event")]  # the build's own members: no event
    job = stub.GetSegmentRebuild(pb.GetSegmentRebuildRequest(name=s.latest_rebuild), metadata=MARKETER)
    assert (job.state, job.added, job.removed) == (pb.SEGMENT_REBUILD_STATE_SUCCEEDED, 2, 0)


def test_a_first_build_over_a_big_audience_walks_it_in_chunks(svc, stub, monkeypatch):
    """Above SEGMENT_FIRST_BUILD_ROWS audience rows a first build is chunked like a rebuild (the
    hook waits for one chunk at a time), with the same outcome: the members, their count, one
    segment.built.v1 and no member event."""
    monkeypatch.setenv("SEGMENT_FIRST_BUILD_ROWS", "100")  # the module's audience has thousands
    monkeypatch.setenv("SEGMENT_REBUILD_CHUNK", "1000")

    def one_statement(*args):
        raise AssertionError("the one-statement first build ran")

    monkeypatch.setattr(seg.Segments, "_first_build", one_statement)
    t = tag()
    ids = rows(svc, *(dict(tags=[t], order_count=i % 3) for i in range(2100)))
    s = dynamic(stub, f"tags:{t} AND order_count >= 1")
    want = {c for i, c in enumerate(ids) if i % 3}
    assert members(stub, s.name) == want and s.member_count == len(want) == 1400
    assert member_events(svc, s.name) == []
    built = [e.parse(ev.SegmentBuilt) for e in events(svc, seg.BUILT, subject=s.name)]
    assert [b.member_count for b in built] == [1400]
    job = stub.GetSegmentRebuild(pb.GetSegmentRebuildRequest(name=s.latest_rebuild), metadata=MARKETER)
    assert (job.state, job.added, job.removed) == (pb.SEGMENT_REBUILD_STATE_SUCCEEDED, 1400, 0)


def test_rebuild_applies_exactly_the_difference_with_its_events(svc, stub, monkeypatch):
    monkeypatch.setenv("SEGMENT_REBUILD_CHUNK", "1000")  # several chunks over the module's audience
    t = tag()
    ids = rows(svc, *(dict(tags=[t], order_count=i % 4) for i in range(2500)))
    s = dynamic(stub, f"tags:{t} AND order_count >= 2")
    want = {c for i, c in enumerate(ids) if i % 4 >= 2}
    assert members(stub, s.name) == want
    # change rows behind the hook's back, then rebuild: only the difference moves
    flip_out, flip_in = sorted(want)[:7], sorted(set(ids) - want)[:5]
    with svc.ctx.engine.begin() as conn:
        conn.execute(audience.update().where(audience.c.customer_id.in_(flip_out)).values(order_count=0))
        conn.execute(audience.update().where(audience.c.customer_id.in_(flip_in)).values(order_count=3))
    before = len(member_events(svc, s.name))
    job = stub.RebuildSegment(pb.RebuildSegmentRequest(name=s.name), metadata=MARKETER)
    ready(stub, s.name)
    job = stub.GetSegmentRebuild(pb.GetSegmentRebuildRequest(name=job.name), metadata=MARKETER)
    assert job.state == pb.SEGMENT_REBUILD_STATE_SUCCEEDED and (job.added, job.removed) == (5, 7)
    assert job.processed == job.total > 0 and job.cause == "request"
    after = member_events(svc, s.name)[before:]
    assert sorted(after) == sorted([("+", c, "rebuild") for c in flip_in] + [("-", c, "rebuild") for c in flip_out])
    assert members(stub, s.name) == (want - set(flip_out)) | set(flip_in)
    assert stub.GetSegment(pb.GetSegmentRequest(name=s.name), metadata=MARKETER).member_count == len(want) - 2


def refresh(svc) -> None:
    """Fire the refresh timer now (the service's own worker may take it: wait until it ran)."""
    with svc.ctx.engine.begin() as conn:
        assert timers.get(conn, seg.REFRESH_TIMER, "all").cron == "0 * * * *"
        timers.reschedule(conn, seg.REFRESH_TIMER, "all", dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    deadline = time.monotonic() + 10
    while True:
        rt(svc).timers.run_once()
        with svc.ctx.engine.connect() as conn:
            if timers.get(conn, seg.REFRESH_TIMER, "all").due_at > dt.datetime.now(dt.UTC):
                return
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_relative_segments_drift_with_the_clock_through_the_refresh_timer(svc, stub, clock):
    t = tag()
    recent, r25, old = rows(
        svc,
        dict(tags=[t], last_purchase_time=NOW - 20 * DAY),
        dict(tags=[t], last_purchase_time=NOW - 25 * DAY),
        dict(tags=[t], last_purchase_time=NOW - 40 * DAY),
    )
    active = dynamic(stub, f"tags:{t} AND last_purchase_time >= now - 30d")
    lapsed = dynamic(stub, f"tags:{t} AND last_purchase_time < now - 30d")
    window = dynamic(stub, f"tags:{t} AND last_purchase_time < now - 30d AND last_purchase_time >= now - 60d")
    fixed = dynamic(stub, f'tags:{t} AND last_purchase_time >= "2026-01-01"')
    assert active.relative_time and not fixed.relative_time
    assert (members(stub, active.name), members(stub, lapsed.name), members(stub, window.name)) == (
        {recent, r25},
        {old},
        {old},
    )
    clock["now"] = NOW + 8 * DAY  # recent 28 days ago, r25 33, old 48
    refresh(svc)
    assert (members(stub, active.name), members(stub, lapsed.name), members(stub, window.name)) == (
        {recent},
        {old, r25},
        {old, r25},
    )
    assert member_events(svc, active.name)[-1] == ("-", r25, "rebuild")
    assert member_events(svc, lapsed.name)[-1] == ("+", r25, "rebuild")
    clock["now"] = NOW + 38 * DAY  # recent 58 days ago, r25 63, old 78
    refresh(svc)
    assert (members(stub, active.name), members(stub, lapsed.name), members(stub, window.name)) == (
        set(),
        {recent, r25, old},
        {recent},
    )
    assert members(stub, fixed.name) == {recent, r25, old}
    # no rebuild ran: only the customers whose purchase crossed a bound were looked at
    assert ready(stub, active.name).latest_rebuild == active.latest_rebuild


# -- the resource ---------------------------------------------------------------------------
def test_update_with_etags_list_with_filters_and_delete(svc, stub):
    t = tag()
    (x,) = rows(svc, dict(tags=[t], province="یزد"))
    s = dynamic(stub, f"tags:{t}", name=f"list {t} a")
    assert members(stub, s.name) == {x}
    mask = field_mask_pb2.FieldMask(paths=["filter", "description"])
    upd = stub.UpdateSegment(
        pb.UpdateSegmentRequest(
            segment=pb.Segment(name=s.name, filter=f'tags:{t} AND province = "تهران"', description="d", etag=s.etag),
            update_mask=mask,
        ),
        metadata=MARKETER,
    )
    assert upd.etag != s.etag and upd.filter.endswith('"تهران"')
    assert members(stub, ready(stub, s.name).name) == set()
    e = error(
        stub.UpdateSegment,
        pb.UpdateSegmentRequest(
            segment=pb.Segment(name=s.name, description="e", etag=s.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        ),
    )
    assert e.code == grpc.StatusCode.ABORTED
    e = error(
        stub.UpdateSegment,
        pb.UpdateSegmentRequest(
            segment=pb.Segment(name=s.name, filter="nope = 1"), update_mask=field_mask_pb2.FieldMask(paths=["filter"])
        ),
    )
    assert e.field_violations[0].field == "segment.filter"
    e = error(
        stub.UpdateSegment,
        pb.UpdateSegmentRequest(
            segment=pb.Segment(name=s.name, kind=pb.SEGMENT_KIND_STATIC),
            update_mask=field_mask_pb2.FieldMask(paths=["kind"]),
        ),
    )
    assert e.field_violations[0].field == "update_mask"
    create(stub, pb.SEGMENT_KIND_STATIC, name=f"list {t} b")
    e = error(
        stub.CreateSegment,
        pb.CreateSegmentRequest(segment=pb.Segment(display_name=f"list {t} b", kind=pb.SEGMENT_KIND_STATIC)),
    )
    assert e.code == grpc.StatusCode.ALREADY_EXISTS
    page = stub.ListSegments(
        pb.ListSegmentsRequest(filter=f'display_name = "list {t}*" AND kind = STATIC'), metadata=MARKETER
    )
    assert [x.display_name for x in page.segments] == [f"list {t} b"]
    first = stub.ListSegments(
        pb.ListSegmentsRequest(filter=f'display_name = "list {t}*"', page_size=1), metadata=MARKETER
    )
    second = stub.ListSegments(
        pb.ListSegmentsRequest(filter=f'display_name = "list {t}*"', page_size=1, page_token=first.next_page_token),
        metadata=MARKETER,
    )
    assert [x.display_name for x in [*first.segments, *second.segments]] == [f"list {t} a", f"list {t} b"]
    e = error(stub.ListSegments, pb.ListSegmentsRequest(filter="colour = 1"))
    assert e.field_violations[0].field == "filter"
    e = error(stub.DeleteSegment, pb.DeleteSegmentRequest(name=s.name, etag=s.etag))
    assert e.code == grpc.StatusCode.ABORTED
    stub.DeleteSegment(pb.DeleteSegmentRequest(name=s.name), metadata=MARKETER)
    assert error(stub.GetSegment, pb.GetSegmentRequest(name=s.name)).code == grpc.StatusCode.NOT_FOUND
    with svc.ctx.engine.connect() as conn:
        assert (
            conn.execute(
                sa.select(sa.func.count())
                .select_from(segment_members)
                .join(segments, segments.c.id == segment_members.c.segment_id, isouter=True)
                .where(segments.c.id.is_(None))
            ).scalar()
            == 0
        )
    # permissions: an analyst reads segments, does not write them
    analyst = md("analyst", "ana")
    stub.ListSegments(pb.ListSegmentsRequest(page_size=1), metadata=analyst)
    e = error(
        stub.CreateSegment,
        pb.CreateSegmentRequest(segment=pb.Segment(display_name="n", kind=pb.SEGMENT_KIND_STATIC)),
        md=analyst,
    )
    assert e.code == grpc.StatusCode.PERMISSION_DENIED


def test_a_consent_change_moves_the_customer_and_a_replayed_event_publishes_nothing(svc, stub):
    from campaign_svc import consent

    t = tag()
    cid = str(uuid.uuid4())
    created = customer_message("customer.created.v1", cid=cid, email=f"{t}@x.ir", tags=[t])
    deliver(svc, created)
    s = dynamic(stub, f'tags:{t} AND email_consent = "granted"')
    r = rt(svc)
    with r.uow.begin() as tx:
        consent.record(r, tx, consent.Change("email", f"{t}@x.ir", "granted", "web_form", customer_id=cid))
    assert members(stub, s.name) == {cid}
    with r.uow.begin() as tx:
        consent.record(r, tx, consent.Change("email", f"{t}@x.ir", "revoked", "unsubscribe_link"))
    assert members(stub, s.name) == set()
    deliver(svc, created)  # the same event again: nothing moves, nothing is published
    assert member_events(svc, s.name) == [("+", cid, "event"), ("-", cid, "event")]


def test_a_resumed_rebuild_goes_on_after_its_last_chunk(svc, stub):
    """A rebuild job taken over after a crash starts from its checkpoint (the heap page after
    the last committed chunk): the pages before it are not evaluated again."""
    from crm_chassis import jobs
    from crm_chassis.work_tables import jobs as job_rows

    t = tag()
    ids = rows(svc, *(dict(tags=[t], order_count=0) for _ in range(300)))
    s = dynamic(stub, f"tags:{t} AND order_count >= 1")
    assert members(stub, s.name) == set()
    with svc.ctx.engine.begin() as conn:  # behind the hook's back
        conn.execute(audience.update().where(audience.c.customer_id.in_(ids)).values(order_count=1))
        pages = dict(
            conn.execute(
                sa.select(audience.c.customer_id, sa.text("(ctid::text::point)[0]::int")).where(
                    audience.c.customer_id.in_(ids)
                )
            ).all()
        )
    cut = sorted(set(pages.values()))[len(set(pages.values())) // 2]
    sid = s.name.removeprefix("segments/")
    with svc.ctx.engine.begin() as conn:
        job = jobs.start(conn, seg.REBUILD_KIND, {"segment_id": sid, "cause": "request"})
        conn.execute(job_rows.update().where(job_rows.c.id == job.id).values(checkpoint={"page": cut, "fresh": False}))
        conn.execute(segments.update().where(segments.c.id == sid).values(rebuild_job=job.id))
    seg.engine(rt(svc)).worker.wake()
    ready(stub, s.name)
    after = {c for c, p in pages.items() if p >= cut}
    assert 0 < len(after) < len(ids) and members(stub, s.name) == after


def test_a_big_import_is_set_based_and_its_combinations_follow(svc, stub):
    """3,000 rows of e-mails: matched in one statement, events by COPY, and the combination
    that excludes the list drops exactly those customers."""
    t = tag()
    with svc.ctx.engine.begin() as conn:
        ids = conn.execute(
            sa.text(
                "INSERT INTO audience (customer_id, email, tags) "
                "SELECT gen_random_uuid()::text, :t || '-' || i || '@x.ir', ARRAY[:t] FROM generate_series(1, 3500) i "
                "RETURNING customer_id, email"
            ),
            {"t": t},
        ).all()
    everyone = dynamic(stub, f"tags:{t}")
    listed = create(stub, pb.SEGMENT_KIND_STATIC)
    rest = ready(
        stub,
        create(stub, pb.SEGMENT_KIND_COMBINED, include_segments=[everyone.name], exclude_segments=[listed.name]).name,
    )
    assert rest.member_count == 3500
    csv = "email\n" + "".join(f"{e.upper()}\n" for _, e in ids[:3000]) + "nobody@x.ir\n"
    r = stub.ImportSegmentMembers(
        pb.ImportSegmentMembersRequest(segment=listed.name, content=csv.encode()), metadata=MARKETER
    )
    assert (r.rows, r.matched, r.added, r.unmatched_count) == (3001, 3000, 3000, 1) and r.unmatched[0].line == 3002
    assert members(stub, rest.name) == {c for c, _ in ids[3000:]}
    assert stub.GetSegment(pb.GetSegmentRequest(name=rest.name), metadata=MARKETER).member_count == 500
    assert len(events(svc, seg.REMOVED, subject=rest.name)) == 3000
    assert len(events(svc, seg.ADDED, subject=listed.name)) == 3000


def test_a_csv_uploaded_through_the_gateway_as_multipart_fills_a_static_list(svc, stub):
    from tests.support.harness import gateway_client, token

    (a,) = rows(svc, dict(display_name="ت", email="te@x.ir"))
    s = create(stub, pb.SEGMENT_KIND_STATIC)
    http, clients = gateway_client(campaign=f"127.0.0.1:{svc.port}")
    try:
        resp = http.post(
            f"/v1/{s.name}:importMembers",
            data={"file": (io.BytesIO(b"email\nTE@x.ir\nnobody@x.ir\n"), "list.csv", "text/csv")},
            headers={"Authorization": f"Bearer {token('marketer', 'mina')}"},
            content_type="multipart/form-data",
        )
        assert resp.status_code == 200, resp.get_data(as_text=True)
        body = resp.get_json()
        assert (int(body["matched"]), int(body["unmatchedCount"])) == (1, 1)  # int64 as JSON strings
    finally:
        clients.close()
    assert members(stub, s.name) == {a}
