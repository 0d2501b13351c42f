"""TrackingService (proto/crm/campaign/v1/tracking.proto): opens, clicks, bounces, SMS delivery
receipts, the company site's click-stream and responses. docs/tracking.md says what a user does.

- **Links** (crm_chassis.links, secret TRACKING_LINK_SECRET, default derived from JWT_SECRET):
  "open" (the message id) for the pixel at PUBLIC_BASE_URL/v1/t/o/{token}, "click" (the
  message id and the target URL) for PUBLIC_BASE_URL/v1/t/c/{token}, "visit" (the message id)
  for the `crm_t` parameter a click adds to a landing page on the company's own domains
  (TRACKING_SITE_DOMAINS), which the site's script hands back to tie its visitor to the customer.
- `track(rt, html, message_id)`: the delivery part's e-mail path rewrites each http(s) link of
  the HTML (not the unsubscribe or opt-in links, not a link marked `data-crm-notrack`) into a
  click link and appends the open pixel.
- Opens: every open counts (open_count), the first sets opened_time and publishes
  message.opened.v1 (later opens publish nothing: mail clients and proxies re-fetch images).
  Clicks: every click counts and publishes message.clicked.v1 with its URL; the first sets
  clicked_time.
- Bounces (`parse_dsn`, `apply_bounce`): 5.x.x is hard (the address is suppressed), 4.x.x soft;
  an "Action: delayed" or "delivered" report is no bounce. A redelivered report changes nothing.
- Click-stream: visitors (first-party id -> customer), page_events (append-only), and the
  per-customer web_activity summary recomputed from them in the same transaction.
- Responses: a row, the message's responded_time, and response.recorded.v1 through the outbox.

Settings: TRACKING_LINK_SECRET, PUBLIC_BASE_URL, TRACKING_SITE_KEYS (dev-site-key),
BOUNCE_KEYS (dev-bounce-key), TRACKING_SITE_DOMAINS (none), TRACKING_EMAIL (true).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import html as htmlmod
import json
import os
import re
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm.campaign.v1 import campaign_events_pb2 as ev
from crm.campaign.v1 import tracking_pb2 as pb
from crm.campaign.v1 import tracking_pb2_grpc
from crm_chassis import persian
from crm_chassis.errors import DomainError, FieldViolation, InvalidArgument, NotFound, Unauthenticated
from crm_chassis.filtering import keyset_page
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.links import Signer, key_list, key_matches, link_secret
from crm_chassis.mail import kind_of
from crm_chassis.mail import parse_dsn as mail_dsn
from crm_chassis.mail_parse import parse as parse_mail
from crm_chassis.mail_parse import reply_text
from crm_chassis.messaging.consumer import Subscription
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import ResourceName, check_request_id

from . import consent
from .campaigns import CAMPAIGN, MESSAGE
from .runtime import Campaign
from .tables import audience, campaigns, messages
from .tracking_tables import page_events, responses, short_links, visitors, web_activity

m = messages.c
RESPONSE = ResourceName("responses/{response_id}")
VISITOR = ResourceName("visitors/{visitor_id}", visitor_id=r"[A-Za-z0-9_-]{8,64}")
CUSTOMER = ResourceName("customers/{customer_id}")
# A 1x1 transparent GIF.
GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
KINDS = ("reply", "form", "click", "sms")
RESPONSE_CHANNELS = ("email", "sms", "telegram", "bale", "web")
EVENT_KINDS = ("page_view", "event")
MAX_EVENTS = 50
BACKFILL_HITS = 500  # a visitor's earlier hits sent when it is first tied to a customer
URL_LIMIT = 2048
VISITOR_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
_HREF = re.compile(r"""(<a\b[^>]*?\bhref\s*=\s*)(["'])(.*?)\2""", re.IGNORECASE | re.DOTALL)
_OUR_MESSAGE_ID = re.compile(r"<?cmp-([0-9a-fA-F-]{36})@")
# Kavenegar's delivery statuses (its "status" callback): 10 delivered; 6 failed, 11 undelivered;
# 14 blocked by the recipient (they refuse advertising: a hard bounce).
DELIVERED = frozenset({"10", "delivered", "delivrd"})
SOFT_FAILED = frozenset({"6", "11", "failed", "undelivered", "undeliv"})
HARD_FAILED = frozenset({"14", "blocked", "rejected"})
DSN_DELIVERED = frozenset({"delivered", "expanded"})  # RFC 3464 success (relayed: handed on, not known to arrive)
# User agents of machines that fetch a message's links and images before, or instead of, its
# reader: mail security gateways' link scanners, link previews of chat apps, crawlers and
# headless browsers, and the "+http://..." signature crawlers put in their agent. Mail clients'
# image proxies (Gmail's GoogleImageProxy, Yahoo's) fetch for a reader: they stay opens.
_MACHINE_AGENT = re.compile(
    r"\+https?://|\b(?:bot|crawler|spider|scanner)\b|[a-z](?:bot|spider)\b|crawl|preview|urlscan|safelinks|"
    r"barracuda|proofpoint|mimecast|forcepoint|trend ?micro|messagelabs|symantec|sophos|fortiguard|"
    r"zscaler|ironport|headless|phantomjs|slurp|facebookexternalhit|whatsapp|skypeuripreview",
    re.IGNORECASE,
)
_PHONE_MODELS = re.compile(r"\bcubot\b", re.IGNORECASE)  # a phone maker whose name ends in "bot"


def machine_agent(user_agent: str) -> bool:
    """Whether a User-Agent is a machine's (see _MACHINE_AGENT); an empty one is not judged (a
    direct gRPC caller has none)."""
    agent = _PHONE_MODELS.sub("", user_agent or "")
    return bool(agent) and _MACHINE_AGENT.search(agent) is not None


# --- settings and links ------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    secret: bytes
    base_url: str
    site_keys: tuple[str, ...]
    bounce_keys: tuple[str, ...]
    site_domains: tuple[str, ...]  # landing pages there get crm_t and the campaign's UTM
    email: bool  # rewrite e-mail links and add the pixel
    # a click this soon after the send is a link scanner's (they follow links on arrival); 0: off
    machine_click_seconds: int

    @classmethod
    def from_env(cls, jwt_secret: str, env=os.environ) -> Settings:
        secret = link_secret(env.get("TRACKING_LINK_SECRET", ""), jwt_secret, "tracking-links")
        return cls(
            secret=secret,
            base_url=env.get("PUBLIC_BASE_URL", "http://localhost:8080").rstrip("/"),
            site_keys=key_list(env, "TRACKING_SITE_KEYS", "dev-site-key"),
            bounce_keys=key_list(env, "BOUNCE_KEYS", "dev-bounce-key"),
            site_domains=tuple(d.lower() for d in key_list(env, "TRACKING_SITE_DOMAINS")),
            email=env.get("TRACKING_EMAIL", "true").strip().lower() not in ("0", "false", "no", "off"),
            machine_click_seconds=max(0, int(env.get("TRACKING_MACHINE_CLICK_SECONDS", "0") or 0)),
        )


def settings(rt: Campaign) -> Settings:
    return rt.once("tracking.settings", lambda: Settings.from_env(rt.settings.jwt_secret))


def _signer(rt: Campaign, purpose: str) -> Signer:
    return Signer(settings(rt).secret, purpose, reason="TRACKING_LINK_INVALID")


def open_url(rt: Campaign, message_id: str) -> str:
    return f"{settings(rt).base_url}/v1/t/o/{_signer(rt, 'open').sign(str(message_id))}"


def click_url(rt: Campaign, message_id: str, url: str) -> str:
    return f"{settings(rt).base_url}/v1/t/c/{_signer(rt, 'click').sign(str(message_id), url)}"


def visit_token(rt: Campaign, message_id: str) -> str:
    return _signer(rt, "visit").sign(str(message_id))


def _is_http(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc) and not any(ch in url for ch in "\r\n\x1f")


def trackable(rt: Campaign, url: str) -> bool:
    """An http(s) link that is not one of ours (unsubscribe, opt-in, tracking)."""
    if not _is_http(url) or len(url) > URL_LIMIT:
        return False
    base = settings(rt).base_url
    return not any(url.startswith(f"{base}{p}") for p in ("/v1/unsubscribe/", "/v1/optIn/", "/v1/t/"))


_TEXT_URL = re.compile(r"https?://[^\s<>\"'«»]+", re.IGNORECASE)
SHORT_CODE = re.compile(r"[A-Za-z0-9_-]{10}")


def short_code(rt: Campaign, message_id: str, url: str) -> str:
    """10 URL-safe characters (60 bits of an HMAC of the message and the target): the same link
    of the same message always gets the same code, so a re-render writes the same row."""
    digest = hmac.new(settings(rt).secret, f"short|{message_id}|{url}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode()[:10]


def track_text(rt: Campaign, conn: sa.Connection | None, text: str, message_id: str) -> str:
    """A text message with its http(s) links tracked: short links (`{base}/s/{code}`, stored in
    short_links through `conn`) when `conn` is given (SMS: every character counts), else signed
    click links (bot messages). Trailing punctuation stays outside the link."""
    if not text:
        return text
    found: dict[str, str] = {}

    def link(match: re.Match) -> str:
        raw = match.group(0)
        url = raw.rstrip(".,;:!?)]}،؛؟")
        tail = raw[len(url) :]
        if not trackable(rt, url):
            return raw
        if conn is None:
            return click_url(rt, message_id, url) + tail
        code = found.setdefault(url, short_code(rt, message_id, url))
        return f"{settings(rt).base_url}/s/{code}{tail}"

    out = _TEXT_URL.sub(link, text)
    if found and conn is not None:
        conn.execute(
            pg_insert(short_links)
            .values([{"code": c, "message_id": message_id, "url": u} for u, c in found.items()])
            .on_conflict_do_nothing()
        )
    return out


def track(rt: Campaign, html: str, message_id: str) -> str:
    """The HTML with its http(s) links rewritten to click links (the unsubscribe and opt-in links,
    and an <a data-crm-notrack>, left alone) and the open pixel appended (before </body>)."""
    if not html:
        return html

    def link(match: re.Match) -> str:
        head, quote, raw = match.group(1), match.group(2), match.group(3)
        url = htmlmod.unescape(raw).strip()
        if "data-crm-notrack" in head.lower() or not trackable(rt, url):
            return match.group(0)
        return f"{head}{quote}{click_url(rt, message_id, url)}{quote}"

    out = _HREF.sub(link, html)
    pixel = (
        f'<img src="{open_url(rt, message_id)}" width="1" height="1" alt="" '
        'style="display:block;border:0;width:1px;height:1px" />'
    )
    at = out.lower().rfind("</body>")
    return out[:at] + pixel + out[at:] if at >= 0 else out + pixel


def _landing(rt: Campaign, url: str, row) -> str:
    """A click's target; on the company's own domains with the visit token (crm_t) and the
    campaign's UTM parameters where the link has none."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    domains = settings(rt).site_domains
    if row is None or not any(host == d or host.endswith("." + d) for d in domains):
        return url
    query = parse_qsl(parts.query, keep_blank_values=True)
    have = {k for k, _ in query}
    extra = {
        "utm_source": "crm",
        "utm_medium": row.channel,
        "utm_campaign": str(row.campaign_id),
        "crm_t": visit_token(rt, str(row.id)),
    }
    query += [(k, v) for k, v in extra.items() if k not in have]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _uuid(value: str) -> str | None:
    try:
        return str(uuid.UUID(value))
    except (ValueError, TypeError, AttributeError):
        return None


def message_event(r, *, url: str = "") -> ev.MessageEvent:
    e = ev.MessageEvent(
        message=MESSAGE.format(r.campaign_id, r.id),
        campaign=CAMPAIGN.format(r.campaign_id),
        variant=r.variant,
        customer=f"customers/{r.customer_id}",
        channel=r.channel,
        state=r.state,
        bounce_kind=r.bounce_kind,
        bounce_detail=r.error if r.state == "bounced" else "",
        url=url,
        run=r.run,
    )
    e.event_time.GetCurrentTime()
    return e


# --- bounces -----------------------------------------------------------------------------------
@dataclass
class Bounce:
    message_id: str = ""  # our messages.id
    provider_message_id: str = ""  # the Message-ID we sent, or the provider's id
    recipient: str = ""
    status: str = ""  # 5.1.1, or the provider's code
    kind: str = ""  # hard | soft | "" (not a failure)
    description: str = ""
    channel: str = "email"
    action: str = ""  # a DSN's Action: "delivered" (or relayed) is a delivery report, no bounce


def parse_dsn(raw: bytes) -> Bounce | None:
    """The bounce an RFC 3464 delivery-status notification reports (crm_chassis.mail.parse_dsn),
    or None if the message is not one; our message by the returned message's Message-ID
    (<cmp-{id}@domain>) or its X-CRM-Message header."""
    dsn = mail_dsn(raw)
    if dsn is None:
        return None
    out = Bounce(
        recipient=dsn.recipient, status=dsn.status, kind=dsn.kind, description=dsn.description, action=dsn.action
    )
    out.provider_message_id = dsn.original_message_id
    own = dsn.original_headers.get("X-CRM-Message", "").strip()
    found = _OUR_MESSAGE_ID.search(out.provider_message_id)
    out.message_id = _uuid(own) or (_uuid(found.group(1)) if found else None) or ""
    return out


def parse_webhook(body: bytes) -> Bounce:
    """A provider's JSON bounce: {message_id or provider_message_id, recipient, status, kind,
    description, channel}."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument.field("body", "is neither a delivery-status notification nor JSON") from None
    if not isinstance(data, dict):
        raise InvalidArgument.field("body", "must be a JSON object")
    get = lambda k: str(data.get(k) or "").replace("\x00", "").strip()  # noqa: E731
    ours = get("message_id")
    if ours.startswith("campaigns/"):
        ours = ours.rsplit("/", 1)[-1]
    b = Bounce(
        message_id=_uuid(ours) or "",
        provider_message_id=get("provider_message_id")[:300],
        recipient=get("recipient").lower(),
        status=get("status")[:40],
        kind=get("kind").lower(),
        description=get("description")[:300],
        channel=get("channel") or "email",
    )
    if ours and not b.message_id:
        raise InvalidArgument.field("message_id", "is not a message id")
    if not (b.message_id or b.provider_message_id or b.recipient):
        raise InvalidArgument.field("message_id", "give message_id, provider_message_id or recipient")
    b.kind = {"permanent": "hard", "transient": "soft"}.get(b.kind, b.kind)
    if b.kind not in ("hard", "soft"):
        if b.kind:
            raise InvalidArgument.field("kind", "must be hard or soft")
        if b.status[:1] not in ("4", "5"):
            raise InvalidArgument.field("status", "give kind, or a 4.x.x / 5.x.x status")
        b.kind = kind_of(b.status)
    if b.channel not in consent.CHANNELS:
        raise InvalidArgument.field("channel", f"must be one of {', '.join(consent.CHANNELS)}")
    return b


def _find_message(conn: sa.Connection, message_id: str = "", provider_id: str = ""):
    q = sa.select(messages).with_for_update()
    if message_id:
        row = conn.execute(q.where(m.id == message_id)).first()
        if row is not None:
            return row
    if provider_id:
        return conn.execute(q.where(m.provider_message_id == provider_id).limit(1)).first()
    return None


def mark_delivered(tx, row):
    """A sent message reported delivered (an SMS receipt, a DSN's success report): its state and
    message.delivered.v1, once (a message delivered, bounced or answered already stays)."""
    if row.state != "sent":
        return row
    row = tx.conn.execute(
        messages.update()
        .where(m.id == row.id)
        .values(state="delivered", delivered_time=sa.func.now())
        .returning(messages)
    ).one()
    tx.publish("message.delivered.v1", message_event(row), MESSAGE.format(row.campaign_id, row.id))
    return row


def apply_bounce(rt: Campaign, tx, b: Bounce) -> pb.PostBounceResponse:
    """Marks the message bounced (hard or soft), suppresses the address of a hard bounce and
    publishes message.bounced.v1; a redelivered report (the message bounced so already) changes
    nothing."""
    out = pb.PostBounceResponse(bounce_kind=b.kind, status=b.status, recipient=b.recipient)
    if not b.kind:
        if b.action in DSN_DELIVERED:  # a success report (NOTIFY=SUCCESS): the message arrived
            row = _find_message(tx.conn, b.message_id, b.provider_message_id)
            if row is not None:
                out.message = MESSAGE.format(row.campaign_id, row.id)
                mark_delivered(tx, row)
        return out
    conn = tx.conn
    row = _find_message(conn, b.message_id, b.provider_message_id)
    channel, address = b.channel, b.recipient
    if row is not None:
        out.message = MESSAGE.format(row.campaign_id, row.id)
        channel, address = row.channel, row.address
        again = row.state == "bounced" and (row.bounce_kind == b.kind or row.bounce_kind == "hard")
        if not again:
            detail = " ".join(x for x in (b.status, b.description) if x)[:500]
            row = conn.execute(
                messages.update()
                .where(m.id == row.id)
                .values(state="bounced", bounce_kind=b.kind, bounced_time=sa.func.now(), error=detail, lease_until=None)
                .returning(messages)
            ).one()
            tx.publish("message.bounced.v1", message_event(row), MESSAGE.format(row.campaign_id, row.id))
    if b.kind == "hard" and address:
        if channel == "email" or channel == "sms":
            try:
                address = consent.normalise(channel, address, rt.phone_region, "recipient")
            except InvalidArgument:
                return out
        out.suppressed = consent.suppress(tx, channel, address, "hard_bounce", b.status[:200])
    return out


# --- the use cases -----------------------------------------------------------------------------
class Tracking:
    def __init__(self, rt: Campaign):
        self.rt = rt
        self.uow = rt.uow
        self.tokens = PageTokens(rt.settings.jwt_secret, "responses")

    # opens and clicks ---------------------------------------------------------------------------
    def open_pixel(self, req: pb.GetOpenPixelRequest) -> pb.TrackingPixel:
        gif = pb.TrackingPixel(content_type="image/gif", data=GIF)
        try:
            fields = _signer(self.rt, "open").open(req.token)
        except DomainError:
            return gif  # never an error image to a mail client; nothing recorded
        mid = _uuid(fields[0]) if len(fields) == 1 else None
        if mid is None:
            return gif
        if machine_agent(req.user_agent):  # a scanner's fetch: counted apart, not an open
            with self.uow.begin() as tx:
                tx.conn.execute(
                    messages.update().where(m.id == mid).values(machine_open_count=m.machine_open_count + 1)
                )
            return gif
        with self.uow.begin() as tx:
            row = tx.conn.execute(
                messages.update()
                .where(m.id == mid)
                .values(open_count=m.open_count + 1, opened_time=sa.func.coalesce(m.opened_time, sa.func.now()))
                .returning(messages)
            ).first()
            if row is not None and row.open_count == 1:
                tx.publish("message.opened.v1", message_event(row), MESSAGE.format(row.campaign_id, row.id))
        return gif

    def follow_click(self, req: pb.FollowClickRequest) -> pb.ClickRedirect:
        fields = _signer(self.rt, "click").open(req.token)  # UNAUTHENTICATED if forged
        if len(fields) != 2 or not _is_http(fields[1]):
            raise Unauthenticated("the link is not valid", reason="TRACKING_LINK_INVALID")
        return self._click(_uuid(fields[0]), fields[1], req.user_agent)

    def follow_short_link(self, req: pb.FollowShortLinkRequest) -> pb.ClickRedirect:
        if not SHORT_CODE.fullmatch(req.code):
            raise NotFound("no such link")
        with self.uow.read() as conn:
            link = conn.execute(sa.select(short_links).where(short_links.c.code == req.code)).first()
        if link is None or not _is_http(link.url):
            raise NotFound("no such link")
        return self._click(str(link.message_id), link.url, req.user_agent)

    def _click(self, mid: str | None, url: str, user_agent: str) -> pb.ClickRedirect:
        """Record a click of message `mid` on `url` (a machine's apart) and answer its redirect."""
        row = None
        if mid is not None:
            with self.uow.begin() as tx:
                if not machine_agent(user_agent):
                    person = [m.id == mid]
                    quick = settings(self.rt).machine_click_seconds
                    if quick:  # sooner after the send than a reader clicks: a scanner on arrival
                        soon = sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, quick)
                        person.append(sa.or_(m.sent_time.is_(None), m.sent_time <= soon))
                    row = tx.conn.execute(
                        messages.update()
                        .where(*person)
                        .values(
                            click_count=m.click_count + 1, clicked_time=sa.func.coalesce(m.clicked_time, sa.func.now())
                        )
                        .returning(messages)
                    ).first()
                if row is not None:
                    tx.publish(
                        "message.clicked.v1", message_event(row, url=url), MESSAGE.format(row.campaign_id, row.id)
                    )
                else:  # a machine's follow (or no such message): counted apart, redirected with no
                    # visit token, so the site does not tie the scanner's visit to the customer
                    tx.conn.execute(
                        messages.update().where(m.id == mid).values(machine_click_count=m.machine_click_count + 1)
                    )
        return pb.ClickRedirect(location=_landing(self.rt, url, row))

    # bounces and receipts -----------------------------------------------------------------------
    def post_bounce(self, req: pb.PostBounceRequest) -> pb.PostBounceResponse:
        if not key_matches(req.key, settings(self.rt).bounce_keys):
            raise Unauthenticated("the provider key is not valid", reason="BOUNCE_KEY_INVALID")
        body = bytes(req.body or b"").replace(b"\x00", b"")  # no address or status has a NUL (nor PostgreSQL text)
        if not body.strip():
            raise InvalidArgument.field("body", "is required")
        b = parse_webhook(body) if body.lstrip()[:1] == b"{" else parse_dsn(body)
        if b is None:
            raise InvalidArgument.field("body", "is not a delivery-status notification (multipart/report)")
        with self.uow.begin() as tx:
            return apply_bounce(self.rt, tx, b)

    def inbound_mail(self, req: pb.PostInboundMailRequest) -> pb.PostInboundMailResponse:
        """A mail to the marketing mailbox: a bounce, a reply to a campaign e-mail (a response,
        once per Message-ID), an auto-reply (nothing), or one that answers no message of ours."""
        if not key_matches(req.key, settings(self.rt).bounce_keys):
            raise Unauthenticated("the provider key is not valid", reason="BOUNCE_KEY_INVALID")
        raw = bytes(req.body or b"")
        if not raw.strip():
            raise InvalidArgument.field("body", "is required")
        bounce = parse_dsn(raw)
        if bounce is not None:
            with self.uow.begin() as tx:
                b = apply_bounce(self.rt, tx, bounce)
            return pb.PostInboundMailResponse(outcome="bounce", message=b.message, bounce_kind=b.bounce_kind)
        mail = parse_mail(raw)
        if mail.auto_submitted:  # out of office, a list's robot: no person answered
            return pb.PostInboundMailResponse(outcome="auto_reply")
        with self.uow.begin() as tx:
            row = self._answered(tx.conn, mail.thread_ids, mail.from_address)
            if row is None:
                return pb.PostInboundMailResponse(outcome="unmatched")
            given = pb.Response(
                message=MESSAGE.format(row.campaign_id, row.id),
                kind="reply",
                channel="email",
                contact_name=mail.from_name,
                text=reply_text(mail.body),
            )
            if "@" in mail.from_address:
                given.email = mail.from_address
            try:
                response = self._record(tx, given, "mail:" + mail.message_id[:120])
            except InvalidArgument:  # a From no address check takes: the reply without it
                given.ClearField("email")
                response = self._record(tx, given, "mail:" + mail.message_id[:120])
        return pb.PostInboundMailResponse(outcome="reply", message=given.message, response=RESPONSE.format(response.id))

    @staticmethod
    def _answered(conn: sa.Connection, thread_ids: list[str], sender: str):
        """The campaign e-mail a reply answers: the one its In-Reply-To / References name
        (<cmp-{id}@...>), else the latest one mailed to its sender within the campaign's
        attribution window."""
        for mid in thread_ids:
            found = _OUR_MESSAGE_ID.search(mid)
            mid_ = _uuid(found.group(1)) if found else None
            row = conn.execute(sa.select(messages).where(m.id == mid_)).first() if mid_ else None
            if row is not None:
                return row
        return _latest_sent(conn, "email", sender) if sender else None

    def delivery_receipt(self, req: pb.PostDeliveryReceiptRequest) -> pb.PostDeliveryReceiptResponse:
        if not key_matches(req.key, settings(self.rt).bounce_keys):
            raise Unauthenticated("the provider key is not valid", reason="BOUNCE_KEY_INVALID")
        if not req.provider_message_id:
            raise InvalidArgument.field("provider_message_id", "is required")
        status = req.status.strip().lower()
        with self.uow.begin() as tx:
            row = _find_message(tx.conn, provider_id=req.provider_message_id[:300])
            if row is None:
                return pb.PostDeliveryReceiptResponse()
            name = MESSAGE.format(row.campaign_id, row.id)
            if status in DELIVERED:
                row = mark_delivered(tx, row)
            elif status in SOFT_FAILED or status in HARD_FAILED:
                kind = "hard" if status in HARD_FAILED else "soft"
                apply_bounce(self.rt, tx, Bounce(message_id=str(row.id), status=status, kind=kind, channel=row.channel))
                row = tx.conn.execute(sa.select(messages).where(m.id == row.id)).one()
            return pb.PostDeliveryReceiptResponse(message=name, state=row.state)

    # the click-stream ---------------------------------------------------------------------------
    def _customer_by(self, conn: sa.Connection, ident: pb.Identify) -> str:
        a = audience.c
        if ident.customer:
            cid = CUSTOMER.parse(ident.customer, "identify.customer").customer_id
            cond = a.customer_id == cid
        elif ident.email:
            cond = a.email == consent.normalise("email", ident.email, self.rt.phone_region, "identify.email")
        elif ident.phone:
            number = consent.normalise("sms", ident.phone, self.rt.phone_region, "identify.phone")
            cond = sa.or_(a.mobile == number, a.phone == number)
        else:
            return ""
        return conn.execute(sa.select(a.customer_id).where(cond, ~a.deleted).limit(1)).scalar() or ""

    def _clicked_message(self, conn: sa.Connection, token: str):
        if not token:
            return None
        try:
            fields = _signer(self.rt, "visit").open(token)
        except DomainError:
            raise InvalidArgument.field("click_token", "is not a valid crm_t token") from None
        mid = _uuid(fields[0]) if len(fields) == 1 else None
        return conn.execute(sa.select(messages).where(m.id == mid)).first() if mid else None

    def _events(self, req: pb.PostTrackingEventsRequest, now: dt.datetime) -> list[dict]:
        if len(req.events) > MAX_EVENTS:
            raise InvalidArgument.field("events", f"at most {MAX_EVENTS} a request")
        rows, bad = [], []
        for i, e in enumerate(req.events):
            kind = e.kind or "page_view"
            if kind not in EVENT_KINDS:
                bad.append(FieldViolation(f"events[{i}].kind", "must be page_view or event"))
            if not _is_http(e.url) or len(e.url) > URL_LIMIT:
                bad.append(FieldViolation(f"events[{i}].url", f"must be an http(s) URL of at most {URL_LIMIT}"))
            if kind == "event" and not e.name:
                bad.append(FieldViolation(f"events[{i}].name", "an event needs a name"))
            when = e.event_time.ToDatetime(dt.UTC) if e.HasField("event_time") else now
            rows.append(
                {
                    "visitor_id": req.visitor_id,
                    "kind": kind,
                    "name": e.name[:100],
                    "url": e.url,
                    "referrer": e.referrer[:URL_LIMIT],
                    "title": e.title[:300],
                    "utm_source": e.utm_source[:100],
                    "utm_medium": e.utm_medium[:100],
                    "utm_campaign": e.utm_campaign[:100],
                    "utm_term": e.utm_term[:100],
                    "utm_content": e.utm_content[:100],
                    "event_time": min(when, now),
                }
            )
        if bad:
            raise InvalidArgument(bad)
        return rows

    def post_events(self, req: pb.PostTrackingEventsRequest) -> pb.PostTrackingEventsResponse:
        if not key_matches(req.site_key, settings(self.rt).site_keys):
            raise Unauthenticated("the site key is not valid", reason="SITE_KEY_INVALID")
        if not VISITOR_ID.fullmatch(req.visitor_id):
            raise InvalidArgument.field("visitor_id", "must be 8 to 64 letters, digits, '-' or '_'")
        now = dt.datetime.now(dt.UTC)
        rows = self._events(req, now)
        with self.uow.begin() as tx:
            conn = tx.conn
            clicked = self._clicked_message(conn, req.click_token)
            customer, how = self._customer_by(conn, req.identify), "identify"
            if not customer and clicked is not None:
                customer, how = clicked.customer_id, "click"
            before = conn.execute(
                sa.select(visitors.c.customer_id).where(visitors.c.visitor_id == req.visitor_id).with_for_update()
            ).scalar()
            first = min((r["event_time"] for r in rows), default=now)
            stmt = pg_insert(visitors).values(
                visitor_id=req.visitor_id, customer_id=customer, identified_by=how if customer else "",
                first_seen_time=first, last_seen_time=now,
            )  # fmt: skip
            changes = {
                "last_seen_time": now,
                "first_seen_time": sa.func.least(visitors.c.first_seen_time, stmt.excluded.first_seen_time),
            }
            if customer:
                changes |= {"customer_id": stmt.excluded.customer_id, "identified_by": stmt.excluded.identified_by}
            visitor = conn.execute(
                stmt.on_conflict_do_update(index_elements=["visitor_id"], set_=changes).returning(visitors)
            ).one()
            hit_ids = (
                conn.execute(page_events.insert().returning(page_events.c.id), rows).scalars().all() if rows else []
            )
            changed = [c for c in dict.fromkeys([visitor.customer_id, before]) if c]
            for cid in changed:  # before: the visitor turned out to be someone else
                summarise(conn, cid)
            self.rt.audience_changed(conn, changed, "web")
            self._publish_hits(tx, req, visitor, before, hit_ids)
            out = pb.PostTrackingEventsResponse(
                accepted=len(rows), customer=CUSTOMER.format(visitor.customer_id) if visitor.customer_id else ""
            )
            f = req.response
            utm = next((e for e in reversed(req.events) if e.utm_campaign), pb.TrackingEvent())
            # the form's campaign: as the page names it, else the UTM campaign, else the click's; a
            # form of no known campaign is no campaign response (the events are kept all the same)
            campaign_id = (
                CAMPAIGN.parse(f.campaign, "response.campaign").campaign_id
                if f.campaign
                else (_uuid(utm.utm_campaign) or (str(clicked.campaign_id) if clicked is not None else ""))
            )
            known = (
                _uuid(campaign_id)
                and conn.execute(sa.select(campaigns.c.id).where(campaigns.c.id == _uuid(campaign_id))).first()
            )
            if known and (f.contact_name or f.email or f.phone or f.text):
                by_click = clicked is not None and str(clicked.campaign_id) == _uuid(campaign_id)
                given = pb.Response(
                    campaign=CAMPAIGN.format(_uuid(campaign_id)),
                    message=MESSAGE.format(clicked.campaign_id, clicked.id) if by_click else "",
                    customer=out.customer,
                    kind="form",
                    channel="web",
                    contact_name=f.contact_name,
                    email=f.email,
                    phone=f.phone,
                    text=f.text,
                    utm_source=utm.utm_source,
                    utm_medium=utm.utm_medium,
                    utm_campaign=utm.utm_campaign,
                    visitor_id=req.visitor_id,
                )
                out.response = RESPONSE.format(self._record(tx, given, "", "response.").id)
            return out

    def _publish_hits(self, tx, req: pb.PostTrackingEventsRequest, visitor, before: str | None, hit_ids) -> None:
        """web_activity.recorded.v1 for sales' lead scoring: this request's hits of a visitor tied
        to a customer or identified by e-mail or phone; a visitor tied to a customer now for the
        first time brings its earlier hits (at most BACKFILL_HITS, the newest)."""
        ident = req.identify
        email, phone = self._contact("email", ident.email), self._contact("sms", ident.phone)
        if not (visitor.customer_id or email or phone):
            return
        p = page_events.c
        q = sa.select(p.id, p.kind, p.name, p.url, p.event_time).where(p.visitor_id == visitor.visitor_id)
        if visitor.customer_id and visitor.customer_id != before:
            q = q.order_by(p.id.desc()).limit(BACKFILL_HITS + len(hit_ids))
        elif hit_ids:
            q = q.where(p.id.in_(hit_ids))
        else:
            return
        hits = sorted(tx.conn.execute(q).all(), key=lambda h: h.id)
        if not hits:
            return
        e = ev.WebActivityEvent(
            visitor=VISITOR.format(visitor.visitor_id),
            customer=CUSTOMER.format(visitor.customer_id) if visitor.customer_id else "",
            email=email,
            phone=phone,
        )
        for h in hits:
            hit = e.hits.add(id=str(h.id), kind=h.kind, name=h.name, url=h.url)
            hit.event_time.FromDatetime(h.event_time)
        e.event_time.GetCurrentTime()
        tx.publish("web_activity.recorded.v1", e, e.visitor)

    def _contact(self, channel: str, value: str) -> str:
        """An identify field as sales can match it, or "" (a field the visitor was not identified
        by may hold anything a form copied into it: "-", "n/a"; it is left out, not refused)."""
        try:
            return consent.normalise(channel, value, self.rt.phone_region, "identify") if value else ""
        except InvalidArgument:
            return ""

    def get_visitor(self, req: pb.GetVisitorRequest) -> pb.Visitor:
        vid = VISITOR.parse(req.name).visitor_id
        p = page_events.c
        with self.uow.read() as conn:
            v = conn.execute(sa.select(visitors).where(visitors.c.visitor_id == vid)).first()
            if v is None:
                raise NotFound(f"{req.name} not found")
            views = conn.execute(sa.select(sa.func.count()).where(p.visitor_id == vid, p.kind == "page_view")).scalar()
            last = conn.execute(
                sa.select(p.url).where(p.visitor_id == vid).order_by(p.event_time.desc(), p.id.desc()).limit(1)
            ).scalar()
        out = pb.Visitor(
            name=VISITOR.format(vid),
            customer=CUSTOMER.format(v.customer_id) if v.customer_id else "",
            identified_by=v.identified_by,
            page_views=views,
            last_page=last or "",
        )
        out.first_seen_time.FromDatetime(v.first_seen_time)
        out.last_seen_time.FromDatetime(v.last_seen_time)
        return out

    # responses ----------------------------------------------------------------------------------
    def _record(self, tx, r: pb.Response, request_id: str, prefix: str = "response."):
        """The response row (an earlier one for a repeated request_id), the message's
        responded_time, response.recorded.v1."""
        conn = tx.conn
        if request_id:
            earlier = conn.execute(sa.select(responses).where(responses.c.request_id == request_id)).first()
            if earlier is not None:
                return earlier
        bad: list[FieldViolation] = []
        if r.kind not in KINDS:
            bad.append(FieldViolation(f"{prefix}kind", f"must be one of {', '.join(KINDS)}"))
        if r.channel and r.channel not in RESPONSE_CHANNELS:
            bad.append(FieldViolation(f"{prefix}channel", f"must be one of {', '.join(RESPONSE_CHANNELS)}"))
        if bad:
            raise InvalidArgument(bad)
        message = None
        if r.message:
            ids = MESSAGE.parse(r.message, f"{prefix}message")
            mid = _uuid(ids.message_id)
            message = conn.execute(sa.select(messages).where(m.id == mid)).first() if mid else None
            if message is None:
                raise NotFound(f"{r.message} not found")
        campaign_id = str(message.campaign_id) if message is not None else ""
        if not campaign_id and r.campaign:
            campaign_id = _uuid(CAMPAIGN.parse(r.campaign, f"{prefix}campaign").campaign_id) or ""
            if not campaign_id:
                raise NotFound(f"{r.campaign} not found")
        if not campaign_id and _uuid(r.utm_campaign):
            campaign_id = _uuid(r.utm_campaign)
        if not campaign_id:
            raise InvalidArgument.field(f"{prefix}campaign", "is required (or message, or utm_campaign naming it)")
        if conn.execute(sa.select(campaigns.c.id).where(campaigns.c.id == campaign_id)).first() is None:
            raise NotFound(f"campaigns/{campaign_id} not found")
        customer_id = CUSTOMER.parse(r.customer, f"{prefix}customer").customer_id if r.customer else ""
        if not customer_id and message is not None:
            customer_id = message.customer_id
        if not customer_id and r.visitor_id:
            customer_id = (
                conn.execute(sa.select(visitors.c.customer_id).where(visitors.c.visitor_id == r.visitor_id)).scalar()
                or ""
            )
        if message is None and customer_id:  # the touch it answers: the campaign's last message to them
            message = conn.execute(
                sa.select(messages)
                .where(m.campaign_id == campaign_id, m.customer_id == customer_id)
                .order_by(m.run.desc())
                .limit(1)
            ).first()
        mail = consent.normalise("email", r.email, self.rt.phone_region, f"{prefix}email") if r.email else ""
        phone = consent.normalise("sms", r.phone, self.rt.phone_region, f"{prefix}phone") if r.phone else ""
        values = {
            "campaign_id": campaign_id,
            "message_id": message.id if message is not None else None,
            "customer_id": customer_id,
            "kind": r.kind,
            "channel": r.channel or (message.channel if message is not None else "web"),
            "contact_name": persian.normalize(r.contact_name)[:200] if r.contact_name else "",
            "email": mail,
            "phone": phone,
            "text": r.text[:4000],
            "utm_source": r.utm_source[:100],
            "utm_medium": r.utm_medium[:100],
            "utm_campaign": r.utm_campaign[:100],
            "visitor_id": r.visitor_id[:64],
            "actor": current_principal().subject,
            "request_id": request_id or None,
        }
        row = conn.execute(pg_insert(responses).values(**values).on_conflict_do_nothing().returning(responses)).first()
        if row is None:  # a concurrent call with this request_id committed first
            return conn.execute(sa.select(responses).where(responses.c.request_id == request_id)).one()
        if message is not None:
            conn.execute(
                messages.update()
                .where(m.id == message.id)
                .values(responded_time=sa.func.coalesce(m.responded_time, sa.func.now()))
            )
        tx.publish("response.recorded.v1", response_event(row), RESPONSE.format(row.id))
        return row

    def sms_reply(self, number: str, text: str, provider_id: str = "") -> str:
        """An SMS to the company's line that is no stop keyword: a response (kind sms) to the
        latest campaign SMS sent to that number within its campaign's attribution window; the
        response's name, or "" when no campaign message went there. A provider's redelivery
        (same message id) is one response."""
        with self.uow.begin() as tx:
            row = _latest_sent(tx.conn, "sms", number)
            if row is None:
                return ""
            given = pb.Response(
                message=MESSAGE.format(row.campaign_id, row.id), kind="sms", channel="sms", phone=number, text=text
            )
            rid = f"sms:{provider_id[:100]}" if provider_id else ""
            return RESPONSE.format(self._record(tx, given, rid).id)

    def record_response(self, req: pb.RecordResponseRequest) -> pb.Response:
        check_request_id(req.request_id)
        with self.uow.begin() as tx:
            return response_to_proto(self._record(tx, req.response, req.request_id))

    def list_responses(self, req: pb.ListResponsesRequest) -> tuple[list[pb.Response], str]:
        campaign_id = _uuid(CAMPAIGN.parse(req.campaign, "campaign").campaign_id)
        if campaign_id is None:
            raise NotFound(f"{req.campaign} not found")
        r = responses.c
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn,
                sa.select(responses).where(r.campaign_id == campaign_id),
                [(r.create_time, True), (r.id, True)],
                self.tokens,
                f"r:{campaign_id}",
                page_size(req.page_size),
                req.page_token,
            )
        return [response_to_proto(x) for x in rows], token


