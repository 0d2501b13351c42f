"""The delivery workers: they send the messages campaign runs queued, in the background (the API
never waits for a provider), and resume after a restart without sending anything twice.

One round (`Delivery.run_once`):
1. Claim, per running campaign, at most what its throttle allows this round (messages per
   second: the campaign's, else CAMPAIGN_THROTTLE_<CHANNEL>, 0 = unlimited; per process), oldest
   due first, SKIP LOCKED, in one statement per campaign that also re-checks consent and
   suppression at send time (an unsubscribe after queueing is honoured: the message becomes
   'suppressed') and leaves out recipients in their quiet hours (their not_before moves to the
   end of them). Claimed messages become 'sending' with a lease, and that is COMMITTED before any
   provider is called.
2. Render and send each (the campaign variant's template through runtime.renderer, the
   channel's sender); nothing is held open meanwhile.
3. Record the outcomes in one transaction, set-based: sent (provider id, message.sent.v1),
   retried with back-off (a provider outage; up to CAMPAIGN_SEND_ATTEMPTS), failed (a refused
   address or a template that does not render: the variable is named in the error), bounced (a
   hard rejection suppresses the address).
4. A message left 'sending' past its lease (the process died between claim and record) is never
   resent (the provider may have it): the sweep marks it failed, "interrupted".
5. A campaign whose run has nothing queued, held or sending left is completed
   (campaign.completed.v1), unless it recurs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import sqlalchemy as sa

from crm.campaign.v1 import campaign_events_pb2 as ev
from crm_chassis.errors import DomainError, FailedPrecondition, InvalidArgument
from crm_chassis.workers import PollingWorker

from . import consent, tracking
from .campaigns import CAMPAIGN, MESSAGE, channel_throttle, event
from .outgoing import Outgoing, SendError
from .runtime import Campaign
from .tables import audience, campaign_variants, campaigns, messages

log = logging.getLogger("campaign.delivery")
c = campaigns.c
m = messages.c
LEASE_SECONDS = 300
BATCH = 500


def max_attempts(env=os.environ) -> int:
    try:
        return max(1, int(env.get("CAMPAIGN_SEND_ATTEMPTS", "6")))
    except ValueError:
        return 6


def send_threads(env=os.environ) -> int:
    try:
        return max(1, int(env.get("CAMPAIGN_SEND_THREADS", "4")))
    except ValueError:
        return 4


def context(rt: Campaign, cmp, customer, address: str = "", message_id: str = "") -> dict:
    """What a template of the campaign sees: the recipient's audience row (or None), the
    campaign, and the unsubscribe link of this message."""
    from .consent_api import unsubscribe_url

    return {
        "customer": customer,
        "campaign": {"display_name": cmp.display_name, "id": str(cmp.id)},
        "unsubscribe_url": unsubscribe_url(rt, cmp.channel, address, cmp.purpose, message_id) if address else "",
    }


def render(rt: Campaign, conn: sa.Connection, variant, ctx: dict):
    if rt.renderer is None:
        raise FailedPrecondition("no template renderer is installed (the templates part)", reason="NO_RENDERER")
    return rt.renderer(conn, variant.template_id, variant.template_version, ctx)


def check_renders(rt: Campaign, conn: sa.Connection, cmp, variants) -> None:
    """At launch: each variant renders for a sample member of the audience (or an empty
    customer); a template that fails names its variable and the launch is refused."""
    a = audience.c
    from .segments_tables import segment_members

    sample = conn.execute(
        sa.select(audience)
        .join(segment_members, segment_members.c.customer_id == a.customer_id)
        .where(segment_members.c.segment_id == cmp.segment_id, ~a.deleted)
        .limit(1)
    ).first()
    address = "sample@example.com" if cmp.channel == "email" else "+989120000000"
    for i, v in enumerate(variants):
        try:
            render(rt, conn, v, context(rt, cmp, sample, address))
        except InvalidArgument as e:
            raise InvalidArgument.field(
                f"campaign.variants[{i}].template", "; ".join(f"{x.field}: {x.description}" for x in e.violations)
            ) from None


@dataclass
class Outcome:
    id: str
    state: str  # sent | queued (retry) | failed | bounced
    provider_id: str = ""
    error: str = ""
    hard: bool = False


# The outcomes of a round by the primary key, from arrays (one cacheable statement, whatever
# the count). A retry (queued) waits 30 s, 2 min, 8 min, ... at most 2 h; past the attempts
# limit it has failed.
_RECORD = sa.text(
    f"""
