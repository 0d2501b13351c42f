"""ChannelService (proto/crm/support/v1/channels.proto): the bots' webhook, the public web form
and the channels' status.

The two public RPCs are reached through the gateway without a bearer token (routes.PUBLIC):
the gateway calls them as public_channel, so this service checks what authenticates the
caller itself: the webhook's secret token (hmac.compare_digest against TELEGRAM_WEBHOOK_SECRET
/ BALE_WEBHOOK_SECRET) and the form's site key (one of WEB_FORM_KEYS). Either wrong or missing
is UNAUTHENTICATED.

The web form opens a ticket on channel web with the e-mail (else the phone) as its contact
address; replies go by mail when the mail part has registered its sender and the form gave an
e-mail. A filled honeypot (`website`) is answered like an accepted form and nothing is stored.
Each accepted form is recorded in webform_submissions (ticket, site key, client address).
"""

from __future__ import annotations

import hmac
import logging
import re

import sqlalchemy as sa

from crm.support.v1 import channels_pb2 as pb
from crm.support.v1 import channels_pb2_grpc
from crm_chassis.columns import TIMESTAMPTZ, UUID, id_column, text_column
from crm_chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound, Unauthenticated
from crm_chassis.grpc_server import Registration
from crm_chassis.links import key_matches
from crm_chassis.persian import phone_e164

from . import messengers
from .messengers import PROVIDERS, channel_settings, parse_update
from .runtime import Support
from .tables import categories, metadata, tickets
from .ticketing import NewTicket, number_text

log = logging.getLogger("support.channels")

WEBHOOK_PATH = "/v1/channels/{provider}:webhook"
NAME_LIMIT = 200
EMAIL_LIMIT = 254
PHONE_LIMIT = 40
SUBJECT_LIMIT = 200
BODY_LIMIT = 10_000
CATEGORY_LIMIT = 100
REQUEST_ID_LIMIT = 100
ADDRESS_LIMIT = 100
# A practical address check (RFC 5322's full grammar accepts what no mail server delivers):
# a local part of the usual characters, a domain of dot-separated labels with a 2+ letter TLD.
_EMAIL = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,63}$"
)

