"""Baselines for the outbox relay: a plain pika publish loop (1) with many confirms in flight
(SelectConnection, a window of unconfirmed messages) and (2) waiting for each confirm."""

from __future__ import annotations

import time

import pika


def pipelined(url: str, exchange: str, routing_key: str, body: bytes, count: int, window: int = 1000) -> float:
    """Messages per second, persistent, every one confirmed."""
    state = {"sent": 0, "confirmed": 0, "t0": 0.0, "t1": 0.0}
    props = pika.BasicProperties(delivery_mode=2, content_type="application/protobuf")

    def pump(channel):
        while state["sent"] < count and state["sent"] - state["confirmed"] < window:
            channel.basic_publish(exchange, routing_key, body, props)
            state["sent"] += 1

    def on_confirm(frame):
        # RabbitMQ confirms in order on a channel: the highest tag seen is the count confirmed.
        state["confirmed"] = max(state["confirmed"], frame.method.delivery_tag)
        if state["confirmed"] >= count:
            state["t1"] = time.perf_counter()
            conn.close()
        else:
            pump(ch_holder[0])

    ch_holder = []

    def on_channel(channel):
        ch_holder.append(channel)
        channel.exchange_declare(
            exchange=exchange,
            exchange_type="topic",
            durable=True,
            callback=lambda _f: channel.confirm_delivery(on_confirm, callback=lambda _f: start(channel)),
        )

    def start(channel):
        state["t0"] = time.perf_counter()
        pump(channel)

    conn = pika.SelectConnection(
        pika.URLParameters(url),
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_close_callback=lambda c, reason: c.ioloop.stop(),
    )
    conn.ioloop.start()
    return count / (state["t1"] - state["t0"])


def one_by_one(url: str, exchange: str, routing_key: str, body: bytes, count: int) -> float:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.exchange_declare(exchange=exchange, exchange_type="topic", durable=True)
    ch.confirm_delivery()
    props = pika.BasicProperties(delivery_mode=2, content_type="application/protobuf")
    t0 = time.perf_counter()
    for _ in range(count):
        ch.basic_publish(exchange, routing_key, body, props)
    elapsed = time.perf_counter() - t0
    conn.close()
    return count / elapsed
