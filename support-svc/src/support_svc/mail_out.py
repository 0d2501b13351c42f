"""Agent replies by e-mail: `support.senders["email"]` (ticketing's durable delivery timer calls
it, at least once; an exception is retried with back-off, ticketing.DELIVERY_ATTEMPTS times).

The reply goes to the ticket's contact address with the subject "Re: [T-000123] subject", the
Message-ID `<msg-{message id}@{MAIL_DOMAIN}>` (the same on every retry, so a receiver can drop a
duplicate; it is stored as the message's external_id, and mail_in threads answers to it),
In-Reply-To / References of the customer's last mail, a plain text part and an HTML part
(right-to-left for Persian), and the agent message's attachments.

Settings (environment, read once): SMTP_HOST (127.0.0.1), SMTP_PORT (2526: the local sink),
SMTP_FROM (support@crm.local), MAIL_DOMAIN (crm.local), SMTP_STARTTLS (false), SMTP_USER and
SMTP_PASSWORD (none: no login), SMTP_TIMEOUT_SECONDS (30).
"""

from __future__ import annotations

import os
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formataddr, formatdate

import sqlalchemy as sa

from .mail_parse import is_synthetic, references, reply_subject, text_to_html
from .runtime import Support
from .tables import attachments, ticket_messages
from .ticketing import number_text


@dataclass(frozen=True)
class OutSettings:
    host: str = "127.0.0.1"
    port: int = 2526
    sender: str = "support@crm.local"
    sender_name: str = ""
    domain: str = "crm.local"
    starttls: bool = False
    user: str = ""
    password: str = ""
    timeout: float = 30.0


def _bool(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def out_settings(env=None) -> OutSettings:
    env = os.environ if env is None else env
    from crm_chassis.config import ConfigError

    try:
        port = int(env.get("SMTP_PORT") or 2526)
        timeout = float(env.get("SMTP_TIMEOUT_SECONDS") or 30)
    except ValueError as exc:
        raise ConfigError([f"SMTP_PORT / SMTP_TIMEOUT_SECONDS: {exc}"]) from exc
    if not 1 <= port <= 65535:
        raise ConfigError([f"SMTP_PORT={port} is out of range [1, 65535]"])
    return OutSettings(
        host=env.get("SMTP_HOST") or "127.0.0.1",
        port=port,
        sender=env.get("SMTP_FROM") or "support@crm.local",
        sender_name=env.get("SMTP_FROM_NAME") or "",
        domain=mail_domain(env),
        starttls=_bool(env.get("SMTP_STARTTLS") or ""),
        user=env.get("SMTP_USER") or "",
        password=env.get("SMTP_PASSWORD") or "",
        timeout=timeout,
    )


def mail_domain(env=None) -> str:
    env = os.environ if env is None else env
    return (env.get("MAIL_DOMAIN") or "crm.local").strip().lower()


def message_id_of(message_id, domain: str) -> str:
    """The Message-ID of our mail of an agent message (stable: the message's id)."""
    return f"<msg-{message_id}@{domain}>"


def last_customer_mail(conn: sa.Connection, ticket_id):
    """The newest customer message of the ticket that came with a real Message-ID, or None."""
    rows = conn.execute(
        sa.select(ticket_messages.c.external_id, ticket_messages.c.headers)
        .where(
            ticket_messages.c.ticket_id == ticket_id,
            ticket_messages.c.kind == "customer",
            ticket_messages.c.external_id != "",
        )
        .order_by(ticket_messages.c.create_time.desc(), ticket_messages.c.id.desc())
        .limit(10)
    ).all()
    for r in rows:
        if r.external_id.startswith("<") and not is_synthetic(r.external_id):
            return r
    return None


def build(conn: sa.Connection, ticket, message, settings: OutSettings) -> EmailMessage:
    """The mail of an agent reply (see the module docstring)."""
    to = (ticket.contact_address or "").strip()
    if "@" not in to:
        raise ValueError(f"ticket {number_text(ticket.number)} has no e-mail address to reply to")
    mail = EmailMessage()
    mail["From"] = formataddr((settings.sender_name, settings.sender)) if settings.sender_name else settings.sender
    mail["To"] = formataddr((ticket.contact_name, to)) if ticket.contact_name else to
    mail["Subject"] = reply_subject(number_text(ticket.number), ticket.subject)
    mail["Message-ID"] = message_id_of(message.id, settings.domain)
    mail["Date"] = formatdate(message.create_time.timestamp(), localtime=False, usegmt=True)
    mail["X-CRM-Ticket"] = number_text(ticket.number)
    mail["Auto-Submitted"] = "no"  # a person wrote it; auto-responders may answer
    last = last_customer_mail(conn, ticket.id)
    if last is not None:
        mail["In-Reply-To"] = last.external_id
        mail["References"] = " ".join(references(list((last.headers or {}).get("references") or []), last.external_id))
    mail.set_content(message.body)
    mail.add_alternative(text_to_html(message.body), subtype="html")
    for f in conn.execute(
        sa.select(attachments).where(attachments.c.message_id == message.id).order_by(attachments.c.filename)
    ):
        maintype, _, subtype = (f.content_type or "application/octet-stream").partition("/")
        mail.add_attachment(
            bytes(f.content), maintype=maintype or "application", subtype=subtype or "octet-stream", filename=f.filename
        )
    return mail


def deliver(mail: EmailMessage, settings: OutSettings) -> None:
    with smtplib.SMTP(settings.host, settings.port, timeout=settings.timeout) as smtp:
        smtp.ehlo()
        if settings.starttls:
            smtp.starttls(context=ssl.create_default_context())
            smtp.ehlo()
        if settings.user:
            smtp.login(settings.user, settings.password)
        smtp.send_message(mail)


def sender(support: Support):
    settings = support.once("mail_out.settings", out_settings)

    def send(conn: sa.Connection, ticket, message) -> str:
        """Send one agent reply; returns its Message-ID (raises to be retried)."""
        mail = build(conn, ticket, message, settings)
        deliver(mail, settings)
        return mail["Message-ID"]

    return send


def install(support: Support) -> None:
    support.senders["email"] = sender(support)
