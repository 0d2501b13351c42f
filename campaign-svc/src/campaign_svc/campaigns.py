"""CampaignService (proto/crm/campaign/v1/campaign_service.proto): campaigns, their launch, runs,
A/B winner, clone, stats. The delivery workers (delivery.py) send what a run queues.

A run (timer campaign.run, keyed by the campaign: at launch, at start_time, or on the cron)
queues one message per recipient in ONE statement: the segment's members minus the excluded
segments' members, with their channel address; recipients without consent or suppressed get a
'suppressed' row, over the frequency cap a 'capped' one, the others 'queued' with not_before past
the quiet hours, or 'held' outside the A/B test group until the winner is chosen (timer
campaign.winner). Variants are assigned by a hash of (campaign, customer), so a rerun gives a
customer the same variant.

Settings: CAMPAIGN_FREQUENCY_CAP (messages per customer per 7 days across campaigns, default 3;
0 = no cap), CAMPAIGN_THROTTLE_<CHANNEL> (messages per second when a campaign sets none; 0 =
unlimited).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from decimal import Decimal

import sqlalchemy as sa
from google.protobuf import empty_pb2

from crm.campaign.v1 import campaign_events_pb2 as ev
from crm.campaign.v1 import campaign_service_pb2 as pb
from crm.campaign.v1 import campaign_service_pb2_grpc
from crm_chassis import dates, money, timers
from crm_chassis.columns import UUID
from crm_chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument
from crm_chassis.filtering import FieldType, FilterField, FilterSchema, keyset_page
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import ResourceName, UpdateMask, check_etag, check_request_id, etag

from . import consent
from .runtime import Campaign
from .segments_tables import segment_members
from .tables import audience, audience_invoices, campaign_variants, campaigns, consent_state, messages
from .tracking_tables import responses

CAMPAIGN = ResourceName("campaigns/{campaign_id}")
MESSAGE = ResourceName("campaigns/{campaign_id}/messages/{message_id}")
SEGMENT = ResourceName("segments/{segment_id}")
TEMPLATE = ResourceName("templates/{template_id}")
RUN = "campaign.run"
WINNER = "campaign.winner"
STATES = ("draft", "scheduled", "running", "paused", "completed", "cancelled")
STATE_ENUM = {s: pb.Campaign.State.Value(f"STATE_{s.upper()}") for s in STATES}
METRICS = ("opens", "clicks", "responses", "revenue")
GOALS = ("leads", "orders", "revenue", "responses")
KEY = re.compile(r"[A-Za-z0-9]{1,8}")
NAME_LIMIT = 200
EDITABLE = ("draft", "scheduled", "paused")  # content, audience and schedule may change
SENT = ("sent", "delivered", "bounced")  # states of a message that left
ADDRESS = {"email": audience.c.email, "sms": audience.c.mobile}

c = campaigns.c
m = messages.c


def frequency_cap(env=os.environ) -> int:
    try:
        return max(0, int(env.get("CAMPAIGN_FREQUENCY_CAP", "3")))
    except ValueError:
        return 3


def channel_throttle(channel: str, env=os.environ) -> int:
    try:
        return max(0, int(env.get(f"CAMPAIGN_THROTTLE_{channel.upper()}", "0")))
    except ValueError:
        return 0


# -- conversions ----------------------------------------------------------------------------------
def to_proto(row, variants) -> pb.Campaign:
    out = pb.Campaign(
        name=CAMPAIGN.format(row.id),
        display_name=row.display_name,
        description=row.description,
        channel=row.channel,
        purpose=row.purpose,
        state=STATE_ENUM[row.state],
        segment=SEGMENT.format(row.segment_id) if row.segment_id else "",
        exclude_segments=[SEGMENT.format(i) for i in row.exclude_segment_ids],
        variants=[
            pb.Variant(
                key=v.key, template=TEMPLATE.format(v.template_id), template_version=v.template_version, weight=v.weight
            )
            for v in variants
        ],
        test_percent=row.test_percent,
        winner_metric=row.winner_metric,
        winner_wait_hours=row.winner_wait_hours,
        winner_variant=row.winner_variant,
        cron=row.cron,
        time_zone=row.timezone,
        throttle_per_second=row.throttle_per_second,
        quiet_start_hour=row.quiet_start_hour,
        quiet_end_hour=row.quiet_end_hour,
        ignore_frequency_cap=row.ignore_frequency_cap,
        goal_kind=row.goal_kind,
        goal_target=money.to_money(row.goal_target, row.currency),
        cost=money.to_money(row.cost, row.currency),
        attribution_days=row.attribution_days,
        cloned_from=CAMPAIGN.format(row.cloned_from) if row.cloned_from else "",
        run=row.run,
        owner=row.owner,
        etag=etag(row.version),
    )
    for f in ("start_time", "launch_time", "complete_time", "create_time", "update_time"):
        if getattr(row, f) is not None:
            getattr(out, f).FromDatetime(getattr(row, f))
    return out


def message_to_proto(row) -> pb.CampaignMessage:
    out = pb.CampaignMessage(
        name=MESSAGE.format(row.campaign_id, row.id),
        run=row.run,
        variant=row.variant,
        customer=f"customers/{row.customer_id}",
        address=row.address,
        state=row.state,
        attempts=row.attempts,
        error=row.error,
        provider_message_id=row.provider_message_id,
        bounce_kind=row.bounce_kind,
        open_count=row.open_count,
        click_count=row.click_count,
    )
    for f in (
        "not_before", "sent_time", "opened_time", "clicked_time", "responded_time", "delivered_time", "bounced_time",
        "unsubscribed_time",
    ):  # fmt: skip
        if getattr(row, f) is not None:
            getattr(out, f).FromDatetime(getattr(row, f))
    return out


def event(row, *, recipients: int = 0) -> ev.CampaignEvent:
    e = ev.CampaignEvent(
        campaign=CAMPAIGN.format(row.id),
        display_name=row.display_name,
        channel=row.channel,
        state=row.state,
        segment=SEGMENT.format(row.segment_id) if row.segment_id else "",
        run=row.run,
        recipients=recipients,
        goal_kind=row.goal_kind,
        goal_target=money.to_money(row.goal_target, row.currency),
        cost=money.to_money(row.cost, row.currency),
        cloned_from=CAMPAIGN.format(row.cloned_from) if row.cloned_from else "",
        version=row.version,
    )
    e.event_time.GetCurrentTime()
    return e


def run_recipients(conn: sa.Connection, row) -> int:
    """The messages of the campaign's latest run (0 before its first): the `recipients` of the
    events other than launched and completed, so a consumer keeping the newest state of a
    campaign (reporting) keeps the figure through an update, a pause or the winner."""
    if not row.run:
        return 0
    q = sa.select(sa.func.count()).select_from(messages).where(m.campaign_id == row.id, m.run == row.run)
    return conn.execute(q).scalar()


FILTERS = FilterSchema(
    FilterField("state", c.state, FieldType.ENUM, enum_values={s.upper(): s for s in STATES} | {s: s for s in STATES}),
    FilterField("channel", c.channel),
    FilterField("owner", c.owner),
    FilterField("display_name", c.display_name),
    FilterField("create_time", c.create_time, FieldType.TIMESTAMP),
    FilterField("launch_time", c.launch_time, FieldType.TIMESTAMP),
)
MESSAGE_FILTERS = FilterSchema(
    FilterField("state", m.state),
    FilterField("variant", m.variant),
    FilterField("run", m.run, FieldType.INT),
    FilterField("customer_id", m.customer_id),
)
MASK = UpdateMask(
    [
        "display_name",
        "description",
        "purpose",
        "segment",
        "exclude_segments",
        "variants",
        "test_percent",
        "winner_metric",
        "winner_wait_hours",
        "start_time",
        "cron",
        "time_zone",
        "throttle_per_second",
        "quiet_start_hour",
        "quiet_end_hour",
        "ignore_frequency_cap",
        "goal_kind",
        "goal_target",
        "cost",
        "attribution_days",
    ],
    immutable={"channel": "make a new campaign (or clone this one) for another channel"},
)
ANYTIME = {"display_name", "description", "goal_kind", "goal_target", "cost", "attribution_days"}


class Campaigns:
    def __init__(self, rt: Campaign):
        self.rt = rt
        self.uow = rt.uow
        self.tokens = PageTokens(rt.settings.jwt_secret, "campaigns")

    # -- validation ------------------------------------------------------------------------------
    def _values(
        self, cmp: pb.Campaign, paths, currency: str = "IRR", creating: bool = False
    ) -> tuple[dict, list | None]:
        """Column values of the paths named (all on create), and the variants if named."""
        bad: list[FieldViolation] = []
        v: dict = {}
        variants = None
        p = set(paths)
        if "display_name" in p:
            v["display_name"] = cmp.display_name.strip()
            if not v["display_name"] or len(v["display_name"]) > NAME_LIMIT:
                bad.append(FieldViolation("campaign.display_name", f"is required, at most {NAME_LIMIT} characters"))
        if "description" in p:
            v["description"] = cmp.description.strip()[:2000]
        if "channel" in p:
            v["channel"] = cmp.channel
            if cmp.channel not in consent.CHANNELS:
                bad.append(FieldViolation("campaign.channel", f"must be one of {', '.join(consent.CHANNELS)}"))
        if "purpose" in p:
            v["purpose"] = (cmp.purpose or "marketing").strip().lower()
            if not re.fullmatch(r"[a-z0-9_-]{1,40}", v["purpose"]) or v["purpose"] == consent.ALL:
                bad.append(FieldViolation("campaign.purpose", "must be 1..40 of a-z, 0-9, '_', '-' (not all)"))
        if "segment" in p:
            v["segment_id"] = None
            if cmp.segment:
                try:
                    v["segment_id"] = SEGMENT.parse(cmp.segment, "campaign.segment").segment_id
                except InvalidArgument as e:
                    bad += e.violations
        if "exclude_segments" in p:
            ids = []
            for i, s in enumerate(cmp.exclude_segments):
                try:
                    ids.append(SEGMENT.parse(s, f"campaign.exclude_segments[{i}]").segment_id)
                except InvalidArgument as e:
                    bad += e.violations
            v["exclude_segment_ids"] = sorted(set(ids))
        if "variants" in p:
            variants = []
            keys = set()
            for i, var in enumerate(cmp.variants):
                where = f"campaign.variants[{i}]"
                key = var.key.strip().upper()
                if len(cmp.variants) > 1 and not KEY.fullmatch(key):
                    bad.append(FieldViolation(f"{where}.key", "1..8 letters or digits, one per variant"))
                if key in keys:
                    bad.append(FieldViolation(f"{where}.key", f"{key!r} is used twice"))
                keys.add(key)
                try:
                    tid = TEMPLATE.parse(var.template, f"{where}.template").template_id
                except InvalidArgument as e:
                    bad += e.violations
                    tid = ""
                if var.weight < 0 or var.weight > 1000:
                    bad.append(FieldViolation(f"{where}.weight", "must be 0..1000 (0: 1)"))
                if var.template_version < 0:
                    bad.append(FieldViolation(f"{where}.template_version", "must be 0 (current) or a version"))
                variants.append(
                    {"key": key, "position": i, "template_id": tid, "template_version": var.template_version,
                     "weight": var.weight or 1}
                )  # fmt: skip
            if len(variants) > 8:
                bad.append(FieldViolation("campaign.variants", "at most 8 variants"))
        for f, default in (("quiet_start_hour", 22), ("quiet_end_hour", 8)):
            if f in p and not cmp.HasField(f):
                p.discard(f)
                if creating:
                    v[f] = default
        for f, lo, hi in (
            ("test_percent", 0, 99),
            ("winner_wait_hours", 0, 24 * 30),
            ("throttle_per_second", 0, 100_000),
            ("quiet_start_hour", 0, 23),
            ("quiet_end_hour", 0, 23),
        ):
            if f in p:
                v[f] = getattr(cmp, f)
                if not lo <= v[f] <= hi:
                    bad.append(FieldViolation(f"campaign.{f}", f"must be {lo}..{hi}"))
        if "winner_wait_hours" in p and v.get("winner_wait_hours") == 0:
            v["winner_wait_hours"] = 24
        if "winner_metric" in p:
            v["winner_metric"] = cmp.winner_metric
            if cmp.winner_metric and cmp.winner_metric not in METRICS:
                bad.append(FieldViolation("campaign.winner_metric", f"must be one of {', '.join(METRICS)}"))
        if "start_time" in p:
            v["start_time"] = cmp.start_time.ToDatetime(dt.UTC) if cmp.HasField("start_time") else None
        if "time_zone" in p:
            v["timezone"] = cmp.time_zone or "Asia/Tehran"
            if not dates.is_time_zone(v["timezone"]):
                bad.append(FieldViolation("campaign.time_zone", f"unknown time zone {cmp.time_zone!r}"))
        if "cron" in p:
            v["cron"] = cmp.cron.strip()
            zone = v.get("timezone", "Asia/Tehran")
            if v["cron"] and dates.is_time_zone(zone):  # else the time zone's own violation names it
                try:
                    timers.next_occurrence(v["cron"], zone)
                except ValueError as e:
                    bad.append(FieldViolation("campaign.cron", str(e)))
        if "ignore_frequency_cap" in p:
            v["ignore_frequency_cap"] = cmp.ignore_frequency_cap
        if "goal_kind" in p:
            v["goal_kind"] = cmp.goal_kind
            if cmp.goal_kind and cmp.goal_kind not in GOALS:
                bad.append(FieldViolation("campaign.goal_kind", f"must be one of {', '.join(GOALS)}"))
        for f in ("goal_target", "cost"):
            if f in p:
                amount = Decimal(0)
                if getattr(cmp, f).currency_code:
                    try:
                        amount = money.to_decimal(getattr(cmp, f), f"campaign.{f}", currency)
                    except InvalidArgument as e:
                        bad += e.violations
                if amount < 0:
                    bad.append(FieldViolation(f"campaign.{f}", "may not be negative"))
                v[f] = amount
        if "attribution_days" in p:
            v["attribution_days"] = cmp.attribution_days or 30
            if not 1 <= v["attribution_days"] <= 365:
                bad.append(FieldViolation("campaign.attribution_days", "must be 1..365 (0: 30)"))
        if bad:
            raise InvalidArgument(bad)
        return v, variants

    def _pin(self, conn: sa.Connection, variants: list[dict], channel: str) -> None:
        """Check each variant's template exists and is of the campaign's channel; version 0 is the
        template's current version, pinned now."""
        from . import templates

        uc = templates.use_cases(self.rt)
        for i, var in enumerate(variants):
            where = f"campaign.variants[{i}].template"
            t = uc._row(conn, TEMPLATE.format(var["template_id"]), where)
            if t.channel != channel:
                raise InvalidArgument.field(where, f"the template is for {t.channel}, the campaign sends by {channel}")
            tid, current = t.id, t.current_version
            if var["template_version"] == 0:
                var["template_version"] = current
            elif var["template_version"] > current:
                raise InvalidArgument.field(
                    f"campaign.variants[{i}].template_version", f"the template has {current} versions"
                )
            var["template_id"] = str(tid)

    def _variants(self, conn: sa.Connection, cid) -> list:
        cv = campaign_variants.c
        return conn.execute(sa.select(campaign_variants).where(cv.campaign_id == cid).order_by(cv.position)).all()

    def _write_variants(self, conn: sa.Connection, cid, variants: list[dict]) -> None:
        conn.execute(campaign_variants.delete().where(campaign_variants.c.campaign_id == cid))
        if variants:
            conn.execute(campaign_variants.insert(), [{"campaign_id": cid, **v} for v in variants])

    def _proto(self, conn, row) -> pb.Campaign:
        return to_proto(row, self._variants(conn, row.id))

    # -- CRUD ------------------------------------------------------------------------------------
    def create(self, req: pb.CreateCampaignRequest) -> pb.Campaign:
        cmp = req.campaign
        paths = [*MASK.updatable, "channel"]
        request_id = check_request_id(req.request_id)
        values, variants = self._values(cmp, paths, creating=True)
        principal = current_principal()
        with self.uow.begin() as tx:
            conn = tx.conn
            if request_id:
                seen = conn.execute(sa.select(campaigns).where(c.request_id == request_id)).first()
                if seen is not None:
                    return self._proto(conn, seen)
            self._pin(conn, variants or [], values["channel"])
            row = conn.execute(
                campaigns.insert().values(**values, owner=principal.subject, request_id=request_id).returning(campaigns)
            ).one()
            self._write_variants(conn, row.id, variants or [])
            tx.audit(CAMPAIGN.format(row.id), "create", principal, [])
            tx.publish("campaign.created.v1", event(row), CAMPAIGN.format(row.id))
            return self._proto(conn, row)

    def _locked(self, conn, name: str, field: str = "name"):
        cid = CAMPAIGN.parse(name, field).campaign_id
        row = conn.execute(sa.select(campaigns).where(c.id == cid).with_for_update()).first()
        if row is None:
            raise CAMPAIGN.not_found(cid)
        return row

    def get(self, name: str) -> pb.Campaign:
        cid = CAMPAIGN.parse(name, "name").campaign_id
        with self.uow.read() as conn:
            row = conn.execute(sa.select(campaigns).where(c.id == cid)).first()
            if row is None:
                raise CAMPAIGN.not_found(cid)
            return self._proto(conn, row)

    def list(self, req: pb.ListCampaignsRequest) -> tuple[list[pb.Campaign], str]:
        where = FILTERS.compile(req.filter)
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn,
                sa.select(campaigns).where(where),
                [(c.create_time, True), (c.id, True)],
                self.tokens,
                f"l:{req.filter.strip()}",
                page_size(req.page_size),
                req.page_token,
            )
            cv = campaign_variants.c
            vs: dict = {}
            if rows:
                q = sa.select(campaign_variants).where(cv.campaign_id.in_([r.id for r in rows])).order_by(cv.position)
                for v in conn.execute(q):
                    vs.setdefault(v.campaign_id, []).append(v)
        return [to_proto(r, vs.get(r.id, [])) for r in rows], token

    def update(self, req: pb.UpdateCampaignRequest) -> pb.Campaign:
        paths = MASK.paths(req.update_mask)
        principal = current_principal()
        with self.uow.begin() as tx:
            conn = tx.conn
            row = self._locked(conn, req.campaign.name, "campaign.name")
            check_etag(req.campaign.etag, row.version, req.campaign.name)
            late = [p for p in paths if p not in ANYTIME]
            if late and row.state not in EDITABLE:
                raise FailedPrecondition(
                    f"{', '.join(late)} can be changed only while the campaign is a draft, scheduled or paused "
                    f"(it is {row.state})",
                    reason="CAMPAIGN_NOT_EDITABLE",
                )
            values, variants = self._values(req.campaign, paths, row.currency)
            if variants is not None:
                self._pin(conn, variants, row.channel)
                self._write_variants(conn, row.id, variants)
            row = conn.execute(
                campaigns.update()
                .where(c.id == row.id)
                .values(**values, version=c.version + 1, update_time=sa.func.now())
                .returning(campaigns)
            ).one()
            tx.audit(CAMPAIGN.format(row.id), "update", principal, [])
            tx.publish("campaign.updated.v1", event(row, recipients=run_recipients(conn, row)), CAMPAIGN.format(row.id))
            return self._proto(conn, row)

    def delete(self, req: pb.DeleteCampaignRequest) -> None:
        with self.uow.begin() as tx:
            row = self._locked(tx.conn, req.name)
            check_etag(req.etag, row.version, req.name)
            if row.state != "draft":
                raise FailedPrecondition(
                    f"a {row.state} campaign is not deleted: cancel it (its messages are kept)",
                    reason="CAMPAIGN_NOT_DRAFT",
                )
            tx.conn.execute(campaigns.delete().where(c.id == row.id))
            tx.audit(req.name, "delete", current_principal(), [])
            tx.publish("campaign.deleted.v1", event(row), req.name)

    # -- state changes ---------------------------------------------------------------------------
    def _set_state(self, tx, row, state: str, key: str, **more):
        row = tx.conn.execute(
            campaigns.update()
            .where(c.id == row.id)
            .values(state=state, version=c.version + 1, update_time=sa.func.now(), **more)
            .returning(campaigns)
        ).one()
        tx.audit(CAMPAIGN.format(row.id), state, current_principal(), [])
        if key:
            tx.publish(key, event(row, recipients=run_recipients(tx.conn, row)), CAMPAIGN.format(row.id))
        return row

    def launch(self, req: pb.LaunchCampaignRequest) -> pb.Campaign:
        with self.uow.begin() as tx:
            conn = tx.conn
            row = self._locked(conn, req.name)
            check_etag(req.etag, row.version, req.name)
            if row.state != "draft":
                raise FailedPrecondition(f"the campaign is {row.state}, not a draft", reason="CAMPAIGN_NOT_DRAFT")
            bad = []
            if not row.segment_id:
                bad.append(FieldViolation("campaign.segment", "a campaign needs its audience before launch"))
            variants = self._variants(conn, row.id)
            if not variants:
                bad.append(FieldViolation("campaign.variants", "a campaign needs content before launch"))
            if len(variants) > 1 and row.test_percent and not row.winner_metric:
                bad.append(FieldViolation("campaign.winner_metric", "an A/B test group needs the metric of its winner"))
            if bad:
                raise InvalidArgument(bad)
            from . import delivery

            delivery.check_renders(self.rt, conn, row, variants)  # a broken template names its variable
            now = conn.execute(sa.select(sa.func.now())).scalar()
            if row.cron:
                first = timers.schedule_recurring(conn, RUN, str(row.id), row.cron, timezone=row.timezone)
                state = "scheduled" if first > now else "running"
            else:
                at = row.start_time if row.start_time and row.start_time > now else now
                timers.schedule(conn, RUN, str(row.id), at)
                state = "scheduled" if at > now else "running"
            row = self._set_state(tx, row, state, "", launch_time=now)
            return self._proto(conn, row)

    def pause(self, req: pb.PauseCampaignRequest) -> pb.Campaign:
        with self.uow.begin() as tx:
            row = self._locked(tx.conn, req.name)
            check_etag(req.etag, row.version, req.name)
            if row.state not in ("running", "scheduled"):
                raise FailedPrecondition(f"a {row.state} campaign cannot be paused", reason="CAMPAIGN_NOT_RUNNING")
            return self._proto(tx.conn, self._set_state(tx, row, "paused", "campaign.paused.v1"))

    def resume(self, req: pb.ResumeCampaignRequest) -> pb.Campaign:
        with self.uow.begin() as tx:
            row = self._locked(tx.conn, req.name)
            check_etag(req.etag, row.version, req.name)
            if row.state != "paused":
                raise FailedPrecondition(f"a {row.state} campaign is not paused", reason="CAMPAIGN_NOT_PAUSED")
            state = "running" if row.run else "scheduled"
            if not row.run and not row.cron:  # its one run may have come (and done nothing) while paused
                now = tx.conn.execute(sa.select(sa.func.now())).scalar()
                at = row.start_time if row.start_time and row.start_time > now else now
                timers.schedule(tx.conn, RUN, str(row.id), at)
            return self._proto(tx.conn, self._set_state(tx, row, state, "campaign.resumed.v1"))

    def cancel(self, req: pb.CancelCampaignRequest) -> pb.Campaign:
        with self.uow.begin() as tx:
            conn = tx.conn
            row = self._locked(conn, req.name)
            check_etag(req.etag, row.version, req.name)
            if row.state in ("cancelled", "completed") and not row.cron:
                raise FailedPrecondition(f"the campaign is already {row.state}", reason="CAMPAIGN_ENDED")
            conn.execute(
                messages.update()
                .where(m.campaign_id == row.id, m.state.in_(("queued", "held")))
                .values(state="cancelled")
            )
            timers.cancel_many(conn, [(RUN, str(row.id)), (WINNER, str(row.id))])
            row = self._set_state(tx, row, "cancelled", "campaign.cancelled.v1", complete_time=sa.func.now())
            return self._proto(conn, row)

    def clone(self, req: pb.CloneCampaignRequest) -> pb.Campaign:
        principal = current_principal()
        with self.uow.begin() as tx:
            conn = tx.conn
            src = self._locked(conn, req.name)
            name = (req.display_name or f"{src.display_name} (copy)").strip()[:NAME_LIMIT]
            keep = [
                "description", "channel", "purpose", "segment_id", "exclude_segment_ids", "start_time", "cron",
                "timezone", "goal_kind", "goal_target", "currency", "attribution_days", "test_percent",
                "winner_metric", "winner_wait_hours", "throttle_per_second", "quiet_start_hour", "quiet_end_hour",
                "ignore_frequency_cap",
            ]  # fmt: skip
            row = conn.execute(
                campaigns.insert()
                .values(
                    display_name=name,
                    cloned_from=src.id,
                    owner=principal.subject,
                    **{k: getattr(src, k) for k in keep},
                )
                .returning(campaigns)
            ).one()
            self._write_variants(
                conn,
                row.id,
                [
                    {"key": v.key, "position": v.position, "template_id": v.template_id,
                     "template_version": v.template_version, "weight": v.weight}
                    for v in self._variants(conn, src.id)
                ],
            )  # fmt: skip
            tx.audit(CAMPAIGN.format(row.id), "clone", principal, [])
            tx.publish("campaign.created.v1", event(row), CAMPAIGN.format(row.id))
            return self._proto(conn, row)

    # -- runs ------------------------------------------------------------------------------------
    def run(self, conn: sa.Connection, timer) -> None:
        """campaign.run: queue the next run's messages (the campaign locked; a paused or cancelled
        campaign's run does nothing)."""
        row = conn.execute(sa.select(campaigns).where(c.id == timer.key).with_for_update()).first()
        if row is None or row.state not in ("scheduled", "running"):
            return
        variants = self._variants(conn, row.id)
        now = conn.execute(sa.select(sa.func.now())).scalar()
        run = row.run + 1
        counts = enqueue(conn, row, run, variants, now)
        queued = sum(counts.values())
        with self.uow.joined(conn) as tx:
            row = conn.execute(
                campaigns.update()
                .where(c.id == row.id)
                .values(run=run, state="running", version=c.version + 1, update_time=sa.func.now())
                .returning(campaigns)
            ).one()
            tx.publish("campaign.launched.v1", event(row, recipients=queued), CAMPAIGN.format(row.id))
        if len(variants) > 1 and row.test_percent and counts.get("held"):
            timers.schedule(conn, WINNER, str(row.id), now + dt.timedelta(hours=row.winner_wait_hours))

    def choose_winner(self, conn: sa.Connection, timer) -> None:
        """campaign.winner: the variant with the best rate of the metric among its sent messages
        wins (ties: the first variant); the held messages get it and are queued."""
        row = conn.execute(sa.select(campaigns).where(c.id == timer.key).with_for_update()).first()
        if row is None or row.state in ("cancelled",):
            return
        variants = [v.key for v in self._variants(conn, row.id)]
        known = row.winner_variant in variants  # chosen before; not when the variants changed since
        if known:
            best = row.winner_variant
        else:
            rates = variant_rates(conn, row)
            best = max(variants, key=lambda k: (rates.get(k, 0.0), -variants.index(k))) if variants else ""
        # the held rest are queued, but for those whom other campaigns took to the cap meanwhile
        capped = over_cap(conn, row, m.customer_id, conn.execute(sa.select(sa.func.now())).scalar())
        conn.execute(
            messages.update()
            .where(m.campaign_id == row.id, m.state == "held")
            .values(
                state=sa.case((capped, sa.literal("capped")), else_=sa.literal("queued")),
                variant=best,
                not_before=sa.func.greatest(m.not_before, sa.func.now()),
            )
        )
        if known:
            return
        with self.uow.joined(conn) as tx:
            row = conn.execute(
                campaigns.update()
                .where(c.id == row.id)
                .values(winner_variant=best, version=c.version + 1, update_time=sa.func.now())
                .returning(campaigns)
            ).one()
            tx.publish(
                "campaign.winner_chosen.v1", event(row, recipients=run_recipients(conn, row)), CAMPAIGN.format(row.id)
            )

    # -- reading ---------------------------------------------------------------------------------
    def stats(self, name: str) -> pb.CampaignStats:
        cid = CAMPAIGN.parse(name, "name").campaign_id
        with self.uow.read() as conn:
            row = conn.execute(sa.select(campaigns).where(c.id == cid)).first()
            if row is None:
                raise CAMPAIGN.not_found(cid)
            return campaign_stats(conn, row)

    def messages(self, req: pb.ListCampaignMessagesRequest) -> tuple[list[pb.CampaignMessage], str]:
        cid = CAMPAIGN.parse(req.parent, "parent").campaign_id
        where = sa.and_(m.campaign_id == cid, MESSAGE_FILTERS.compile(req.filter))
        with self.uow.read() as conn:
            if conn.execute(sa.select(c.id).where(c.id == cid)).first() is None:
                raise CAMPAIGN.not_found(cid)
            rows, token = keyset_page(
                conn,
                sa.select(messages).where(where),
                [(m.queued_time, False), (m.id, False)],
                self.tokens,
                f"m:{cid}:{req.filter.strip()}",
                page_size(req.page_size),
                req.page_token,
            )
        return [message_to_proto(r) for r in rows], token


