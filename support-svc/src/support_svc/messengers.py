"""The messenger channels: Telegram and Bale bots (both speak the Telegram Bot API).

Inbound, a bot's webhook (ChannelService.PostBotUpdate, channels_api.py) hands each Update to
`Messengers.handle_update`: a message from a chat whose last ticket is not closed is added to
that ticket as the customer's message, else it opens a ticket (channel telegram or bale,
contact_address the chat id). Every message has the external id "<chat id>:<message id>" (an
edit "<chat id>:<message id>:e<edit date>"), so a redelivered update is one message. A shared
contact (the user's own, from a request_contact button) stores the phone on the chat and links
the chat (and its open ticket) to the customer with that number.

Outbound, `install` registers a sender per provider with a bot token: an agent reply on such a
ticket is sent to the chat by the core's durable delivery timer (at least once; a failure of
the Bot API, 429 included, raises and the timer retries with back-off). Short notices to a chat
(the greeting of /start, a new ticket's number) go through a timer of their own
(`messenger.notice`) so a slow Bot API never holds the webhook up.

Settings (read once per process, see docs/channels.md): TELEGRAM_BOT_TOKEN, TELEGRAM_API_BASE,
TELEGRAM_WEBHOOK_SECRET, BALE_BOT_TOKEN, BALE_API_BASE, BALE_WEBHOOK_SECRET,
BOT_API_TIMEOUT_SECONDS, MESSENGER_CONFIRM_TICKETS, PUBLIC_BASE_URL.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm_chassis import bots as chassis_bots
from crm_chassis import timers
from crm_chassis.bots import BotApi, BotApiError
from crm_chassis.columns import UUID, text_column, times
from crm_chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument
from crm_chassis.links import key_list
from crm_chassis.persian import phone_e164

from .runtime import Support
from .tables import metadata, ticket_messages, tickets
from .ticketing import NewTicket, Tickets, number_text

log = logging.getLogger("support.messengers")

PROVIDERS = chassis_bots.PROVIDERS
LABELS = {"telegram": "تلگرام", "bale": "بله"}
NOTICE = "messenger.notice"  # timer kind: a short message to a chat (greeting, ticket number)
NOTICE_ATTEMPTS = 6
SUBJECT_CHARS = 80

GREETING = "سلام! به پشتیبانی خوش آمدید. پرسش یا درخواست خود را بنویسید تا کارشناسان ما پاسخ دهند."
CONTACT_THANKS = "شماره تماس شما ثبت شد. سپاس!"


def ticket_notice(number: int) -> str:
    return f"درخواست شما با شماره {number_text(number)} ثبت شد. پاسخ کارشناسان در همین گفتگو ارسال می‌شود."


# --- tables ------------------------------------------------------------------------------------
# One row per chat that wrote to a bot: who it is, its phone once shared, the customer it is
# linked to and the ticket its messages go to while that ticket is not closed.
messenger_chats = sa.Table(
    "messenger_chats",
    metadata,
    sa.Column("provider", sa.Text, primary_key=True),  # telegram | bale
    sa.Column("chat_id", sa.Text, primary_key=True),
    text_column("user_id"),  # the Bot API user id of the sender (private chats: = chat id)
    text_column("username"),
    text_column("display_name"),
    text_column("phone"),  # E.164, from a shared contact
    text_column("customer_id"),
    sa.Column("last_ticket_id", UUID, sa.ForeignKey("tickets.id", ondelete="SET NULL")),
    # the /start (or contact) message last answered: a redelivered update is not answered twice
    sa.Column("last_command_message_id", sa.BigInteger, nullable=False, server_default="0"),
    *times(),
)
sa.Index("messenger_chats_last_ticket", messenger_chats.c.last_ticket_id)

# The status RPC counts undelivered replies per channel without reading every message.
sa.Index(
    "ticket_messages_undelivered",
    ticket_messages.c.channel,
    ticket_messages.c.delivery,
    postgresql_where=ticket_messages.c.delivery.in_(["pending", "failed"]),
)


# --- settings ----------------------------------------------------------------------------------
def _flag(raw: str | None, default: bool) -> bool:
    if raw is None or raw.strip() == "":
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ProviderSettings:
    provider: str
    api_base: str
    token: str  # empty: replies are not sent
    webhook_secret: str  # empty: the webhook is refused (FAILED_PRECONDITION)


@dataclass(frozen=True)
class ChannelSettings:
    providers: dict[str, ProviderSettings]
    timeout: float
    confirm_tickets: bool
    public_base_url: str
    web_form_keys: tuple[str, ...]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ChannelSettings:
        env = os.environ if env is None else env
        providers = {
            p: ProviderSettings(
                p,
                chassis_bots.api_base(p, env),
                chassis_bots.bot_token(p, env),
                env.get(f"{chassis_bots.ENV_PREFIX[p]}_WEBHOOK_SECRET", "").strip(),
            )
            for p in PROVIDERS
        }
        timeout = chassis_bots.api_timeout(env)
        keys = key_list(env, "WEB_FORM_KEYS", "dev-site-key")
        return cls(
            providers=providers,
            timeout=timeout,
            confirm_tickets=_flag(env.get("MESSENGER_CONFIRM_TICKETS"), True),
            public_base_url=(env.get("PUBLIC_BASE_URL") or "").rstrip("/"),
            web_form_keys=keys,
        )


def channel_settings(support: Support) -> ChannelSettings:
    """The process' settings of the channels, read from the environment once."""
    return support.once("channels.settings", ChannelSettings.from_env)


