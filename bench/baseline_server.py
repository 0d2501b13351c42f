"""A service with the benchmark's baselines on the same gRPC server:
`python -m bench.baseline_server` (the environment as for `python -m customer_svc serve`;
BENCH_SERVICE names another service's package, e.g. sales_svc).

BaselineService.MinimalWrite is one INSERT of a bare row and one outbox INSERT in one unit of
work (no validation, audit entry or search key); MinimalRead is a primary-key SELECT of it.
`make bench` prints CreateCustomer and GetCustomer as ratios of them, measured in one run.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pathlib
import sys
import uuid

import grpc_tools
import sqlalchemy as sa
from grpc_tools import protoc

from crm.customer.v1 import customer_events_pb2, customer_pb2
from crm_chassis.grpc_server import Registration
from crm_chassis.service import ServiceContext, main
from crm_chassis.uow import UnitOfWork

SPEC = importlib.import_module(f"{os.environ.get('BENCH_SERVICE', 'customer_svc')}.__main__").SPEC
ROOT = pathlib.Path(__file__).resolve().parent.parent
GEN = ROOT / ".run" / "bench-gen"
TABLE = sa.Table(
    "bench_minimal",
    sa.MetaData(),
    sa.Column("id", sa.Uuid(as_uuid=False), primary_key=True),
    sa.Column("given_name", sa.Text, nullable=False),
    sa.Column("family_name", sa.Text, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)


def stubs():
    """The generated baseline modules (compiled here, not in `make proto`: no product contract)."""
    GEN.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    src = pathlib.Path(__file__).parent / "proto"
    rc = protoc.main(
        [
            "protoc",
            f"-I{src}",
            f"-I{ROOT / 'proto'}",
            f"-I{include}",
            f"--python_out={GEN}",
            f"--grpc_python_out={GEN}",
            str(src / "crmbench" / "baseline.proto"),
        ]
    )
    if rc:
        raise SystemExit("could not compile bench/proto/crmbench/baseline.proto")
    if str(GEN) not in sys.path:
        sys.path.insert(0, str(GEN))
    from crmbench import baseline_pb2, baseline_pb2_grpc

    return baseline_pb2, baseline_pb2_grpc


def baseline_registration(ctx: ServiceContext) -> Registration:
    pb2, pb2_grpc = stubs()
    TABLE.metadata.create_all(ctx.engine)
    uow = UnitOfWork(ctx.engine, ctx.relay, source_service=SPEC.name, event_domain=SPEC.producer_domain)
    insert, select = TABLE.insert(), sa.select(TABLE).where(TABLE.c.id == sa.bindparam("id"))

    class Baseline(pb2_grpc.BaselineServiceServicer):
        def MinimalWrite(self, request, context):  # noqa: N802
            c = request.customer
            cid = str(uuid.uuid4())
            name = f"customers/{cid}"
            out = customer_pb2.Customer(name=name, given_name=c.given_name, family_name=c.family_name)
            with uow.begin() as tx:
                tx.execute(insert, {"id": cid, "given_name": c.given_name, "family_name": c.family_name})
                tx.publish("customer.created.v1", customer_events_pb2.CustomerCreated(customer=out), name)
            return out

        def MinimalRead(self, request, context):  # noqa: N802
            with uow.read() as conn:
                row = conn.execute(select, {"id": request.name.removeprefix("customers/")}).one()
            return customer_pb2.Customer(
                name=f"customers/{row.id}", given_name=row.given_name, family_name=row.family_name
            )

    return Registration.of(Baseline())


SPEC_WITH_BASELINE = dataclasses.replace(SPEC, build=lambda ctx: [*SPEC.build(ctx), baseline_registration(ctx)])

if __name__ == "__main__":
    raise SystemExit(main(SPEC_WITH_BASELINE))
