"""Reading an inbound e-mail: pure functions (no database, no network), so every odd mail can
be tested on its own. support-svc opens tickets from what this reads; campaign-svc reads the
replies to its campaigns.

    mail = parse(raw_bytes, envelope_from="a@b.ir", rcpt_tos=["support@crm.local"])
    mail.subject, mail.from_address, mail.body, mail.attachments, mail.message_id, mail.thread_ids
    mail.auto_submitted   # an auto-reply (RFC 3834) or a bulk mail: no person wrote it
    reply_text(mail.body) # what the sender wrote above the quoted message they answer

Never raises for bad input: a mail the parser cannot read at all comes back with the raw text
as its body and `parse_error` set; an unknown or wrong charset falls back to UTF-8, then to
Windows-1256 (Arabic script, common in Iran) with replacement characters; a mail without a
Message-ID gets a stable one from the SHA-256 of its bytes (a redelivery is the same message).
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import email.utils
import hashlib
import html
import mimetypes
import re
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.message import Message
from html.parser import HTMLParser

SUBJECT_LIMIT = 300  # characters of a subject kept
BODY_LIMIT = 100_000  # characters of a body kept (the rest is in the original, kept by the caller)

SYNTHETIC_DOMAIN = "mail-in.invalid"  # Message-IDs made here for mails that had none
NO_SUBJECT = "(no subject)"
EMPTY_BODY = "(empty message)"
FALLBACK_CHARSETS = ("utf-8", "cp1256")
MAX_THREAD_IDS = 50  # of References: enough for any real thread, bounded for the lookup
_MSGID = re.compile(r"<[^<>\s]+>")
_PERSIAN = re.compile(r"[\u0600-\u06FF]")


@dataclass
class Attachment:
    filename: str
    content_type: str
    content: bytes


@dataclass
class ParsedMail:
    message_id: str  # "<...>" as given, or synthetic (see synthetic_message_id)
    synthetic_id: bool
    in_reply_to: list[str]
    references: list[str]
    subject: str
    from_address: str  # lower case; the envelope sender if the header has none
    from_name: str
    recipients: list[str]  # envelope recipients, then To and Cc (lower case, no duplicates)
    body: str
    attachments: list[Attachment] = field(default_factory=list)
    date: str = ""
    parse_error: str = ""  # why the MIME structure could not be read ('' when it could)
    defects: int = 0  # problems the parser worked around (a missing closing boundary, ...)
    truncated: bool = False  # the body was longer than a message may be
    # Auto-Submitted (RFC 3834) other than "no", or an auto-responder's or a list's marks
    # (X-Autoreply, X-Autorespond, Precedence: auto_reply / bulk / junk / list): no person wrote it
    auto_submitted: bool = False

    @property
    def thread_ids(self) -> list[str]:
        """The Message-IDs this mail answers, most specific first (In-Reply-To, then References
        from the newest), without duplicates."""
        out: list[str] = []
        for mid in [*self.in_reply_to, *reversed(self.references)]:
            if mid not in out:
                out.append(mid)
        return out[:MAX_THREAD_IDS]


# -- text ------------------------------------------------------------------------------------
def decode_bytes(data: bytes, charset: str | None) -> str:
    """`data` in its declared charset; if that is unknown or wrong, UTF-8, then Windows-1256
    with replacement characters (never raises)."""
    tried = []
    for cs in (charset, *FALLBACK_CHARSETS):
        if not cs or cs in tried:
            continue
        tried.append(cs)
        try:
            return data.decode(cs)
        except (LookupError, UnicodeDecodeError):
            continue
    return data.decode("cp1256", errors="replace")


def fix_surrogates(text: str) -> str:
    """A header with raw 8-bit bytes comes back from the email package with surrogate escapes;
    read those bytes as UTF-8, else Windows-1256."""
    if not any("\udc80" <= ch <= "\udcff" for ch in text):
        return text
    return decode_bytes(text.encode("utf-8", errors="surrogateescape"), None)


class _TextOfHtml(HTMLParser):
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "table", "hr"}
    SKIP = {"script", "style", "head", "title"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.out.append("\n")
        if tag == "li":
            self.out.append("- ")

    def handle_startendtag(self, tag, attrs):
        if tag in ("br", "hr"):
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCK and tag != "br":
            self.out.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.out.append(re.sub(r"[ \t\r\n]+", " ", data))


def html_to_text(markup: str) -> str:
    """The text of an HTML body: tags stripped, entities decoded, line breaks kept for <br>,
    paragraphs, list items and table rows; scripts and styles dropped."""
    p = _TextOfHtml()
    try:
        p.feed(markup)
        p.close()
    except Exception:  # noqa: BLE001 - html.parser is lenient; anything else: the tags stripped crudely
        return html.unescape(re.sub(r"<[^>]*>", " ", markup)).strip()
    lines = [ln.strip() for ln in "".join(p.out).split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def text_to_html(text: str) -> str:
    """An HTML alternative of a plain reply: escaped, line breaks kept, right-to-left when it
    holds Persian."""
    rtl = bool(_PERSIAN.search(text))
    body = "<br>\n".join(html.escape(line) for line in text.split("\n"))
    attrs = ' dir="rtl" lang="fa" style="text-align:right"' if rtl else ""
    return f'<!doctype html>\n<html><head><meta charset="utf-8"></head><body><div{attrs}>{body}</div></body></html>\n'


# -- headers ---------------------------------------------------------------------------------
def _raw_header(msg: Message, name: str) -> str:
    for k, v in msg.raw_items():
        if k.lower() == name.lower():
            return str(v)
    return ""


def header(msg: Message, name: str) -> str:
    """The decoded value of a header ('' if absent); a header the policy cannot parse is decoded
    by hand (RFC 2047 words), never raises."""
    try:
        value = msg.get(name)
        text = "" if value is None else str(value)
    except Exception:  # noqa: BLE001 - a malformed header must not lose the mail
        raw = _raw_header(msg, name)
        try:
            text = str(make_header(decode_header(raw)))
        except Exception:  # noqa: BLE001
            text = raw
    return " ".join(fix_surrogates(text).split())


def message_ids(value: str) -> list[str]:
    """The <...> Message-IDs in a header value (In-Reply-To, References), in order."""
    return _MSGID.findall(value or "")


def _addresses(msg: Message, name: str) -> list[tuple[str, str]]:
    """(display name, address) of every address in a header, lower-case addresses."""
    out = []
    try:
        h = msg.get(name)
        groups = getattr(h, "addresses", None)
        if groups is not None:
            for a in groups:
                if a.addr_spec and "@" in a.addr_spec:
                    out.append((fix_surrogates(a.display_name or ""), a.addr_spec.strip().lower()))
            return out
    except Exception:  # noqa: BLE001 - fall back to the lenient parser below
        pass
    for display, addr in email.utils.getaddresses([_raw_header(msg, name)]):
        if "@" in addr:
            try:
                display = str(make_header(decode_header(display)))
            except Exception:  # noqa: BLE001
                pass
            out.append((fix_surrogates(display), addr.strip().lower()))
    return out


def synthetic_message_id(raw: bytes) -> str:
    """A stable Message-ID for a mail that has none: the same bytes, the same id."""
    return f"<sha256-{hashlib.sha256(raw).hexdigest()}@{SYNTHETIC_DOMAIN}>"


def is_synthetic(message_id: str) -> bool:
    return message_id.endswith(f"@{SYNTHETIC_DOMAIN}>")


# -- body and attachments --------------------------------------------------------------------
def _filename(part: Message) -> str:
    try:
        name = part.get_filename() or ""
    except Exception:  # noqa: BLE001
        name = ""
    return fix_surrogates(str(name)).strip().replace("/", "_").replace("\\", "_")[:200]


def _payload(part: Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001 - a broken transfer encoding: the undecoded text
        data = None
    if data is None:
        raw = part.get_payload()
        data = raw.encode("utf-8", errors="surrogateescape") if isinstance(raw, str) else b""
    return data


def _is_attachment(part: Message, ctype: str) -> bool:
    if _filename(part):
        return True
    try:
        disposition = part.get_content_disposition()
    except Exception:  # noqa: BLE001
        disposition = None
    return disposition == "attachment" or not ctype.startswith("text/")


def _attachment(part: Message, ctype: str, n: int, data: bytes | None = None) -> Attachment:
    name = _filename(part)
    if not name:
        ext = ".eml" if ctype == "message/rfc822" else (mimetypes.guess_extension(ctype) or ".bin")
        name = f"part-{n}{ext}"
    return Attachment(filename=name, content_type=ctype or "application/octet-stream", content=data or b"")


def _walk(part: Message, plain: list[str], htmls: list[str], files: list[Attachment]) -> None:
    try:
        ctype = part.get_content_type()
    except Exception:  # noqa: BLE001
        ctype = "application/octet-stream"
    if ctype == "message/rfc822":  # a forwarded mail: kept whole, its text is not ours
        inner = part.get_payload()
        inner = inner[0] if isinstance(inner, list) and inner else inner
        data = inner.as_bytes(policy=email.policy.compat32) if isinstance(inner, Message) else _payload(part)
        files.append(_attachment(part, ctype, len(files) + 1, data))
        return
    if part.is_multipart():
        payload = part.get_payload()
        if isinstance(payload, list):
            for sub in payload:
                if isinstance(sub, Message):
                    _walk(sub, plain, htmls, files)
        return
    data = _payload(part)
    if ctype.startswith("multipart/"):  # its boundary never came: what it holds is text
        text = decode_bytes(data, part.get_content_charset()).strip()
        if text:
            plain.append(text)
        return
    if _is_attachment(part, ctype):
        files.append(_attachment(part, ctype, len(files) + 1, data))
        return
    text = decode_bytes(data, part.get_content_charset())
    if ctype == "text/html":
        htmls.append(html_to_text(text))
    elif text.strip():
        plain.append(text.strip())


def _raw_body(raw: bytes) -> str:
    """What follows the header block of a raw mail, as text (the fallback body)."""
    m = re.search(rb"\r?\n\r?\n", raw)
    body = raw[m.end() :] if m else raw
    return decode_bytes(body, None).strip()


def _limit(text: str, limit: int) -> tuple[str, bool]:
    if len(text) <= limit:
        return text, False
    return text[: limit - 40].rstrip() + "\n\n[... the rest is in original.eml]", True


# -- the whole mail --------------------------------------------------------------------------
def parse(
    raw: bytes,
    envelope_from: str = "",
    rcpt_tos=(),
    *,
    body_limit: int = BODY_LIMIT,
    subject_limit: int = SUBJECT_LIMIT,
) -> ParsedMail:
    """Everything one inbound mail says (see the module docstring); the body and the subject cut
    at the limits given."""
    envelope_from = (envelope_from or "").strip().lower()
    rcpts = [r.strip().lower() for r in rcpt_tos if r and r.strip()]
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
    except Exception as exc:  # noqa: BLE001 - unreadable at all: the raw text becomes the body
        return unparsed(raw, envelope_from, rcpts, f"{type(exc).__name__}: {exc}", body_limit, subject_limit)
    try:
        return _without_nul(_parsed(msg, raw, envelope_from, rcpts, body_limit, subject_limit))
    except Exception as exc:  # noqa: BLE001 - never lose a mail over a parser corner case
        return unparsed(raw, envelope_from, rcpts, f"{type(exc).__name__}: {exc}", body_limit, subject_limit)


def _no_nul(value):
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, list):
        return [_no_nul(v) for v in value]
    return value


def _without_nul(mail: ParsedMail) -> ParsedMail:
    """The mail with U+0000 dropped from every text (PostgreSQL stores none: the failed INSERT
    would be a DataError, answered 451, and the sender would retry forever)."""
    changes = {f.name: _no_nul(getattr(mail, f.name)) for f in dataclasses.fields(mail) if f.name != "attachments"}
    files = [
        dataclasses.replace(a, filename=_no_nul(a.filename), content_type=_no_nul(a.content_type))
        for a in mail.attachments
    ]
    return dataclasses.replace(mail, **changes, attachments=files)


def unparsed(
    raw: bytes,
    envelope_from: str,
    rcpts: list[str],
    error: str,
    body_limit: int = BODY_LIMIT,
    subject_limit: int = SUBJECT_LIMIT,
) -> ParsedMail:
    text = decode_bytes(raw, None)
    subject = ""
    m = re.search(r"^subject:[ \t]*(.*(?:\r?\n[ \t].*)*)", text, re.IGNORECASE | re.MULTILINE)
    if m:
        try:
            subject = str(make_header(decode_header(" ".join(m.group(1).split()))))
        except Exception:  # noqa: BLE001
            subject = m.group(1)
    mid = message_ids(m2.group(1))[:1] if (m2 := re.search(r"^message-id:(.*)$", text, re.I | re.M)) else []
    body, truncated = _limit(text.strip() or EMPTY_BODY, body_limit)
    return _without_nul(
        ParsedMail(
            message_id=mid[0] if mid else synthetic_message_id(raw),
            synthetic_id=not mid,
            in_reply_to=[],
            references=[],
            subject=(" ".join(subject.split()) or NO_SUBJECT)[:subject_limit],
            from_address=envelope_from,
            from_name="",
            recipients=rcpts,
            body=body,
            parse_error=error[:500],
            truncated=True,  # the original is kept: nothing of a mail we could not read is lost
        )
    )


def _auto_submitted(msg: Message) -> bool:
    auto = header(msg, "auto-submitted").lower()
    precedence = header(msg, "precedence").lower()
    return (
        (auto != "" and not auto.startswith("no"))
        or bool(header(msg, "x-autoreply") or header(msg, "x-autorespond"))
        or precedence in ("auto_reply", "bulk", "junk", "list")
    )


def _parsed(
    msg: Message, raw: bytes, envelope_from: str, rcpts: list[str], body_limit: int, subject_limit: int
) -> ParsedMail:
    mids = message_ids(header(msg, "message-id"))
    senders = _addresses(msg, "from") or _addresses(msg, "sender")
    from_name, from_address = senders[0] if senders else ("", envelope_from)
    recipients = list(rcpts)
    for name in ("to", "cc", "delivered-to", "x-original-to"):
        for _, addr in _addresses(msg, name):
            if addr not in recipients:
                recipients.append(addr)
    plain: list[str] = []
    htmls: list[str] = []
    files: list[Attachment] = []
    _walk(msg, plain, htmls, files)
    body = "\n\n".join(plain) if plain else "\n\n".join(h for h in htmls if h)
    defects = len(msg.defects) + sum(len(p.defects) for p in msg.walk() if p is not msg)
    if not body.strip() and not files:
        body = _raw_body(raw)  # a structure the parser could not split (a broken boundary)
    body, truncated = _limit(body.strip() or ("" if files else EMPTY_BODY), body_limit)
    subject = header(msg, "subject")
    return ParsedMail(
        message_id=mids[0] if mids else synthetic_message_id(raw),
        synthetic_id=not mids,
        in_reply_to=message_ids(header(msg, "in-reply-to"))[:MAX_THREAD_IDS],
        references=message_ids(header(msg, "references"))[-MAX_THREAD_IDS:],
        subject=(subject or NO_SUBJECT)[:subject_limit],
        from_address=from_address or envelope_from,
        from_name=from_name[:200],
        recipients=recipients,
        body=body,
        attachments=files,
        date=header(msg, "date")[:100],
        defects=defects,
        truncated=truncated,
        auto_submitted=_auto_submitted(msg),
    )


# -- replies ----------------------------------------------------------------------------------
# Where a reply's quoted original starts: "On ... wrote:" (Gmail, Apple, Thunderbird; the line
# may be wrapped), Outlook's "-----Original Message-----" or its underscore rule followed by a
# From: block, and the Persian clients' "در تاریخ ... نوشت:".
_QUOTE_START = re.compile(
    r"^(?:On\b.{0,300}?\bwrote:|-{2,}\s*Original Message\s*-{2,}|_{8,}|From:\s.+|"
    r"در تاریخ.{0,300}?نوشت\s*:|.{0,200}\bنوشت\s*:)\s*$",
    re.IGNORECASE | re.DOTALL,
)


def reply_text(body: str, limit: int = 4000) -> str:
    """What a reply's sender wrote: the lines above the quoted message (see _QUOTE_START) with
    ">" quoted lines dropped, at most `limit` characters. The whole body if nothing marks a
    quote."""
    lines = (body or "").replace("\r\n", "\n").split("\n")
    out: list[str] = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        joined = (stripped + " " + lines[i + 1].strip()) if i + 1 < len(lines) else stripped
        if out and (_QUOTE_START.match(stripped) or (stripped.startswith("On ") and _QUOTE_START.match(joined))):
            break
        if stripped.startswith(">"):
            continue
        out.append(line.rstrip())
    text = "\n".join(out).strip()
    return text[:limit]
