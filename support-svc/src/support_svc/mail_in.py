"""Inbound e-mail (and fax by mail): an SMTP endpoint (aiosmtpd) that turns every mail into a
ticket or a message of one. `python -m support_svc mail-in` runs only it; `serve` runs it too.

A mail is answered 250 only once it is committed (durable); a database that is down gets 451
(the sending MTA retries later). A mail that cannot be parsed still becomes a ticket with its
raw text (never a 5xx, never a 451 loop over content). Over MAIL_IN_MAX_BYTES the client gets
552 and nothing is stored.

Threading, in this order: In-Reply-To / References naming a message of a ticket (a customer
mail's Message-ID, or the Message-ID mail_out gave an agent reply); a ticket number in the
subject ("[T-000123]"), only when the sender is the ticket's contact address or its customer
(nobody posts into a ticket by guessing a number); else a new ticket. An answer to a closed
ticket opens a follow-up (tag follow_up, custom field follow_up_of = T-number). The same
Message-ID twice is one message (a mail without one gets a stable id from its bytes).

Settings (environment, read once): MAIL_IN_HOST (127.0.0.1), MAIL_IN_PORT (2525; 0 = any free
port), MAIL_IN_MAX_BYTES (26214400), MAIL_IN_HOSTNAME (the greeting's name: MAIL_DOMAIN),
FAX_GATEWAY_ADDRESSES (none; comma-separated addresses or "@domain"), MAIL_DOMAIN (crm.local).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass

import sqlalchemy as sa

from crm_chassis.config import ConfigError
from crm_chassis.errors import FailedPrecondition
from crm_chassis.mail import mail_domain, parse_dsn

from . import mail_parse
from .mail_parse import ParsedMail
from .runtime import Support
from .tables import teams, ticket_messages, tickets
from .ticketing import NewAttachment, NewTicket, Tickets, number_in, number_text

log = logging.getLogger("crm.support.mail_in")
# aiosmtpd logs every SMTP command (and the addresses in them) at INFO: only its warnings
logging.getLogger("mail.log").setLevel(logging.WARNING)

ROLES = ("mail-in",)
ACTOR = "mail-in"
CHANNELS = ("email", "fax")  # the channels whose external_id is a Message-ID
LOCK_CLASS = 0x6D61696C  # pg_advisory_xact_lock(class, hashtext(Message-ID)): "mail"
_OUR_ID = re.compile(r"^<msg-([0-9a-f-]{36})@(.+)>$")


@dataclass(frozen=True)
class InSettings:
    host: str = "127.0.0.1"
    port: int = 2525
    max_bytes: int = 26_214_400
    hostname: str = "crm.local"
    fax_gateways: tuple[str, ...] = ()
    domain: str = "crm.local"


def in_settings(env=None) -> InSettings:
    env = os.environ if env is None else env
    problems = []
    values = {}
    for name, key, default, lo, hi in (
        ("MAIL_IN_PORT", "port", 2525, 0, 65535),
        ("MAIL_IN_MAX_BYTES", "max_bytes", 26_214_400, 1024, 2**31 - 1),
    ):
        raw = env.get(name) or str(default)
        try:
            values[key] = int(raw)
        except ValueError:
            problems.append(f"{name}={raw!r} is not an integer")
            continue
        if not lo <= values[key] <= hi:
            problems.append(f"{name}={values[key]} is out of range [{lo}, {hi}]")
    if problems:
        raise ConfigError(problems)
    domain = mail_domain(env)
    return InSettings(
        host=env.get("MAIL_IN_HOST") or "127.0.0.1",
        port=values["port"],
        max_bytes=values["max_bytes"],
        hostname=env.get("MAIL_IN_HOSTNAME") or domain,
        fax_gateways=mail_parse.gateway_list(env.get("FAX_GATEWAY_ADDRESSES") or ""),
        domain=domain,
    )


_OUR_REPLY = re.compile(r"<msg-([0-9a-fA-F-]{36})@[^>]+>")  # mail_out.message_id_of


@dataclass
class Stored:
    ticket_id: str
    number: str
    created_ticket: bool
    duplicate: bool


class Inbox:
    """Stores parsed mails as tickets and messages (one transaction per mail)."""

    def __init__(self, support: Support, settings: InSettings):
        self.support = support
        self.settings = settings

    @property
    def tickets(self) -> Tickets:
        return self.support.tickets

    def store(self, raw: bytes, envelope_from: str = "", rcpt_tos=(), peer: str = "") -> Stored:
        bounced = self._bounce(raw)
        if bounced is not None:
            return bounced
        mail = mail_parse.parse(raw, envelope_from, rcpt_tos)
        try:
            return self._store(mail, raw, peer)
        except sa.exc.DBAPIError:
            raise  # the database: 451, the sender retries
        except Exception:  # noqa: BLE001 - a bug or an odd mail must not make a 451 loop
            log.exception("mail-in: storing the parsed mail failed; storing it raw", extra={"peer": peer})
            return self._store(mail_parse.unparsed(raw, envelope_from, list(rcpt_tos), "store failed"), raw, peer)

    # -- a bounce of one of our replies ---------------------------------------------------------
    def _bounce(self, raw: bytes) -> Stored | None:
        """A delivery-status notification returning one of our agent replies (its Message-ID
        <msg-{id}@domain>): the reply's delivery is marked failed with the status and a system
        note says so on the ticket. No ticket is made of it (nor a reply sent to the mailer
        daemon). A delay or delivery report only answers. Anything else: None (a normal mail)."""
        try:
            dsn = parse_dsn(raw)
        except Exception:  # noqa: BLE001 - an odd report is a normal mail then
            return None
        found = _OUR_REPLY.search(dsn.original_message_id) if dsn is not None else None
        if found is None:
            return None
        with self.support.uow.begin() as tx:
            conn = tx.conn
            msg = conn.execute(
                sa.select(ticket_messages.c.ticket_id, ticket_messages.c.delivery_error).where(
                    ticket_messages.c.id == found.group(1), ticket_messages.c.kind == "agent"
                )
            ).first()
            if msg is None:
                return None
            ticket = self.tickets.lock(conn, msg.ticket_id)
            if dsn.kind:
                error = f"bounced ({dsn.kind}) {dsn.status}: {dsn.description}"[:500]
                if msg.delivery_error != error:  # a repeated report notes nothing more
                    conn.execute(
                        ticket_messages.update()
                        .where(ticket_messages.c.id == found.group(1))
                        .values(delivery="failed", delivery_error=error)
                    )
                    note = (
                        f"پاسخ به {dsn.recipient} برگشت خورد ({dsn.status}). "
                        f"The reply to {dsn.recipient} bounced ({dsn.status}): {dsn.description}"
                    )
                    self.tickets.add_notes(tx, [(str(ticket.id), note)], author="mail", actor="mail-in")
            log.info(
                "mail-in: a delivery report of a reply",
                extra={"ticket": number_text(ticket.number), "status": dsn.status, "kind": dsn.kind},
            )
            return Stored(str(ticket.id), number_text(ticket.number), False, False)

    # -- one mail ----------------------------------------------------------------------------
    def _store(self, mail: ParsedMail, raw: bytes, peer: str) -> Stored:
        fax = mail_parse.is_gateway(mail.from_address, self.settings.fax_gateways)
        channel = "fax" if fax else "email"
        contact = (
            mail_parse.fax_number(self.support.phone_region, mail.subject, mail.from_name) if fax else mail.from_address
        )
        files = list(mail.attachments)
        if mail.truncated:
            files.append(NewAttachment("original.eml", "message/rfc822", raw))
        headers = {
            "message_id": mail.message_id,
            "in_reply_to": mail.in_reply_to,
            "references": mail.references,
            "from": mail.from_address,
            "to": mail.recipients[:20],
            "date": mail.date,
            "peer": peer,
        }
        if mail.synthetic_id:
            headers["synthetic_message_id"] = True
        if mail.parse_error:
            headers["parse_error"] = mail.parse_error
        if mail.defects:
            headers["defects"] = mail.defects
        if fax:
            headers["fax_gateway"] = mail.from_address
        with self.support.uow.begin() as tx:
            conn = tx.conn
            # one at a time per Message-ID: a concurrent redelivery waits, then sees the first
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(LOCK_CLASS, sa.func.hashtext(mail.message_id))))
            seen = conn.execute(
                sa.select(ticket_messages.c.ticket_id, tickets.c.number)
                .join(tickets, tickets.c.id == ticket_messages.c.ticket_id)
                .where(ticket_messages.c.channel.in_(CHANNELS), ticket_messages.c.external_id == mail.message_id)
            ).first()
            if seen is not None:
                return Stored(str(seen.ticket_id), number_text(seen.number), False, True)
            target = self._thread(conn, mail, contact)
            if target is not None and target.state != "closed":
                try:
                    self.tickets.add_message(
                        tx,
                        target.id,
                        "customer",
                        mail.body,
                        author=contact or mail.from_address,
                        channel=channel,
                        external_id=mail.message_id,
                        headers=headers,
                        attachments=files,
                        actor=ACTOR,
                    )
                    return Stored(str(target.id), number_text(target.number), False, False)
                except FailedPrecondition:  # closed since we read it: a follow-up below
                    target = self.tickets.get(conn, target.id)
            new = NewTicket(
                subject=mail.subject.strip() or mail_parse.NO_SUBJECT,
                channel=channel,
                body=mail.body,
                contact_address=contact,
                contact_name=mail.from_name,
                team_id=self._team(conn, mail.recipients),
                author=contact or mail.from_address,
                external_id=mail.message_id,
                headers=headers,
                attachments=files,
            )
            if fax and contact:
                new.customer_id = self._fax_customer(conn, contact)
            if target is not None:  # closed: a follow-up ticket
                new.subject = mail_parse.strip_prefixes(new.subject) or target.subject
                new.tags = ("follow_up",)
                new.custom_fields = {"follow_up_of": number_text(target.number)}
                new.team_id = new.team_id or (str(target.team_id) if target.team_id else None)
            row = self.tickets.open(tx, new, ACTOR)
            return Stored(str(row.id), number_text(row.number), True, False)

    def _thread(self, conn: sa.Connection, mail: ParsedMail, contact: str):
        """The ticket this mail answers, or None (see the module docstring)."""
        ids = [m for m in mail.thread_ids if not mail_parse.is_synthetic(m)]
        if ids:
            rows = conn.execute(
                sa.select(ticket_messages.c.external_id, ticket_messages.c.ticket_id).where(
                    ticket_messages.c.channel.in_(CHANNELS), ticket_messages.c.external_id.in_(ids)
                )
            ).all()
            found = {r.external_id: r.ticket_id for r in rows}
            ours = {}
            for m in ids:  # our own reply, even before its delivery was recorded
                g = _OUR_ID.match(m)
                if g and g.group(2).lower() == self.settings.domain:
                    ours[m] = g.group(1)
            if ours:
                for r in conn.execute(
                    sa.select(ticket_messages.c.id, ticket_messages.c.ticket_id).where(
                        ticket_messages.c.id.in_(list(ours.values()))
                    )
                ):
                    for m, mid in ours.items():
                        if mid == str(r.id):
                            found.setdefault(m, r.ticket_id)
            for m in ids:
                if m in found:
                    return self.tickets.get(conn, found[m])
        number = number_in(mail.subject)
        if number is None:
            return None
        t = self.tickets.by_number(conn, number)
        if t is None or not contact:
            return None
        if t.contact_address and t.contact_address.lower() == contact.lower():
            return t
        if t.customer_id and self.tickets.match_customer(conn, contact) == t.customer_id:
            return t
        log.info(
            "mail-in: a ticket number from a stranger opens a new ticket",
            extra={"number": number_text(number), "sender": contact},
        )
        return None

    @staticmethod
    def _team(conn: sa.Connection, recipients: list[str]) -> str | None:
        if not recipients:
            return None
        rows = conn.execute(
            sa.select(teams.c.id, sa.func.lower(teams.c.email_address).label("addr")).where(
                teams.c.active, sa.func.lower(teams.c.email_address).in_(recipients)
            )
        ).all()
        by = {r.addr: r.id for r in rows}
        for r in recipients:  # the envelope recipient first, then To, Cc
            if r in by:
                return str(by[r])
        return None

    @staticmethod
    def _fax_customer(conn: sa.Connection, number: str) -> str:
        """The customer whose fax number this is (the projection keeps it); '' if none."""
        from .tables import customer_refs

        if "fax" not in customer_refs.c:
            return ""
        r = conn.execute(
            sa.select(customer_refs.c.customer_id, customer_refs.c.merged_into)
            .where(
                customer_refs.c.fax == number,
                sa.or_(customer_refs.c.deleted.is_(False), customer_refs.c.merged_into != ""),
            )
            .order_by(customer_refs.c.version.desc())
            .limit(1)
        ).first()
        return (r.merged_into or r.customer_id) if r else ""


class Handler:
    """aiosmtpd handler: handle_DATA stores the mail (in a thread: the database is blocking)."""

    def __init__(self, inbox: Inbox):
        self.inbox = inbox

    async def handle_DATA(self, server, session, envelope):
        raw = envelope.original_content or b""
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer or "")
        loop = asyncio.get_running_loop()
        try:
            stored = await loop.run_in_executor(
                None, self.inbox.store, raw, envelope.mail_from or "", list(envelope.rcpt_tos), peer
            )
        except Exception:  # noqa: BLE001 - the database is down (or worse): the MTA retries
            log.exception("mail-in: could not store a mail; answered 451", extra={"peer": peer, "size": len(raw)})
            return "451 4.3.0 Temporarily unable to store the message, try again later"
        log.info(
            "mail-in: stored",
            extra={
                "peer": peer,
                "size": len(raw),
                "ticket": stored.number,
                "new_ticket": stored.created_ticket,
                "duplicate": stored.duplicate,
            },
        )
        return f"250 2.0.0 OK {stored.number}"


class _SMTP:
    """The aiosmtpd SMTP class with a log line for every size rejection (552)."""

    @staticmethod
    def make():
        from aiosmtpd.smtp import SMTP

        class SMTPLogged(SMTP):
            async def push(self, status: str):
                if status.startswith("552"):
                    peer = self.session.peer if self.session else ""
                    log.warning("mail-in: rejected (too large)", extra={"peer": str(peer), "reason": status})
                return await super().push(status)

        return SMTPLogged


class MailInWorker:
    """The inbound SMTP endpoint as a background worker (start / stop(timeout)); `port` is the
    bound port once started (MAIL_IN_PORT=0: any free port)."""

    name = "mail-in"

    def __init__(self, support: Support, settings: InSettings):
        self.support = support
        self.settings = settings
        self.inbox = Inbox(support, settings)
        self.port = settings.port
        self.controller = None

    def start(self) -> None:
        from .smtp_sink import ServerController

        smtp_cls = _SMTP.make()
        settings = self.settings

        class _Controller(ServerController):
            def factory(self):
                return smtp_cls(self.handler, **self.SMTP_kwargs)

        self.controller = _Controller(
            Handler(self.inbox),
            hostname=settings.host,
            port=settings.port,
            server_hostname=settings.hostname,
            data_size_limit=settings.max_bytes,
            ident="crm support mail-in",
        )
        self.controller.start()
        self.port = self.controller.port
        self.support.extra["mail_in"] = self
        log.info("mail-in: listening", extra={"host": settings.host, "port": self.port})

    def stop(self, timeout: float = 5.0) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None
        if self.support.extra.get("mail_in") is self:
            del self.support.extra["mail_in"]


def roles(support: Support) -> dict:
    settings = support.once("mail_in.settings", in_settings)
    return {"mail-in": [MailInWorker(support, settings)]}