# -- set-based SQL ----------------------------------------------------------------------------------
def _address(channel: str, customer_id) -> sa.ColumnElement:
    """The customer's address on the channel: their e-mail or mobile, or the chat id their
    consent of the bot (consent_state) records."""
    if channel in ADDRESS:
        return ADDRESS[channel]
    cs = consent_state.c
    return sa.func.coalesce(
        sa.select(cs.address)
        .where(cs.channel == channel, cs.customer_id == customer_id, cs.status != "revoked")
        .order_by(cs.update_time.desc())
        .limit(1)
        .scalar_subquery(),
        "",
    )


def _bucket(campaign_id, customer_id) -> sa.ColumnElement:
    """0..99, stable per (campaign, customer). The hash is widened first: abs() of integer's
    smallest value (-2^31) is out of range, and it would fail the whole run."""
    return sa.func.abs(sa.cast(sa.func.hashtext(sa.cast(campaign_id, sa.Text) + customer_id), sa.BigInteger)) % 100


def _variant_case(variants, bucket, scale: int) -> sa.ColumnElement:
    """The variant key of a bucket in 0..scale-1, by cumulative weights."""
    if len(variants) == 1:
        return sa.literal(variants[0].key)
    total = sum(v.weight for v in variants) or 1
    edges, acc = [], 0
    for v in variants:
        acc += v.weight
        edges.append((bucket < sa.literal(acc * scale / total), v.key))
    return sa.case(*[(cond, sa.literal(key)) for cond, key in edges[:-1]], else_=sa.literal(variants[-1].key))


