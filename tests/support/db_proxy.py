"""A database outage the tests can cause: the database URL through a TcpProxy that can be cut
(live connections reset, new ones refused) and restored, as when PostgreSQL restarts."""

from __future__ import annotations

from sqlalchemy.engine import make_url

from tests.support.tcp_proxy import TcpProxy


def proxied_database(url: str) -> tuple[TcpProxy, str]:
    """Start a proxy in front of the URL's server (TCP, or the Unix socket of the embedded one);
    return it and the same database's URL through it."""
    u = make_url(url)
    host = u.query.get("host") or u.host or "127.0.0.1"
    port = u.port or 5432
    upstream = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)
    proxy = TcpProxy(upstream).start()
    through = u.difference_update_query(["host"]).set(host="127.0.0.1", port=proxy.port)
    return proxy, through.render_as_string(hide_password=False)
