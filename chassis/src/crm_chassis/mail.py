"""Sending e-mail over SMTP, shared by support-svc (agent replies), campaign-svc (campaigns) and
reporting-svc (scheduled reports): the settings, a one-shot `deliver`, `SmtpPool`, persistent
connections reused across sends for throughput, with SMTP failures classified as `MailError`,
and `compose`, the MIME of a mail (with attachments) written fast.

    settings = smtp_settings(default_from="news@crm.local")
    deliver(mail, settings)                    # one connection for one message
    pool = SmtpPool(settings, size=4)
    pool.send(mail)                            # a pooled connection (reconnects when stale)
    data = compose(headers, text, html, [Attachment("r.xlsx", XLSX_TYPE, content)])  # fast MIME
    is_address("a@b.ir")                       # an address a form may take

`MailError.permanent` is a 5xx answer (the same message will never be accepted), else a 4xx
answer, a refused or broken connection or a timeout (worth a retry later);
`MailError.recipient` says the recipient address itself was refused (a hard bounce when
permanent). The stage (connect, mail, rcpt, data) and the reply code are kept.

Settings (environment): SMTP_HOST (127.0.0.1), SMTP_PORT (2526: the local sink `make run`
starts), SMTP_FROM (the service's default), SMTP_FROM_NAME, MAIL_DOMAIN (crm.local: the right
side of our Message-IDs), SMTP_STARTTLS (false), SMTP_USER and SMTP_PASSWORD (none: no login),
SMTP_TIMEOUT_SECONDS (30).
"""

from __future__ import annotations

import base64
import email
import email.policy
import os
import queue
import re
import secrets
import smtplib
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import HeaderParser
from email.policy import SMTP as SMTP_POLICY
from email.utils import formataddr, formatdate, getaddresses

from .config import ConfigError


@dataclass(frozen=True)
class SmtpSettings:
    host: str = "127.0.0.1"
    port: int = 2526
    sender: str = "noreply@crm.local"
    sender_name: str = ""
    domain: str = "crm.local"
    starttls: bool = False
    user: str = ""
    password: str = ""
    timeout: float = 30.0

    @property
    def from_header(self) -> str:
        """The From header's value (a non-ASCII name RFC 2047-encoded)."""
        return formataddr((self.sender_name, self.sender), charset="utf-8") if self.sender_name else self.sender


# An e-mail address as a form takes it: local part @ a domain with at least one dot (no display
# name, no comments, no quoted local part).
ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")


def is_address(value: str) -> bool:
    return bool(value) and ADDRESS.fullmatch(value) is not None


