"""campaign-svc starts, migrates its database and answers health and reflection."""

from __future__ import annotations

import grpc
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from campaign_svc.__main__ import SPEC
from tests.support.harness import channel, start_service

OWN = "crm.campaign.v1.CampaignService"


def test_it_serves_health_and_reflection(databases, broker):
    service = start_service(SPEC, databases.fresh("campaign_svc"), broker.url)
    try:
        with channel(service) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for name in ("", OWN):
                status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
                assert status == health_pb2.HealthCheckResponse.SERVING, name
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            answer = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([request]), timeout=5))
            assert OWN in {s.name for s in answer.list_services_response.service}
            try:
                health.Check(health_pb2.HealthCheckRequest(service="crm.nope.v1.Nope"), timeout=5)
                raise AssertionError("an unknown service has no health status")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND
        with service.ctx.engine.connect() as conn:  # migrated: the outbox exists
            assert conn.execute(sa.text("SELECT count(*) FROM outbox")).scalar() == 0
    finally:
        service.stop(0)