# --- the Bot API (crm_chassis.bots) -----------------------------------------------------------
BOT_CLASSES = chassis_bots.BOT_CLASSES


def bots(support: Support) -> dict[str, BotApi]:
    """The process' bot clients, of the providers with a token."""

    def make():
        s = channel_settings(support)
        return {p: BOT_CLASSES[p](cfg.api_base, cfg.token, s.timeout) for p, cfg in s.providers.items() if cfg.token}

    return support.once("messengers.bots", make)


# --- reading an Update -------------------------------------------------------------------------
# Message contents that carry a file: the Bot API's key -> its label for the agent.
FILE_KINDS = {
    "photo": "عکس",
    "document": "فایل",
    "voice": "پیام صوتی",
    "audio": "صوت",
    "video": "ویدیو",
    "video_note": "ویدیوی کوتاه",
    "animation": "گیف",
    "sticker": "استیکر",
}


def _files(msg: dict) -> list[dict]:
    """The files of a message as {kind, file_id, file_unique_id, file_name, mime_type, file_size}
    (a photo: its largest size). Not downloaded: an agent sees that and what was sent."""
    found = []
    for kind in FILE_KINDS:
        value = msg.get(kind)
        if kind == "photo" and isinstance(value, list) and value:
            value = max(
                (p for p in value if isinstance(p, dict)),
                key=lambda p: (p.get("file_size") or 0, p.get("width") or 0),
                default=None,
            )
        if not isinstance(value, dict) or not value.get("file_id"):
            continue
        found.append(
            {
                "kind": kind,
                "file_id": str(value["file_id"]),
                "file_unique_id": str(value.get("file_unique_id") or ""),
                "file_name": str(value.get("file_name") or ""),
                "mime_type": str(value.get("mime_type") or ("image/jpeg" if kind == "photo" else "")),
                "file_size": value.get("file_size") if isinstance(value.get("file_size"), int) else 0,
                "emoji": str(value.get("emoji") or ""),
            }
        )
    return found


