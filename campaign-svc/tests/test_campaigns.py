"""Campaigns end to end on a real SMTP server (aiosmtpd): a segment's members get the personalised
Persian e-mail with its unsubscribe headers, once; consent re-checked at send time; throttling
and the frequency cap; quiet hours; the A/B winner; a provider outage retried without sending
twice; a template that does not render refuses the launch naming the variable; clone; stats
with an attributed payment and ROI; bad input named by field. The service's own timer and
delivery workers are stopped: the tests drive their rounds."""

from __future__ import annotations

import datetime as dt
import uuid

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from campaign_svc import campaigns as cmod
from campaign_svc import consent, delivery
from campaign_svc.__main__ import SPEC
from campaign_svc.tables import audience, audience_invoices, messages
from crm.campaign.v1 import campaign_events_pb2 as ev
from crm.campaign.v1 import campaign_service_pb2 as pb
from crm.campaign.v1 import (
    campaign_service_pb2_grpc,
    segments_pb2,
    segments_pb2_grpc,
    templates_pb2,
    templates_pb2_grpc,
)
from crm.type.v1 import money_pb2
from crm_chassis import dates
from tests.support.harness import channel, start_service
from tests.support.smtp_capture import SmtpCapture

from .conftest import MARKETER, events, rt

HTML = "<p>{{ customer.display_name }} عزیز، پیشنهاد ویژه {{ customer.city | default('شما') }}</p>"


@pytest.fixture(scope="module")
def smtp():
    with SmtpCapture() as s:
        yield s


@pytest.fixture(scope="module")
def svc(databases, broker, smtp):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMTP_PORT", str(smtp.port))
        mp.setenv("SMTP_FROM", "news@crm.test")
        mp.setenv("MAIL_DOMAIN", "crm.test")
        mp.setenv("SMTP_TIMEOUT_SECONDS", "2")
        mp.setenv("PUBLIC_BASE_URL", "https://crm.test")  # RFC 8058 one-click needs https
        service = start_service(SPEC, databases.fresh("test_campaigns"), broker.url, relay=False)
    r = rt(service)
    r.timers.stop()
    r.timers._stopping.clear()
    delivery.worker(r).stop()
    yield service
    service.stop(0)


@pytest.fixture(scope="module")
def stubs(svc):
    with channel(svc) as ch:
        yield (
            campaign_service_pb2_grpc.CampaignServiceStub(ch),
            segments_pb2_grpc.SegmentServiceStub(ch),
            templates_pb2_grpc.TemplateServiceStub(ch),
        )


@pytest.fixture
def sender(svc):
    """The delivery worker, driven here with a clock of our own (the throttle's)."""
    d = delivery.worker(rt(svc))
    d.clock = lambda: 0.0
    d._budget.clear()
    return d


@pytest.fixture(autouse=True)
def clean_desk(svc):
    """What earlier tests left queued or held is cancelled: each test's rounds send its own."""
    with svc.ctx.engine.begin() as conn:
        conn.execute(messages.update().where(messages.c.state.in_(("queued", "held"))).values(state="cancelled"))


def fire_timers(svc) -> None:
    """Every timer due now (campaign.run, campaign.winner) fires; none of them fails."""
    while rt(svc).timers.run_once():
        pass
    with svc.ctx.engine.connect() as conn:
        failed = conn.execute(sa.text("SELECT kind, last_error FROM timers WHERE attempts > 0")).all()
    assert not failed, failed


def people(svc, n: int, **extra) -> list[str]:
    ids = []
    with svc.ctx.engine.begin() as conn:
        for i in range(n):
            cid = str(uuid.uuid4())
            values = {
                "display_name": f"مشتری {i}",
                "email": f"{cid}@example.ir",
                "mobile": f"+98912{i:07d}",
                "city": "شیراز",
            }
            conn.execute(audience.insert().values(customer_id=cid, **{**values, **extra}))
            ids.append(cid)
    return ids


def segment_of(stubs, ids: list[str]) -> str:
    _, seg, _ = stubs
    s = seg.CreateSegment(
        segments_pb2.CreateSegmentRequest(
            segment=segments_pb2.Segment(
                display_name=f"list {uuid.uuid4().hex[:6]}", kind=segments_pb2.SEGMENT_KIND_STATIC
            )
        ),
        metadata=MARKETER,
    )
    seg.AddSegmentMembers(
        segments_pb2.AddSegmentMembersRequest(segment=s.name, customers=[f"customers/{i}" for i in ids]),
        metadata=MARKETER,
    )
    return s.name


def template(stubs, html: str = HTML, subject: str = "{{ customer.display_name }}، جشنواره") -> str:
    _, _, tpl = stubs
    t = tpl.CreateTemplate(
        templates_pb2.CreateTemplateRequest(
            template=templates_pb2.Template(display_name="پاییز", channel="email", subject=subject, html_body=html)
        ),
        metadata=MARKETER,
    )
    return t.name


def campaign(stubs, segment: str, variants: list[pb.Variant], **fields) -> pb.Campaign:
    api, _, _ = stubs
    fields.setdefault("quiet_start_hour", 0)
    fields.setdefault("quiet_end_hour", 0)  # no quiet hours unless a test wants them
    c = pb.Campaign(display_name="جشنواره پاییز", channel="email", segment=segment, variants=variants, **fields)
    return api.CreateCampaign(pb.CreateCampaignRequest(campaign=c), metadata=MARKETER)


def launched(stubs, svc, c: pb.Campaign) -> pb.Campaign:
    api, _, _ = stubs
    api.LaunchCampaign(pb.LaunchCampaignRequest(name=c.name), metadata=MARKETER)
    fire_timers(svc)
    return api.GetCampaign(pb.GetCampaignRequest(name=c.name), metadata=MARKETER)