def quiet_until(now, tz: str | sa.ColumnElement, start: int, end: int) -> sa.ColumnElement:
    """SQL: the end of the quiet hours if `now` falls in them in time zone `tz` (a zone name, or
    a column holding one per row: the recipient's; hours start..end, wrapping past midnight
    when start > end), else `now`."""
    if start == end:
        return sa.literal(now)
    local = sa.func.timezone(tz, sa.literal(now))
    hour = sa.extract("hour", local)
    day = sa.func.date_trunc("day", local)
    end_today = day + sa.func.make_interval(0, 0, 0, 0, end)
    if start > end:  # e.g. 22..8
        quiet = sa.or_(hour >= start, hour < end)
        until_local = sa.case((hour >= start, end_today + sa.text("interval '1 day'")), else_=end_today)
    else:  # e.g. 13..15
        quiet = sa.and_(hour >= start, hour < end)
        until_local = end_today
    return sa.case((quiet, sa.func.timezone(tz, until_local)), else_=sa.literal(now))


_CAP_LOCK = sa.func.hashtextextended(sa.literal("campaign.frequency_cap"), 0)


def over_cap(conn: sa.Connection, row, customer_id: sa.ColumnElement, now: dt.datetime) -> sa.ColumnElement:
    """SQL: the customer `customer_id` (a column) has had the week's CAMPAIGN_FREQUENCY_CAP of
    messages (queued, sending or sent) across campaigns; false when the cap is off or the
    campaign ignores it. Where the cap applies, the caller's transaction first takes the cap's
    lock, so two runs queueing at once are counted one after the other: the second statement
    (read committed: a snapshot of its own) sees the first's messages, and nobody gets one
    over the cap because two campaigns launched together."""
    cap = frequency_cap()
    if not cap or row.ignore_frequency_cap:
        return sa.false()
    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_CAP_LOCK)))
    p = messages.alias("p")
    recent = (
        sa.select(sa.func.count())
        .where(
            p.c.customer_id == customer_id,
            p.c.state.in_(("queued", "sending", *SENT)),
            p.c.queued_time > sa.literal(now) - sa.text("interval '7 days'"),
        )
        .scalar_subquery()
    )
    return recent >= cap


