"""The channel senders of campaign-svc: `rt.senders[channel](out: Outgoing) -> provider id`,
registered at runtime construction (`install`). Each raises `outgoing.SendError` on failure:
`retryable` for an outage (the delivery workers try again with back-off), not retryable for a
refused address or message (`hard_bounce` when the address itself was refused).

- **email**: SMTP through `crm_chassis.mail.SmtpPool` (persistent sessions, reused across
  sends), the MIME written by `crm_chassis.mail.compose` (fast: no EmailMessage).
  multipart/alternative (the text part, then the HTML part as rendered: styles
  inlined, dir and lang set), a Message-ID stable per message (`<cmp-{message id}@{domain}>`,
  the same on every retry), and when the Outgoing has an unsubscribe link the RFC 2369 / RFC
  8058 headers `List-Unsubscribe: <mailto:...>, <https://...>` and `List-Unsubscribe-Post:
  List-Unsubscribe=One-Click`. A 5xx to RCPT is a hard bounce; another 5xx refuses the
  message; 4xx, a refused or broken connection and a timeout are retryable.
- **sms**: one `SmsProvider` interface, `send(number, text, sender, reference) -> id`, with
  two adapters: `Kavenegar` (its REST API: POST {base}/v1/{API key}/sms/send.json, form
  fields receptor / sender / message / localid, JSON `return.status` 200 and
  `entries[].messageid`) and `GenericJsonSms` (a JSON POST to a configured URL with an auth
  header and configurable field names, the id read from a dotted path of the answer).
- **telegram**, **bale**: bot messages through `crm_chassis.bots` (the chat id is the address).

Settings (environment, read when the runtime is made; docs/channels.md):
SMTP_HOST, SMTP_PORT, SMTP_FROM (campaigns@crm.local), SMTP_FROM_NAME, MAIL_DOMAIN,
SMTP_STARTTLS, SMTP_USER, SMTP_PASSWORD, SMTP_TIMEOUT_SECONDS (crm_chassis.mail),
SMTP_CONNECTIONS (4); SMS_PROVIDER (none | kavenegar | generic), SMS_API_KEY, SMS_SENDER,
SMS_TIMEOUT_SECONDS (10), KAVENEGAR_API_BASE (https://api.kavenegar.com), SMS_GENERIC_URL,
SMS_GENERIC_AUTH_HEADER (Authorization), SMS_GENERIC_AUTH_PREFIX (Bearer),
SMS_GENERIC_TO_FIELD (to), SMS_GENERIC_TEXT_FIELD (text), SMS_GENERIC_FROM_FIELD (from),
SMS_GENERIC_REFERENCE_FIELD (reference), SMS_GENERIC_ID_PATH (id); TELEGRAM_BOT_TOKEN,
TELEGRAM_API_BASE, BALE_BOT_TOKEN, BALE_API_BASE, BOT_API_TIMEOUT_SECONDS (crm_chassis.bots).
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import make_msgid, parseaddr

from crm_chassis import bots as chassis_bots
from crm_chassis.config import ConfigError
from crm_chassis.mail import MailError, SmtpPool, SmtpSettings, compose, is_address, smtp_settings
from crm_chassis.persian import phone_e164

from .outgoing import Outgoing, SendError
from .runtime import Campaign

log = logging.getLogger("campaign.channels")

CHANNELS = ("email", "sms", "telegram", "bale")
DEFAULT_FROM = "campaigns@crm.local"


# --- e-mail ------------------------------------------------------------------------------------
def message_id_of(out: Outgoing, domain: str) -> str:
    """Our Message-ID of a campaign message: stable per messages.id (a retry sends the same)."""
    if out.message_id:
        return f"<cmp-{out.message_id}@{domain}>"
    return make_msgid("cmp", domain=domain)


def unsubscribe_headers(out: Outgoing) -> dict[str, str]:
    """List-Unsubscribe (RFC 2369) of the Outgoing's links, and List-Unsubscribe-Post
    (RFC 8058 one-click) when one of them is an https URL."""
    links = []
    if out.unsubscribe_mailto:
        mailto = out.unsubscribe_mailto
        links.append(f"<{mailto if mailto.startswith('mailto:') else 'mailto:' + mailto}>")
    if out.unsubscribe_url:
        links.append(f"<{out.unsubscribe_url}>")
    if not links:
        return {}
    headers = {"List-Unsubscribe": ", ".join(links)}
    if out.unsubscribe_url.startswith("https://"):
        headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    return headers


class EmailSender:
    def __init__(self, settings: SmtpSettings, connections: int = 4):
        self.settings = settings
        self.pool = SmtpPool(settings, size=connections)

    def headers(self, out: Outgoing) -> list[tuple[str, str]]:
        address = out.address.strip()
        if not is_address(address):
            raise SendError(f"{address!r} is not an e-mail address", retryable=False, code="bad_address")
        headers = {
            "From": out.sender or self.settings.from_header,
            "To": address,
            "Subject": out.subject,
            "Message-ID": message_id_of(out, self.settings.domain),
        }
        if out.reply_to:
            headers["Reply-To"] = out.reply_to
        if out.campaign_id:
            headers["X-CRM-Campaign"] = out.campaign_id
        headers.update(unsubscribe_headers(out))
        headers.update(out.headers)
        return list(headers.items())

    def build(self, out: Outgoing) -> bytes:
        """The mail as sent: the text part and the HTML part as multipart/alternative."""
        return compose(self.headers(out), out.text or " ", out.html)

    def send(self, out: Outgoing) -> str:
        headers = self.headers(out)
        data = compose(headers, out.text or " ", out.html)
        envelope_from = parseaddr(out.sender)[1] if out.sender else self.settings.sender
        try:
            self.pool.send(data, envelope_from, [out.address.strip()])
        except MailError as e:
            raise SendError(
                str(e),
                retryable=e.retryable,
                hard_bounce=e.permanent and e.recipient,
                code=f"smtp_{e.code}" if e.code else f"smtp_{e.stage or 'error'}",
            ) from None
        return dict(headers)["Message-ID"]

    def close(self) -> None:
        self.pool.close()


# --- SMS ---------------------------------------------------------------------------------------
class SmsProvider:
    """One SMS provider: `send(number, text, sender, reference) -> the provider's message id`
    (number in E.164; reference our message id, for providers that dedupe by it)."""

    name = ""

    def send(self, number: str, text: str, sender: str = "", reference: str = "") -> str:
        raise NotImplementedError


def _post(url: str, data: bytes, headers: dict, timeout: float) -> tuple[int, bytes]:
    """(HTTP status, body); SendError(retryable) when the provider cannot be reached."""
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the configured provider
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise SendError(f"the SMS provider is unreachable: {reason}", code="unreachable") from None


def _json(raw: bytes):
    try:
        return json.loads(raw or b"null")
    except ValueError:
        return None


# Kavenegar's return.status values: what each means for a send.
KAVENEGAR_BAD_NUMBER = frozenset({411})  # the receptor is not a valid number: a hard bounce
KAVENEGAR_REFUSED = frozenset({400, 404, 405, 406, 412, 413, 414, 417, 419, 420, 422, 426, 428, 431, 432, 501})
# 401 account disabled, 402 operation failed, 403 bad API key, 407 access denied, 409 server
# busy, 418 no credit, 429 / 451 too many calls, 5xx: not this message's fault; retried.


class Kavenegar(SmsProvider):
    name = "kavenegar"

    def __init__(self, api_key: str, sender: str = "", base_url: str = "https://api.kavenegar.com", timeout=10.0):
        if not api_key:
            raise ConfigError(["SMS_PROVIDER=kavenegar needs SMS_API_KEY"])
        self.api_key, self.sender, self.timeout = api_key, sender, timeout
        self.base_url = base_url.rstrip("/")

    @staticmethod
    def receptor(number: str) -> str:
        """Kavenegar's form of a number: national for Iran (09121234567), else 00 + E.164."""
        digits = number.lstrip("+")
        return "0" + digits[2:] if digits.startswith("98") else "00" + digits

    def send(self, number: str, text: str, sender: str = "", reference: str = "") -> str:
        fields = {"receptor": self.receptor(number), "message": text}
        if sender or self.sender:
            fields["sender"] = sender or self.sender
        if reference:
            fields["localid"] = reference  # Kavenegar answers a repeated localid with the first send
        url = f"{self.base_url}/v1/{urllib.parse.quote(self.api_key, safe='')}/sms/send.json"
        status, raw = _post(
            url,
            urllib.parse.urlencode(fields).encode(),
            {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8", "Accept": "application/json"},
            self.timeout,
        )
        answer = _json(raw)
        ret = answer.get("return") if isinstance(answer, dict) else None
        code = ret.get("status") if isinstance(ret, dict) and isinstance(ret.get("status"), int) else status
        text_ = str(ret.get("message") or "") if isinstance(ret, dict) else ""
        if code == 200 and status == 200:
            entries = answer.get("entries") if isinstance(answer, dict) else None
            if isinstance(entries, list) and entries and isinstance(entries[0], dict) and entries[0].get("messageid"):
                return str(entries[0]["messageid"])
            raise SendError("Kavenegar answered 200 without a message id", code="kavenegar_no_id")
        # The API key is in the URL and never in the error's text.
        what = f"Kavenegar refused the message: {code} {text_}".strip()[:300]
        if code in KAVENEGAR_BAD_NUMBER:
            raise SendError(what, retryable=False, hard_bounce=True, code=f"kavenegar_{code}")
        if code in KAVENEGAR_REFUSED:
            raise SendError(what, retryable=False, code=f"kavenegar_{code}")
        raise SendError(what, retryable=True, code=f"kavenegar_{code}")


class GenericJsonSms(SmsProvider):
    """A JSON HTTP provider: POST {to_field: number, text_field: text, from_field: sender,
    reference_field: our id} to `url` with `auth_header: auth_prefix api_key`; 2xx is sent (the
    id read from `id_path`, e.g. "data.message_id"), 408, 425, 429 and 5xx are retried, any
    other 4xx refuses the message (422: the number, a hard bounce)."""

    name = "generic"

    def __init__(
        self,
        url: str,
        api_key: str = "",
        sender: str = "",
        *,
        auth_header: str = "Authorization",
        auth_prefix: str = "Bearer",
        to_field: str = "to",
        text_field: str = "text",
        from_field: str = "from",
        reference_field: str = "reference",
        id_path: str = "id",
        timeout: float = 10.0,
    ):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(["SMS_PROVIDER=generic needs SMS_GENERIC_URL (an http(s) URL)"])
        self.url, self.api_key, self.sender, self.timeout = url, api_key, sender, timeout
        self.auth_header, self.auth_prefix = auth_header, auth_prefix
        self.fields = {"to": to_field, "text": text_field, "from": from_field, "reference": reference_field}
        self.id_path = [p for p in id_path.split(".") if p]

    def send(self, number: str, text: str, sender: str = "", reference: str = "") -> str:
        body = {self.fields["to"]: number, self.fields["text"]: text}
        if (sender or self.sender) and self.fields["from"]:
            body[self.fields["from"]] = sender or self.sender
        if reference and self.fields["reference"]:
            body[self.fields["reference"]] = reference
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key and self.auth_header:
            headers[self.auth_header] = f"{self.auth_prefix} {self.api_key}".strip()
        status, raw = _post(self.url, json.dumps(body, ensure_ascii=False).encode(), headers, self.timeout)
        answer = _json(raw)
        if 200 <= status < 300:
            value = answer
            for part in self.id_path:
                value = value.get(part) if isinstance(value, dict) else None
            if value in (None, ""):
                raise SendError(f"the SMS provider answered {status} without {'.'.join(self.id_path)}", code="no_id")
            return str(value)
        detail = ""
        if isinstance(answer, dict):
            detail = str(answer.get("error") or answer.get("message") or answer.get("detail") or "")
        what = f"the SMS provider answered {status} {detail}".strip()[:300]
        if status in (408, 425, 429) or status >= 500:
            raise SendError(what, retryable=True, code=f"http_{status}")
        raise SendError(what, retryable=False, hard_bounce=status == 422, code=f"http_{status}")


def sms_provider(env: Mapping[str, str] | None = None) -> SmsProvider | None:
    """The provider SMS_PROVIDER names (None for none / unset); ConfigError for a bad setting."""
    env = os.environ if env is None else env
    kind = (env.get("SMS_PROVIDER") or "none").strip().lower()
    try:
        timeout = float(env.get("SMS_TIMEOUT_SECONDS") or 10)
    except ValueError as exc:
        raise ConfigError([f"SMS_TIMEOUT_SECONDS: {exc}"]) from exc
    key, sender = (env.get("SMS_API_KEY") or "").strip(), (env.get("SMS_SENDER") or "").strip()
    if kind in ("", "none"):
        return None
    if kind == "kavenegar":
        base = env.get("KAVENEGAR_API_BASE") or "https://api.kavenegar.com"
        return Kavenegar(key, sender, base, timeout)
    if kind == "generic":
        g = lambda name, default: env.get(f"SMS_GENERIC_{name}", default)  # noqa: E731
        return GenericJsonSms(
            (env.get("SMS_GENERIC_URL") or "").strip(),
            key,
            sender,
            auth_header=g("AUTH_HEADER", "Authorization"),
            auth_prefix=g("AUTH_PREFIX", "Bearer"),
            to_field=g("TO_FIELD", "to"),
            text_field=g("TEXT_FIELD", "text"),
            from_field=g("FROM_FIELD", "from"),
            reference_field=g("REFERENCE_FIELD", "reference"),
            id_path=g("ID_PATH", "id"),
            timeout=timeout,
        )
    raise ConfigError([f"SMS_PROVIDER={kind!r}: expected none, kavenegar or generic"])


@dataclass
class SmsSender:
    provider: SmsProvider
    region: str = "IR"

    def send(self, out: Outgoing) -> str:
        number = phone_e164(out.address, self.region)
        if number is None:
            raise SendError(f"{out.address!r} is not a phone number", retryable=False, code="bad_address")
        if not out.text.strip():
            raise SendError("the SMS has no text", retryable=False, code="empty")
        return self.provider.send(number, out.text, out.sender, out.message_id)


# --- bots --------------------------------------------------------------------------------------
@dataclass
class BotSender:
    bot: chassis_bots.BotApi

    def send(self, out: Outgoing) -> str:
        chat_id = out.address.strip()
        if not chat_id.lstrip("-").isdigit() and not chat_id.startswith("@"):
            raise SendError(f"{chat_id!r} is not a chat id", retryable=False, code="bad_address")
        try:
            return f"{chat_id}:{self.bot.send_text(chat_id, out.text)}"
        except chassis_bots.BotApiError as e:
            # 400 chat not found / 403 blocked by the user: the address is dead for this bot
            raise SendError(
                str(e), retryable=e.retryable, hard_bounce=e.code in (400, 403), code=f"bot_{e.code}"
            ) from None


# --- the part ----------------------------------------------------------------------------------
@dataclass
class Channels:
    email: EmailSender
    sms: SmsSender | None
    bots: dict[str, BotSender]


def channels(rt: Campaign, env: Mapping[str, str] | None = None) -> Channels:
    env = os.environ if env is None else env

    def make() -> Channels:
        try:
            connections = int(env.get("SMTP_CONNECTIONS") or 4)
        except ValueError as exc:
            raise ConfigError([f"SMTP_CONNECTIONS: {exc}"]) from exc
        email = EmailSender(smtp_settings(env, default_from=DEFAULT_FROM), connections)
        provider = sms_provider(env)
        sms = SmsSender(provider, rt.phone_region) if provider else None
        bots = {p: BotSender(b) for p, b in chassis_bots.clients(env).items()}
        return Channels(email, sms, bots)

    return rt.once("channels", make)


def install(rt: Campaign) -> None:
    ch = channels(rt)
    rt.senders["email"] = ch.email.send
    if ch.sms is not None:
        rt.senders["sms"] = ch.sms.send
    for provider, sender in ch.bots.items():
        rt.senders[provider] = sender.send