def _latest_sent(conn: sa.Connection, channel: str, address: str):
    """The latest message of `channel` a campaign sent to `address` within that campaign's
    attribution window (what an SMS answer or an e-mail reply without references answers)."""
    c = campaigns.c
    return conn.execute(
        sa.select(messages)
        .join(campaigns, c.id == m.campaign_id)
        .where(
            m.channel == channel,
            m.address == address,
            m.sent_time.is_not(None),
            m.sent_time > sa.func.now() - sa.func.make_interval(0, 0, 0, c.attribution_days),
        )
        .order_by(m.sent_time.desc())
        .limit(1)
    ).first()


def summarise(conn: sa.Connection, customer_id: str) -> None:
    """The customer's web_activity from every page event of their visitors (set-based), and the
    audience row's web columns from it (segment filters read those); the caller then calls
    rt.audience_changed so segments follow."""
    p, v = page_events.c, visitors.c
    theirs = page_events.join(visitors, v.visitor_id == p.visitor_id)
    last_page = (
        sa.select(p.url)
        .select_from(theirs)
        .where(v.customer_id == customer_id, p.kind == "page_view")
        .order_by(p.event_time.desc(), p.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    agg = (
        sa.select(
            sa.literal(customer_id).label("customer_id"),
            sa.func.count().filter(p.kind == "page_view").label("page_views"),
            sa.func.count().filter(p.kind == "event").label("event_count"),
            sa.func.min(p.event_time).label("first_visit_time"),
            sa.func.max(p.event_time).label("last_visit_time"),
            sa.func.coalesce(last_page, "").label("last_page"),
        )
        .select_from(theirs)
        .where(v.customer_id == customer_id)
    )
    cols = ["customer_id", "page_views", "event_count", "first_visit_time", "last_visit_time", "last_page"]
    stmt = pg_insert(web_activity).from_select(cols, agg)
    w = conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["customer_id"], set_={c: stmt.excluded[c] for c in cols[1:]}
        ).returning(web_activity)
    ).one()
    conn.execute(
        audience.update()
        .where(audience.c.customer_id == customer_id)
        .values(web_page_views=w.page_views, web_events=w.event_count, last_web_visit_time=w.last_visit_time)
    )