def rows_of(svc, c: pb.Campaign) -> list:
    cid = c.name.removeprefix("campaigns/")
    with svc.ctx.engine.connect() as conn:
        return conn.execute(
            sa.select(messages).where(messages.c.campaign_id == cid).order_by(messages.c.customer_id)
        ).all()


def code_of(call) -> tuple:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_a_campaign_mails_its_segment_once_with_the_personal_persian_body_and_unsubscribe_headers(
    svc, stubs, smtp, sender
):
    api, _, _ = stubs
    ids = people(svc, 4)
    with svc.ctx.engine.begin() as conn:  # one said no, one has no e-mail
        conn.execute(audience.update().where(audience.c.customer_id == ids[3]).values(email=""))
    with rt(svc).uow.begin() as tx:
        consent.record(rt(svc), tx, consent.Change("email", f"{ids[2]}@example.ir", "revoked", "admin"))
    c = campaign(stubs, segment_of(stubs, ids), [pb.Variant(template=template(stubs))])
    assert c.state == pb.Campaign.STATE_DRAFT and c.variants[0].template_version == 1
    before = len(smtp.messages())
    c = launched(stubs, svc, c)
    assert c.state == pb.Campaign.STATE_RUNNING and c.run == 1
    assert {r.customer_id: r.state for r in rows_of(svc, c)} == {
        ids[0]: "queued",
        ids[1]: "queued",
        ids[2]: "suppressed",
    }
    assert sender.run_once() == 2
    assert sender.run_once() == 0  # nothing twice
    got = smtp.messages()[before:]
    assert sorted(m["To"] for m in got) == sorted(f"{i}@example.ir" for i in ids[:2])
    mail = next(m for m in got if m["To"] == f"{ids[0]}@example.ir")
    html = mail.get_body(("html",)).get_content()
    assert "مشتری 0 عزیز" in html and "شیراز" in html and 'dir="rtl"' in html
    assert "مشتری 0" in str(mail["Subject"])
    unsubscribe = mail["List-Unsubscribe"]
    assert "/v1/unsubscribe/" in unsubscribe and mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    states = {r.customer_id: r for r in rows_of(svc, c)}
    assert states[ids[0]].state == "sent" and states[ids[0]].provider_message_id and states[ids[0]].attempts == 1
    sent = [e for e in events(svc, "message.sent.v1", ev.MessageEvent) if e.campaign == c.name]
    assert sorted(e.customer for e in sent) == sorted(f"customers/{i}" for i in ids[:2])
    done = api.GetCampaign(pb.GetCampaignRequest(name=c.name), metadata=MARKETER)
    assert done.state == pb.Campaign.STATE_COMPLETED
    (completed,) = [e for e in events(svc, "campaign.completed.v1", ev.CampaignEvent) if e.campaign == c.name]
    assert completed.recipients == 3
    (launch,) = [e for e in events(svc, "campaign.launched.v1", ev.CampaignEvent) if e.campaign == c.name]
    assert launch.recipients == 3 and launch.run == 1


def test_an_unsubscribe_after_queueing_is_honoured_at_send_time(svc, stubs, smtp, sender):
    ids = people(svc, 2)
    c = launched(stubs, svc, campaign(stubs, segment_of(stubs, ids), [pb.Variant(template=template(stubs))]))
    with rt(svc).uow.begin() as tx:  # after the run queued it
        consent.record(rt(svc), tx, consent.Change("email", f"{ids[1]}@example.ir", "revoked", "unsubscribe_link"))
    assert sender.run_once() == 2
    states = {r.customer_id: r.state for r in rows_of(svc, c)}
    assert states == {ids[0]: "sent", ids[1]: "suppressed"}
    assert f"{ids[1]}@example.ir" not in [m["To"] for m in smtp.messages()]


def test_throttling_and_the_frequency_cap(svc, stubs, sender, monkeypatch):
    ids = people(svc, 5)
    seg = segment_of(stubs, ids)
    c = launched(stubs, svc, campaign(stubs, seg, [pb.Variant(template=template(stubs))], throttle_per_second=2))
    assert sender.run_once() == 2  # two a second
    assert sender.run_once() == 0  # the same second: no budget left
    sender.clock = lambda: 1.0
    assert sender.run_once() == 2
    sender.clock = lambda: 10.0  # a burst after a pause is still at most one second's worth
    assert sender.run_once() == 1
    assert {r.state for r in rows_of(svc, c)} == {"sent"}
    # each of them got one message this week: with a cap of 1 the next campaign is capped for all
    monkeypatch.setenv("CAMPAIGN_FREQUENCY_CAP", "1")
    capped = launched(stubs, svc, campaign(stubs, seg, [pb.Variant(template=template(stubs))]))
    assert {r.state for r in rows_of(svc, capped)} == {"capped"}
    notice = launched(
        stubs, svc, campaign(stubs, seg, [pb.Variant(template=template(stubs))], ignore_frequency_cap=True)
    )
    assert {r.state for r in rows_of(svc, notice)} == {"queued"}