def _bool(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def mail_domain(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return (env.get("MAIL_DOMAIN") or "crm.local").strip().lower()


def smtp_settings(env: Mapping[str, str] | None = None, *, default_from: str = "noreply@crm.local") -> SmtpSettings:
    """The SMTP settings of the environment (ConfigError naming a bad port or timeout)."""
    env = os.environ if env is None else env
    try:
        port = int(env.get("SMTP_PORT") or 2526)
        timeout = float(env.get("SMTP_TIMEOUT_SECONDS") or 30)
    except ValueError as exc:
        raise ConfigError([f"SMTP_PORT / SMTP_TIMEOUT_SECONDS: {exc}"]) from exc
    if not 1 <= port <= 65535:
        raise ConfigError([f"SMTP_PORT={port} is out of range [1, 65535]"])
    return SmtpSettings(
        host=env.get("SMTP_HOST") or "127.0.0.1",
        port=port,
        sender=env.get("SMTP_FROM") or default_from,
        sender_name=env.get("SMTP_FROM_NAME") or "",
        domain=mail_domain(env),
        starttls=_bool(env.get("SMTP_STARTTLS") or ""),
        user=env.get("SMTP_USER") or "",
        password=env.get("SMTP_PASSWORD") or "",
        timeout=timeout,
    )


class MailError(Exception):
    """An SMTP send that failed: `permanent` (a 5xx answer), `recipient` (the address was
    refused), the SMTP reply `code` (0: no answer: connection refused, broken, timed out) and
    the `stage` it failed at (connect, mail, rcpt, data)."""

    def __init__(self, message: str, *, code: int = 0, stage: str = "", permanent: bool = False, recipient=False):
        super().__init__(message)
        self.code, self.stage, self.permanent, self.recipient = code, stage, permanent, recipient

    @property
    def retryable(self) -> bool:
        return not self.permanent


def _text(reply) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


def _refused(code: int, reply, stage: str) -> MailError:
    return MailError(
        f"SMTP {stage} refused: {code} {_text(reply)}"[:500],
        code=code,
        stage=stage,
        permanent=500 <= code < 600,
        recipient=stage == "rcpt",
    )


def envelope(mail: EmailMessage) -> tuple[str, list[str]]:
    """The envelope sender (Return-Path, Sender or From) and recipients (To, Cc, Bcc) of a mail."""
    sender = ""
    for h in ("Return-Path", "Sender", "From"):
        found = getaddresses([str(v) for v in mail.get_all(h, [])])
        if found and found[0][1]:
            sender = found[0][1]
            break
    rcpts = [a for _, a in getaddresses([str(v) for h in ("To", "Cc", "Bcc") for v in mail.get_all(h, [])]) if a]
    return sender, rcpts


def as_bytes(mail: EmailMessage) -> bytes:
    """The mail as SMTP sends it (CRLF line ends, no Bcc header)."""
    if "Bcc" in mail:
        mail = _copy_without_bcc(mail)
    return mail.as_bytes(policy=SMTP_POLICY)


def _copy_without_bcc(mail: EmailMessage) -> EmailMessage:
    import copy

    out = copy.copy(mail)
    del out["Bcc"]
    return out


class SmtpConnection:
    """One SMTP session, kept open across sends (EHLO, STARTTLS and login once)."""

    def __init__(self, settings: SmtpSettings):
        self.settings = settings
        self.smtp: smtplib.SMTP | None = None
        self.used = 0.0  # monotonic time of the last send (0: never)

    def open(self) -> smtplib.SMTP:
        s = self.settings
        try:
            smtp = smtplib.SMTP(s.host, s.port, timeout=s.timeout, local_hostname=s.domain or None)
            smtp.ehlo()
            if s.starttls:
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if s.user:
                smtp.login(s.user, s.password)
        except smtplib.SMTPAuthenticationError as e:
            raise MailError(
                f"SMTP login refused: {e.smtp_code} {_text(e.smtp_error)}", code=e.smtp_code, stage="connect"
            ) from None
        except smtplib.SMTPResponseException as e:
            raise MailError(
                f"SMTP greeting refused: {e.smtp_code} {_text(e.smtp_error)}", code=e.smtp_code, stage="connect"
            ) from None
        except (smtplib.SMTPException, OSError) as e:
            raise MailError(f"SMTP server {s.host}:{s.port} unreachable: {e}", stage="connect") from None
        self.smtp = smtp
        return smtp

    def close(self) -> None:
        smtp, self.smtp = self.smtp, None
        if smtp is not None:
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                try:
                    smtp.close()
                except OSError:
                    pass

    def send(self, data: bytes, sender: str, rcpts: list[str]) -> None:
        """Send one message; MailError on any failure (the session is closed on a broken one).
        A reused session the server dropped meanwhile is reopened once, before anything of the
        message was sent."""
        reused = self.smtp is not None
        smtp = self.smtp or self.open()
        try:
            code, reply = smtp.mail(sender)
        except (smtplib.SMTPServerDisconnected, OSError):
            self.close()
            if not reused:
                raise MailError("SMTP connection lost", stage="mail") from None
            smtp = self.open()
            try:
                code, reply = smtp.mail(sender)
            except (smtplib.SMTPException, OSError) as e:
                self.close()
                raise MailError(f"SMTP connection lost: {e}", stage="mail") from None
        try:
            if code != 250:
                raise _refused(code, reply, "mail")
            for r in rcpts:
                code, reply = smtp.rcpt(r)
                if code not in (250, 251):
                    raise _refused(code, reply, "rcpt")
            code, reply = smtp.data(data)
            if code != 250:
                raise _refused(code, reply, "data")
        except MailError:
            self._reset()
            raise
        except smtplib.SMTPDataError as e:
            self._reset()
            raise _refused(e.smtp_code, e.smtp_error, "data") from None
        except smtplib.SMTPResponseException as e:
            self.close()
            raise _refused(e.smtp_code, e.smtp_error, "data") from None
        except (smtplib.SMTPException, OSError) as e:
            self.close()
            raise MailError(f"SMTP connection lost: {e}", stage="data") from None
        self.used = time.monotonic()

    def _reset(self) -> None:
        """RSET after a refused message so the session can carry the next one."""
        try:
            if self.smtp is not None:
                self.smtp.rset()
        except (smtplib.SMTPException, OSError):
            self.close()


class SmtpPool:
    """Up to `size` SMTP sessions shared by the threads of a process: a send takes an idle
    session (or opens one), sends and gives it back. Sessions idle longer than `idle_seconds`
    are closed before reuse (servers drop idle clients; a stale one would cost a failed try)."""

    def __init__(self, settings: SmtpSettings, size: int = 4, idle_seconds: float = 60.0):
        self.settings = settings
        self.size = max(1, size)
        self.idle_seconds = idle_seconds
        self._idle: queue.LifoQueue[SmtpConnection] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(self.size)
        self._lock = threading.Lock()
        self._all: list[SmtpConnection] = []

    def send(self, mail: EmailMessage | bytes, sender: str = "", rcpts: list[str] | None = None) -> None:
        if isinstance(mail, EmailMessage):
            env_from, env_to = envelope(mail)
            sender, rcpts = sender or env_from, rcpts or env_to
            mail = as_bytes(mail)
        if not rcpts:
            raise MailError("the mail has no recipient", stage="rcpt", permanent=True, recipient=True)
        self._slots.acquire()
        try:
            conn = self._take()
            try:
                conn.send(mail, sender, list(rcpts))
            finally:
                self._idle.put(conn)
        finally:
            self._slots.release()

    def _take(self) -> SmtpConnection:
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = SmtpConnection(self.settings)
            with self._lock:
                self._all.append(conn)
            return conn
        if conn.smtp is not None and conn.used and time.monotonic() - conn.used > self.idle_seconds:
            conn.close()
        return conn

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for c in conns:
            c.close()


def deliver(mail: EmailMessage, settings: SmtpSettings) -> None:
    """Send one mail over a connection of its own (MailError on failure)."""
    conn = SmtpConnection(settings)
    try:
        sender, rcpts = envelope(mail)
        if not rcpts:
            raise MailError("the mail has no recipient", stage="rcpt", permanent=True, recipient=True)
        conn.send(as_bytes(mail), sender, rcpts)
    finally:
        conn.close()


# --- composing a mail fast ---------------------------------------------------------------------
# The email package's EmailMessage spends ~2 ms building and flattening one two-part mail
# (its header registry parses every header it is given); a campaign sends thousands a second.
# `compose` writes the same MIME directly: 7-bit headers (RFC 2047 encoded words for non-ASCII
# text, folded), base64 or quoted-printable bodies, CRLF line ends.
_WORD_BYTES = 45  # UTF-8 bytes per encoded word: "=?utf-8?b?" + 60 base64 chars + "?=" < 76


def encoded_words(text: str) -> str:
    """`text` as RFC 2047 encoded words (base64, UTF-8), one per folded line; ASCII text as is."""
    if text.isascii():
        return text
    words, chunk, size = [], [], 0
    for ch in text:
        n = len(ch.encode())
        if size + n > _WORD_BYTES:
            words.append("".join(chunk))
            chunk, size = [], 0
        chunk.append(ch)
        size += n
    if chunk:
        words.append("".join(chunk))
    return "\r\n ".join(f"=?utf-8?b?{base64.b64encode(w.encode()).decode()}?=" for w in words)


def _header(name: str, value: str) -> str:
    value = " ".join(str(value).replace("\r", " ").replace("\n", " ").split())  # no header injection
    if not value.isascii():
        return f"{name}: {encoded_words(value)}"
    line = f"{name}: {value}"
    if len(line) <= 78:
        return line
    out, current = [], f"{name}:"  # fold at spaces (a list of addresses, a long URL list)
    for word in value.split(" "):
        if len(current) + 1 + len(word) > 78 and current != f"{name}:":
            out.append(current)
            current = ""
        current += " " + word
    out.append(current)
    return "\r\n".join(out)


def _body(text: str) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, the encoded body): base64 for mostly non-ASCII text (Persian:
    2 bytes a letter become 2.7; quoted-printable would make them 6), else quoted-printable."""
    import quopri

    data = text.replace("\r\n", "\n").encode()
    sample = text[:2000]
    if (len(sample.encode()) - len(sample)) * 5 > len(sample):  # ~ the non-ASCII characters
        canonical = data.replace(b"\n", b"\r\n")  # RFC 2045: text is CRLF lines before base64
        return "base64", base64.encodebytes(canonical).replace(b"\n", b"\r\n")
    return "quoted-printable", quopri.encodestring(data).replace(b"\n", b"\r\n")


_date_cache: list = [0, ""]


def _date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, formatdate(now, usegmt=True)]
    return _date_cache[1]


def _parts(text: str, html: str) -> tuple[list[str], bytes]:
    """The content headers and body of the text (and HTML) part of a mail."""
    text_cte, text_data = _body(text)
    if not html:
        return ['Content-Type: text/plain; charset="utf-8"', f"Content-Transfer-Encoding: {text_cte}"], text_data
    boundary = f"=_crm_{secrets.token_hex(12)}"
    html_cte, html_data = _body(html)
    b = boundary.encode()
    return [f'Content-Type: multipart/alternative; boundary="{boundary}"'], b"".join(
        [
            b"--" + b + b'\r\nContent-Type: text/plain; charset="utf-8"\r\n',
            b"Content-Transfer-Encoding: " + text_cte.encode() + b"\r\n\r\n",
            text_data,
            b"\r\n--" + b + b'\r\nContent-Type: text/html; charset="utf-8"\r\n',
            b"Content-Transfer-Encoding: " + html_cte.encode() + b"\r\n\r\n",
            html_data,
            b"\r\n--" + b + b"--\r\n",
        ]
    )


@dataclass(frozen=True)
class Attachment:
    """A file attached to a mail `compose` writes."""

    filename: str
    content_type: str
    data: bytes


def _filename_param(name: str, filename: str) -> str:
    """`filename="report.xlsx"`, or RFC 2231 `filename*=utf-8''...` for a non-ASCII name."""
    import urllib.parse

    clean = " ".join(filename.replace("\r", " ").replace("\n", " ").split()) or "attachment"
    if clean.isascii() and '"' not in clean and "\\" not in clean:
        return f'{name}="{clean}"'
    return f"{name}*=utf-8''{urllib.parse.quote(clean, safe='')}"


def _attachment(a: Attachment) -> bytes:
    ctype = " ".join(a.content_type.split()) or "application/octet-stream"
    head = "\r\n".join(
        [
            f"Content-Type: {ctype}; {_filename_param('name', a.filename)}",
            f"Content-Disposition: attachment; {_filename_param('filename', a.filename)}",
            "Content-Transfer-Encoding: base64",
        ]
    )
    return head.encode() + b"\r\n\r\n" + base64.encodebytes(a.data).replace(b"\n", b"\r\n")


def compose(headers: list[tuple[str, str]], text: str, html: str = "", attachments: Sequence[Attachment] = ()) -> bytes:
    """A mail as SMTP sends it: `headers` (From, To, Subject, Message-ID, ...; a Date is added
    when none is given), a text/plain part and, if `html`, a multipart/alternative of the text
    and the HTML (UTF-8); with `attachments`, a multipart/mixed of that and the files (base64)."""
    lines = [_header(n, v) for n, v in headers]
    if not any(n.lower() == "date" for n, _ in headers):
        lines.append(f"Date: {_date()}")
    lines.append("MIME-Version: 1.0")
    part_lines, part_body = _parts(text, html)
    if not attachments:
        return "\r\n".join(lines + part_lines).encode() + b"\r\n\r\n" + part_body
    boundary = f"=_crm_{secrets.token_hex(12)}"
    b = boundary.encode()
    lines.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
    out = [
        "\r\n".join(lines).encode(),
        b"\r\n\r\n--" + b + b"\r\n",
        "\r\n".join(part_lines).encode() + b"\r\n\r\n",
        part_body,
    ]
    for a in attachments:
        out += [b"\r\n--" + b + b"\r\n", _attachment(a)]
    out.append(b"\r\n--" + b + b"--\r\n")
    return b"".join(out)


# -- delivery-status notifications (RFC 3464) ----------------------------------------------------
@dataclass
class Dsn:
    """What a delivery-status notification reports of the (first failed) recipient."""

    recipient: str = ""
    status: str = ""  # 5.1.1
    kind: str = ""  # hard (5.x.x) | soft (4.x.x) | "" (delayed, delivered, relayed: no failure)
    description: str = ""  # the Diagnostic-Code, or the action
    action: str = ""  # failed | delayed | delivered | relayed | expanded (RFC 3464 Action)
    original_message_id: str = ""  # the Message-ID of the message it returns
    original_headers: dict = field(default_factory=dict)  # the returned message's headers


def kind_of(status: str, action: str = "failed") -> str:
    """hard for 5.x.x, soft for 4.x.x; "" when the report is no failure (delivered, delayed)."""
    action = (action or "failed").strip().lower()
    if action not in ("failed",):
        return ""
    head = (status or "").strip()[:1]
    return "soft" if head == "4" else "hard"


def _address_of(value: str) -> str:
    """'rfc822; a@b.ir' -> 'a@b.ir'."""
    value = (value or "").partition(";")[2] if ";" in (value or "") else (value or "")
    return value.strip().strip("<>").lower()


def parse_dsn(raw: bytes) -> Dsn | None:
    """The report of an RFC 3464 delivery-status notification (multipart/report;
    report-type=delivery-status), or None if the message is not one. The returned message (a
    message/rfc822 part, or text/rfc822-headers) gives the original Message-ID."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    if msg.get_content_type() != "multipart/report":
        return None
    out: Dsn | None = None
    original = None
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/delivery-status":
            blocks = part.get_payload()
            if isinstance(blocks, str):  # a parser that left it as text
                blocks = [HeaderParser().parsestr(b) for b in re.split(r"\r?\n\r?\n", blocks) if b.strip()]
            for block in blocks[1:] if len(blocks) > 1 else blocks:
                if block.get("Action") is None and block.get("Status") is None:
                    continue
                status = (block.get("Status") or "").strip().split(" ")[0]
                action = (block.get("Action") or "failed").strip()
                out = Dsn(
                    recipient=_address_of(block.get("Original-Recipient") or block.get("Final-Recipient") or ""),
                    status=status,
                    kind=kind_of(status, action),
                    description=" ".join(str(block.get("Diagnostic-Code") or action).split())[:300],
                    action=action.lower(),
                )
                if out.kind:  # the first failed recipient
                    break
        elif ctype == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload:
                original = payload[0]
        elif ctype == "text/rfc822-headers":
            original = HeaderParser().parsestr(part.get_payload(decode=True).decode("utf-8", "replace"))
    if out is None:
        return None
    if original is not None:
        out.original_message_id = str(original.get("Message-ID") or "").strip()
        out.original_headers = {k: str(v) for k, v in original.items()}
    return out
