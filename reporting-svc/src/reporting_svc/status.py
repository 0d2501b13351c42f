"""GetProjectionStatus: per producer, the newest event applied and how far behind that is (in
seconds, now minus the newest applied event's own time while the queue holds events, else 0; in events, from the depth of this service's queue of the
producer, read with a passive declare), and the rebuild in progress."""

from __future__ import annotations

import datetime as dt

import pika
import sqlalchemy as sa

from crm.reporting.v1 import reporting_service_pb2 as pb
from crm_chassis.messaging.publisher import url_parameters
from crm_chassis.messaging.topology import queue_name

from .tables import projection_sources


def queue_depths(amqp_url: str, service: str, domains: list[str]) -> dict[str, int]:
    found = dict.fromkeys(domains, -1)
    try:
        conn = pika.BlockingConnection(url_parameters(amqp_url))
    except Exception:
        return found
    try:
        for d in domains:
            try:
                ch = conn.channel()
                found[d] = int(ch.queue_declare(queue_name(service, d), passive=True).method.message_count)
                ch.close()
            except pika.exceptions.ChannelClosed:  # not declared yet
                pass
    finally:
        if conn.is_open:
            conn.close()
    return found


def producers(conn: sa.Connection, domains: list[str], depths: dict[str, int], now: dt.datetime) -> list:
    rows = {r.domain: r for r in conn.execute(sa.select(projection_sources))}
    out = []
    for d in sorted(set(domains) | set(rows)):
        lag = pb.ProducerLag(domain=d, events_behind=depths.get(d, -1))
        r = rows.get(d)
        if r is not None:
            lag.last_event_time.FromDatetime(r.last_event_time)
            lag.last_applied_time.FromDatetime(r.last_applied_at)
            lag.applied_events = r.applied_events
            # caught up (an empty queue): nothing is behind, however old the last event is
            if lag.events_behind != 0:
                lag.seconds_behind = max(0.0, (now - r.last_event_time).total_seconds())
        out.append(lag)
    return out