def response_event(row) -> ev.ResponseEvent:
    e = ev.ResponseEvent(
        response=RESPONSE.format(row.id),
        campaign=CAMPAIGN.format(row.campaign_id),
        message=MESSAGE.format(row.campaign_id, row.message_id) if row.message_id else "",
        customer=CUSTOMER.format(row.customer_id) if row.customer_id else "",
        kind=row.kind,
        channel=row.channel,
        contact_name=row.contact_name,
        email=row.email,
        phone=row.phone,
        text=row.text,
        utm_source=row.utm_source,
        utm_medium=row.utm_medium,
        utm_campaign=row.utm_campaign,
        visitor_id=row.visitor_id,
    )
    e.event_time.FromDatetime(row.create_time)
    return e


def response_to_proto(row) -> pb.Response:
    out = pb.Response(name=RESPONSE.format(row.id))
    for k, v in response_event(row).ListFields():
        if k.name in out.DESCRIPTOR.fields_by_name and k.name != "event_time":
            setattr(out, k.name, v)
    out.create_time.FromDatetime(row.create_time)
    return out


class TrackingServicer(tracking_pb2_grpc.TrackingServiceServicer):
    def __init__(self, uc: Tracking):
        self.uc = uc

    def GetOpenPixel(self, request, context):
        return self.uc.open_pixel(request)

    def FollowClick(self, request, context):
        return self.uc.follow_click(request)

    def FollowShortLink(self, request, context):
        return self.uc.follow_short_link(request)

    def PostBounce(self, request, context):
        return self.uc.post_bounce(request)

    def PostInboundMail(self, request, context):
        return self.uc.inbound_mail(request)

    def PostDeliveryReceipt(self, request, context):
        return self.uc.delivery_receipt(request)

    def PostTrackingEvents(self, request, context):
        return self.uc.post_events(request)

    def RecordResponse(self, request, context):
        return self.uc.record_response(request)

    def ListResponses(self, request, context):
        items, token = self.uc.list_responses(request)
        return pb.ListResponsesResponse(responses=items, next_page_token=token)

    def GetVisitor(self, request, context):
        return self.uc.get_visitor(request)


