"""A local HTTP server speaking two SMS provider shapes, for tests of campaign-svc's SMS
adapters (a real server on loopback, like bot_api_stub.py):

- Kavenegar's REST API: POST /v1/<API key>/sms/send.json with form fields receptor, sender,
  message (and localid); answers {"return": {"status": 200, "message": ...}, "entries":
  [{"messageid": ..., "receptor": ..., "status": 1, ...}]}; a wrong key 403, a receptor that is
  not a mobile number (or one in `bad_numbers`) 411, an empty message 413 - with the HTTP
  status equal to return.status, as the real API answers. A repeated localid answers the first
  send's entry (nothing is sent again).
- a generic JSON provider: POST /sms with {"to", "text", "from", "reference"} (the names the
  test configures are read from `generic_fields`) and `Authorization: Bearer <key>`; answers
  200 {"data": {"message_id": "g-..."}}, 401 for a wrong key, 422 for a bad number.

    with SmsStub(api_key="K") as stub:
        stub.url                       # KAVENEGAR_API_BASE / the base of SMS_GENERIC_URL
        stub.fail(502, times=2)        # the next two requests answer 502 (an outage)
        stub.sent()                    # what was accepted: [{"receptor": ..., "message": ...}]
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Request:
    path: str
    headers: dict
    fields: dict
    status: int = 200


@dataclass
class SmsStub:
    api_key: str = "TEST-KEY-123"
    host: str = "127.0.0.1"
    bad_numbers: set = field(default_factory=set)
    generic_fields: dict = field(default_factory=lambda: {"to": "to", "text": "text", "reference": "reference"})
    received: list[Request] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._failures: list[list[int]] = []  # [status, times left]
        self._next = 800_000_000
        self._by_localid: dict[str, dict] = {}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                kind = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                if kind == "application/json":
                    try:
                        fields = json.loads(raw or b"{}")
                    except ValueError:
                        fields = {}
                else:
                    fields = {k: v[0] for k, v in urllib.parse.parse_qs(raw.decode("utf-8")).items()}
                status, body = stub._answer(self.path, dict(self.headers), fields)
                data = json.dumps(body, ensure_ascii=False).encode() if body is not None else b"<html>down</html>"
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if body is not None else "text/html")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="sms-stub", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> SmsStub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> SmsStub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fail(self, status: int, times: int = 1) -> None:
        """The next `times` requests answer `status` (an HTML body: a proxy's error page)."""
        with self._lock:
            self._failures.append([status, times])

    def sent(self) -> list[dict]:
        """The fields of the requests that sent a message (a repeated localid is not one)."""
        with self._lock:
            return [r.fields for r in self.received if r.status == 200 and not r.fields.get("_repeat")]

    # -- the APIs -------------------------------------------------------------------------------
    def _answer(self, path: str, headers: dict, fields: dict):
        with self._lock:
            req = Request(path, headers, fields)
            self.received.append(req)
            if self._failures:
                f = self._failures[0]
                f[1] -= 1
                if f[1] <= 0:
                    self._failures.pop(0)
                req.status = f[0]
                return f[0], None
            m = re.fullmatch(r"/v1/([^/]+)/sms/send\.json", path)
            if m:
                req.status, body = self._kavenegar(urllib.parse.unquote(m.group(1)), fields)
                return req.status, body
            if path == "/sms":
                req.status, body = self._generic(headers, fields)
                return req.status, body
            req.status = 404
            return 404, {"error": "not found"}

    def _kavenegar(self, key: str, fields: dict):
        def error(status: int, message: str):
            return status, {"return": {"status": status, "message": message}, "entries": None}

        if key != self.api_key:
            return error(403, "کد شناسائی API-Key معتبر نمی‌باشد")
        receptor = fields.get("receptor", "")
        if not fields.get("message"):
            return error(413, "متن پیام خالی است")
        if receptor in self.bad_numbers or not re.fullmatch(r"09\d{9}|00\d{8,15}", receptor):
            return error(411, "دریافت کننده نامعتبر است")
        localid = fields.get("localid")
        if localid and localid in self._by_localid:
            fields["_repeat"] = True
            entry = self._by_localid[localid]
        else:
            self._next += 1
            entry = {
                "messageid": self._next,
                "message": fields["message"],
                "status": 1,
                "statustext": "در صف ارسال",
                "sender": fields.get("sender", "10004346"),
                "receptor": receptor,
                "date": 1764700000,
                "cost": 120,
            }
            if localid:
                self._by_localid[localid] = entry
        return 200, {"return": {"status": 200, "message": "تایید شد"}, "entries": [entry]}

    def _generic(self, headers: dict, fields: dict):
        auth = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
        if auth != f"Bearer {self.api_key}":
            return 401, {"error": "unauthorized"}
        to = str(fields.get(self.generic_fields["to"], ""))
        if to in self.bad_numbers or not re.fullmatch(r"\+\d{8,15}", to):
            return 422, {"error": f"invalid number {to}"}
        if not str(fields.get(self.generic_fields["text"], "")).strip():
            return 400, {"error": "empty text"}
        self._next += 1
        return 200, {"data": {"message_id": f"g-{self._next}", "parts": 1}}