def enqueue(conn: sa.Connection, row, run: int, variants, now: dt.datetime) -> dict[str, int]:
    """One run's messages in one INSERT ... SELECT; returns the count per state."""
    a = audience.c
    members = segment_members.c
    address = _address(row.channel, a.customer_id)
    excluded = segment_members.alias("x")
    bucket = _bucket(sa.literal(str(row.id)), a.customer_id)
    # once a winner is chosen (after the first run of a recurring campaign), every later run
    # sends it to everyone: nobody is held for a winner timer that would choose nothing
    winner = row.winner_variant if row.winner_variant in {v.key for v in variants} else ""
    ab = len(variants) > 1 and row.test_percent > 0 and not winner
    if not variants:
        variant = sa.literal("")
    elif winner:
        variant = sa.literal(winner)
    elif ab:
        variant = sa.case(
            (bucket < row.test_percent, _variant_case(variants, bucket, row.test_percent)), else_=sa.literal("")
        )
    else:
        variant = _variant_case(variants, bucket, 100)
    # The recipient's time zone: their country's when the country tells it (crm_chassis.dates
    # .country_zones), else the campaign's. Quiet hours are read in it, now and at delivery.
    zones = sa.values(sa.column("country", sa.Text), sa.column("zone", sa.Text), name="country_zones").data(
        sorted(dates.country_zones().items())
    )
    timezone = sa.func.coalesce(zones.c.zone, sa.literal(row.timezone, sa.Text))
    capped = over_cap(conn, row, a.customer_id, now)
    sendable = consent.sendable(row.channel, row.purpose, address)
    state = sa.case(
        (~sendable, sa.literal("suppressed")),
        (capped, sa.literal("capped")),
        (sa.literal(ab) & (bucket >= row.test_percent), sa.literal("held")),
        else_=sa.literal("queued"),
    )
    source = (
        sa.select(
            sa.literal(str(row.id), UUID).label("campaign_id"),
            sa.literal(run).label("run"),
            variant.label("variant"),
            a.customer_id,
            sa.literal(row.channel, sa.Text).label("channel"),
            address.label("address"),
            state.label("state"),
            quiet_until(now, timezone, row.quiet_start_hour, row.quiet_end_hour).label("not_before"),
            timezone.label("timezone"),
        )
        .select_from(
            segment_members.join(audience, a.customer_id == members.customer_id).outerjoin(
                zones, zones.c.country == a.country
            )
        )
        .where(members.segment_id == row.segment_id, ~a.deleted, a.merged_into == "", address != "")
    )
    if row.exclude_segment_ids:
        source = source.where(
            ~sa.exists().where(
                excluded.c.segment_id.in_(row.exclude_segment_ids), excluded.c.customer_id == a.customer_id
            )
        )
    cols = ["campaign_id", "run", "variant", "customer_id", "channel", "address", "state", "not_before", "timezone"]
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    stmt = (
        pg_insert(messages)
        .from_select(cols, source)
        .on_conflict_do_nothing(constraint="messages_one_per_run")
        .returning(m.state)
    )
    counts: dict[str, int] = {}
    for (s,) in conn.execute(stmt):
        counts[s] = counts.get(s, 0) + 1
    return counts