def test_two_runs_queueing_at_once_are_counted_one_after_the_other_by_the_cap(svc, stubs, monkeypatch):
    """Campaign B's run starts while A's run has queued its messages but not committed: without
    the cap's lock B would count none of A's and both would reach the same people."""
    import threading

    monkeypatch.setenv("CAMPAIGN_FREQUENCY_CAP", "1")
    seg = segment_of(stubs, people(svc, 3))
    first, second = (campaign(stubs, seg, [pb.Variant(template=template(stubs))]) for _ in range(2))

    def row_of(c, conn):
        return conn.execute(sa.select(cmod.campaigns).where(cmod.campaigns.c.id == c.name.split("/")[1])).one()

    got: dict = {}

    def run_second():
        with svc.ctx.engine.begin() as conn:
            got["pid"] = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
            got["counts"] = cmod.enqueue(conn, row_of(second, conn), 1, [], dt.datetime.now(dt.UTC))

    with svc.ctx.engine.begin() as conn:
        assert cmod.enqueue(conn, row_of(first, conn), 1, [], dt.datetime.now(dt.UTC)) == {"queued": 3}
        t = threading.Thread(target=run_second)
        t.start()
        deadline = dt.datetime.now() + dt.timedelta(seconds=20)
        with svc.ctx.engine.connect() as watch:  # B waits on the lock (or, without it, is done)
            while t.is_alive() and dt.datetime.now() < deadline:
                waiting = watch.execute(
                    sa.text("SELECT wait_event FROM pg_stat_activity WHERE pid = :pid"), {"pid": got.get("pid", 0)}
                ).scalar()
                if waiting == "advisory":
                    break
        assert t.is_alive(), "the second run did not wait for the first"
    t.join(20)
    assert got["counts"] == {"capped": 3}
    assert {r.state for r in rows_of(svc, second)} == {"capped"}


def test_the_ab_rest_released_after_the_cap_filled_is_capped(svc, stubs, sender, monkeypatch):
    monkeypatch.setenv("CAMPAIGN_FREQUENCY_CAP", "1")
    seg = segment_of(stubs, people(svc, 20))
    ab = launched(
        stubs,
        svc,
        campaign(
            stubs,
            seg,
            [pb.Variant(key="A", template=template(stubs)), pb.Variant(key="B", template=template(stubs))],
            test_percent=50,
            winner_metric="opens",
            winner_wait_hours=4,
        ),
    )
    held = {r.customer_id for r in rows_of(svc, ab) if r.state == "held"}
    assert held and len(held) < 20
    other = launched(stubs, svc, campaign(stubs, seg, [pb.Variant(template=template(stubs))]))
    # the held ones had no message this week yet: the other campaign reaches them (the rest are capped)
    assert {r.customer_id for r in rows_of(svc, other) if r.state == "queued"} == held
    with svc.ctx.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE timers SET due_at = now(), next_attempt_at = now() WHERE kind = 'campaign.winner'")
        )
    fire_timers(svc)
    assert {r.state for r in rows_of(svc, ab) if r.customer_id in held} == {"capped"}


def test_quiet_hours_hold_messages_until_they_end_in_the_time_zone(svc, stubs, sender):
    with svc.ctx.engine.connect() as conn:

        def until(at: str, start: int, end: int, tz: str = "Asia/Tehran") -> dt.datetime:
            now = dt.datetime.fromisoformat(at)
            return conn.execute(sa.select(cmod.quiet_until(now, tz, start, end))).scalar()

        tehran = dt.timezone(dt.timedelta(hours=3, minutes=30))
        # 23:30 in Tehran (20:00 UTC) with quiet hours 22..8: the next morning at 08:00 Tehran
        assert until("2026-12-01T20:00:00+00:00", 22, 8) == dt.datetime(2026, 12, 2, 8, 0, tzinfo=tehran)
        # 03:00 in Tehran: the same morning
        assert until("2026-11-30T23:30:00+00:00", 22, 8) == dt.datetime(2026, 12, 1, 8, 0, tzinfo=tehran)
        # 12:00 in Tehran is not quiet: now
        assert until("2026-12-01T08:30:00+00:00", 22, 8) == dt.datetime(2026, 12, 1, 8, 30, tzinfo=dt.UTC)
        # a daytime window 13..15 at 14:00
        assert until("2026-12-01T10:30:00+00:00", 13, 15) == dt.datetime(2026, 12, 1, 15, 0, tzinfo=tehran)
    ids = people(svc, 2)
    hour = dt.datetime.now(dt.UTC).hour
    c = launched(  # quiet right now in UTC, for the next two hours
        stubs,
        svc,
        campaign(
            stubs,
            segment_of(stubs, ids),
            [pb.Variant(template=template(stubs))],
            time_zone="UTC",
            quiet_start_hour=hour,
            quiet_end_hour=(hour + 2) % 24,
        ),
    )
    assert sender.run_once() == 0
    rows = rows_of(svc, c)
    assert {r.state for r in rows} == {"queued"}
    assert all(r.not_before > dt.datetime.now(dt.UTC) + dt.timedelta(minutes=55) for r in rows)


def test_quiet_hours_are_read_in_the_recipients_time_zone_from_their_country(svc, stubs, sender):
    """A campaign read in UTC whose quiet hours are the next two hours in Tehran: the customer in
    Iran waits, the one in the US (several zones: the campaign's) and the one with no country
    are sent now. The message keeps the zone it was judged in."""
    tehran_hour = dt.datetime.now(dates.TEHRAN).hour
    iran = people(svc, 1, country="IR")
    elsewhere = people(svc, 1, country="US") + people(svc, 1)
    c = launched(
        stubs,
        svc,
        campaign(
            stubs,
            segment_of(stubs, iran + elsewhere),
            [pb.Variant(template=template(stubs))],
            time_zone="UTC",
            quiet_start_hour=tehran_hour,
            quiet_end_hour=(tehran_hour + 2) % 24,
        ),
    )
    rows = {r.customer_id: r for r in rows_of(svc, c)}
    assert (rows[iran[0]].timezone, rows[elsewhere[0]].timezone, rows[elsewhere[1]].timezone) == (
        "Asia/Tehran",
        "UTC",
        "UTC",
    )
    assert rows[iran[0]].not_before > dt.datetime.now(dt.UTC) + dt.timedelta(minutes=55)
    assert sender.run_once() == 2
    states = {r.customer_id: r.state for r in rows_of(svc, c)}
    assert states[iran[0]] == "queued" and {states[i] for i in elsewhere} == {"sent"}


