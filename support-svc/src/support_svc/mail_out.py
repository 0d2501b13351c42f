"""Agent replies by e-mail: `support.senders["email"]` (ticketing's durable delivery timer calls
it, at least once; an exception is retried with back-off, ticketing.DELIVERY_ATTEMPTS times).

The reply goes to the ticket's contact address with the subject "Re: [T-000123] subject", the
Message-ID `<msg-{message id}@{MAIL_DOMAIN}>` (the same on every retry, so a receiver can drop a
duplicate; it is stored as the message's external_id, and mail_in threads answers to it),
In-Reply-To / References of the customer's last mail, a plain text part and an HTML part
(right-to-left for Persian), and the agent message's attachments.

Settings (environment, read once): SMTP_HOST (127.0.0.1), SMTP_PORT (2526: the local sink),
SMTP_FROM (support@crm.local), MAIL_DOMAIN (crm.local), SMTP_STARTTLS (false), SMTP_USER and
SMTP_PASSWORD (none: no login), SMTP_TIMEOUT_SECONDS (30); read and sent by crm_chassis.mail.
"""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import formataddr, formatdate

import sqlalchemy as sa

from crm_chassis.mail import SmtpSettings, deliver, smtp_settings

from .mail_parse import is_synthetic, references, reply_subject, text_to_html
from .runtime import Support
from .tables import attachments, ticket_messages
from .ticketing import number_text

OutSettings = SmtpSettings


def out_settings(env=None) -> SmtpSettings:
    return smtp_settings(env, default_from="support@crm.local")


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
    mail["From"] = settings.from_header
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
