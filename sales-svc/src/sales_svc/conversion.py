"""ConvertLead: a lead becomes a customer in customer-svc and an opportunity here, exactly once.

The steps, each durable before the next:

1. (local transaction) lock the lead, refuse what cannot convert, and record the attempt in
   `lead_conversions` (who, when, how many attempts, the last error);
2. (customer-svc) create the customer with request id `lead-conversion-<lead id>`, which
   customer-svc keeps unique: an attempt that created the customer but never heard back (a
   timeout, a crash of this process) gets the same customer on the next attempt. Linking an
   existing customer instead (the one given, else the one the lead already names: a campaign
   response from a known customer) only checks it exists;
3. (local transaction) lock the lead again; unless a concurrent attempt finished first, open the
   opportunity, mark the lead converted and close the conversion record, together with their
   events and audit entries.

So no attempt ever makes a second customer, and a lead is marked converted only with its
customer. customer-svc unavailable at step 2 answers UNAVAILABLE with nothing changed but the
attempt's record (the lead is as it was); calling again converts it.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from crm.customer.v1 import customer_pb2
from crm.sales.v1 import conversion_pb2, conversion_pb2_grpc
from crm_chassis import dates, money
from crm_chassis.auth import Principal
from crm_chassis.errors import DomainError, FailedPrecondition, InvalidArgument
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.resources import ResourceName

from .customer_client import CustomerClient, authorization_of, customer_client
from .opportunities_core import MAX_AMOUNT, TEXT_LIMITS
from .runtime import Sales
from .tables import UUID, metadata

LEAD = ResourceName("leads/{lead_id}")
CUSTOMER = ResourceName("customers/{customer_id}")
PIPELINE = ResourceName("pipelines/{pipeline_id}")
CONVERTIBLE = ("new", "contacted", "qualified")

lead_conversions = sa.Table(
    "lead_conversions",
    metadata,
    sa.Column("lead_id", UUID, sa.ForeignKey("leads.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("state", sa.Text, nullable=False, server_default="pending"),  # pending | done
    sa.Column("customer_id", sa.Text, nullable=False, server_default=""),
    sa.Column("customer_created", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("opportunity_id", UUID),
    sa.Column("requested_by", sa.Text, nullable=False, server_default=""),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text, nullable=False, server_default=""),
    sa.Column("start_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("done_time", sa.DateTime(timezone=True)),
)


def customer_request_id(lead_id: str) -> str:
    """The request id every attempt to convert this lead creates its customer with."""
    return f"lead-conversion-{lead_id}"


def customer_from_lead(lead) -> customer_pb2.Customer:
    """The customer a lead becomes: a person if it names one, else an organisation."""
    person = bool(lead.given_name or lead.family_name)
    c = customer_pb2.Customer(
        type=customer_pb2.CUSTOMER_TYPE_PERSON if person else customer_pb2.CUSTOMER_TYPE_ORGANIZATION,
        given_name=lead.given_name,
        family_name=lead.family_name,
        organization_name=lead.organization_name,
        email=lead.email,
        phone=lead.phone,
        mobile=lead.mobile,
        national_id=lead.national_id if person else "",
        website=lead.website,
        industry=lead.industry,
        province=lead.province,
        city=lead.city,
        address=lead.address,
        acquisition_source=lead.source,
        owner=lead.owner_id,
        tags=list(lead.tags or ()),
    )
    return c


def _response(lead_id: str, conv) -> conversion_pb2.ConvertLeadResponse:
    out = conversion_pb2.ConvertLeadResponse(
        lead=LEAD.format(lead_id),
        customer=CUSTOMER.format(conv.customer_id),
        opportunity=f"opportunities/{conv.opportunity_id}",
        customer_created=conv.customer_created,
    )
    if conv.done_time is not None:
        out.convert_time.FromDatetime(conv.done_time)
    return out


class Converter:
    def __init__(self, sales: Sales):
        self.sales = sales

    @property
    def customers(self) -> CustomerClient:
        return customer_client(self.sales)

    def _locked_lead(self, conn: sa.Connection, lead_id: str, principal: Principal, name: str):
        from .leads import visible_lead

        row = visible_lead(conn, lead_id, principal, lock=True)
        if row.delete_time is not None:
            raise LEAD.not_found(name)
        return row

    def _done(self, conn: sa.Connection, lead_id: str):
        return conn.execute(
            sa.select(lead_conversions).where(lead_conversions.c.lead_id == lead_id, lead_conversions.c.state == "done")
        ).one_or_none()

    def convert(
        self, req: conversion_pb2.ConvertLeadRequest, principal: Principal, authorization: str
    ) -> conversion_pb2.ConvertLeadResponse:
        (lead_id,) = LEAD.parse(req.name)
        link = CUSTOMER.parse(req.customer, "customer")[0] if req.customer else None
        pipeline_id = PIPELINE.parse(req.pipeline, "pipeline")[0] if req.pipeline else None
        amount = money.to_decimal(req.amount, "amount") if req.HasField("amount") else None
        close = dates.from_proto(req.expected_close_date, "expected_close_date")
        name = req.opportunity_name.strip()
        if "\x00" in name:
            raise InvalidArgument.field("opportunity_name", "must not contain NUL characters (U+0000)")
        if len(name) > TEXT_LIMITS["display_name"]:  # 1000 characters were stored
            raise InvalidArgument.field("opportunity_name", f"must be at most {TEXT_LIMITS['display_name']} characters")
        if amount is not None and amount < 0:
            raise InvalidArgument.field("amount", "must not be negative")
        if amount is not None and amount > MAX_AMOUNT:
            raise InvalidArgument.field("amount", f"must be at most {MAX_AMOUNT:f}")

        # 1. the attempt, recorded
        with self.sales.uow.begin() as tx:
            lead = self._locked_lead(tx.conn, lead_id, principal, req.name)
            done = self._done(tx.conn, lead_id)
            if done is not None:
                return _response(lead_id, done)  # converted before: the same answer
            if lead.status not in CONVERTIBLE:
                raise FailedPrecondition(
                    f"lead {req.name} is {lead.status}; only a new, contacted or qualified lead converts"
                    + (" (reopen it first)" if lead.status == "disqualified" else ""),
                    reason="LEAD_NOT_CONVERTIBLE",
                    metadata={"status": lead.status},
                )
            if link is None and lead.customer_id:  # a lead of a known customer (a campaign response): theirs
                link = lead.customer_id
            stmt = pg.insert(lead_conversions).values(lead_id=lead_id, requested_by=principal.subject, attempts=1)
            tx.execute(
                stmt.on_conflict_do_update(
                    index_elements=["lead_id"],
                    set_={"attempts": lead_conversions.c.attempts + 1, "requested_by": principal.subject},
                )
            )

        # 2. the customer, in customer-svc (idempotent by the request id)
        try:
            if link:
                customer = self.customers.get_customer(CUSTOMER.format(link), authorization)
                created = False
            else:
                customer = self.customers.create_customer(
                    customer_from_lead(lead), customer_request_id(lead_id), authorization
                )
                created = True
        except DomainError as err:
            with self.sales.uow.begin() as tx:
                tx.execute(
                    lead_conversions.update()
                    .where(lead_conversions.c.lead_id == lead_id)
                    .values(last_error=f"{err.code.name}: {err.message}"[:500])
                )
            raise
        customer_id = CUSTOMER.parse(customer.name, "customer")[0]

        # 3. the opportunity and the converted lead, together
        from .leads import mark_converted
        from .opportunities import open_opportunity

        with self.sales.uow.begin() as tx:
            lead = self._locked_lead(tx.conn, lead_id, principal, req.name)
            done = self._done(tx.conn, lead_id)
            if done is not None:  # a concurrent attempt finished first (with the same customer)
                return _response(lead_id, done)
            if lead.status not in CONVERTIBLE:
                raise FailedPrecondition(
                    f"lead {req.name} became {lead.status} during the conversion", reason="LEAD_NOT_CONVERTIBLE"
                )
            opp = open_opportunity(
                tx,
                principal,
                name=name or lead.organization_name or f"{lead.given_name} {lead.family_name}".strip(),
                customer_id=customer_id,
                owner_id=lead.owner_id or principal.subject,
                team_id=lead.team_id,
                lead_id=lead_id,
                product_line_id=lead.product_line_id,
                pipeline_id=pipeline_id,
                source=lead.source,
                campaign_id=lead.campaign_id,
                currency_code=req.amount.currency_code if amount is not None else "IRR",
                amount=amount,
                expected_close_date=close,
                request_id=f"convert:{lead_id}",
            )
            opportunity_id = opp.name.removeprefix("opportunities/")
            mark_converted(tx, lead_id, customer_id, opportunity_id, principal)
            conv = tx.execute(
                lead_conversions.update()
                .where(lead_conversions.c.lead_id == lead_id)
                .values(
                    state="done",
                    customer_id=customer_id,
                    customer_created=created,
                    opportunity_id=opportunity_id,
                    last_error="",
                    done_time=sa.func.now(),
                )
                .returning(lead_conversions)
            ).one()
        return _response(lead_id, conv)


class LeadConversionServicer(conversion_pb2_grpc.LeadConversionServiceServicer):
    def __init__(self, sales: Sales):
        self.converter = Converter(sales)

    def ConvertLead(self, request, context):  # noqa: N802
        return self.converter.convert(request, current_principal(), authorization_of(context))


def registration(sales: Sales) -> Registration:
    return Registration.of(LeadConversionServicer(sales))