def _body(msg: dict, files: list[dict]) -> str:
    """The message's text as an agent reads it: the text or caption, then a line per file (and
    a location or a contact card)."""
    lines = []
    text = msg.get("text") if isinstance(msg.get("text"), str) else msg.get("caption")
    if isinstance(text, str) and text.strip():
        lines.append(text.strip())
    for f in files:
        name = f["file_name"] or f["emoji"] or f["file_unique_id"] or f["file_id"][:24]
        lines.append(f"[{FILE_KINDS[f['kind']]}: {name}]")
    loc = msg.get("location")
    if isinstance(loc, dict) and "latitude" in loc and "longitude" in loc:
        lines.append(f"[موقعیت: {loc['latitude']},{loc['longitude']}]")
    contact = msg.get("contact")
    if isinstance(contact, dict) and contact.get("phone_number"):
        who = " ".join(str(contact.get(k) or "") for k in ("first_name", "last_name")).strip()
        lines.append(f"[مخاطب: {who} {contact['phone_number']}]".replace("  ", " "))
    return "\n".join(lines)


def _name(user: dict, chat: dict) -> str:
    full = " ".join(str(user.get(k) or "").strip() for k in ("first_name", "last_name")).strip()
    if full:
        return full
    if user.get("username"):
        return "@" + str(user["username"])
    return str(chat.get("title") or chat.get("username") or "")


def _subject(text: str, provider: str, name: str, chat_id: str) -> str:
    first = " ".join(text.split())
    if first:
        return first[:SUBJECT_CHARS]
    return f"پیام {LABELS[provider]} از {name or chat_id}"[:SUBJECT_CHARS]


def _phone(raw: str, region: str) -> str | None:
    """A shared contact's number in E.164: the Bot API gives it international without the plus
    (989121234567) or with it."""
    raw = raw.strip()
    digits = "".join(c for c in raw if c.isdigit())
    if not raw.startswith("+") and not raw.startswith("0") and len(digits) > 10:
        raw = "+" + digits
    return phone_e164(raw, region)


def _id(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str) or str(value).strip() == "":
        raise InvalidArgument(FieldViolation(where, "is required (an integer id)"))
    text = str(value).strip()
    if not text.lstrip("-").isdigit() or len(text) > 30:
        raise InvalidArgument(FieldViolation(where, "must be an integer id"))
    return text


def parse_update(body: bytes) -> dict:
    """The Update object of a webhook body; INVALID_ARGUMENT naming `body` if it is none."""
    try:
        update = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidArgument(FieldViolation("body", "must be a Bot API Update in JSON")) from None
    if not isinstance(update, dict):
        raise InvalidArgument(FieldViolation("body", "must be a JSON object (a Bot API Update)"))
    return _without_nul(update)