def test_the_ab_winner_takes_the_held_rest_by_its_metric(svc, stubs, sender):
    api, _, _ = stubs
    ids = people(svc, 40)
    a, b = (
        template(stubs, subject="A {{ customer.display_name }}"),
        template(stubs, subject="B {{ customer.display_name }}"),
    )
    c = campaign(
        stubs,
        segment_of(stubs, ids),
        [pb.Variant(key="A", template=a, weight=1), pb.Variant(key="B", template=b, weight=1)],
        test_percent=50,
        winner_metric="opens",
        winner_wait_hours=4,
    )
    c = launched(stubs, svc, c)
    rows = rows_of(svc, c)
    held = [r for r in rows if r.state == "held"]
    tested = [r for r in rows if r.state == "queued"]
    assert held and tested and len(held) + len(tested) == 40 and {r.variant for r in tested} == {"A", "B"}
    again = [r.variant for r in rows_of(svc, c)]
    assert again == [r.variant for r in rows]  # assigned by hash: the same every time
    sender.run_once()
    cid = c.name.removeprefix("campaigns/")
    with svc.ctx.engine.begin() as conn:  # B's recipients open, A's do not
        conn.execute(
            messages.update()
            .where(messages.c.campaign_id == cid, messages.c.variant == "B", messages.c.state == "sent")
            .values(opened_time=sa.func.now())
        )
        conn.execute(
            sa.text("UPDATE timers SET due_at = now(), next_attempt_at = now() WHERE kind = 'campaign.winner'")
        )
    fire_timers(svc)
    after = rows_of(svc, c)
    assert not [r for r in after if r.state == "held"]
    assert {r.variant for r in after if r.customer_id in {h.customer_id for h in held}} == {"B"}
    assert api.GetCampaign(pb.GetCampaignRequest(name=c.name), metadata=MARKETER).winner_variant == "B"
    stats = api.GetCampaignStats(pb.GetCampaignStatsRequest(name=c.name), metadata=MARKETER)
    by = {v.variant: v for v in stats.variants}
    assert by["B"].opened == by["B"].sent > 0 and by["A"].opened == 0


def test_a_recurring_ab_campaign_sends_its_later_runs_with_the_winner(svc, stubs, sender):
    """The winner is chosen once (after the first run); a later run's rest was held for a winner
    timer that then did nothing (the winner was known): those recipients never got a message."""
    ids = people(svc, 30)
    a, b = (
        template(stubs, subject="A {{ customer.display_name }}"),
        template(stubs, subject="B {{ customer.display_name }}"),
    )
    c = campaign(
        stubs,
        segment_of(stubs, ids),
        [pb.Variant(key="A", template=a), pb.Variant(key="B", template=b)],
        test_percent=50,
        winner_metric="opens",
        winner_wait_hours=1,
        cron="0 3 * * *",
    )
    api = stubs[0]
    api.LaunchCampaign(pb.LaunchCampaignRequest(name=c.name), metadata=MARKETER)
    cid = c.name.removeprefix("campaigns/")

    def due(kind: str) -> None:
        with svc.ctx.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE timers SET due_at = now(), next_attempt_at = now() WHERE kind = :k AND key = :c"),
                {"k": kind, "c": cid},
            )
        fire_timers(svc)

    due(cmod.RUN)  # run 1: half tested, half held for the winner
    assert {r.state for r in rows_of(svc, c)} == {"queued", "held"}
    sender.run_once()
    due(cmod.WINNER)
    winner = api.GetCampaign(pb.GetCampaignRequest(name=c.name), metadata=MARKETER).winner_variant
    assert winner in ("A", "B")
    sender.run_once()
    due(cmod.RUN)  # run 2
    due(cmod.WINNER)
    second = [r for r in rows_of(svc, c) if r.run == 2]
    assert len(second) == 30 and not [r for r in second if r.state == "held"]
    assert {r.variant for r in second} == {winner}


def test_new_variants_of_a_recurring_ab_campaign_are_tested_and_their_winner_sends_the_rest(svc, stubs, sender):
    """The variants changed (paused, new content) after the first winner: the next run tested
    them and held the rest, and the winner timer did nothing (a winner was set): held for ever."""
    ids = people(svc, 30)
    a, b = (
        template(stubs, subject="A {{ customer.display_name }}"),
        template(stubs, subject="B {{ customer.display_name }}"),
    )
    api = stubs[0]
    c = campaign(
        stubs, segment_of(stubs, ids), [pb.Variant(key="A", template=a), pb.Variant(key="B", template=b)],
        test_percent=50, winner_metric="opens", winner_wait_hours=1, cron="0 3 * * *",
    )  # fmt: skip
    api.LaunchCampaign(pb.LaunchCampaignRequest(name=c.name), metadata=MARKETER)
    cid = c.name.removeprefix("campaigns/")

    def due(kind: str) -> None:
        with svc.ctx.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE timers SET due_at = now(), next_attempt_at = now() WHERE kind = :k AND key = :c"),
                {"k": kind, "c": cid},
            )
        fire_timers(svc)

    due(cmod.RUN)
    sender.run_once()
    due(cmod.WINNER)
    c = api.PauseCampaign(pb.PauseCampaignRequest(name=c.name), metadata=MARKETER)
    c = api.UpdateCampaign(
        pb.UpdateCampaignRequest(
            campaign=pb.Campaign(
                name=c.name, etag=c.etag, variants=[pb.Variant(key="C", template=a), pb.Variant(key="D", template=b)]
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["variants"]),
        ),
        metadata=MARKETER,
    )
    api.ResumeCampaign(pb.ResumeCampaignRequest(name=c.name, etag=c.etag), metadata=MARKETER)
    sender.run_once()
    due(cmod.RUN)  # run 2 tests C and D
    assert "held" in {r.state for r in rows_of(svc, c) if r.run == 2}
    due(cmod.WINNER)
    second = [r for r in rows_of(svc, c) if r.run == 2]
    assert not [r for r in second if r.state == "held"] and {r.variant for r in second} <= {"C", "D"}
    assert api.GetCampaign(pb.GetCampaignRequest(name=c.name), metadata=MARKETER).winner_variant in ("C", "D")