def variant_rates(conn: sa.Connection, row) -> dict[str, float]:
    """Each variant's rate of the winner metric over its sent messages (revenue: per message)."""
    sent = sa.func.count().filter(m.state.in_(SENT))
    if row.winner_metric == "revenue":
        stats = {v.variant: float(v.revenue.units) / max(v.sent, 1) for v in _variant_stats(conn, row) if v.variant}
        return stats
    col = {"opens": m.opened_time, "clicks": m.clicked_time, "responses": m.responded_time}.get(
        row.winner_metric, m.opened_time
    )
    q = (
        sa.select(m.variant, sent.label("sent"), sa.func.count(col).label("hit"))
        .where(m.campaign_id == row.id, m.variant != "")
        .group_by(m.variant)
    )
    return {r.variant: (r.hit / r.sent if r.sent else 0.0) for r in conn.execute(q)}


def _credited(inv) -> sa.ColumnElement:
    """What the credit notes of the invoice `inv` (a table or alias) gave back (0 for none)."""
    cn = audience_invoices.alias("cn")
    return sa.func.coalesce(
        sa.select(sa.func.sum(cn.c.total))
        .where(cn.c.kind == "credit_note", cn.c.credited_invoice == inv.c.invoice_id, cn.c.state != "cancelled")
        .scalar_subquery(),
        0,
    )