# Each accepted web form: which site sent it, from where, and the ticket it opened.
webform_submissions = sa.Table(
    "webform_submissions",
    metadata,
    id_column(),
    sa.Column("ticket_id", UUID, sa.ForeignKey("tickets.id", ondelete="CASCADE"), nullable=False),
    text_column("site_key"),
    text_column("client_address"),
    text_column("email"),
    text_column("phone"),
    sa.Column("create_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
)
sa.Index("webform_submissions_create", webform_submissions.c.create_time)
sa.Index("webform_submissions_ticket", webform_submissions.c.ticket_id)

OUTCOME = {
    messengers.OPENED: pb.PostBotUpdateResponse.OUTCOME_OPENED,
    messengers.APPENDED: pb.PostBotUpdateResponse.OUTCOME_APPENDED,
    messengers.DUPLICATE: pb.PostBotUpdateResponse.OUTCOME_DUPLICATE,
    messengers.IGNORED: pb.PostBotUpdateResponse.OUTCOME_IGNORED,
}


def confirmation(number: str) -> str:
    return f"درخواست شما با شماره پیگیری {number} ثبت شد. کارشناسان ما به‌زودی با شما تماس می‌گیرند."


HONEYPOT_CONFIRMATION = "درخواست شما ثبت شد. کارشناسان ما به‌زودی با شما تماس می‌گیرند."


def _matches(given: str, expected: str) -> bool:
    return bool(given) and bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


class Channels:
    def __init__(self, support: Support):
        self.support = support
        self.settings = channel_settings(support)
        self.messengers = messengers.use_cases(support)

    # -- the webhook -----------------------------------------------------------------------
    def post_update(self, req: pb.PostBotUpdateRequest) -> pb.PostBotUpdateResponse:
        provider = req.provider.strip().lower()
        if provider not in PROVIDERS:
            raise NotFound(f"no messenger {req.provider!r} (telegram, bale)", reason="UNKNOWN_PROVIDER")
        secret = self.settings.providers[provider].webhook_secret
        if not secret:
            var = f"{provider.upper()}_WEBHOOK_SECRET"
            raise FailedPrecondition(f"the {provider} webhook is not configured ({var})", reason="NOT_CONFIGURED")
        if not _matches(req.secret_token, secret):
            raise Unauthenticated("the webhook's secret token is wrong or missing", reason="BAD_WEBHOOK_SECRET")
        update = parse_update(req.body)
        with self.support.uow.begin() as tx:
            outcome = self.messengers.handle_update(tx, provider, update)
        return pb.PostBotUpdateResponse(outcome=OUTCOME[outcome])

    # -- the web form ----------------------------------------------------------------------
    def submit(self, req: pb.SubmitWebFormRequest) -> pb.SubmitWebFormResponse:
        key = req.site_key.strip()
        # Every key is compared (constant time each), so the time does not tell which matched.
        if not key_matches(key, self.settings.web_form_keys):
            raise Unauthenticated("the site key is wrong or missing", reason="BAD_SITE_KEY")
        if req.website.strip():
            log.info("web form honeypot filled: dropped", extra={"client": req.client_address[:ADDRESS_LIMIT]})
            return pb.SubmitWebFormResponse(ticket_number="", message=HONEYPOT_CONFIRMATION)
        name, email, subject, body = req.name.strip(), req.email.strip().lower(), req.subject.strip(), req.body.strip()
        raw_phone, category = req.phone.strip(), req.category.strip()
        bad: list[FieldViolation] = []
        if len(name) > NAME_LIMIT:
            bad.append(FieldViolation("name", f"may be at most {NAME_LIMIT} characters"))
        if email and (len(email) > EMAIL_LIMIT or not _EMAIL.match(email)):
            bad.append(FieldViolation("email", "is not a valid e-mail address"))
        phone = ""
        if raw_phone:
            phone = (phone_e164(raw_phone, self.support.phone_region) or "") if len(raw_phone) <= PHONE_LIMIT else ""
            if not phone:
                bad.append(FieldViolation("phone", "is not a valid phone number"))
        if not email and not raw_phone:
            bad.append(FieldViolation("email", "an e-mail address or a phone number is required"))
            bad.append(FieldViolation("phone", "an e-mail address or a phone number is required"))
        if len(subject) > SUBJECT_LIMIT:
            bad.append(FieldViolation("subject", f"may be at most {SUBJECT_LIMIT} characters"))
        if not body:
            bad.append(FieldViolation("body", "is required"))
        elif len(body) > BODY_LIMIT:
            bad.append(FieldViolation("body", f"may be at most {BODY_LIMIT} characters"))
        if len(category) > CATEGORY_LIMIT:
            bad.append(FieldViolation("category", f"may be at most {CATEGORY_LIMIT} characters"))
        if len(req.request_id) > REQUEST_ID_LIMIT:
            bad.append(FieldViolation("request_id", f"may be at most {REQUEST_ID_LIMIT} characters"))
        if bad:
            raise InvalidArgument(bad)
        request_id = f"webform:{req.request_id}" if req.request_id else ""
        try:
            return self._open(req, name, email, phone, subject, body, category, key, request_id)
        except sa.exc.IntegrityError:
            # the same request_id submitted twice at once: the other one opened the ticket
            if request_id:
                found = self._by_request(request_id)
                if found is not None:
                    return found
            raise

    def _by_request(self, request_id: str) -> pb.SubmitWebFormResponse | None:
        with self.support.uow.read() as conn:
            number = conn.execute(sa.select(tickets.c.number).where(tickets.c.request_id == request_id)).scalar()
        if number is None:
            return None
        return pb.SubmitWebFormResponse(ticket_number=number_text(number), message=confirmation(number_text(number)))

    def _open(self, req, name, email, phone, subject, body, category, key, request_id) -> pb.SubmitWebFormResponse:
        if request_id:
            found = self._by_request(request_id)
            if found is not None:
                return found
        t = self.support.tickets
        with self.support.uow.begin() as tx:
            conn = tx.conn
            category_id = None
            if category:
                category_id = conn.execute(
                    sa.select(categories.c.id).where(categories.c.key == category, categories.c.active)
                ).scalar()
                if category_id is None:
                    raise InvalidArgument(FieldViolation("category", f"{category!r} is not an active category"))
            customer_id = (t.match_customer(conn, email) if email else "") or (
                t.match_customer(conn, phone) if phone else ""
            )
            row = t.open(
                tx,
                NewTicket(
                    subject=subject or " ".join(body.split())[:80],
                    channel="web",
                    body=body,
                    customer_id=customer_id,
                    contact_address=email or phone,
                    contact_name=name,
                    category_id=str(category_id) if category_id else None,
                    custom_fields={"phone": phone} if phone and email else {},
                    author=email or phone,
                    headers={"web_form": {"client_address": req.client_address[:ADDRESS_LIMIT], "phone": phone}},
                    request_id=request_id,
                ),
                "webform",
            )
            conn.execute(
                webform_submissions.insert().values(
                    ticket_id=row.id,
                    site_key=key,
                    client_address=req.client_address[:ADDRESS_LIMIT],
                    email=email,
                    phone=phone,
                )
            )
        number = number_text(row.number)
        return pb.SubmitWebFormResponse(ticket_number=number, message=confirmation(number))

    # -- status ----------------------------------------------------------------------------
    def status(self) -> pb.ChannelStatus:
        s = self.settings
        with self.support.uow.read() as conn:
            counts = self.messengers.counts(conn)
            recent = conn.execute(
                sa.select(sa.func.count()).where(
                    webform_submissions.c.create_time > sa.func.now() - sa.text("interval '24 hours'")
                )
            ).scalar()
        out = pb.ChannelStatus(name="channelStatus", web_form_site_keys=len(s.web_form_keys))
        out.web_form_submissions_24h = recent or 0
        for p in PROVIDERS:
            cfg = s.providers[p]
            out.providers.append(
                pb.ChannelStatus.Provider(
                    provider=p,
                    webhook_configured=bool(cfg.webhook_secret),
                    sending_configured=bool(cfg.token),
                    webhook_url=s.public_base_url + WEBHOOK_PATH.format(provider=p),
                    chat_count=counts[p]["chats"],
                    pending_deliveries=counts[p]["pending"],
                    failed_deliveries=counts[p]["failed"],
                )
            )
        return out


class ChannelServicer(channels_pb2_grpc.ChannelServiceServicer):
    def __init__(self, uc: Channels):
        self.uc = uc

    def PostBotUpdate(self, request, context):
        return self.uc.post_update(request)

    def SubmitWebForm(self, request, context):
        return self.uc.submit(request)

    def GetChannelStatus(self, request, context):
        return self.uc.status()


def use_cases(support: Support) -> Channels:
    return support.once("channels", lambda: Channels(support))


def registration(support: Support) -> Registration:
    return Registration.of(ChannelServicer(use_cases(support)))
