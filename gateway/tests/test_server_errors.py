"""Errors as a new user meets them, through the real server: gunicorn (gateway/gunicorn.conf.py,
its problem+json worker) on a free loopback port in front of the in-process services. A request
line gunicorn refuses (raw UTF-8 in the URL, too long) or headers too large get a problem
document like every app error, and the OpenAPI document lists each status."""

from __future__ import annotations

import json
import pathlib
import socket
import urllib.parse

import pytest

from tests.support.harness import start_gateway, stop_process

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; (status, headers, body) of the one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split(" ")[1]), headers, body


def get(port: int, target: str, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{extra}\r\n".encode()


@pytest.fixture(scope="module")
def gunicorn(suite):
    proc, port = start_gateway(
        f"127.0.0.1:{suite.customer.port}",
        f"127.0.0.1:{suite.reporting.port}",
        GATEWAY_WORKERS="1",
        GATEWAY_THREADS="2",
        OTEL_EXPORTER_OTLP_ENDPOINT="",
    )
    try:
        yield port
    finally:
        stop_process(proc)


def problem(status: int, headers: dict, body: bytes, want: int) -> dict:
    assert status == want, body
    assert headers["content-type"] == "application/problem+json"
    doc = json.loads(body.decode("utf-8"))
    assert doc["status"] == want and doc["title"] and doc["detail"]
    assert doc["request_id"] == headers["x-request-id"]
    assert b"<html" not in body and b"Traceback" not in body
    return doc


def test_the_readme_search_with_raw_utf8_is_a_problem_not_an_html_page(gunicorn):
    # What `curl 'http://127.0.0.1:8080/v1/customers:search?query=رضایی'` sends: raw UTF-8.
    raw = "GET /v1/customers:search?query=رضایی HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    doc = problem(*exchange(gunicorn, raw), 400)
    assert doc["reason"] == "INVALID_REQUEST_LINE" and "percent-encode" in doc["detail"]
    doc = problem(*exchange(gunicorn, b"HELLO\r\n\r\n"), 400)


def test_the_readme_search_percent_encoded_finds_the_customer(gunicorn, suite):
    h = suite.headers()
    suite.http.post(
        "/v1/customers", json={"type": "CUSTOMER_TYPE_PERSON", "givenName": "علی", "familyName": "رضایی"}, headers=h
    )
    # curl -G --data-urlencode 'query=رضایی'
    target = "/v1/customers:search?" + urllib.parse.urlencode({"query": "رضایی"})
    status, headers, body = exchange(gunicorn, get(gunicorn, target, f"Authorization: {h['Authorization']}"))
    assert status == 200, body
    assert any(r["customer"]["familyName"] == "رضایی" for r in json.loads(body)["results"])


def test_too_long_a_request_line_is_414(gunicorn):
    doc = problem(*exchange(gunicorn, get(gunicorn, "/v1/customers?filter=" + "a" * 5000)), 414)
    assert doc["title"] == "URI Too Long" and "4094 bytes" in doc["detail"]


def test_headers_too_large_or_too_many_are_431(gunicorn):
    big = problem(*exchange(gunicorn, get(gunicorn, "/healthz", "X-Big: " + "a" * 9000)), 431)
    many = problem(*exchange(gunicorn, get(gunicorn, "/healthz", *(f"X-H{i}: v" for i in range(150)))), 431)
    assert big["title"] == many["title"] == "Request Header Fields Too Large"
    assert big["reason"] == many["reason"] == "HEADERS_TOO_LARGE"


def test_a_body_over_the_limit_is_413_before_it_is_read(gunicorn, suite):
    raw = (
        "POST /v1/customers HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: {suite.headers()['Authorization']}\r\nContent-Length: {100 * 1024 * 1024}\r\n\r\n{{"
    ).encode()
    problem(*exchange(gunicorn, raw), 413)


def test_the_openapi_document_lists_the_server_errors(gunicorn):
    status, _, body = exchange(gunicorn, get(gunicorn, "/openapi.json"))
    assert status == 200
    doc = json.loads(body)
    listed = doc["components"]["responses"]
    for code in ("400", "413", "414", "431"):
        assert listed[f"Problem{code}"]["content"] == {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        }
    assert "--data-urlencode" in listed["Problem400"]["description"]


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response off a connection kept open (b"" headers if the server closed it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return 0, {}, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split(" ")[1]), headers, body


def closed(s: socket.socket) -> bool:
    """Whether the server closed the connection (after its answer)."""
    s.settimeout(10)
    try:
        while chunk := s.recv(65536):
            if b"HTTP/1.1" in chunk:
                return False
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def post(target: str, body: bytes, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def test_a_413_on_a_public_route_closes_the_connection_it_says_it_closes(gunicorn):
    # what ka413.py of the fuzz run sent: 400 KB to a 16 KiB public route, then a second request
    big = json.dumps({"key": "س" * 200000}).encode()
    with socket.create_connection(("127.0.0.1", gunicorn), timeout=30) as s:
        s.sendall(post("/v1/deliveryReceipts:post", big))
        status, headers, body = read_response(s)
        problem(status, headers, body, 413)
        assert headers["connection"] == "close"  # not keep-alive over a socket about to close
        assert closed(s)


def test_a_small_unread_body_keeps_the_connection(gunicorn):
    # a 401 answered before the body is read: gunicorn drains a small body and keeps the socket
    small = b'{"givenName": "a"}'
    with socket.create_connection(("127.0.0.1", gunicorn), timeout=30) as s:
        for _ in range(2):
            s.sendall(post("/v1/customers", small))
            status, headers, body = read_response(s)
            problem(status, headers, body, 401)
            assert headers["connection"] == "keep-alive"


def test_a_large_unread_body_closes_the_connection(gunicorn):
    big = b'{"givenName": "' + b"a" * 300_000 + b'"}'
    with socket.create_connection(("127.0.0.1", gunicorn), timeout=30) as s:
        s.sendall(post("/v1/customers", big))  # no token: 401 before the body is read
        status, headers, body = read_response(s)
        problem(status, headers, body, 401)
        assert headers["connection"] == "close" and closed(s)


def test_a_body_over_the_limit_is_413_without_sending_it(gunicorn, suite):
    # 20 MiB announced, none sent: the answer comes at once (the limit of a route without files)
    raw = post("/v1/customers", b"", f"Authorization: {suite.headers()['Authorization']}")
    raw = raw.replace(b"Content-Length: 0", f"Content-Length: {20 * 1024 * 1024}".encode())
    with socket.create_connection(("127.0.0.1", gunicorn), timeout=10) as s:
        s.sendall(raw)
        status, headers, body = read_response(s)
        doc = problem(status, headers, body, 413)
        assert "10 MiB" in doc["detail"] and headers["connection"] == "close"


def chunked(target: str, chunks: bytes, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Transfer-Encoding: chunked\r\n{extra}\r\n"
    ).encode() + chunks


def test_an_invalid_chunk_size_is_a_400(gunicorn, suite):
    auth = f"Authorization: {suite.headers()['Authorization']}"
    for target, extra in (("/v1/customers", (auth,)), ("/v1/webform:submit", ())):
        with socket.create_connection(("127.0.0.1", gunicorn), timeout=30) as s:
            s.sendall(chunked(target, b"ZZ\r\n{}\r\n0\r\n\r\n", *extra))
            status, headers, body = read_response(s)
            doc = problem(status, headers, body, 400)
            assert doc["reason"] == "INVALID_BODY" and headers["connection"] == "close"


def test_a_chunked_body_over_the_limit_is_413(gunicorn, suite):
    auth = f"Authorization: {suite.headers()['Authorization']}"
    piece = b"a" * (1024 * 1024)
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(11)) + b"0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gunicorn), timeout=30) as s:
        s.sendall(chunked("/v1/customers", body, auth))
        status, headers, body = read_response(s)
        problem(status, headers, body, 413)
        assert headers["connection"] == "close"


def test_json_nested_too_deeply_is_a_400_in_a_worker_thread(gunicorn):
    # the fuzz's body, in gunicorn's gthread worker (its threads' stacks, not the test's)
    deep = b"[" * 10_000 + b"]" * 10_000  # under the route's 32 KiB
    with socket.create_connection(("127.0.0.1", gunicorn), timeout=30) as s:
        s.sendall(post("/v1/webform:submit", deep, "Connection: close"))
        doc = problem(*read_response(s), 400)
        assert "nested too deeply" in doc["detail"]
