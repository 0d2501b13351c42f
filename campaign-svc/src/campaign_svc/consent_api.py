"""ConsentService (proto/crm/campaign/v1/consent.proto): the consent of an address, the ledger,
double opt-in by a signed confirmation link, unsubscribe links (and RFC 8058's one-click POST),
SMS stop keywords, suppressions. The ledger and state themselves are consent.py's.

Links (crm_chassis.links, secret CONSENT_LINK_SECRET, default derived from JWT_SECRET):
- confirmation: the "requested" entry's id, valid OPT_IN_LINK_DAYS (7). The message carries
  OPT_IN_PAGE_URL with {token} (default PUBLIC_BASE_URL/v1/optIn/{token}): the company's page
  shows GetOptIn and posts ConfirmOptIn, so a mail scanner fetching the link confirms nothing.
- unsubscribe: (channel, address, purpose, message id), never expiring; `unsubscribe_url` gives
  the URL the delivery part puts in each message and its List-Unsubscribe header.

The confirmation message goes out by a durable timer (consent.confirm) after the request's
commit, through the channel's sender (runtime.Campaign.senders); a failed send is retried.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from google.protobuf import empty_pb2, json_format, struct_pb2

from crm.campaign.v1 import consent_pb2 as pb
from crm.campaign.v1 import consent_pb2_grpc
from crm_chassis import persian, timers
from crm_chassis.errors import AlreadyExists, FieldViolation, InvalidArgument, NotFound, Unauthenticated
from crm_chassis.filtering import keyset_page
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.links import Signer, key_list, key_matches
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import ResourceName

from . import consent
from .outgoing import Outgoing
from .runtime import Campaign
from .tables import consent_ledger, consent_state, messages, suppressions

ENTRY = ResourceName("consentEntries/{entry}")
CUSTOMER = ResourceName("customers/{customer_id}")
CONFIRM = "consent.confirm"  # timer: send the confirmation message of a requested entry
PURPOSE_LIMIT = 40
RECORDABLE = ("granted", "revoked")
SUPPRESSION_REASONS = ("hard_bounce", "complaint", "stop", "admin", "erased")
# Stop keywords of SMS (compared after Persian normalisation, ASCII digits, lower case, no spaces):
# "لغو11" / "11" is the opt-out Iranian operators require of advertising lines.
STOP_WORDS = frozenset(
    {"لغو", "لغو11", "11", "انصراف", "توقف", "stop", "stopall", "unsubscribe", "cancel", "end", "quit", "optout"}
)


@dataclass(frozen=True)
class Settings:
    secret: bytes
    link_days: int
    base_url: str
    page_url: str  # with {token}
    sms_keys: tuple[str, ...]

    @classmethod
    def from_env(cls, jwt_secret: str, env=os.environ) -> Settings:
        secret = consent.link_secret_of(env, jwt_secret)
        try:
            days = int(env.get("OPT_IN_LINK_DAYS", "7"))
        except ValueError:
            days = 7
        base = env.get("PUBLIC_BASE_URL", "http://localhost:8080").rstrip("/")
        keys = key_list(env, "SMS_INBOUND_KEYS", "dev-sms-key")
        return cls(secret, max(1, days), base, env.get("OPT_IN_PAGE_URL", f"{base}/v1/optIn/{{token}}"), keys)


def settings(rt: Campaign) -> Settings:
    return rt.once("consent.settings", lambda: Settings.from_env(rt.settings.jwt_secret))


def _opt_in_links(rt: Campaign) -> Signer:
    return Signer(settings(rt).secret, "opt-in", reason="OPT_IN_LINK_INVALID")


def _unsubscribe_links(rt: Campaign) -> Signer:
    return Signer(settings(rt).secret, "unsubscribe", reason="UNSUBSCRIBE_LINK_INVALID")


def unsubscribe_token(
    rt: Campaign, channel: str, address: str, purpose: str = "marketing", message_id: str = ""
) -> str:
    return _unsubscribe_links(rt).sign(channel, address, purpose, str(message_id))


def unsubscribe_url(rt: Campaign, channel: str, address: str, purpose: str = "marketing", message_id: str = "") -> str:
    """The public unsubscribe URL of a message (also the https target of its List-Unsubscribe
    header: RFC 8058's one-click POST goes to the same route)."""
    return f"{settings(rt).base_url}/v1/unsubscribe/{unsubscribe_token(rt, channel, address, purpose, message_id)}"


def mask(channel: str, address: str) -> str:
    """m***@example.com, +98912***4567: enough for a person to recognise their own address."""
    if channel == "email" and "@" in address:
        local, _, domain = address.partition("@")
        return f"{local[:1]}***@{domain}"
    if len(address) > 8:
        return f"{address[:6]}***{address[-4:]}"
    return address[:2] + "***"


def stop_keyword(text: str) -> str:
    """The stop keyword a text is, or ""."""
    word = persian.to_ascii_digits(persian.normalize(text or "")).lower()
    word = "".join(ch for ch in word if not ch.isspace() and ch not in ".!،,")
    return word if word in STOP_WORDS else ""


def _struct(d: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d or {})
    return s


def entry_to_proto(row) -> pb.ConsentEntry:
    e = pb.ConsentEntry(
        name=ENTRY.format(row.id),
        channel=row.channel,
        address=row.address,
        purpose=row.purpose,
        customer=CUSTOMER.format(row.customer_id) if row.customer_id else "",
        action=row.action,
        source=row.source,
        text_version=row.text_version,
        proof=_struct(row.proof),
        actor=row.actor,
    )
    e.occur_time.FromDatetime(row.occur_time)
    e.record_time.FromDatetime(row.record_time)
    return e


def suppression_to_proto(row) -> pb.Suppression:
    s = pb.Suppression(channel=row.channel, address=row.address, reason=row.reason, detail=row.detail)
    s.create_time.FromDatetime(row.create_time)
    return s


class Consents:
    def __init__(self, rt: Campaign):
        self.rt = rt
        self.uow = rt.uow
        self.tokens = PageTokens(rt.settings.jwt_secret, "consent")

    def _address(self, channel: str, address: str, prefix: str = "") -> tuple[str, str]:
        return channel, consent.normalise(channel, address, self.rt.phone_region, f"{prefix}address")

    # reading ----------------------------------------------------------------------------------
    def consent_of(self, conn: sa.Connection, channel: str, address: str) -> pb.Consent:
        rows = conn.execute(
            sa.select(consent_state)
            .where(consent_state.c.channel == channel, consent_state.c.address == address)
            .order_by(consent_state.c.purpose)
        ).all()
        sup = consent.suppression_of(conn, channel, address)
        ok = conn.execute(sa.select(consent.sendable(channel, "marketing", sa.literal(address)))).scalar()
        out = pb.Consent(
            channel=channel,
            address=address,
            customer=next((CUSTOMER.format(r.customer_id) for r in rows if r.customer_id), ""),
            suppressed=sup is not None,
            suppression_reason=sup.reason if sup else "",
            sendable=bool(ok),
        )
        for r in rows:
            p = out.purposes.add(purpose=r.purpose, status=r.status, source=r.source, entry=ENTRY.format(r.ledger_id))
            p.update_time.FromDatetime(r.update_time)
        return out

    def get(self, req: pb.GetConsentRequest) -> pb.Consent:
        channel, address = self._address(req.channel, req.address)
        with self.uow.read() as conn:
            return self.consent_of(conn, channel, address)

    def list_entries(self, req: pb.ListConsentEntriesRequest) -> tuple[list[pb.ConsentEntry], str]:
        limit = page_size(req.page_size)
        l = consent_ledger.c  # noqa: E741
        if req.customer:
            where = l.customer_id == CUSTOMER.parse(req.customer, "customer").customer_id
            key = f"c:{req.customer}"
        elif req.address:
            channel, address = self._address(req.channel, req.address)
            where = sa.and_(l.channel == channel, l.address == address)
            key = f"a:{channel}:{address}"
        else:
            raise InvalidArgument.field("address", "give channel and address, or customer")
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn, sa.select(consent_ledger).where(where), [(l.id, True)], self.tokens, key, limit, req.page_token
            )
        return [entry_to_proto(r) for r in rows], token

    # recording --------------------------------------------------------------------------------
    def _purpose(self, value: str, name: str) -> str:
        purpose = (value or "marketing").strip().lower()
        if len(purpose) > PURPOSE_LIMIT or not purpose.replace("_", "").replace("-", "").isalnum():
            raise InvalidArgument.field(name, f"must be 1..{PURPOSE_LIMIT} letters, digits, '_' or '-'")
        return purpose

    def record(self, req: pb.RecordConsentRequest) -> pb.RecordConsentResponse:
        e = req.entry
        bad: list[FieldViolation] = []
        if e.action not in RECORDABLE:
            bad.append(
                FieldViolation("entry.action", "must be granted or revoked (RequestOptIn asks for a confirmation)")
            )
        if e.channel not in consent.CHANNELS:
            bad.append(FieldViolation("entry.channel", f"must be one of {', '.join(consent.CHANNELS)}"))
        if bad:
            raise InvalidArgument(bad)
        _, address = self._address(e.channel, e.address, "entry.")
        purpose = self._purpose(e.purpose, "entry.purpose")
        if purpose == consent.ALL and e.action != "revoked":
            raise InvalidArgument.field("entry.purpose", 'only a revocation may name purpose "all"')
        occur = None
        if e.HasField("occur_time"):
            occur = e.occur_time.ToDatetime(dt.UTC)
            if occur > dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5):
                raise InvalidArgument.field("entry.occur_time", "may not be in the future")
        customer_id = CUSTOMER.parse(e.customer, "entry.customer").customer_id if e.customer else ""
        principal = current_principal()
        change = consent.Change(
            e.channel,
            address,
            e.action,
            (e.source or "admin").strip()[:40],
            purpose=purpose,
            customer_id=customer_id,
            text_version=e.text_version[:100],
            proof=json_format.MessageToDict(e.proof),
            actor=principal.subject,
            occur_time=occur,
        )
        with self.uow.begin() as tx:
            done = consent.record(self.rt, tx, change)
            rows = tx.conn.execute(
                sa.select(consent_ledger).where(consent_ledger.c.id.in_([d.entry_id for d in done]))
            ).all()
            return pb.RecordConsentResponse(
                entries=[entry_to_proto(r) for r in sorted(rows, key=lambda r: r.id)],
                consent=self.consent_of(tx.conn, e.channel, address),
            )

    # double opt-in ----------------------------------------------------------------------------
    def request_opt_in(self, req: pb.RequestOptInRequest) -> pb.RequestOptInResponse:
        channel, address = self._address(req.channel, req.address)
        purpose = self._purpose(req.purpose, "purpose")
        if purpose == consent.ALL:
            raise InvalidArgument.field("purpose", 'an opt-in names one purpose, not "all"')
        customer_id = CUSTOMER.parse(req.customer, "customer").customer_id if req.customer else ""
        principal = current_principal()
        with self.uow.begin() as tx:
            conn = tx.conn
            if consent.status_of(conn, channel, address, purpose) == "granted":
                return pb.RequestOptInResponse(consent=self.consent_of(conn, channel, address))
            (done,) = consent.record(
                self.rt,
                tx,
                consent.Change(
                    channel,
                    address,
                    "requested",
                    (req.source or "api").strip()[:40],
                    purpose=purpose,
                    customer_id=customer_id,
                    text_version=req.text_version[:100],
                    proof=json_format.MessageToDict(req.proof),
                    actor=principal.subject,
                ),
            )
            now = conn.execute(sa.select(sa.func.now())).scalar()
            timers.schedule(conn, CONFIRM, str(done.entry_id), now)
            row = conn.execute(sa.select(consent_ledger).where(consent_ledger.c.id == done.entry_id)).one()
            return pb.RequestOptInResponse(
                entry=entry_to_proto(row), consent=self.consent_of(conn, channel, address), confirmation_sent=True
            )

    def _link_expiry(self, row) -> dt.datetime:
        return row.record_time + dt.timedelta(days=settings(self.rt).link_days)

    def confirmation_message(self, row) -> Outgoing:
        token = _opt_in_links(self.rt).sign(str(row.id), expire_time=self._link_expiry(row))
        link = settings(self.rt).page_url.format(token=token)
        fa = f"برای تأیید دریافت پیام‌ها ({row.purpose}) روی این پیوند بزنید: {link}"
        en = f"To confirm you want our messages ({row.purpose}), open: {link}"
        html = (
            f'<div dir="rtl" lang="fa"><p>برای تأیید دریافت پیام‌ها روی پیوند زیر بزنید.</p>'
            f'<p><a href="{link}">تأیید اشتراک</a></p></div>'
            f'<div dir="ltr" lang="en"><p>To confirm you want our messages, open the link: '
            f'<a href="{link}">confirm</a>.</p></div>'
        )
        return Outgoing(
            channel=row.channel,
            address=row.address,
            text=f"{fa}\n\n{en}",
            subject="تأیید اشتراک / Confirm your subscription",
            html=html if row.channel == "email" else "",
            message_id=f"opt-in-{row.id}",
        )

    def send_confirmation(self, conn: sa.Connection, timer) -> None:
        """consent.confirm: the confirmation message of a requested entry (a failed send raises and
        is retried by the timer worker; a request already answered sends nothing)."""
        row = conn.execute(sa.select(consent_ledger).where(consent_ledger.c.id == int(timer.key))).first()
        if row is None or row.action != "requested":
            return
        state = conn.execute(
            sa.select(consent_state.c.ledger_id).where(
                consent_state.c.channel == row.channel,
                consent_state.c.address == row.address,
                consent_state.c.purpose == row.purpose,
            )
        ).scalar()
        if state != row.id:  # answered (or asked again) since: a later entry set the state
            return
        send = self.rt.senders.get(row.channel)
        if send is None:
            raise RuntimeError(f"no sender for channel {row.channel} is configured")
        send(self.confirmation_message(row))

    def _requested(self, conn: sa.Connection, token: str):
        if not token:
            raise InvalidArgument.field("token", "is required")
        fields = _opt_in_links(self.rt).open(token)
        if len(fields) != 1 or not fields[0].isascii() or not fields[0].isdigit() or len(fields[0]) > 18:
            raise Unauthenticated("the link is not valid", reason="OPT_IN_LINK_INVALID")
        row = conn.execute(sa.select(consent_ledger).where(consent_ledger.c.id == int(fields[0]))).first()
        if row is None or row.action != "requested":
            raise Unauthenticated("the link is not valid", reason="OPT_IN_LINK_INVALID")
        return row

    def _opt_in(self, conn: sa.Connection, row) -> pb.OptIn:
        out = pb.OptIn(
            channel=row.channel,
            masked_address=mask(row.channel, row.address),
            purpose=row.purpose,
            status=consent.status_of(conn, row.channel, row.address, row.purpose),
        )
        out.expire_time.FromDatetime(self._link_expiry(row))
        return out

    def get_opt_in(self, req: pb.GetOptInRequest) -> pb.OptIn:
        with self.uow.read() as conn:
            return self._opt_in(conn, self._requested(conn, req.token))

    def confirm(self, req: pb.ConfirmOptInRequest) -> pb.OptIn:
        principal = current_principal()
        with self.uow.begin() as tx:
            row = self._requested(tx.conn, req.token)
            if consent.status_of(tx.conn, row.channel, row.address, row.purpose) != "granted":
                consent.record(
                    self.rt,
                    tx,
                    consent.Change(
                        row.channel,
                        row.address,
                        "granted",
                        "confirmation_link",
                        purpose=row.purpose,
                        customer_id=row.customer_id,
                        text_version=row.text_version,
                        proof={
                            "requested_entry": ENTRY.format(row.id),
                            "client_address": req.client_address[:100],
                            "user_agent": req.user_agent[:300],
                        },
                        actor=principal.subject,
                    ),
                )
            return self._opt_in(tx.conn, row)

    # unsubscribe ------------------------------------------------------------------------------
    def _unsubscription(self, token: str) -> tuple[str, str, str, str]:
        if not token:
            raise InvalidArgument.field("token", "is required")
        fields = _unsubscribe_links(self.rt).open(token)
        # signed with our key yet not one of our links (its fields are not what unsubscribe_token
        # writes): refused as any other bad link, nothing recorded
        if len(fields) != 4 or fields[0] not in consent.CHANNELS or not 0 < len(fields[2]) <= PURPOSE_LIMIT:
            raise Unauthenticated("the link is not valid", reason="UNSUBSCRIBE_LINK_INVALID")
        channel, address, purpose, message_id = fields
        return channel, address, purpose, message_id

    def get_unsubscribe(self, req: pb.GetUnsubscribeRequest) -> pb.Unsubscription:
        channel, address, purpose, _ = self._unsubscription(req.token)
        with self.uow.read() as conn:
            status = consent.status_of(conn, channel, address, purpose) if purpose != consent.ALL else ""
        return pb.Unsubscription(channel=channel, masked_address=mask(channel, address), purpose=purpose, status=status)

    def unsubscribe(self, req: pb.UnsubscribeRequest) -> pb.Unsubscription:
        channel, address, purpose, message_id = self._unsubscription(req.token)
        one_click = b"List-Unsubscribe=One-Click" in (req.body or b"")
        principal = current_principal()
        with self.uow.begin() as tx:
            if purpose == consent.ALL or consent.status_of(tx.conn, channel, address, purpose) != "revoked":
                consent.record(
                    self.rt,
                    tx,
                    consent.Change(
                        channel,
                        address,
                        "revoked",
                        "list_unsubscribe" if one_click else "unsubscribe_link",
                        purpose=purpose,
                        proof={"message": message_id, "client_address": req.client_address[:100]},
                        actor=principal.subject,
                    ),
                )
            try:
                mid = str(uuid.UUID(message_id))
            except ValueError:  # a link of no campaign message
                mid = None
            if mid:  # the campaign message it came from counts it (its stats)
                tx.conn.execute(
                    messages.update()
                    .where(messages.c.id == mid)
                    .values(unsubscribed_time=sa.func.coalesce(messages.c.unsubscribed_time, sa.func.now()))
                )
        return pb.Unsubscription(
            channel=channel, masked_address=mask(channel, address), purpose=purpose, status="revoked"
        )

    # SMS stop keywords ------------------------------------------------------------------------
    def inbound_sms(self, req: pb.PostInboundSmsRequest) -> pb.PostInboundSmsResponse:
        if not key_matches(req.key, settings(self.rt).sms_keys):
            raise Unauthenticated("the provider key is not valid", reason="SMS_KEY_INVALID")
        number = consent.normalise("sms", req.from_number, self.rt.phone_region, "from_number")
        keyword = stop_keyword(req.message)
        if not keyword:
            from . import tracking  # an answer to a campaign SMS is a response

            tracking.use_cases(self.rt).sms_reply(number, req.message, req.message_id)
            return pb.PostInboundSmsResponse(stopped=False)
        principal = current_principal()
        with self.uow.begin() as tx:
            conn = tx.conn
            if req.message_id:
                seen = conn.execute(
                    sa.select(consent_ledger.c.id).where(
                        consent_ledger.c.channel == "sms",
                        consent_ledger.c.address == number,
                        consent_ledger.c.source == "sms_stop",
                        consent_ledger.c.proof["message_id"].astext == req.message_id,
                    )
                ).first()
                if seen is not None:  # the provider's redelivery
                    return pb.PostInboundSmsResponse(stopped=True)
            consent.record(
                self.rt,
                tx,
                consent.Change(
                    "sms",
                    number,
                    "revoked",
                    "sms_stop",
                    purpose=consent.ALL,
                    proof={"keyword": keyword, "line": req.to_number[:20], "message_id": req.message_id[:100]},
                    actor=principal.subject,
                ),
            )
        return pb.PostInboundSmsResponse(stopped=True)

    # suppressions -----------------------------------------------------------------------------
    def list_suppressions(self, req: pb.ListSuppressionsRequest) -> tuple[list[pb.Suppression], str]:
        limit = page_size(req.page_size)
        s = suppressions.c
        q = sa.select(suppressions)
        if req.channel:
            if req.channel not in consent.CHANNELS:
                raise InvalidArgument.field("channel", f"must be one of {', '.join(consent.CHANNELS)}")
            q = q.where(s.channel == req.channel)
        order = [(s.create_time, True), (s.channel, True), (s.address, True)]
        with self.uow.read() as conn:
            rows, token = keyset_page(conn, q, order, self.tokens, f"s:{req.channel}", limit, req.page_token)
        return [suppression_to_proto(r) for r in rows], token

    def create_suppression(self, req: pb.CreateSuppressionRequest) -> pb.Suppression:
        sup = req.suppression
        _, address = self._address(sup.channel, sup.address, "suppression.")
        reason = sup.reason or "admin"
        if reason not in SUPPRESSION_REASONS:
            raise InvalidArgument.field("suppression.reason", f"must be one of {', '.join(SUPPRESSION_REASONS)}")
        with self.uow.begin() as tx:
            if not consent.suppress(tx, sup.channel, address, reason, sup.detail[:200]):
                raise AlreadyExists(f"{sup.channel} address {address} is already suppressed")
            tx.audit(f"suppressions/{sup.channel}/{address}", "create", current_principal(), [])
            row = tx.conn.execute(
                sa.select(suppressions).where(suppressions.c.channel == sup.channel, suppressions.c.address == address)
            ).one()
            return suppression_to_proto(row)

    def delete_suppression(self, req: pb.DeleteSuppressionRequest) -> None:
        channel, address = self._address(req.channel, req.address)
        with self.uow.begin() as tx:
            if not consent.lift(tx, channel, address):
                raise NotFound(f"{channel} address {address} is not suppressed")
            tx.audit(f"suppressions/{channel}/{address}", "delete", current_principal(), [])


