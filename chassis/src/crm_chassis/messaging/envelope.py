"""The event envelope: a protobuf body plus CloudEvents attributes in AMQP headers
(binary content mode of the CloudEvents AMQP binding, `cloudEvents_` prefix)."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field

import pika

CONTENT_TYPE = "application/protobuf"
SPEC_VERSION = "1.0"


@dataclass
class Event:
    id: str
    type: str  # crm.<domain>.<routing key>, e.g. crm.customer.customer.created.v1
    source: str  # /customer-svc
    subject: str  # customers/123
    time: dt.datetime
    exchange: str
    routing_key: str  # customer.created.v1
    data: bytes
    dataschema: str  # protobuf full name of the body, e.g. crm.customer.v1.CustomerCreated
    trace_headers: dict = field(default_factory=dict)  # traceparent / tracestate

    def parse(self, message_cls):
        msg = message_cls()
        msg.ParseFromString(self.data)
        return msg

    def amqp_properties(self, trace_headers: dict | None = None) -> pika.BasicProperties:
        headers = {
            "cloudEvents_specversion": SPEC_VERSION,
            "cloudEvents_id": self.id,
            "cloudEvents_type": self.type,
            "cloudEvents_source": self.source,
            "cloudEvents_subject": self.subject,
            "cloudEvents_time": self.time.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
            "cloudEvents_dataschema": self.dataschema,
        }
        headers.update(trace_headers if trace_headers is not None else self.trace_headers)
        return pika.BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=self.id,
            type=self.type,
            timestamp=int(self.time.timestamp()),
            headers=headers,
        )


def new_event(*, domain: str, source_service: str, routing_key: str, subject: str, message) -> Event:
    from .topology import exchange_for

    return Event(
        id=str(uuid.uuid4()),
        type=f"crm.{domain}.{routing_key}",
        source=f"/{source_service}",
        subject=subject,
        time=dt.datetime.now(dt.UTC),
        exchange=exchange_for(domain),
        routing_key=routing_key,
        data=message.SerializeToString(),
        dataschema=message.DESCRIPTOR.full_name,
    )


class MalformedEvent(ValueError):
    """A message that can never be processed (missing attributes): dead-lettered at once."""


def from_amqp(method, properties: pika.BasicProperties, body: bytes) -> Event:
    headers = properties.headers or {}

    def h(name: str) -> str:
        value = headers.get(f"cloudEvents_{name}")
        if isinstance(value, bytes):
            value = value.decode()
        if not value:
            raise MalformedEvent(f"missing header cloudEvents_{name}")
        return str(value)

    try:
        when = dt.datetime.fromisoformat(h("time").replace("Z", "+00:00"))
    except ValueError as exc:
        raise MalformedEvent(f"bad cloudEvents_time: {exc}") from None
    return Event(
        id=h("id"),
        type=h("type"),
        source=h("source"),
        subject=str(headers.get("cloudEvents_subject") or ""),
        time=when,
        exchange=method.exchange,
        routing_key=method.routing_key,
        data=body,
        dataschema=str(headers.get("cloudEvents_dataschema") or ""),
        trace_headers={k: v for k, v in headers.items() if k in ("traceparent", "tracestate")},
    )