def test_a_scheduled_campaign_paused_past_its_start_runs_when_resumed(svc, stubs):
    """Its run came while it was paused (and did nothing); the resume left it 'scheduled' with no
    run to come, for ever."""
    api, _, _ = stubs
    ids = people(svc, 2)
    start = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    c = campaign(stubs, segment_of(stubs, ids), [pb.Variant(template=template(stubs))])
    c = api.UpdateCampaign(
        pb.UpdateCampaignRequest(
            campaign=pb.Campaign(name=c.name, etag=c.etag, start_time=start),
            update_mask=field_mask_pb2.FieldMask(paths=["start_time"]),
        ),
        metadata=MARKETER,
    )
    c = api.LaunchCampaign(pb.LaunchCampaignRequest(name=c.name), metadata=MARKETER)
    assert c.state == pb.Campaign.STATE_SCHEDULED
    c = api.PauseCampaign(pb.PauseCampaignRequest(name=c.name), metadata=MARKETER)
    with svc.ctx.engine.begin() as conn:  # the start time comes while it is paused
        conn.execute(
            sa.text("UPDATE timers SET due_at = now(), next_attempt_at = now() WHERE kind = :k AND key = :c"),
            {"k": cmod.RUN, "c": c.name.removeprefix("campaigns/")},
        )
        conn.execute(
            sa.text("UPDATE campaigns SET start_time = now() - interval '1 minute' WHERE id = :c"),
            {"c": c.name.removeprefix("campaigns/")},
        )
    fire_timers(svc)
    assert rows_of(svc, c) == []
    api.ResumeCampaign(pb.ResumeCampaignRequest(name=c.name), metadata=MARKETER)
    fire_timers(svc)
    after = api.GetCampaign(pb.GetCampaignRequest(name=c.name), metadata=MARKETER)
    assert after.state == pb.Campaign.STATE_RUNNING and after.run == 1
    assert {r.state for r in rows_of(svc, c)} == {"queued"}


def test_a_provider_outage_is_retried_later_and_sent_once(svc, stubs, smtp, sender):
    ids = people(svc, 1)
    c = launched(stubs, svc, campaign(stubs, segment_of(stubs, ids), [pb.Variant(template=template(stubs))]))
    smtp.stop()
    try:
        assert sender.run_once() == 1
        (r,) = rows_of(svc, c)
        assert r.state == "queued" and r.attempts == 1 and r.error and r.not_before > dt.datetime.now(dt.UTC)
        assert sender.run_once() == 0  # its back-off
    finally:
        smtp.start()
    cid = c.name.removeprefix("campaigns/")
    with svc.ctx.engine.begin() as conn:
        conn.execute(messages.update().where(messages.c.campaign_id == cid).values(not_before=sa.func.now()))
    before = len([m for m in smtp.messages() if m["To"] == f"{ids[0]}@example.ir"])
    assert sender.run_once() == 1
    (r,) = rows_of(svc, c)
    assert (r.state, r.attempts) == ("sent", 2)
    assert len([m for m in smtp.messages() if m["To"] == f"{ids[0]}@example.ir"]) == before + 1


def test_a_message_interrupted_while_sending_is_never_resent(svc, stubs, sender):
    ids = people(svc, 1)
    c = launched(stubs, svc, campaign(stubs, segment_of(stubs, ids), [pb.Variant(template=template(stubs))]))
    cid = c.name.removeprefix("campaigns/")
    with svc.ctx.engine.begin() as conn:  # claimed by a process that died before recording
        conn.execute(
            messages.update()
            .where(messages.c.campaign_id == cid)
            .values(state="sending", lease_until=sa.func.now() - sa.text("interval '1 second'"))
        )
    assert sender.run_once() == 0
    (r,) = rows_of(svc, c)
    assert r.state == "failed" and "not resent" in r.error
    (failed,) = [e for e in events(svc, "message.failed.v1", ev.MessageEvent) if e.campaign == c.name]
    assert (failed.customer, failed.state) == (f"customers/{ids[0]}", "failed")  # reports count it


def test_a_slow_round_keeps_its_lease_so_another_workers_sweep_does_not_fail_its_messages(svc, stubs, sender):
    """A round that outlives the 5-minute lease (a slow or timing-out provider, hundreds of
    messages) while another process sweeps: the sweep marked the messages still being sent
    'failed' (interrupted) and their outcome was then dropped: sent mail recorded as failed,
    a provider outage's retries lost. The round renews its lease as it goes."""
    ids = people(svc, 3)
    c = launched(stubs, svc, campaign(stubs, segment_of(stubs, ids), [pb.Variant(template=template(stubs))]))
    other = delivery.Delivery(rt(svc))  # another process's worker: only its sweep runs here
    t = [0.0]
    sender.clock = lambda: t[0]
    real = rt(svc).senders["email"]

    def slow(out):
        step = delivery.LEASE_SECONDS * 0.6  # this message took minutes: the clock moves on
        t[0] += step
        with svc.ctx.engine.begin() as conn:  # ...and so do the leases (their end comes closer)
            conn.execute(
                messages.update()
                .where(messages.c.state == "sending")
                .values(lease_until=messages.c.lease_until - sa.func.make_interval(0, 0, 0, 0, 0, 0, step))
            )
        other._sweep()
        return real(out)

    saved_threads, sender.threads = sender.threads, 1
    rt(svc).senders["email"] = slow
    try:
        assert sender.run_once() == 3
    finally:
        rt(svc).senders["email"] = real
        sender.threads = saved_threads
    rows = rows_of(svc, c)
    assert [r.state for r in rows] == ["sent"] * 3, [(r.state, r.error) for r in rows]