class ConsentServicer(consent_pb2_grpc.ConsentServiceServicer):
    def __init__(self, uc: Consents):
        self.uc = uc

    def GetConsent(self, request, context):
        return self.uc.get(request)

    def RecordConsent(self, request, context):
        return self.uc.record(request)

    def ListConsentEntries(self, request, context):
        items, token = self.uc.list_entries(request)
        return pb.ListConsentEntriesResponse(entries=items, next_page_token=token)

    def RequestOptIn(self, request, context):
        return self.uc.request_opt_in(request)

    def GetOptIn(self, request, context):
        return self.uc.get_opt_in(request)

    def ConfirmOptIn(self, request, context):
        return self.uc.confirm(request)

    def GetUnsubscribe(self, request, context):
        return self.uc.get_unsubscribe(request)

    def Unsubscribe(self, request, context):
        return self.uc.unsubscribe(request)

    def PostInboundSms(self, request, context):
        return self.uc.inbound_sms(request)

    def ListSuppressions(self, request, context):
        items, token = self.uc.list_suppressions(request)
        return pb.ListSuppressionsResponse(suppressions=items, next_page_token=token)

    def CreateSuppression(self, request, context):
        return self.uc.create_suppression(request)

    def DeleteSuppression(self, request, context):
        self.uc.delete_suppression(request)
        return empty_pb2.Empty()


def use_cases(rt: Campaign) -> Consents:
    return rt.once("consents", lambda: Consents(rt))


def registration(rt: Campaign) -> Registration:
    return Registration.of(ConsentServicer(use_cases(rt)))


def timer_handlers(rt: Campaign) -> None:
    rt.timers.register(CONFIRM, use_cases(rt).send_confirmation, max_attempts=12)


def install(rt: Campaign) -> None:
    settings(rt)  # read at start, as every other setting
    consent.configure(consent.hash_key_of(os.environ, rt.settings.jwt_secret))
