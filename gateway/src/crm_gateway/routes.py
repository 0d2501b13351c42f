"""The HTTP routes: one table maps each REST route to its gRPC method (like google.api.http
annotations), and one generic handler transcodes JSON <-> protobuf for all of them. The
OpenAPI document is generated from the same table, so the two cannot drift apart."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Route:
    method: str  # GET, POST, PATCH, DELETE
    path: str  # OpenAPI form: /v1/customers/{customer_id}
    service: str  # key of Clients.stubs: "customer", "reporting"
    rpc: str  # gRPC method name
    summary: str
    # request field <- template over the path parameters: {"name": "customers/{customer_id}"}
    bind: dict[str, str] = field(default_factory=dict)
    body: str | None = None  # "*": the whole request; "customer": that field; None: no body
    status: int = 200
    stream: bool = False  # server-streaming download (exports)
    # bytes field filled by the `file` part when the body is multipart/form-data (the other form
    # fields fill the request fields of their names); JSON bodies work as for any route
    upload: str | None = None

    @property
    def flask_path(self) -> str:
        return self.path.replace("{", "<").replace("}", ">")

    @property
    def path_params(self) -> list[str]:
        import re

        return re.findall(r"{(\w+)}", self.path)


def _c(method, path, rpc, summary, **kw) -> Route:
    if "{customer_id}" in path and "bind" not in kw:
        kw["bind"] = {("parent" if path.endswith("/notes") else "name"): "customers/{customer_id}"}
    if "{customer_id}" in path and kw.get("body") == "customer":
        kw["bind"] = {"customer.name": "customers/{customer_id}"}
    return Route(method, path, "customer", rpc, summary, **kw)


CUSTOMER = "customer"
ROUTES: list[Route] = [
    _c(
        "POST",
        "/v1/customers",
        "CreateCustomer",
        "Create a customer (Idempotency-Key makes retries safe)",
        body=CUSTOMER,
        status=201,
    ),
    _c("GET", "/v1/customers", "ListCustomers", "List customers: filter (AIP-160), order_by, keyset pages"),
    _c("GET", "/v1/customers:search", "SearchCustomers", "Full-text and fuzzy search, Persian-aware"),
    _c(
        "GET",
        "/v1/customers:export",
        "ExportCustomers",
        "Download a filtered list or search as CSV, XLSX, PDF or DOCX",
        stream=True,
    ),
    _c("GET", "/v1/customers/{customer_id}", "GetCustomer", "Get a customer"),
    _c(
        "PATCH",
        "/v1/customers/{customer_id}",
        "UpdateCustomer",
        "Update the fields in the body (or update_mask); send the etag you read",
        body=CUSTOMER,
    ),
    _c("DELETE", "/v1/customers/{customer_id}", "DeleteCustomer", "Soft-delete a customer"),
    _c("POST", "/v1/customers/{customer_id}:undelete", "UndeleteCustomer", "Restore a deleted customer", body="*"),
    _c(
        "POST",
        "/v1/customers/{customer_id}:erase",
        "EraseCustomer",
        "Erase personal data (right to be forgotten)",
        body="*",
    ),
    _c("POST", "/v1/customers/{customer_id}/notes", "CreateNote", "Add a note", body="note", status=201),
    _c("GET", "/v1/customers/{customer_id}/notes", "ListNotes", "List a customer's notes, newest first"),
    Route(
        "PATCH",
        "/v1/customers/{customer_id}/notes/{note_id}",
        CUSTOMER,
        "UpdateNote",
        "Edit your own note",
        bind={"note.name": "customers/{customer_id}/notes/{note_id}"},
        body="note",
    ),
    Route("POST", "/v1/groups", CUSTOMER, "CreateGroup", "Create a group", body="group", status=201),
    Route("GET", "/v1/groups", CUSTOMER, "ListGroups", "List groups"),
    Route(
        "PATCH",
        "/v1/groups/{group_id}",
        CUSTOMER,
        "UpdateGroup",
        "Rename a group",
        bind={"group.name": "groups/{group_id}"},
        body="group",
    ),
    Route(
        "DELETE", "/v1/groups/{group_id}", CUSTOMER, "DeleteGroup", "Delete a group", bind={"name": "groups/{group_id}"}
    ),
    Route(
        "POST",
        "/v1/groups/{group_id}:addMembers",
        CUSTOMER,
        "AddGroupMembers",
        "Add customers to a group",
        bind={"group": "groups/{group_id}"},
        body="*",
    ),
    Route(
        "POST",
        "/v1/groups/{group_id}:removeMembers",
        CUSTOMER,
        "RemoveGroupMembers",
        "Remove customers",
        bind={"group": "groups/{group_id}"},
        body="*",
    ),
    Route(
        "GET",
        "/v1/groups/{group_id}/members",
        CUSTOMER,
        "ListGroupMembers",
        "List a group's customers",
        bind={"group": "groups/{group_id}"},
    ),
    Route("POST", "/v1/ranks", CUSTOMER, "CreateRank", "Create a rank", body="rank", status=201),
    Route("GET", "/v1/ranks", CUSTOMER, "ListRanks", "List ranks in order"),
    Route(
        "PATCH",
        "/v1/ranks/{rank_id}",
        CUSTOMER,
        "UpdateRank",
        "Rename or move a rank",
        bind={"rank.name": "ranks/{rank_id}"},
        body="rank",
    ),
    Route("DELETE", "/v1/ranks/{rank_id}", CUSTOMER, "DeleteRank", "Delete a rank", bind={"name": "ranks/{rank_id}"}),
    Route("POST", "/v1/ranks:assign", CUSTOMER, "AssignRank", "Give customers a rank", body="*"),
    Route(
        "POST",
        "/v1/acquisitionSources",
        CUSTOMER,
        "CreateAcquisitionSource",
        "Add an acquisition source",
        body="acquisition_source",
        status=201,
    ),
    Route("GET", "/v1/acquisitionSources", CUSTOMER, "ListAcquisitionSources", "List acquisition sources"),
    Route(
        "PATCH",
        "/v1/acquisitionSources/{key}",
        CUSTOMER,
        "UpdateAcquisitionSource",
        "Rename or retire a source",
        bind={"acquisition_source.name": "acquisitionSources/{key}"},
        body="acquisition_source",
    ),
    Route(
        "POST",
        "/v1/customFieldDefinitions",
        CUSTOMER,
        "CreateCustomFieldDefinition",
        "Define a custom field",
        body="custom_field_definition",
        status=201,
    ),
    Route("GET", "/v1/customFieldDefinitions", CUSTOMER, "ListCustomFieldDefinitions", "List custom fields"),
    Route("GET", "/v1/auditEntries", CUSTOMER, "ListAuditEntries", "Read the audit trail (admins)"),
    Route("GET", "/v1/customers:findDuplicates", CUSTOMER, "FindDuplicates", "Sets of probable duplicates"),
    Route(
        "POST",
        "/v1/customers:merge",
        CUSTOMER,
        "MergeCustomers",
        "Merge customers into a survivor (validateOnly previews)",
        body="*",
    ),
    Route(
        "POST",
        "/v1/merges/{merge_id}:undo",
        CUSTOMER,
        "UnmergeCustomers",
        "Undo a merge (within 30 days)",
        bind={"merge": "merges/{merge_id}"},
        body="*",
    ),
    Route(
        "POST",
        "/v1/importJobs",
        CUSTOMER,
        "ImportCustomers",
        "Start importing a CSV or XLSX file (a multipart `file` part, or content base64 in JSON); poll the job",
        body="*",
        status=201,
        upload="content",
    ),
    Route("GET", "/v1/importJobs", CUSTOMER, "ListImportJobs", "Imports, newest first"),
    Route(
        "POST",
        "/v1/importJobs/{job_id}:cancel",
        CUSTOMER,
        "CancelImportJob",
        "Stop a running import; what it committed stays",
        bind={"name": "importJobs/{job_id}"},
        body="*",
    ),
    Route(
        "GET",
        "/v1/importJobs/{job_id}",
        CUSTOMER,
        "GetImportJob",
        "Progress and outcome of an import",
        bind={"name": "importJobs/{job_id}"},
    ),
    Route(
        "GET",
        "/v1/importJobs/{job_id}/errorReport",
        CUSTOMER,
        "DownloadImportErrorReport",
        "The rows an import rejected, with reasons (CSV or XLSX)",
        bind={"name": "importJobs/{job_id}"},
        stream=True,
    ),
    Route(
        "GET",
        "/v1/reports/customers-by-source",
        "reporting",
        "CountCustomersBySource",
        "Customers per acquisition source (start_time inclusive, end_time exclusive)",
    ),
]