def _attributed(row):
    """Paid invoices attributed to this campaign by last touch: the customer's latest message
    (of any campaign) sent before the payment within that campaign's attribution window."""
    inv = audience_invoices.c
    last = messages.alias("last")
    cmp = campaigns.alias("lc")
    touch = (
        sa.select(last.c.id, last.c.campaign_id, last.c.variant)
        .select_from(last.join(cmp, cmp.c.id == last.c.campaign_id))
        .where(
            last.c.customer_id == inv.customer_id,
            last.c.state.in_(SENT),
            last.c.sent_time <= inv.paid_time,
            last.c.sent_time > inv.paid_time - sa.func.make_interval(0, 0, 0, cmp.c.attribution_days),
        )
        .order_by(last.c.sent_time.desc(), last.c.id.desc())
        .limit(1)
        .lateral("touch")
    )
    return (
        sa.select(
            inv.invoice_id,
            (inv.paid_total - _credited(audience_invoices)).label("paid_total"),  # less its credit notes
            inv.order_id,
            touch.c.variant,
        )
        .select_from(audience_invoices.join(touch, sa.true()))
        .where(
            inv.kind == "invoice",
            inv.paid_time.is_not(None),
            touch.c.campaign_id == row.id,
            inv.customer_id.in_(sa.select(m.customer_id).where(m.campaign_id == row.id, m.state.in_(SENT))),
        )
        .subquery("attributed")
    )


