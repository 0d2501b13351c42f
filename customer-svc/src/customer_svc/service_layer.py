"""Use cases: each runs in one transaction; state and its events commit together."""

from __future__ import annotations

import datetime as dt
import logging

import sqlalchemy as sa

from crm.customer.v1 import customer_events_pb2
from crm_chassis.db import autocommit
from crm_chassis.errors import InvalidArgument, NotFound
from crm_chassis.messaging.envelope import new_event
from crm_chassis.messaging.outbox import OutboxRelay, enqueue
from crm_chassis.pagination import PageTokens, page_size

from . import adapters, domain
from .integration import customer_to_proto

log = logging.getLogger("customer_svc")


class CustomerUseCases:
    def __init__(self, engine: sa.Engine, relay: OutboxRelay | None, token_secret: str, service_name: str):
        self.engine = engine
        self.reader = autocommit(engine)
        self.relay = relay
        self.tokens = PageTokens(token_secret, "customers.list")
        self.service_name = service_name

    def create(self, new: domain.NewCustomer, request_id: str = "") -> sa.Row:
        domain.validate_new(new)
        if len(request_id) > 128:
            raise InvalidArgument.field("request_id", "must be at most 128 characters")
        values = {
            "type": new.type,
            "given_name": new.given_name,
            "family_name": new.family_name,
            "organization_name": new.organization_name,
            "display_name": new.display_name,
            "email": new.email,
            "phone": new.phone,
            "acquisition_source": new.acquisition_source,
            "request_id": request_id or None,
        }
        try:
            with self.engine.begin() as conn:
                if request_id:
                    existing = adapters.get_by_request_id(conn, request_id)
                    if existing is not None:
                        return existing
                row = adapters.insert_customer(conn, values)
                msg = customer_events_pb2.CustomerCreated(customer=customer_to_proto(row))
                enqueue(
                    conn,
                    new_event(
                        domain="customer",
                        source_service=self.service_name,
                        routing_key="customer.created.v1",
                        subject=msg.customer.name,
                        message=msg,
                    ),
                )
        except sa.exc.IntegrityError:
            # A concurrent retry with the same request_id won the race: return its result.
            if request_id:
                with self.engine.connect() as conn:
                    existing = adapters.get_by_request_id(conn, request_id)
                if existing is not None:
                    return existing
            raise
        if self.relay is not None:
            self.relay.wake()
        return row

    def get(self, customer_id: str) -> sa.Row:
        with self.reader.connect() as conn:
            row = adapters.get_customer(conn, customer_id)
        if row is None:
            raise NotFound(
                f"customer customers/{customer_id} does not exist",
                reason="CUSTOMER_NOT_FOUND",
                metadata={"name": f"customers/{customer_id}"},
            )
        return row

    def list(self, size: int, token: str) -> tuple[list[sa.Row], str]:
        limit = page_size(size)
        key = self.tokens.decode(token)
        after = None
        if key is not None:
            try:
                after = (dt.datetime.fromisoformat(key[0]), str(key[1]))
            except (ValueError, IndexError, TypeError):
                raise InvalidArgument.field("page_token", "is not a valid page token for this query") from None
        with self.reader.connect() as conn:
            rows = adapters.list_customers(conn, limit + 1, after)
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1]
            next_token = self.tokens.encode([last.create_time.isoformat(), str(last.id)])
        return rows, next_token
