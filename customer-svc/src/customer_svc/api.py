"""The gRPC servicer: proto in, use case, proto out. Nothing else lives here."""

from __future__ import annotations

from crm.customer.v1 import customer_service_pb2 as pb
from crm.customer.v1 import customer_service_pb2_grpc
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal

from . import domain, export_service
from .catalog import Catalog
from .duplicates import Duplicates
from .import_service import Importer
from .service_layer import CustomerUseCases


class CustomerServicer(customer_service_pb2_grpc.CustomerServiceServicer):
    def __init__(self, use_cases: CustomerUseCases, importer: Importer | None = None):
        self.uc = use_cases
        self.cat = Catalog(use_cases)
        self.dups = Duplicates(use_cases)
        self.importer = importer or Importer(use_cases)

    # customers
    def CreateCustomer(self, request, context):
        return self.uc.create(request.customer, request.request_id, current_principal())

    def GetCustomer(self, request, context):
        return self.uc.get(domain.parse_name(request.name), current_principal())

    def ListCustomers(self, request, context):
        items, token = self.uc.list(
            request.page_size,
            request.page_token,
            request.filter,
            request.order_by,
            request.show_deleted,
            current_principal(),
        )
        return pb.ListCustomersResponse(customers=items, next_page_token=token)

    def UpdateCustomer(self, request, context):
        return self.uc.update(request.customer, list(request.update_mask.paths), current_principal())

    def DeleteCustomer(self, request, context):
        return self.uc.delete(domain.parse_name(request.name), request.etag, current_principal())

    def UndeleteCustomer(self, request, context):
        return self.uc.undelete(domain.parse_name(request.name), current_principal())

    def SearchCustomers(self, request, context):
        hits, token = self.uc.search(
            request.query, request.page_size, request.page_token, request.filter, current_principal()
        )
        return pb.SearchCustomersResponse(
            results=[pb.SearchResult(customer=c, relevance=s) for c, s in hits], next_page_token=token
        )

    def EraseCustomer(self, request, context):
        return self.uc.erase(domain.parse_name(request.name), request.reason, current_principal())

    def ExportCustomers(self, request, context):
        yield from export_service.export(self.uc, request, current_principal())

    # duplicates
    def FindDuplicates(self, request, context):
        sets, token = self.dups.find(request.customer, request.page_size, request.page_token)
        return pb.FindDuplicatesResponse(duplicate_sets=sets, next_page_token=token)

    def MergeCustomers(self, request, context):
        return self.dups.merge(request, current_principal())

    def UnmergeCustomers(self, request, context):
        return self.dups.unmerge(request.merge, current_principal())

    # import
    def ImportCustomers(self, request, context):
        return self.importer.start(request, current_principal())

    def GetImportJob(self, request, context):
        return self.importer.get(request.name)

    def ListImportJobs(self, request, context):
        jobs, token = self.importer.list(request.page_size, request.page_token)
        return pb.ListImportJobsResponse(import_jobs=jobs, next_page_token=token)

    def CancelImportJob(self, request, context):
        return self.importer.cancel(request.name, current_principal())

    def DownloadImportErrorReport(self, request, context):
        yield from self.importer.error_report(request.name, request.format)

    # notes
    def CreateNote(self, request, context):
        return self.cat.create_note(request.parent, request.note, current_principal())

    def ListNotes(self, request, context):
        items, token = self.cat.list_notes(request.parent, request.page_size, request.page_token)
        return pb.ListNotesResponse(notes=items, next_page_token=token)

    def UpdateNote(self, request, context):
        return self.cat.update_note(request.note, list(request.update_mask.paths), current_principal())

    # groups
    def CreateGroup(self, request, context):
        return self.cat.create_group(request.group, current_principal())

    def UpdateGroup(self, request, context):
        return self.cat.update_group(request.group, list(request.update_mask.paths), current_principal())

    def DeleteGroup(self, request, context):
        return pb.DeleteGroupResponse(removed_members=self.cat.delete_group(request.name, current_principal()))

    def ListGroups(self, request, context):
        items, token = self.cat.list_groups(request.page_size, request.page_token)
        return pb.ListGroupsResponse(groups=items, next_page_token=token)

    def AddGroupMembers(self, request, context):
        return pb.AddGroupMembersResponse(
            added=self.cat.add_members(request.group, list(request.customers), current_principal())
        )

    def RemoveGroupMembers(self, request, context):
        return pb.RemoveGroupMembersResponse(
            removed=self.cat.remove_members(request.group, list(request.customers), current_principal())
        )

    def ListGroupMembers(self, request, context):
        items, token = self.cat.list_members(request.group, request.page_size, request.page_token, current_principal())
        return pb.ListCustomersResponse(customers=items, next_page_token=token)

    # ranks
    def CreateRank(self, request, context):
        return self.cat.create_rank(request.rank, current_principal())

    def UpdateRank(self, request, context):
        return self.cat.update_rank(request.rank, list(request.update_mask.paths), current_principal())

    def DeleteRank(self, request, context):
        return pb.DeleteRankResponse(cleared_customers=self.cat.delete_rank(request.name, current_principal()))

    def ListRanks(self, request, context):
        return pb.ListRanksResponse(ranks=self.cat.list_ranks())

    def AssignRank(self, request, context):
        return pb.AssignRankResponse(
            updated=self.cat.assign_rank(request.rank, list(request.customers), current_principal())
        )

    # managed lists
    def CreateAcquisitionSource(self, request, context):
        return self.cat.create_source(request.acquisition_source, current_principal())

    def ListAcquisitionSources(self, request, context):
        return pb.ListAcquisitionSourcesResponse(acquisition_sources=self.cat.list_sources(request.show_retired))

    def UpdateAcquisitionSource(self, request, context):
        return self.cat.update_source(request.acquisition_source, list(request.update_mask.paths), current_principal())

    def CreateCustomFieldDefinition(self, request, context):
        return self.cat.create_custom_field(request.custom_field_definition, current_principal())

    def ListCustomFieldDefinitions(self, request, context):
        return pb.ListCustomFieldDefinitionsResponse(custom_field_definitions=self.cat.list_custom_fields())

    # audit
    def ListAuditEntries(self, request, context):
        items, token = self.cat.list_audit(request.resource, request.page_size, request.page_token)
        return pb.ListAuditEntriesResponse(audit_entries=items, next_page_token=token)


def registration(use_cases: CustomerUseCases, importer: Importer | None = None) -> Registration:
    return Registration.of(CustomerServicer(use_cases, importer))
