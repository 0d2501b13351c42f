"""The gRPC servicer: proto in, use case, proto out. Nothing else lives here."""

from __future__ import annotations

from crm.customer.v1 import customer_service_pb2, customer_service_pb2_grpc
from crm_chassis.grpc_server import Registration

from . import domain
from .integration import customer_to_proto
from .service_layer import CustomerUseCases

_SVC = "/crm.customer.v1.CustomerService/"
PERMISSIONS = {
    _SVC + "GetCustomer": "customers.read",
    _SVC + "ListCustomers": "customers.read",
    _SVC + "CreateCustomer": "customers.write",
}


class CustomerServicer(customer_service_pb2_grpc.CustomerServiceServicer):
    def __init__(self, use_cases: CustomerUseCases):
        self.uc = use_cases

    def CreateCustomer(self, request, context):
        c = request.customer
        new = domain.NewCustomer(
            type=c.type,
            given_name=c.given_name,
            family_name=c.family_name,
            organization_name=c.organization_name,
            email=c.email,
            phone=c.phone,
            acquisition_source=c.acquisition_source,
        )
        return customer_to_proto(self.uc.create(new, request.request_id))

    def GetCustomer(self, request, context):
        return customer_to_proto(self.uc.get(domain.parse_name(request.name)))

    def ListCustomers(self, request, context):
        rows, token = self.uc.list(request.page_size, request.page_token)
        return customer_service_pb2.ListCustomersResponse(
            customers=[customer_to_proto(r) for r in rows], next_page_token=token
        )


def registration(use_cases: CustomerUseCases) -> Registration:
    return Registration(
        CustomerServicer(use_cases),
        customer_service_pb2_grpc.add_CustomerServiceServicer_to_server,
        customer_service_pb2.DESCRIPTOR.services_by_name["CustomerService"],
    )