def on_merged(rt: Campaign, conn: sa.Connection, event) -> None:
    """customer.merged.v1 (after the audience part re-pointed the visitors): the merged
    customers' web_activity goes, the survivor's is recomputed from all their visits."""
    from crm.customer.v1 import customer_events_pb2 as ce

    msg = event.parse(ce.CustomerMerged)
    survivor = msg.survivor.name.rsplit("/", 1)[-1]
    merged = [n.rsplit("/", 1)[-1] for n in msg.merged]
    conn.execute(web_activity.delete().where(web_activity.c.customer_id.in_(merged)))
    summarise(conn, survivor)
    rt.audience_changed(conn, [survivor], "web")


def on_erased(conn: sa.Connection, event) -> None:
    """customer.erased.v1: the customer's browsing history goes (their visitors' page events,
    the visitors, the summary) and their SMS short links; their responses lose the contact
    (audience.erase_personal)."""
    from crm.customer.v1 import customer_events_pb2 as ce

    cid = event.parse(ce.CustomerErased).customer.name.rsplit("/", 1)[-1]
    # their SMS short links' targets may carry personal values the template put in the URL
    conn.execute(short_links.delete().where(short_links.c.message_id.in_(sa.select(m.id).where(m.customer_id == cid))))
    theirs = sa.select(visitors.c.visitor_id).where(visitors.c.customer_id == cid)
    conn.execute(page_events.delete().where(page_events.c.visitor_id.in_(theirs)))
    conn.execute(visitors.delete().where(visitors.c.customer_id == cid))
    conn.execute(web_activity.delete().where(web_activity.c.customer_id == cid))
    conn.execute(
        audience.update()
        .where(audience.c.customer_id == cid)
        .values(web_page_views=0, web_events=0, last_web_visit_time=None)
    )


def subscriptions(rt: Campaign) -> list[Subscription]:
    return [
        Subscription(
            domain="customer",
            handlers={
                "customer.merged.v1": lambda conn, event: on_merged(rt, conn, event),
                "customer.erased.v1": on_erased,
            },
        )
    ]


def use_cases(rt: Campaign) -> Tracking:
    return rt.once("tracking", lambda: Tracking(rt))


def registration(rt: Campaign) -> Registration:
    return Registration.of(TrackingServicer(use_cases(rt)))


def install(rt: Campaign) -> None:
    settings(rt)  # read at start, as every other setting
