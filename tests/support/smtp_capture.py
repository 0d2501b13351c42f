"""An SMTP server on loopback (aiosmtpd) that keeps what it receives in memory, counts its
sessions and can refuse: for tests and benchmarks of e-mail senders.

    with SmtpCapture() as smtp:
        smtp.port                        # SMTP_PORT
        smtp.refuse_rcpt["x@y"] = "550 5.1.1 no such user"
        smtp.refuse_data = "451 4.3.0 try later"   # every DATA answers that (None: accept)
        smtp.messages()                  # [EmailMessage, ...] in arrival order
        smtp.sessions                    # EHLO/HELO count (connections that greeted)

`keep=False` only counts messages (a benchmark's sink: no parsing, no copies).
"""

from __future__ import annotations

import email
import email.policy
import logging
import threading
from email.message import EmailMessage

from support_svc.smtp_sink import ServerController  # aiosmtpd's Controller that takes port 0

logging.getLogger("mail.log").setLevel(logging.WARNING)


class _Handler:
    def __init__(self, capture: SmtpCapture):
        self.capture = capture

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # noqa: N802
        with self.capture.lock:
            self.capture.sessions += 1
        session.host_name = hostname
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        refusal = self.capture.refuse_rcpt.get(address.lower())
        if refusal:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        if self.capture.refuse_data:
            return self.capture.refuse_data
        with self.capture.lock:
            self.capture.count += 1
            if self.capture.keep:
                self.capture.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 OK: queued"


class SmtpCapture:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, keep: bool = True):
        self.host, self.port, self.keep = host, port, keep
        self.lock = threading.Lock()
        self.received: list[tuple[str, list[str], bytes]] = []
        self.count = 0
        self.sessions = 0
        self.refuse_rcpt: dict[str, str] = {}
        self.refuse_data: str | None = None
        self.controller: ServerController | None = None

    def start(self) -> SmtpCapture:
        self.controller = ServerController(_Handler(self), hostname=self.host, port=self.port)
        self.controller.start()
        self.port = self.controller.port
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def __enter__(self) -> SmtpCapture:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def raw(self) -> list[bytes]:
        with self.lock:
            return [r[2] for r in self.received]

    def messages(self) -> list[EmailMessage]:
        return [email.message_from_bytes(b, policy=email.policy.default) for b in self.raw()]

    def envelopes(self) -> list[tuple[str, list[str]]]:
        with self.lock:
            return [(r[0], r[1]) for r in self.received]