_COUNTS = ("queued", "held", "sent", "delivered", "bounced", "failed", "suppressed", "capped")
_FIRSTS = {"opened": m.opened_time, "clicked": m.clicked_time, "responded": m.responded_time,
           "unsubscribed": m.unsubscribed_time}  # fmt: skip
_MACHINE = {"machine_opens": m.machine_open_count, "machine_clicks": m.machine_click_count}


def _variant_stats(conn: sa.Connection, row) -> list[pb.VariantStats]:
    """The whole campaign's counts first, then each variant's (two GROUP BYs of its messages,
    two of its attributed invoices)."""
    states = {"sent": m.state.in_(SENT)}
    cols = [
        *[sa.func.count().filter(states.get(k, m.state == k)).label(k) for k in _COUNTS],
        *[sa.func.count(col).label(k) for k, col in _FIRSTS.items()],
        *[sa.func.coalesce(sa.func.sum(col), 0).label(k) for k, col in _MACHINE.items()],
    ]
    att = _attributed(row)
    money_cols = [
        sa.func.count(sa.distinct(sa.func.nullif(att.c.order_id, ""))).label(
            "orders"
        ),  # an invoice of no order is none
        sa.func.coalesce(sa.func.sum(att.c.paid_total), 0).label("revenue"),
    ]
    total = conn.execute(sa.select(*cols).where(m.campaign_id == row.id)).one()
    per = conn.execute(sa.select(m.variant, *cols).where(m.campaign_id == row.id, m.variant != "").group_by(m.variant))
    money_total = conn.execute(sa.select(*money_cols)).one()
    money_per = {r.variant: r for r in conn.execute(sa.select(att.c.variant, *money_cols).group_by(att.c.variant))}

    def stats(variant: str, r, mr) -> pb.VariantStats:
        return pb.VariantStats(
            variant=variant,
            **{k: getattr(r, k) for k in (*_COUNTS, *_FIRSTS, *_MACHINE)},
            orders=mr.orders if mr is not None else 0,
            revenue=money.to_money(mr.revenue if mr is not None else 0, row.currency),
        )

    return [stats("", total, money_total), *[stats(r.variant, r, money_per.get(r.variant)) for r in per]]