def test_a_template_that_does_not_render_refuses_the_launch_naming_the_variable(svc, stubs):
    api, _, _ = stubs
    ids = people(svc, 1, city="")  # no city, and the template has no fallback for it
    c = campaign(
        stubs, segment_of(stubs, ids), [pb.Variant(template=template(stubs, html="<p>{{ customer.city }}</p>"))]
    )
    code, details = code_of(lambda: api.LaunchCampaign(pb.LaunchCampaignRequest(name=c.name), metadata=MARKETER))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "campaign.variants[0].template" in details and "customer.city" in details
    assert api.GetCampaign(pb.GetCampaignRequest(name=c.name), metadata=MARKETER).state == pb.Campaign.STATE_DRAFT
    assert rows_of(svc, c) == []


def test_clone_stats_attribution_and_roi(svc, stubs, sender):
    api, _, _ = stubs
    ids = people(svc, 2)
    irr = lambda n: money_pb2.Money(currency_code="IRR", units=n)  # noqa: E731
    c = campaign(
        stubs,
        segment_of(stubs, ids),
        [pb.Variant(template=template(stubs))],
        goal_kind="revenue",
        goal_target=irr(10_000_000),
        cost=irr(1_000_000),
    )
    c = launched(stubs, svc, c)
    sender.run_once()
    with svc.ctx.engine.begin() as conn:  # ids[0] pays after the message; ids[1] paid before it
        now = conn.execute(sa.select(sa.func.now())).scalar()
        for cid, paid, amount in (
            (ids[0], now + dt.timedelta(days=2), 4_000_000),
            (ids[1], now - dt.timedelta(days=3), 9_000_000),
        ):
            conn.execute(
                audience_invoices.insert().values(
                    invoice_id=f"inv-{cid}", customer_id=cid, kind="invoice", state="paid", total=amount,
                    paid_total=amount, currency="IRR", paid_time=paid, order_id=f"ord-{cid}", event_time=paid,
                )
            )  # fmt: skip
    stats = api.GetCampaignStats(pb.GetCampaignStatsRequest(name=c.name), metadata=MARKETER)
    assert stats.total.sent == 2 and stats.total.orders == 1
    assert (stats.total.revenue.units, stats.goal_achieved) == (4_000_000, 4_000_000.0)
    assert stats.goal_share == pytest.approx(0.4) and stats.roi == pytest.approx(3.0)
    copy = api.CloneCampaign(pb.CloneCampaignRequest(name=c.name), metadata=MARKETER)
    assert copy.state == pb.Campaign.STATE_DRAFT and copy.cloned_from == c.name and copy.run == 0
    assert (copy.segment, copy.goal_kind, copy.display_name) == (c.segment, "revenue", "جشنواره پاییز (copy)")
    assert [v.template for v in copy.variants] == [v.template for v in c.variants]
    assert copy.goal_target.units == 10_000_000 and copy.cost.units == 0  # the copy's spend is its own


def _paid(conn, cid: str, iid: str, amount: int, when, order: str = "", kind: str = "invoice", credited: str = ""):
    conn.execute(
        audience_invoices.insert().values(
            invoice_id=iid, customer_id=cid, kind=kind, state="paid" if kind == "invoice" else "issued",
            total=amount, paid_total=amount if kind == "invoice" else 0, currency="IRR",
            paid_time=when if kind == "invoice" else None, order_id=order, credited_invoice=credited, event_time=when,
        )
    )  # fmt: skip


def test_attributed_orders_count_orders_not_invoices_without_one(svc, stubs, sender):
    """Two invoices of no order counted as one order (the distinct empty order id) beside the
    real one; first touch already left them out."""
    api, _, _ = stubs
    ids = people(svc, 2)
    c = launched(stubs, svc, campaign(stubs, segment_of(stubs, ids), [pb.Variant(template=template(stubs))]))
    sender.run_once()
    with svc.ctx.engine.begin() as conn:
        later = conn.execute(sa.select(sa.func.now())).scalar() + dt.timedelta(days=1)
        _paid(conn, ids[0], f"o-{ids[0]}", 1_000_000, later, order=f"ord-{ids[0]}")
        _paid(conn, ids[0], f"s-{ids[0]}", 2_000_000, later)  # a service invoice, no order
        _paid(conn, ids[1], f"s-{ids[1]}", 3_000_000, later)
    stats = api.GetCampaignStats(pb.GetCampaignStatsRequest(name=c.name), metadata=MARKETER)
    assert (stats.total.orders, stats.total.revenue.units) == (1, 6_000_000)


def test_a_credit_note_takes_its_amount_off_the_attributed_revenue_and_roi(svc, stubs, sender):
    """A refunded payment still counted whole in the campaign's revenue, goal share and ROI (the
    audience's revenue, and reporting's campaign report, take credit notes off)."""
    api, _, _ = stubs
    ids = people(svc, 1)
    irr = lambda n: money_pb2.Money(currency_code="IRR", units=n)  # noqa: E731
    c = campaign(
        stubs, segment_of(stubs, ids), [pb.Variant(template=template(stubs))], goal_kind="revenue",
        goal_target=irr(10_000_000), cost=irr(1_000_000),
    )  # fmt: skip
    c = launched(stubs, svc, c)
    sender.run_once()
    cid = c.name.removeprefix("campaigns/")
    with svc.ctx.engine.begin() as conn:
        later = conn.execute(sa.select(sa.func.now())).scalar() + dt.timedelta(days=1)
        _paid(conn, ids[0], f"i-{ids[0]}", 4_000_000, later, order=f"ord-{ids[0]}")
        _paid(conn, ids[0], f"cn-{ids[0]}", 1_000_000, later, kind="credit_note", credited=f"i-{ids[0]}")
        conn.execute(  # first touch: the invoice's lead came from the campaign
            audience_invoices.update().where(audience_invoices.c.customer_id == ids[0]).values(campaign_id=cid)
        )
    stats = api.GetCampaignStats(pb.GetCampaignStatsRequest(name=c.name), metadata=MARKETER)
    assert stats.total.revenue.units == 3_000_000 and stats.goal_share == pytest.approx(0.3)
    assert stats.roi == pytest.approx(2.0) and stats.first_touch_revenue.units == 3_000_000


