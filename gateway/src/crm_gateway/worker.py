"""gunicorn workers whose own error answers are application/problem+json, like the app's.

gunicorn answers some requests before the app sees them: a request line that is not HTTP (a
URL with raw non-ASCII characters, as `curl 'http://…?query=رضایی'` sends it) is a 400, a
request line over `limit_request_line` a 414, headers over `limit_request_field_size` /
`limit_request_fields` a 431; it writes those as an HTML page. These workers keep gunicorn's
decision (status, reason phrase, its log line) and replace the page: `Worker.handle_error` is
handed a stand-in for the client socket that keeps what gunicorn would have written, and the
worker sends a problem document with the same status instead.

    worker_class = "crm_gateway.worker.ProblemThreadWorker"   # gunicorn.conf.py

They also close a connection whose request body the app did not read to its end (a 413, 401 or
429 answered before the body, a body cut at its limit, a chunk gunicorn could not parse):
gunicorn would announce keep-alive, then drain at most 64 KiB of what is left and close the
socket under a client that reuses it. The app's WSGI call sees the body through a reader that
counts, and at start_response a body with more than that left makes gunicorn's response
force_close(): it says "Connection: close" and means it.

Standard library and gunicorn only: gunicorn's master imports this module before it forks.
"""

from __future__ import annotations

import json
import logging
import uuid

from gunicorn import util
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import ThreadWorker
from gunicorn.workers.sync import SyncWorker

from .problem_doc import MEDIA_TYPE, problem_document

log = logging.getLogger("crm.gateway")

_DETAIL_CHARS = 200  # of the client's own input echoed back
# gunicorn's request limits (its defaults), set by gunicorn.conf.py and documented in openapi.py.
LIMIT_REQUEST_LINE = 4094
LIMIT_REQUEST_FIELDS = 100
LIMIT_REQUEST_FIELD_SIZE = 8190


class _KeptWrites:
    """Stands in for the client socket while gunicorn writes its HTML error page."""

    def __init__(self):
        self.data = b""

    def gettimeout(self) -> float:
        return 0.0  # gunicorn's write_nonblock then writes without touching blocking mode

    def setblocking(self, _flag) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.data += data


def _status(written: bytes) -> tuple[int, str]:
    """(414, "URI Too Long") from the status line gunicorn wrote; (500, ...) if none."""
    try:
        _version, code, reason = written.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        return int(code), reason
    except ValueError:
        return 500, "Internal Server Error"


def _detail(status: int, exc: BaseException, cfg) -> tuple[str, str | None]:
    said = str(exc)
    if len(said) > _DETAIL_CHARS:
        said = said[:_DETAIL_CHARS] + "…"
    if isinstance(exc, http_errors.InvalidRequestLine):
        return (
            "the request line is not valid HTTP/1.1: a URL must be ASCII, so percent-encode other "
            "characters (curl -G --data-urlencode 'query=…')",
            "INVALID_REQUEST_LINE",
        )
    if status == 414:
        return f"the request line is longer than {cfg.limit_request_line} bytes", "REQUEST_LINE_TOO_LONG"
    if status == 431:
        return (
            f"the request headers are too large: at most {cfg.limit_request_fields} headers of "
            f"{cfg.limit_request_field_size} bytes each ({said})",
            "HEADERS_TOO_LARGE",
        )
    if status >= 500:
        return "internal error", None
    return f"bad request: {said}", None


# What of an unread body gunicorn drains itself before it reuses the connection (its parser's
# _DRAIN_MAX_BYTES); more left unread, and it closes the connection.
DRAIN_BYTES = 64 * 1024


class _CountingInput:
    """The request body as the app reads it: how much, whether to its end, whether a read failed."""

    def __init__(self, stream):
        self._stream = stream
        self.read_bytes = 0
        self.ended = False
        self.failed = False

    def _took(self, data: bytes, asked: int | None) -> bytes:
        self.read_bytes += len(data)
        if not data and asked != 0:
            self.ended = True
        return data

    def read(self, size=None):
        try:
            return self._took(self._stream.read(size), size)
        except Exception:
            self.failed = True
            raise

    def readline(self, size=None):
        try:
            return self._took(self._stream.readline(size), size)
        except Exception:
            self.failed = True
            raise

    def readlines(self, hint=None):
        return list(iter(self.readline, b""))

    def __iter__(self):
        return iter(self.readline, b"")

    def left_unread(self, env) -> bool:
        """Whether DRAIN_BYTES or more of the body may still be on the socket (or where the
        next request starts is unknown)."""
        if self.failed:
            return True
        if self.ended:
            return False
        try:
            length = int(env.get("CONTENT_LENGTH") or "")
        except ValueError:
            length = None
        if length is None:
            # chunked (or read to the connection's end): unknown unless read to its end
            chunked = "chunked" in env.get("HTTP_TRANSFER_ENCODING", "").lower()
            return chunked
        return length - self.read_bytes >= DRAIN_BYTES  # gunicorn gives up once it drained that much


def closing_unread(app):
    """The WSGI app, closing the connection (gunicorn's Response.force_close) when it answers
    with a body left unread."""

    def wsgi(env, start_response):
        body = env["wsgi.input"] = _CountingInput(env["wsgi.input"])

        def start(status, headers, exc_info=None):
            resp = getattr(start_response, "__self__", None)
            if body.left_unread(env) and hasattr(resp, "force_close"):
                resp.force_close()
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        return app(env, start)

    return wsgi


class ProblemErrors:
    """Mixin for a gunicorn worker class: its own error answers as problem+json, and a
    connection closed when the app leaves its request's body unread."""

    def load_wsgi(self):
        super().load_wsgi()
        self.wsgi = closing_unread(self.wsgi)

    def handle_error(self, req, client, addr, exc):
        kept = _KeptWrites()
        super().handle_error(req, kept, addr, exc)  # gunicorn chooses the status and logs
        status, reason = _status(kept.data)
        detail, why = _detail(status, exc, self.cfg)
        request_id = uuid.uuid4().hex
        body = json.dumps(
            problem_document(status, detail, reason=why, request_id=request_id), ensure_ascii=False
        ).encode("utf-8")
        head = (
            f"HTTP/1.1 {status} {reason}\r\n"
            "Connection: close\r\n"
            f"Content-Type: {MEDIA_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"X-Request-Id: {request_id}\r\n"
            "\r\n"
        ).encode("latin-1")
        try:
            util.write_nonblock(client, head + body)
        except Exception:
            log.debug("could not send the error answer", exc_info=True)


class ProblemThreadWorker(ProblemErrors, ThreadWorker):
    """gunicorn's gthread worker (gunicorn.conf.py's), with problem+json error answers."""


class ProblemSyncWorker(ProblemErrors, SyncWorker):
    """gunicorn's sync worker, with problem+json error answers."""