def campaign_stats(conn: sa.Connection, row) -> pb.CampaignStats:
    rows = _variant_stats(conn, row)
    total = rows[0] if rows else pb.VariantStats()
    revenue = money.to_decimal(total.revenue) if total.revenue.currency_code else Decimal(0)
    # every response recorded for the campaign (with a message of it or not) opens a lead in sales-svc
    answered = conn.execute(sa.select(sa.func.count()).where(responses.c.campaign_id == row.id)).scalar()
    achieved = {
        "orders": float(total.orders),
        "revenue": float(revenue),
        "responses": float(answered),
        "leads": float(answered),
    }.get(row.goal_kind, 0.0)
    target = float(row.goal_target)
    cost = Decimal(row.cost)
    inv = audience_invoices.c  # first touch: the invoice's lead came from this campaign (sales-svc)
    first = conn.execute(
        sa.select(
            sa.func.count(sa.distinct(sa.func.nullif(inv.order_id, ""))).label("orders"),
            sa.func.coalesce(sa.func.sum(inv.paid_total - _credited(audience_invoices)), 0).label("revenue"),
        ).where(inv.campaign_id == str(row.id), inv.kind == "invoice", inv.paid_time.is_not(None))
    ).one()
    return pb.CampaignStats(
        campaign=CAMPAIGN.format(row.id),
        total=total,
        variants=[v for v in rows[1:] if v.variant],
        goal_achieved=achieved,
        goal_share=achieved / target if target else 0.0,
        roi=float((revenue - cost) / cost) if cost else 0.0,
        cost=money.to_money(cost, row.currency),
        leads=answered,
        first_touch_orders=first.orders,
        first_touch_revenue=money.to_money(first.revenue, row.currency),
    )


# -- gRPC -------------------------------------------------------------------------------------------
class CampaignServicer(campaign_service_pb2_grpc.CampaignServiceServicer):
    def __init__(self, uc: Campaigns):
        self.uc = uc

    def CreateCampaign(self, request, context):
        return self.uc.create(request)

    def GetCampaign(self, request, context):
        return self.uc.get(request.name)

    def ListCampaigns(self, request, context):
        items, token = self.uc.list(request)
        return pb.ListCampaignsResponse(campaigns=items, next_page_token=token)

    def UpdateCampaign(self, request, context):
        return self.uc.update(request)

    def DeleteCampaign(self, request, context):
        self.uc.delete(request)
        return empty_pb2.Empty()

    def LaunchCampaign(self, request, context):
        return self.uc.launch(request)

    def PauseCampaign(self, request, context):
        return self.uc.pause(request)

    def ResumeCampaign(self, request, context):
        return self.uc.resume(request)

    def CancelCampaign(self, request, context):
        return self.uc.cancel(request)

    def CloneCampaign(self, request, context):
        return self.uc.clone(request)

    def GetCampaignStats(self, request, context):
        return self.uc.stats(request.name)

    def ListCampaignMessages(self, request, context):
        items, token = self.uc.messages(request)
        return pb.ListCampaignMessagesResponse(messages=items, next_page_token=token)


def use_cases(rt: Campaign) -> Campaigns:
    return rt.once("campaigns", lambda: Campaigns(rt))


def registration(rt: Campaign) -> Registration:
    return Registration.of(CampaignServicer(use_cases(rt)))


def timer_handlers(rt: Campaign) -> None:
    uc = use_cases(rt)
    rt.timers.register(RUN, uc.run)
    rt.timers.register(WINNER, uc.choose_winner)
