"""A RabbitMQ publisher that sends a whole batch and then waits for the batch's publisher
confirms (pipelined), instead of waiting for each message: on these machines that is the
difference between ~1.5k and ~14k persistent messages per second (PERFORMANCE.md).

pika's BlockingChannel can only wait per message in confirm mode, so this uses the channel
implementation under the BlockingConnection (pika 1.4, pinned) for the publish and the
ack/nack callback, and the BlockingConnection to pump I/O.
"""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

import pika
from pika.exceptions import AMQPError

HEARTBEAT_SECONDS = 30


def url_parameters(amqp_url: str) -> pika.URLParameters:
    """The URL's connection parameters: one connection attempt (the callers retry with back-off)
    and a 30 s heartbeat unless the URL asks for another (`?heartbeat=2`)."""
    params = pika.URLParameters(amqp_url)
    params.connection_attempts = 1
    if "heartbeat" not in parse_qs(urlsplit(amqp_url).query):
        params.heartbeat = HEARTBEAT_SECONDS
    return params


class PublishError(Exception):
    """The batch was not confirmed (broker down, nack, timeout): nothing may be marked sent."""


class ConfirmingPublisher:
    def __init__(self, amqp_url: str, declare=None, confirm_timeout: float = 30.0):
        self.params = url_parameters(amqp_url)
        self.params.socket_timeout = 5
        self.params.blocked_connection_timeout = 30
        self.declare = declare
        self.confirm_timeout = confirm_timeout
        self._conn: pika.BlockingConnection | None = None
        self._impl = None
        self._pending: set[int] = set()
        self._nacked: set[int] = set()
        self._next_tag = 1
        # Delivery tags count per connection: a batch sent on a connection that was since
        # replaced can never be confirmed (its tags would match the new connection's).
        self._generation = 0

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.is_open

    def connect(self) -> None:
        if self.connected:
            return
        try:
            conn = pika.BlockingConnection(self.params)
            channel = conn.channel()
            if self.declare:
                self.declare(channel)
            impl = channel._impl  # noqa: SLF001 - see module docstring
            selected = []
            impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda _f: selected.append(True))
            deadline = time.monotonic() + self.confirm_timeout
            while not selected:
                if time.monotonic() > deadline:
                    raise PublishError("broker did not enable publisher confirms")
                conn.process_data_events(time_limit=0.05)
        except (AMQPError, OSError) as exc:
            raise PublishError(f"cannot connect to broker: {exc!r}") from exc
        self._conn, self._channel, self._impl = conn, channel, impl
        self._next_tag = 1
        self._pending.clear()
        self._nacked.clear()
        self._generation += 1

    def _on_confirm(self, frame) -> None:
        method = frame.method
        if method.multiple:
            done = {t for t in self._pending if t <= method.delivery_tag}
        else:
            done = {method.delivery_tag}
        self._pending -= done
        if isinstance(method, pika.spec.Basic.Nack):
            self._nacked |= done

    def publish(self, messages) -> tuple[int, int]:
        """Send messages (exchange, routing_key, body, BasicProperties) without waiting for their
        confirms; returns a receipt (the connection and the last delivery tag) for `wait_confirmed`."""
        self.connect()
        try:
            for exchange, routing_key, body, props in messages:
                self._impl.basic_publish(exchange, routing_key, body, props)
                self._pending.add(self._next_tag)
                self._next_tag += 1
            # Send now, so the broker persists and confirms them while the caller does other work.
            self._conn.process_data_events(time_limit=0)
        except (AMQPError, OSError) as exc:
            self.close()
            raise PublishError(f"publish failed: {exc!r}") from exc
        return self._generation, self._next_tag - 1

    def wait_confirmed(self, receipt: tuple[int, int]) -> None:
        """Return when every message up to the receipt's is confirmed; PublishError if the broker
        refused one of them, the connection broke or was replaced since, or confirms took too long."""
        generation, upto = receipt
        if generation != self._generation or not self.connected:
            raise PublishError("the connection these messages went out on is gone; they are unconfirmed")
        deadline = time.monotonic() + self.confirm_timeout
        try:
            while self._pending and min(self._pending) <= upto:
                if time.monotonic() > deadline:
                    raise PublishError(f"{len(self._pending)} confirms missing after {self.confirm_timeout}s")
                self._conn.process_data_events(time_limit=0.05)
        except (AMQPError, OSError) as exc:
            self.close()
            raise PublishError(f"publish failed: {exc!r}") from exc
        except PublishError:
            self.close()
            raise
        refused = {t for t in self._nacked if t <= upto}
        if refused:
            self._nacked -= refused
            self.close()
            raise PublishError(f"broker refused {len(refused)} messages")

    def publish_batch(self, messages) -> None:
        """Send a batch and return when every message of it is confirmed; PublishError otherwise."""
        self.wait_confirmed(self.publish(messages))

    def keepalive(self) -> None:
        """Service the connection's heartbeats while no batch is being published: pika's
        BlockingConnection only does I/O when called, and the broker closes a connection that
        stays silent for two heartbeat intervals. Call it from the publishing thread."""
        if not self.connected:
            return
        try:
            self._conn.process_data_events(time_limit=0)
        except (AMQPError, OSError) as exc:
            self.close()
            raise PublishError(f"broker connection lost: {exc!r}") from exc

    def close(self) -> None:
        conn, self._conn, self._impl = self._conn, None, None
        self._pending.clear()
        if conn is not None:
            try:
                if conn.is_open:
                    conn.close()
            except Exception:
                pass