def test_responses_without_a_message_count_toward_a_leads_goal(svc, stubs, sender):
    """A response recorded for the campaign without a message of it (a web form reached by the
    campaign's UTM link, a call) opens a lead in sales-svc all the same, but the goal counted only
    recipients whose message had a response."""
    from crm.campaign.v1 import tracking_pb2, tracking_pb2_grpc

    api, _, _ = stubs
    ids = people(svc, 1)
    c = campaign(
        stubs, segment_of(stubs, ids), [pb.Variant(template=template(stubs))], goal_kind="leads",
        goal_target=money_pb2.Money(currency_code="IRR", units=4),
    )  # fmt: skip
    c = launched(stubs, svc, c)
    sender.run_once()
    with channel(svc) as ch:
        tr = tracking_pb2_grpc.TrackingServiceStub(ch)
        (m,) = api.ListCampaignMessages(pb.ListCampaignMessagesRequest(parent=c.name), metadata=MARKETER).messages
        for r in (
            tracking_pb2.Response(message=m.name, kind="reply", text="بله"),
            tracking_pb2.Response(campaign=c.name, kind="form", email="new1@example.ir"),
            tracking_pb2.Response(campaign=c.name, kind="form", phone="09121112233"),
        ):
            tr.RecordResponse(tracking_pb2.RecordResponseRequest(response=r), metadata=MARKETER)
    stats = api.GetCampaignStats(pb.GetCampaignStatsRequest(name=c.name), metadata=MARKETER)
    assert (stats.leads, stats.goal_achieved, stats.total.responded) == (3, 3.0, 1)
    assert stats.goal_share == pytest.approx(0.75)


def test_an_unsubscribe_from_a_message_counts_in_the_campaigns_stats(svc, stubs, smtp, sender):
    """The stats count recipients who unsubscribed from their message, but nothing ever set a
    message's unsubscribed_time: always 0."""
    from crm.campaign.v1 import consent_pb2, consent_pb2_grpc
    from tests.support.harness import md

    api, _, _ = stubs
    ids = people(svc, 2)
    c = launched(stubs, svc, campaign(stubs, segment_of(stubs, ids), [pb.Variant(template=template(stubs))]))
    sender.run_once()
    mail = next(m for m in smtp.messages() if m["To"] == f"{ids[0]}@example.ir")
    token = mail["List-Unsubscribe"].split("/v1/unsubscribe/", 1)[1].split(">", 1)[0]
    with channel(svc) as ch:
        consent_pb2_grpc.ConsentServiceStub(ch).Unsubscribe(
            consent_pb2.UnsubscribeRequest(token=token, body=b"List-Unsubscribe=One-Click"),
            metadata=md("public_channel", "gateway:public"),
        )
    stats = api.GetCampaignStats(pb.GetCampaignStatsRequest(name=c.name), metadata=MARKETER)
    assert (stats.total.sent, stats.total.unsubscribed) == (2, 1)
    listed = api.ListCampaignMessages(pb.ListCampaignMessagesRequest(parent=c.name), metadata=MARKETER).messages
    assert {m.customer: m.HasField("unsubscribed_time") for m in listed} == {
        f"customers/{ids[0]}": True,
        f"customers/{ids[1]}": False,
    }
    assert {r.customer_id: r.unsubscribed_time is not None for r in rows_of(svc, c)} == {ids[0]: True, ids[1]: False}


