"""CampaignService (proto/crm/campaign/v1/campaign_service.proto): campaigns, their launch and
results. The campaigns part fills it in."""

from __future__ import annotations

from crm.campaign.v1 import campaign_service_pb2_grpc
from crm_chassis.grpc_server import Registration

from .runtime import Campaign


class CampaignServicer(campaign_service_pb2_grpc.CampaignServiceServicer):
    def __init__(self, rt: Campaign):
        self.rt = rt


def registration(rt: Campaign) -> Registration:
    return Registration.of(CampaignServicer(rt))