UPDATE messages m SET
  state = CASE WHEN o.state = 'queued' AND m.attempts < :limit THEN 'queued'
               WHEN o.state = 'queued' THEN 'failed' ELSE o.state END,
  provider_message_id = o.pid,
  error = o.err,
  lease_until = NULL,
  sent_time = CASE WHEN o.state = 'sent' THEN now() ELSE m.sent_time END,
  bounced_time = CASE WHEN o.state = 'bounced' THEN now() ELSE m.bounced_time END,
  bounce_kind = CASE WHEN o.state = 'bounced' THEN 'hard' ELSE m.bounce_kind END,
  not_before = CASE WHEN o.state = 'queued' AND m.attempts < :limit
                    THEN now() + make_interval(secs => least(30 * power(4, m.attempts - 1), 7200))
                    ELSE m.not_before END
  FROM unnest(CAST(:ids AS uuid[]), CAST(:states AS text[]), CAST(:pids AS text[]), CAST(:errs AS text[]))
       AS o(id, state, pid, err)
 WHERE m.id = o.id AND m.state = 'sending'
RETURNING {", ".join(f"m.{col.name}" for col in messages.c)}
"""
).columns(*messages.c)


class Delivery(PollingWorker):
    name = "campaign-delivery"

    def __init__(self, rt: Campaign, poll_seconds: float = 1.0, clock=time.monotonic):
        super().__init__()
        self.rt = rt
        self.engine = rt.engine
        self.poll_seconds = poll_seconds
        self.clock = clock
        self._budget: dict[str, tuple[float, float]] = {}  # campaign id -> (tokens, at)
        self.threads = send_threads()
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._renewed = 0.0  # when the lease of the round's claimed messages was last taken (clock)

    # -- throttle --------------------------------------------------------------------------------
    def _allowance(self, cid: str, rate: int) -> int:
        """How many messages the campaign may claim now (a token bucket of one second)."""
        if rate <= 0:
            return BATCH
        now = self.clock()
        tokens, at = self._budget.get(cid, (float(rate), now))
        tokens = min(float(rate), tokens + (now - at) * rate)
        self._budget[cid] = (tokens, now)
        return int(tokens)

    def _spend(self, cid: str, n: int) -> None:
        if cid in self._budget:
            tokens, at = self._budget[cid]
            self._budget[cid] = (tokens - n, at)

    # -- a round ---------------------------------------------------------------------------------
    def run_once(self) -> int:
        """One round; the number of messages settled (sent, failed, retried or suppressed)."""
        with self._lock:
            self._sweep()
            claimed, suppressed = self._claim()
            self._renewed = self.clock()
            outcomes = self._send(claimed) if claimed else []
            self._record(outcomes)
            self._complete()
            return len(outcomes) + suppressed

    def _renew(self, ids: list[str]) -> None:
        """A round still sending keeps its claim: the lease of its messages is taken again once a
        third of it has passed, so another process's sweep never takes a live round's messages
        for interrupted ones (and drops what this round then records)."""
        if not ids or self.clock() - self._renewed < LEASE_SECONDS / 3:
            return
        self._renewed = self.clock()
        with self.engine.begin() as conn:
            conn.execute(
                messages.update()
                .where(m.id.in_(ids), m.state == "sending")
                .values(lease_until=sa.func.now() + sa.text(f"interval '{LEASE_SECONDS} seconds'"))
            )

    def _sweep(self) -> None:
        """Messages whose sender died mid-round are failed (never resent) and say so:
        message.failed.v1, as a failure at send time does."""
        with self.rt.uow.begin() as tx:
            rows = tx.conn.execute(
                messages.update()
                .where(m.state == "sending", m.lease_until < sa.func.now())
                .values(state="failed", error="interrupted while sending; not resent (the provider may have it)")
                .returning(messages)
            ).all()
            if rows:
                tx.publish_many(
                    "message.failed.v1", [(MESSAGE.format(r.campaign_id, r.id), _message_event(r)) for r in rows]
                )

    def _claim(self) -> tuple[list, int]:
        """(the (campaign, message) pairs claimed for sending, how many were suppressed instead)"""
        with self.engine.begin() as conn:
            now = conn.execute(sa.select(sa.func.now())).scalar()
            due = conn.execute(
                sa.select(campaigns)
                .where(
                    c.state == "running",
                    sa.exists().where(m.campaign_id == c.id, m.state == "queued", m.not_before <= now),
                )
                .order_by(c.launch_time)
            ).all()
            out, suppressed = [], 0
            for cmp in due:
                rate = cmp.throttle_per_second or channel_throttle(cmp.channel)
                n = min(self._allowance(str(cmp.id), rate), BATCH)
                if n <= 0:
                    continue
                self._defer_quiet(conn, cmp, now)
                pick = (
                    sa.select(m.id)
                    .where(m.campaign_id == cmp.id, m.state == "queued", m.not_before <= now)
                    .order_by(m.not_before, m.id)
                    .limit(n)
                    .with_for_update(skip_locked=True)
                    .scalar_subquery()
                )
                ok = consent.sendable(cmp.channel, cmp.purpose, m.address)
                rows = conn.execute(
                    messages.update()
                    .where(m.id.in_(pick))
                    .values(
                        state=sa.case((ok, "sending"), else_="suppressed"),
                        attempts=sa.case((ok, m.attempts + 1), else_=m.attempts),
                        lease_until=sa.case((ok, sa.func.now() + sa.text(f"interval '{LEASE_SECONDS} seconds'"))),
                        error=sa.case((ok, m.error), else_="no consent or suppressed at send time"),
                    )
                    .returning(messages)
                ).all()
                self._spend(str(cmp.id), len(rows))
                out += [(cmp, r) for r in rows if r.state == "sending"]
                suppressed += sum(1 for r in rows if r.state == "suppressed")
            return out, suppressed

    @staticmethod
    def _defer_quiet(conn: sa.Connection, cmp, now) -> None:
        """Due messages whose recipient is in their quiet hours now wait for the end of them."""
        from .campaigns import quiet_until

        if cmp.quiet_start_hour == cmp.quiet_end_hour:
            return
        until = quiet_until(now, m.timezone, cmp.quiet_start_hour, cmp.quiet_end_hour)  # the recipient's zone
        conn.execute(
            messages.update()
            .where(m.campaign_id == cmp.id, m.state == "queued", m.not_before <= now, until > sa.literal(now))
            .values(not_before=until)
        )

    def _send(self, claimed: list) -> list[Outcome]:
        """Render each claimed message in this thread (the template versions are read once) and
        hand it at once to the channel's sender on CAMPAIGN_SEND_THREADS threads (4; the e-mail
        sender keeps a pool of as many SMTP sessions), so sending overlaps rendering."""
        by_campaign: dict = {}
        for cmp, r in claimed:
            by_campaign.setdefault(cmp.id, (cmp, []))[1].append(r)
        results: list = []  # an Outcome, or the Future of one
        ids = [str(r.id) for _, r in claimed]
        with self.engine.connect() as conn:
            for cmp, rows in by_campaign.values():
                variants = {
                    v.key: v
                    for v in conn.execute(sa.select(campaign_variants).where(campaign_variants.c.campaign_id == cmp.id))
                }
                customers = {
                    r.customer_id: r
                    for r in conn.execute(
                        sa.select(audience).where(audience.c.customer_id.in_([r.customer_id for r in rows]))
                    )
                }
                send = self.rt.senders.get(cmp.channel)
                for r in rows:
                    item = self._prepare(conn, cmp, r, variants, customers.get(r.customer_id), send)
                    if isinstance(item, Outcome):
                        results.append(item)
                    elif self.threads > 1:
                        results.append(self._pool().submit(self._deliver, item))
                    else:
                        results.append(self._deliver(item))
                    self._renew(ids)
            conn.rollback()
        pending = [x for x in results if not isinstance(x, Outcome)]
        while pending:
            pending = list(wait(pending, timeout=LEASE_SECONDS / 6).not_done)
            self._renew(ids)
        return [x if isinstance(x, Outcome) else x.result() for x in results]

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="campaign-send")
        return self._executor

    def _prepare(self, conn, cmp, r, variants, customer, send):
        """The message's Outgoing ready to send, or its Outcome if it cannot be sent."""
        mid = str(r.id)
        variant = variants.get(r.variant) or (next(iter(variants.values())) if len(variants) == 1 else None)
        if variant is None:
            return Outcome(mid, "failed", error=f"the campaign has no variant {r.variant!r}")
        if send is None:
            return Outcome(mid, "queued", error=f"no sender for channel {cmp.channel} is configured")
        try:
            ctx = context(self.rt, cmp, customer, r.address, mid)
            content = render(self.rt, conn, variant, ctx)
        except DomainError as e:
            return Outcome(mid, "failed", error=f"render: {e}")
        html, text = content.html, content.text
        if cmp.channel == "email" and tracking.settings(self.rt).email:
            html = tracking.track(self.rt, html, mid)  # click links and the open pixel
        elif cmp.channel == "sms":  # short links, stored before the message leaves
            with self.engine.begin() as links:
                text = tracking.track_text(self.rt, links, text, mid)
        elif cmp.channel != "email":  # bot messages: signed click links
            text = tracking.track_text(self.rt, None, text, mid)
        out = Outgoing(
            channel=cmp.channel,
            address=r.address,
            text=text,
            subject=content.subject,
            html=html,
            message_id=mid,
            campaign_id=str(cmp.id),
            unsubscribe_url=ctx["unsubscribe_url"] if cmp.channel == "email" else "",
        )
        return (send, out, mid)

    @staticmethod
    def _deliver(item) -> Outcome:
        send, out, mid = item
        try:
            provider_id = send(out)
        except SendError as e:
            if e.retryable:
                return Outcome(mid, "queued", error=str(e)[:500])
            return Outcome(mid, "bounced" if e.hard_bounce else "failed", error=str(e)[:500], hard=e.hard_bounce)
        except Exception as e:  # a sender's bug: retried (the message is not lost), logged
            log.exception("sender of %s failed", out.channel)
            return Outcome(mid, "queued", error=f"{type(e).__name__}: {e}"[:500])
        return Outcome(mid, "sent", provider_id=str(provider_id or "")[:300])

    def _record(self, outcomes: list[Outcome]) -> None:
        if not outcomes:
            return
        with self.rt.uow.begin() as tx:
            conn = tx.conn
            rows = conn.execute(
                _RECORD,
                {
                    "ids": [o.id for o in outcomes],
                    "states": [o.state for o in outcomes],
                    "pids": [o.provider_id for o in outcomes],
                    "errs": [o.error for o in outcomes],
                    "limit": max_attempts(),
                },
            ).all()
            hard = [r for r in rows if r.state == "bounced"]
            for r in hard:
                consent.suppress(tx, r.channel, r.address, "hard_bounce", r.error[:200])
            for state, key in (
                ("sent", "message.sent.v1"),
                ("bounced", "message.bounced.v1"),
                ("failed", "message.failed.v1"),
            ):
                items = [(MESSAGE.format(r.campaign_id, r.id), _message_event(r)) for r in rows if r.state == state]
                if items:
                    tx.publish_many(key, items)

    def _complete(self) -> None:
        """Running one-off campaigns with nothing left to send are completed."""
        with self.rt.uow.begin() as tx:
            conn = tx.conn
            done = conn.execute(
                campaigns.update()
                .where(
                    c.state == "running",
                    c.cron == "",
                    c.run > 0,
                    ~sa.exists().where(m.campaign_id == c.id, m.state.in_(("queued", "held", "sending"))),
                )
                .values(
                    state="completed", complete_time=sa.func.now(), version=c.version + 1, update_time=sa.func.now()
                )
                .returning(campaigns)
            ).all()
            if done:
                settled = dict(
                    conn.execute(
                        sa.select(m.campaign_id, sa.func.count())
                        .where(m.campaign_id.in_([r.id for r in done]))
                        .group_by(m.campaign_id)
                    ).all()
                )
                tx.publish_many(
                    "campaign.completed.v1",
                    [(CAMPAIGN.format(r.id), event(r, recipients=settled.get(r.id, 0))) for r in done],
                )

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                n = self.run_once()
            except Exception:
                log.exception("delivery round failed")
                n = 0
            if not n:
                self._idle(self.poll_seconds)

    def stop(self, timeout: float = 10.0) -> None:
        self._signal_stop()
        self._join(timeout)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None


def _message_event(r) -> ev.MessageEvent:
    e = ev.MessageEvent(
        message=MESSAGE.format(r.campaign_id, r.id),
        campaign=CAMPAIGN.format(r.campaign_id),
        variant=r.variant,
        customer=f"customers/{r.customer_id}",
        channel=r.channel,
        state=r.state,
        bounce_kind=r.bounce_kind,
        bounce_detail=r.error if r.state == "bounced" else "",
        run=r.run,
    )
    e.event_time.GetCurrentTime()
    return e


def worker(rt: Campaign) -> Delivery:
    return rt.once("delivery", lambda: Delivery(rt))


def workers(rt: Campaign) -> list:
    return [worker(rt)]