def test_every_campaign_event_after_the_launch_carries_the_runs_recipients(svc, stubs, sender):
    """A consumer keeps a campaign's newest event (reporting's report 5): the cost entered after
    the campaign completed, a pause or the winner must not read as 0 recipients (the journey
    found the report lost the entered cost, and with it the figure)."""
    api, _, _ = stubs
    ids = people(svc, 3)
    c = launched(stubs, svc, campaign(stubs, segment_of(stubs, ids), [pb.Variant(template=template(stubs))]))
    irr = money_pb2.Money(currency_code="IRR", units=5_000_000)
    api.UpdateCampaign(
        pb.UpdateCampaignRequest(
            campaign=pb.Campaign(name=c.name, cost=irr, etag=c.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["cost"]),
        ),
        metadata=MARKETER,
    )
    api.PauseCampaign(pb.PauseCampaignRequest(name=c.name), metadata=MARKETER)
    (launch,) = events(svc, "campaign.launched.v1", ev.CampaignEvent, subject=c.name)
    (update,) = events(svc, "campaign.updated.v1", ev.CampaignEvent, subject=c.name)
    (pause,) = events(svc, "campaign.paused.v1", ev.CampaignEvent, subject=c.name)
    assert launch.recipients == update.recipients == pause.recipients == 3
    assert update.cost.units == 5_000_000 and update.version > launch.version
    draft = campaign(stubs, segment_of(stubs, ids), [pb.Variant(template=template(stubs))])
    api.UpdateCampaign(
        pb.UpdateCampaignRequest(
            campaign=pb.Campaign(name=draft.name, display_name="d", etag=draft.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=MARKETER,
    )
    (never_run,) = events(svc, "campaign.updated.v1", ev.CampaignEvent, subject=draft.name)
    assert never_run.recipients == 0


def test_bad_input_is_named_and_state_rules_hold(svc, stubs):
    api, _, _ = stubs
    for c, field in (
        (pb.Campaign(channel="email"), "campaign.display_name"),
        (pb.Campaign(display_name="x", channel="fax"), "campaign.channel"),
        (pb.Campaign(display_name="x", channel="email", segment="nope/1"), "campaign.segment"),
        (pb.Campaign(display_name="x", channel="email", test_percent=150), "campaign.test_percent"),
        (pb.Campaign(display_name="x", channel="email", winner_metric="likes"), "campaign.winner_metric"),
        (pb.Campaign(display_name="x", channel="email", cron="every day"), "campaign.cron"),
        (pb.Campaign(display_name="x", channel="email", time_zone="Mars/Olympus"), "campaign.time_zone"),
        (
            pb.Campaign(display_name="x", channel="email", variants=[pb.Variant(template="bad")]),
            "campaign.variants[0].template",
        ),
    ):
        code, details = code_of(lambda c=c: api.CreateCampaign(pb.CreateCampaignRequest(campaign=c), metadata=MARKETER))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details, (field, details)
    sms_tpl = stubs[2].CreateTemplate(
        templates_pb2.CreateTemplateRequest(
            template=templates_pb2.Template(
                display_name="s", channel="sms", text_body="سلام {{ customer.display_name }}"
            )
        ),
        metadata=MARKETER,
    )
    code, details = code_of(
        lambda: campaign(stubs, "", [pb.Variant(template=sms_tpl.name)])
    )  # an SMS template in an e-mail campaign
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "is for sms" in details
    plain = api.CreateCampaign(
        pb.CreateCampaignRequest(campaign=pb.Campaign(display_name="p", channel="sms")), metadata=MARKETER
    )
    assert (plain.quiet_start_hour, plain.quiet_end_hour, plain.attribution_days) == (22, 8, 30)  # the defaults
    c = campaign(stubs, "", [])
    code, details = code_of(lambda: api.LaunchCampaign(pb.LaunchCampaignRequest(name=c.name), metadata=MARKETER))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "campaign.segment" in details and "campaign.variants" in details
    stale = pb.UpdateCampaignRequest(
        campaign=pb.Campaign(name=c.name, display_name="y", etag='"99"'),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
    )
    assert code_of(lambda: api.UpdateCampaign(stale, metadata=MARKETER))[0] == grpc.StatusCode.ABORTED
    ok = api.UpdateCampaign(
        pb.UpdateCampaignRequest(
            campaign=pb.Campaign(name=c.name, display_name="y", etag=c.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=MARKETER,
    )
    assert ok.display_name == "y" and ok.etag != c.etag
    ids = people(svc, 1)
    sent = launched(stubs, svc, campaign(stubs, segment_of(stubs, ids), [pb.Variant(template=template(stubs))]))
    assert code_of(lambda: api.DeleteCampaign(pb.DeleteCampaignRequest(name=sent.name), metadata=MARKETER))[0] == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    moved = pb.UpdateCampaignRequest(
        campaign=pb.Campaign(name=sent.name, segment=sent.segment),
        update_mask=field_mask_pb2.FieldMask(paths=["segment"]),
    )
    assert code_of(lambda: api.UpdateCampaign(moved, metadata=MARKETER))[0] == grpc.StatusCode.FAILED_PRECONDITION
    cancelled = api.CancelCampaign(pb.CancelCampaignRequest(name=sent.name), metadata=MARKETER)
    assert cancelled.state == pb.Campaign.STATE_CANCELLED and {r.state for r in rows_of(svc, sent)} == {"cancelled"}
    api.DeleteCampaign(pb.DeleteCampaignRequest(name=c.name), metadata=MARKETER)
    assert (
        code_of(lambda: api.GetCampaign(pb.GetCampaignRequest(name=c.name), metadata=MARKETER))[0]
        == grpc.StatusCode.NOT_FOUND
    )
    listed = api.ListCampaigns(pb.ListCampaignsRequest(filter='state = "cancelled"'), metadata=MARKETER)
    assert sent.name in [x.name for x in listed.campaigns]


def test_a_recurring_campaign_in_an_unknown_time_zone_names_the_time_zone(stubs):
    """The cron was checked in the unknown zone too, and ZoneInfoNotFoundError answered INTERNAL."""
    api, _, _ = stubs
    bad = pb.Campaign(display_name="x", channel="email", cron="0 3 * * *", time_zone="Mars/Olympus")
    code, details = code_of(lambda: api.CreateCampaign(pb.CreateCampaignRequest(campaign=bad), metadata=MARKETER))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "campaign.time_zone" in details, details


def test_the_campaign_routes_over_http_through_the_gateway(svc, stubs):
    from tests.support.harness import gateway_client, token

    http, clients = gateway_client(campaign=f"127.0.0.1:{svc.port}")
    auth = {"Authorization": f"Bearer {token('marketer', 'mina')}"}
    ids = people(svc, 1)
    body = {
        "displayName": "HTTP campaign",
        "channel": "email",
        "segment": segment_of(stubs, ids),
        "variants": [{"template": template(stubs)}],
        "quietStartHour": 0,
        "quietEndHour": 0,
    }
    made = http.post("/v1/campaigns", json=body, headers=auth)
    assert made.status_code == 201, made.get_data(as_text=True)
    name = made.get_json()["name"]
    assert made.get_json()["state"] == "STATE_DRAFT" and made.get_json()["variants"][0]["templateVersion"] == 1
    launched_ = http.post(f"/v1/{name}:launch", json={}, headers=auth)
    assert launched_.status_code == 200 and launched_.get_json()["state"] == "STATE_RUNNING"
    fire_timers(svc)
    stats = http.get(f"/v1/{name}/stats", headers=auth)
    assert stats.status_code == 200 and stats.get_json()["total"]["queued"] == "1"
    bad = http.post("/v1/campaigns", json={"channel": "pigeon"}, headers=auth)
    assert bad.status_code == 400 and "campaign.channel" in bad.get_data(as_text=True)
    assert http.get(f"/v1/{name}/stats").status_code == 401  # no token
    clients.close()