def _without_nul(value):
    """The value with every U+0000 removed from its strings (PostgreSQL stores none, in text or
    jsonb; a message carrying one would fail, and the platform would redeliver it forever)."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


# --- the use cases -----------------------------------------------------------------------------
OPENED, APPENDED, DUPLICATE, IGNORED = "opened", "appended", "duplicate", "ignored"


class Messengers:
    def __init__(self, support: Support):
        self.support = support
        self.settings = channel_settings(support)

    @property
    def tickets(self) -> Tickets:
        return self.support.tickets

    def handle_update(self, tx, provider: str, update: dict) -> str:
        """One Update in the caller's transaction: opened, appended, duplicate or ignored."""
        kind = next((k for k in ("message", "edited_message") if isinstance(update.get(k), dict)), None)
        if kind is None:
            return IGNORED  # callback queries, member changes, channel posts, polls ...
        msg = update[kind]
        chat = msg.get("chat") if isinstance(msg.get("chat"), dict) else {}
        chat_id = _id(chat.get("id"), f"body.{kind}.chat.id")
        message_id = int(_id(msg.get("message_id"), f"body.{kind}.message_id"))
        user = msg.get("from") if isinstance(msg.get("from"), dict) else {}
        if user.get("is_bot"):
            return IGNORED
        conn = tx.conn
        row = self._touch_chat(conn, provider, chat_id, user, chat)  # locks the chat's row
        external_id = f"{chat_id}:{message_id}"
        if kind == "edited_message":
            external_id += f":e{msg.get('edit_date') or 0}"
        seen = conn.execute(
            sa.select(ticket_messages.c.id).where(
                ticket_messages.c.channel == provider, ticket_messages.c.external_id == external_id
            )
        ).first()
        if seen is not None:
            return DUPLICATE
        text = msg.get("text") if isinstance(msg.get("text"), str) else ""
        contact = msg.get("contact") if isinstance(msg.get("contact"), dict) else None
        if kind == "message" and contact and contact.get("phone_number") and self._own(contact, user, chat_id):
            return self._contact(tx, provider, row, message_id, str(contact["phone_number"]))
        if kind == "message" and text.strip().split("@")[0].split(" ")[0] == "/start":
            if row.last_command_message_id != message_id:
                self._command_answered(conn, provider, chat_id, message_id)
                self._notice(conn, provider, chat_id, message_id, GREETING)
            return IGNORED
        files = _files(msg)
        body = _body(msg, files)
        if not body:
            return IGNORED  # a dice, a poll, a service message: nothing an agent can answer
        if kind == "edited_message":
            body = "(ویرایش شده) " + body
        name = _name(user, chat)
        headers = {
            "bot": {
                "provider": provider,
                "update_id": update.get("update_id"),
                "chat_id": chat_id,
                "message_id": message_id,
                "from_id": str(user.get("id") or ""),
                "username": str(user.get("username") or ""),
                "edited": kind == "edited_message",
                "files": files,
            }
        }
        actor = f"{provider}:{chat_id}"
        if row.last_ticket_id is not None:
            current = conn.execute(sa.select(tickets.c.state).where(tickets.c.id == row.last_ticket_id)).scalar()
            if current is not None and current != "closed":
                try:
                    with tx.savepoint():
                        self.tickets.add_message(
                            tx,
                            row.last_ticket_id,
                            "customer",
                            body,
                            author=chat_id,
                            channel=provider,
                            external_id=external_id,
                            headers=headers,
                            actor=actor,
                        )
                    return APPENDED
                except FailedPrecondition:  # closed meanwhile: a new ticket, as below
                    pass
        ticket = self.tickets.open(
            tx,
            NewTicket(
                subject=_subject(text or str(msg.get("caption") or ""), provider, name, chat_id),
                channel=provider,
                body=body,
                customer_id=row.customer_id,
                contact_address=chat_id,
                contact_name=name,
                author=chat_id,
                external_id=external_id,
                headers=headers,
                language=str(user.get("language_code") or "fa")[:8] or "fa",
            ),
            actor,
        )
        conn.execute(
            messenger_chats.update()
            .where(messenger_chats.c.provider == provider, messenger_chats.c.chat_id == chat_id)
            .values(last_ticket_id=ticket.id, update_time=sa.func.now())
        )
        if self.settings.confirm_tickets:
            self._notice(conn, provider, chat_id, message_id, ticket_notice(ticket.number))
        return OPENED

    @staticmethod
    def _own(contact: dict, user: dict, chat_id: str) -> bool:
        """A contact the user shared of themselves (a request_contact button), not a card of
        someone else they forwarded."""
        owner = contact.get("user_id")
        return owner is not None and str(owner) in (str(user.get("id") or ""), chat_id)

    def _touch_chat(self, conn, provider: str, chat_id: str, user: dict, chat: dict):
        """Insert or refresh the chat's row and lock it for this transaction (messages of one
        chat are handled one at a time, so two first messages cannot open two tickets)."""
        values = {
            "provider": provider,
            "chat_id": chat_id,
            "user_id": str(user.get("id") or "")[:40],
            "username": str(user.get("username") or chat.get("username") or "")[:100],
            "display_name": _name(user, chat)[:200],
        }
        stmt = pg_insert(messenger_chats).values(**values)
        return conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["provider", "chat_id"],
                set_={
                    "user_id": sa.func.coalesce(sa.func.nullif(stmt.excluded.user_id, ""), messenger_chats.c.user_id),
                    "username": stmt.excluded.username,
                    "display_name": sa.func.coalesce(
                        sa.func.nullif(stmt.excluded.display_name, ""), messenger_chats.c.display_name
                    ),
                    "update_time": sa.func.now(),
                },
            ).returning(messenger_chats)
        ).one()

    @staticmethod
    def _command_answered(conn, provider: str, chat_id: str, message_id: int) -> None:
        conn.execute(
            messenger_chats.update()
            .where(messenger_chats.c.provider == provider, messenger_chats.c.chat_id == chat_id)
            .values(last_command_message_id=message_id)
        )

    def _contact(self, tx, provider: str, row, message_id: int, raw_phone: str) -> str:
        conn = tx.conn
        if row.last_command_message_id == message_id:
            return DUPLICATE
        phone = _phone(raw_phone, self.support.phone_region)
        if phone is None:
            return IGNORED
        customer_id = self.tickets.match_customer(conn, phone) or row.customer_id
        conn.execute(
            messenger_chats.update()
            .where(messenger_chats.c.provider == provider, messenger_chats.c.chat_id == row.chat_id)
            .values(phone=phone, customer_id=customer_id, last_command_message_id=message_id, update_time=sa.func.now())
        )
        if customer_id and row.last_ticket_id is not None:
            t = Tickets.get(conn, row.last_ticket_id)
            if not t.customer_id and t.state != "closed":
                self.tickets.update(tx, t.id, {"customer_id": customer_id}, f"{provider}:{row.chat_id}")
        self._notice(conn, provider, row.chat_id, message_id, CONTACT_THANKS)
        return IGNORED

    def _notice(self, conn, provider: str, chat_id: str, message_id: int, text: str) -> None:
        """A short message to the chat, sent by a timer after this transaction commits (only
        when the provider has a bot token)."""
        if provider not in bots(self.support):
            return
        now = conn.execute(sa.select(sa.func.now())).scalar()
        timers.schedule(
            conn,
            NOTICE,
            f"{provider}:{chat_id}:{message_id}",
            now,
            {"provider": provider, "chat_id": chat_id, "text": text},
        )

    # -- status ----------------------------------------------------------------------------
    def counts(self, conn) -> dict[str, dict[str, int]]:
        out = {p: {"chats": 0, "pending": 0, "failed": 0} for p in PROVIDERS}
        for provider, n in conn.execute(
            sa.select(messenger_chats.c.provider, sa.func.count()).group_by(messenger_chats.c.provider)
        ):
            if provider in out:
                out[provider]["chats"] = n
        m = ticket_messages.c
        for channel, delivery, n in conn.execute(
            sa.select(m.channel, m.delivery, sa.func.count())
            .where(m.channel.in_(PROVIDERS), m.delivery.in_(["pending", "failed"]))
            .group_by(m.channel, m.delivery)
        ):
            out[channel][delivery] = n
        return out


