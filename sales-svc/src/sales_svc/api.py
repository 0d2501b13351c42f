"""SalesService (proto/crm/sales/v1/sales_service.proto): teams."""

from __future__ import annotations

from crm.sales.v1 import sales_service_pb2, sales_service_pb2_grpc
from crm_chassis.grpc_server import Registration

from .runtime import Sales


class SalesServicer(sales_service_pb2_grpc.SalesServiceServicer):
    def __init__(self, sales: Sales):
        self.sales = sales


def registration(sales: Sales) -> Registration:
    return Registration(
        SalesServicer(sales),
        sales_service_pb2_grpc.add_SalesServiceServicer_to_server,
        sales_service_pb2.DESCRIPTOR.services_by_name["SalesService"],
    )
