"""One message on its way out, as the delivery workers hand it to a channel's sender
(runtime.Campaign.senders), and the error a sender raises."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Outgoing:
    channel: str  # email | sms | telegram | bale
    address: str  # e-mail, E.164 number, chat id
    text: str  # the plain-text body (SMS and bots send only this)
    subject: str = ""  # e-mail
    html: str = ""  # e-mail: the HTML part (CSS inlined, dir=rtl for Persian)
    headers: dict[str, str] = field(default_factory=dict)  # e-mail: List-Unsubscribe, ...
    message_id: str = ""  # our messages.id: idempotency key for providers that take one
    campaign_id: str = ""
    sender: str = ""  # e-mail From / SMS line number; "" for the channel's default
    # e-mail: the recipient's unsubscribe links, sent as List-Unsubscribe (and, for an https
    # URL, List-Unsubscribe-Post: List-Unsubscribe=One-Click, RFC 8058)
    unsubscribe_url: str = ""
    unsubscribe_mailto: str = ""  # mailto:unsubscribe+...@domain (or the bare address)
    reply_to: str = ""  # e-mail Reply-To


class SendError(Exception):
    """A send failed. `retryable`: a provider outage or rate limit (retried with back-off);
    not retryable: a rejected address or a refused message (the message fails, a hard
    rejection of the address may suppress it)."""

    def __init__(self, message: str, *, retryable: bool = True, hard_bounce: bool = False, code: str = ""):
        super().__init__(message)
        self.retryable = retryable
        self.hard_bounce = hard_bounce
        self.code = code