def use_cases(support: Support) -> Messengers:
    return support.once("messengers", lambda: Messengers(support))


# --- the part ----------------------------------------------------------------------------------
def _sender(bot: BotApi):
    def send(conn, ticket, message) -> str:
        """An agent reply to the ticket's chat; "<chat id>:<message id>" of what was sent."""
        chat_id = ticket.contact_address
        if not chat_id:
            raise BotApiError(400, f"ticket {number_text(ticket.number)} has no chat id")
        return f"{chat_id}:{bot.send_text(chat_id, message.body)}"

    return send


def install(support: Support) -> None:
    for provider, bot in bots(support).items():
        support.senders[provider] = _sender(bot)


def timer_handlers(support: Support) -> None:
    def notice(conn, timer) -> None:
        bot = bots(support).get(timer.payload.get("provider", ""))
        if bot is None:  # the token was removed since: nothing to send with
            return
        try:
            bot.send_message(timer.payload["chat_id"], timer.payload["text"])
        except BotApiError as err:
            if err.code in (400, 403) or timer.attempt >= NOTICE_ATTEMPTS:
                # the chat is gone or blocked the bot: a notice is not worth more tries
                log.warning("messenger notice dropped", extra={"key": timer.key, "error": str(err)})
                return
            raise

    support.timers.register(NOTICE, notice, max_attempts=NOTICE_ATTEMPTS)
