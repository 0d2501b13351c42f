"""A local HTTP server speaking the Telegram Bot API (the shape Bale speaks too), for tests of
the messenger channels: POST /bot<token>/<method> with a JSON body.

    with BotApiStub(token="123:abc") as stub:
        base = stub.url                       # TELEGRAM_API_BASE
        ...                                   # the service calls sendMessage
        stub.calls("sendMessage")             # [{"chat_id": ..., "text": ...}, ...]
        stub.fail(500, times=2)               # the next two calls answer 500
        stub.fail(429, times=1, retry_after=3)

sendMessage answers {"ok": true, "result": <Message>} with a new message_id (one sequence per
stub, from 100000, like a chat's ids); getMe answers the bot. A wrong token answers 401 and an
unknown method 404, as the real API does; every answer is recorded either way.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Call:
    token: str
    method: str
    params: dict
    status: int = 200  # what the stub answered


@dataclass
class _Failure:
    status: int
    times: int
    retry_after: int = 0


@dataclass
class BotApiStub:
    token: str = "123456:TEST-token"
    host: str = "127.0.0.1"
    received: list[Call] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._failures: list[_Failure] = []
        self._next_id = 100000
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    params = json.loads(raw or b"{}")
                except ValueError:
                    params = {"_raw": raw.decode("utf-8", "replace")}
                status, body = stub._answer(self.path, params)
                data = json.dumps(body, ensure_ascii=False).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST  # noqa: N815 - getMe by GET works on the real API too

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="bot-api-stub", daemon=True)

    # -- control -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> BotApiStub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> BotApiStub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fail(self, status: int, times: int = 1, retry_after: int = 0) -> None:
        """The next `times` calls answer `status` (429 with parameters.retry_after if given)."""
        with self._lock:
            self._failures.append(_Failure(status, times, retry_after))

    def recover(self) -> None:
        """Forget the failures still pending."""
        with self._lock:
            self._failures.clear()

    def calls(self, method: str = "sendMessage", ok_only: bool = True) -> list[dict]:
        """The params of the calls of `method` received (those answered ok, unless told)."""
        with self._lock:
            return [c.params for c in self.received if c.method == method and (c.status == 200 or not ok_only)]

    def wait_for(self, predicate, timeout: float = 5.0) -> list[dict]:
        """Wait until predicate(calls) holds; the calls then."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.calls()
            if predicate(got) or time.monotonic() > deadline:
                return got
            time.sleep(0.02)

    # -- the API -------------------------------------------------------------------------------
    def _answer(self, path: str, params: dict) -> tuple[int, dict]:
        parts = path.split("?", 1)[0].strip("/").split("/")
        token = parts[0][3:] if parts and parts[0].startswith("bot") else ""
        method = parts[1] if len(parts) > 1 else ""
        with self._lock:
            call = Call(token, method, params)
            self.received.append(call)
            if token != self.token:
                call.status = 401
                return 401, {"ok": False, "error_code": 401, "description": "Unauthorized"}
            if self._failures:
                f = self._failures[0]
                f.times -= 1
                if f.times <= 0:
                    self._failures.pop(0)
                call.status = f.status
                body = {"ok": False, "error_code": f.status, "description": _DESCRIPTIONS.get(f.status, "Error")}
                if f.status == 429:
                    body["description"] = f"Too Many Requests: retry after {f.retry_after}"
                    body["parameters"] = {"retry_after": f.retry_after}
                return f.status, body
            if method == "getMe":
                return 200, {"ok": True, "result": {"id": 123456, "is_bot": True, "first_name": "Support"}}
            if method != "sendMessage":
                call.status = 404
                return 404, {"ok": False, "error_code": 404, "description": "Not Found"}
            if "chat_id" not in params or not str(params.get("text") or "").strip():
                call.status = 400
                return 400, {"ok": False, "error_code": 400, "description": "Bad Request: message text is empty"}
            if len(str(params["text"])) > 4096:
                call.status = 400
                return 400, {"ok": False, "error_code": 400, "description": "Bad Request: message is too long"}
            self._next_id += 1
            chat_id = params["chat_id"]
            message = {
                "message_id": self._next_id,
                "from": {"id": 123456, "is_bot": True, "first_name": "Support"},
                "chat": {"id": int(chat_id) if str(chat_id).lstrip("-").isdigit() else chat_id, "type": "private"},
                "date": int(time.time()),
                "text": params["text"],
            }
            return 200, {"ok": True, "result": message}


_DESCRIPTIONS = {
    400: "Bad Request",
    403: "Forbidden: bot was blocked by the user",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
}
