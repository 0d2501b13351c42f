"""A local SMTP sink for development (`make run` starts it): every message it receives is
written as an .eml file in a folder, and one line is logged. Nothing is relayed anywhere.

    python -m support_svc.smtp_sink --port 2526 --dir .run/mail

support-svc sends agent replies to it by default (SMTP_HOST 127.0.0.1, SMTP_PORT 2526). Tests
use `Sink(folder, port=0).start()` and read `sink.messages()`.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import logging
import os
import pathlib
import signal
import threading
import time
import uuid
from email.message import EmailMessage

from aiosmtpd.controller import Controller

log = logging.getLogger("crm.smtp_sink")
# aiosmtpd logs every SMTP command (and the addresses in them) at INFO: only its warnings
logging.getLogger("mail.log").setLevel(logging.WARNING)


class ServerController(Controller):
    """aiosmtpd's threaded Controller that also works with port 0 (any free port): the bound
    port is read back before the start-up probe connects (and kept in `port`)."""

    def _trigger_server(self):
        if self.server is not None and self.server.sockets:
            self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class SinkHandler:
    def __init__(self, folder: pathlib.Path):
        self.folder = folder

    async def handle_DATA(self, server, session, envelope):
        data = envelope.original_content or b""
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.eml"
        tmp = self.folder / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.folder / name)  # a reader never sees half a file
        subject = ""
        try:
            subject = str(email.message_from_bytes(data, policy=email.policy.default).get("subject", ""))
        except Exception:  # noqa: BLE001 - the file is written; the log line is a courtesy
            pass
        log.info(
            "mail from %s to %s (%d bytes) %r -> %s",
            envelope.mail_from,
            ",".join(envelope.rcpt_tos),
            len(data),
            subject,
            self.folder / name,
        )
        return "250 OK: kept"


class Sink:
    """The sink as an object: start(), stop(timeout), `port` once started, messages()."""

    name = "smtp-sink"

    def __init__(self, folder, host: str = "127.0.0.1", port: int = 2526):
        self.folder = pathlib.Path(folder)
        self.host = host
        self.port = port
        self.controller: ServerController | None = None

    def start(self) -> Sink:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.controller = ServerController(SinkHandler(self.folder), hostname=self.host, port=self.port)
        self.controller.start()
        self.port = self.controller.port
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def files(self) -> list[pathlib.Path]:
        return sorted(self.folder.glob("*.eml"), key=lambda p: (p.stat().st_mtime_ns, p.name))

    def messages(self) -> list[EmailMessage]:
        """Every message received so far, oldest first."""
        return [email.message_from_bytes(p.read_bytes(), policy=email.policy.default) for p in self.files()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m support_svc.smtp_sink", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=2526)
    ap.add_argument("--dir", default=os.path.join(".run", "mail"), help="where the .eml files go")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s smtp-sink %(message)s")
    sink = Sink(args.dir, args.host, args.port).start()
    log.info("listening on %s:%d, writing to %s", args.host, sink.port, pathlib.Path(args.dir).resolve())
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    sink.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
