"""The gateway's routes come from the contracts' google.api.http annotations: the route table
reproduces the one the gateway served by hand, a new annotated RPC gets its route with no
gateway change, and downloads document (and send) their real media types."""

from __future__ import annotations

import subprocess
import sys

import pytest
from google.api import annotations_pb2, resource_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from openapi_spec_validator import validate

from crm_gateway.routes import CSV, DOCX, PDF, ROUTES, XLSX, RouteError, build_routes

# The table the gateway served before the routes moved into the protos (routes.py as it was):
# (verb, path, rpc, bind, body, status).
C = "customers/{customer_id}"
HAND_WRITTEN = {
    ("POST", "/v1/customers", "CreateCustomer", (), "customer", 201),
    ("GET", "/v1/customers", "ListCustomers", (), None, 200),
    ("GET", "/v1/customers:search", "SearchCustomers", (), None, 200),
    ("GET", "/v1/customers:export", "ExportCustomers", (), None, 200),
    ("GET", "/v1/customers/{customer_id}", "GetCustomer", (("name", C),), None, 200),
    ("PATCH", "/v1/customers/{customer_id}", "UpdateCustomer", (("customer.name", C),), "customer", 200),
    ("DELETE", "/v1/customers/{customer_id}", "DeleteCustomer", (("name", C),), None, 200),
    ("POST", "/v1/customers/{customer_id}:undelete", "UndeleteCustomer", (("name", C),), "*", 200),
    ("POST", "/v1/customers/{customer_id}:erase", "EraseCustomer", (("name", C),), "*", 200),
    ("POST", "/v1/customers/{customer_id}/notes", "CreateNote", (("parent", C),), "note", 201),
    ("GET", "/v1/customers/{customer_id}/notes", "ListNotes", (("parent", C),), None, 200),
    (
        "PATCH",
        "/v1/customers/{customer_id}/notes/{note_id}",
        "UpdateNote",
        (("note.name", "customers/{customer_id}/notes/{note_id}"),),
        "note",
        200,
    ),
    ("POST", "/v1/groups", "CreateGroup", (), "group", 201),
    ("GET", "/v1/groups", "ListGroups", (), None, 200),
    ("PATCH", "/v1/groups/{group_id}", "UpdateGroup", (("group.name", "groups/{group_id}"),), "group", 200),
    ("DELETE", "/v1/groups/{group_id}", "DeleteGroup", (("name", "groups/{group_id}"),), None, 200),
    ("POST", "/v1/groups/{group_id}:addMembers", "AddGroupMembers", (("group", "groups/{group_id}"),), "*", 200),
    ("POST", "/v1/groups/{group_id}:removeMembers", "RemoveGroupMembers", (("group", "groups/{group_id}"),), "*", 200),
    ("GET", "/v1/groups/{group_id}/members", "ListGroupMembers", (("group", "groups/{group_id}"),), None, 200),
    ("POST", "/v1/ranks", "CreateRank", (), "rank", 201),
    ("GET", "/v1/ranks", "ListRanks", (), None, 200),
    ("PATCH", "/v1/ranks/{rank_id}", "UpdateRank", (("rank.name", "ranks/{rank_id}"),), "rank", 200),
    ("DELETE", "/v1/ranks/{rank_id}", "DeleteRank", (("name", "ranks/{rank_id}"),), None, 200),
    ("POST", "/v1/ranks:assign", "AssignRank", (), "*", 200),
    ("POST", "/v1/acquisitionSources", "CreateAcquisitionSource", (), "acquisition_source", 201),
    ("GET", "/v1/acquisitionSources", "ListAcquisitionSources", (), None, 200),
    (
        "PATCH",
        "/v1/acquisitionSources/{key}",
        "UpdateAcquisitionSource",
        (("acquisition_source.name", "acquisitionSources/{key}"),),
        "acquisition_source",
        200,
    ),
    ("POST", "/v1/customFieldDefinitions", "CreateCustomFieldDefinition", (), "custom_field_definition", 201),
    ("GET", "/v1/customFieldDefinitions", "ListCustomFieldDefinitions", (), None, 200),
    ("GET", "/v1/auditEntries", "ListAuditEntries", (), None, 200),
    ("GET", "/v1/customers:findDuplicates", "FindDuplicates", (), None, 200),
    ("POST", "/v1/customers:merge", "MergeCustomers", (), "*", 200),
    ("POST", "/v1/merges/{merge_id}:undo", "UnmergeCustomers", (("merge", "merges/{merge_id}"),), "*", 200),
    ("POST", "/v1/importJobs", "ImportCustomers", (), "*", 201),
    ("GET", "/v1/importJobs", "ListImportJobs", (), None, 200),
    ("POST", "/v1/importJobs/{job_id}:cancel", "CancelImportJob", (("name", "importJobs/{job_id}"),), "*", 200),
    ("GET", "/v1/importJobs/{job_id}", "GetImportJob", (("name", "importJobs/{job_id}"),), None, 200),
    (
        "GET",
        "/v1/importJobs/{job_id}/errorReport",
        "DownloadImportErrorReport",
        (("name", "importJobs/{job_id}"),),
        None,
        200,
    ),
    ("GET", "/v1/reports/customers-by-source", "CountCustomersBySource", (), None, 200),
    ("GET", "/v1/reports/customers-by-source:export", "ExportCustomersBySource", (), None, 200),
    ("GET", "/v1/reports/acquisition", "GetAcquisitionReport", (), None, 200),
    ("GET", "/v1/reports/acquisition:export", "ExportAcquisitionReport", (), None, 200),
    ("GET", "/v1/reports/pipeline", "GetPipelineReport", (), None, 200),
    ("GET", "/v1/reports/pipeline:export", "ExportPipelineReport", (), None, 200),
    ("GET", "/v1/reports/sales", "GetSalesReport", (), None, 200),
    ("GET", "/v1/reports/sales:export", "ExportSalesReport", (), None, 200),
    ("GET", "/v1/reports/forecast", "GetForecastReport", (), None, 200),
    ("GET", "/v1/reports/forecast:export", "ExportForecastReport", (), None, 200),
    ("GET", "/v1/reports/support", "GetSupportReport", (), None, 200),
    ("GET", "/v1/reports/support:export", "ExportSupportReport", (), None, 200),
    ("GET", "/v1/reports/loyalty", "GetLoyaltyReport", (), None, 200),
    ("GET", "/v1/reports/loyalty:export", "ExportLoyaltyReport", (), None, 200),
    ("GET", "/v1/reports/campaigns", "GetCampaignReport", (), None, 200),
    ("GET", "/v1/reports/campaigns:export", "ExportCampaignReport", (), None, 200),
    (
        "GET",
        "/v1/customers/{customer_id}/timeline:export",
        "ExportCustomerTimeline",
        (("customer", "customers/{customer_id}"),),
        None,
        200,
    ),
    (
        "GET",
        "/v1/customers/{customer_id}/timeline",
        "GetCustomerTimeline",
        (("customer", "customers/{customer_id}"),),
        None,
        200,
    ),
    ("GET", "/v1/projectionStatus", "GetProjectionStatus", (), None, 200),
    ("POST", "/v1/projectionRebuilds", "RebuildProjections", (), "*", 201),
    (
        "GET",
        "/v1/projectionRebuilds/{projection_rebuild_id}",
        "GetProjectionRebuild",
        (("name", "projectionRebuilds/{projection_rebuild_id}"),),
        None,
        200,
    ),
}


# The services that table covered (sales-svc's routes came with their annotations).
BEFORE = {"crm.customer.v1.CustomerService", "crm.reporting.v1.ReportingService"}


def test_the_annotations_reproduce_the_hand_written_table():
    old = [r for r in ROUTES if r.service in BEFORE]
    got = {(r.method, r.path, r.rpc, tuple(sorted(r.bind.items())), r.body, r.status) for r in old}
    assert got == HAND_WRITTEN
    assert {r.rpc for r in old if r.stream} == {
        "ExportCustomers",
        "DownloadImportErrorReport",
        "ExportCustomersBySource",
        "ExportAcquisitionReport",
        "ExportPipelineReport",
        "ExportForecastReport",
        "ExportSalesReport",
        "ExportSupportReport",
        "ExportLoyaltyReport",
        "ExportCampaignReport",
        "ExportCustomerTimeline",
    }
    assert [(r.rpc, r.upload) for r in old if r.upload] == [("ImportCustomers", "content")]
    # Summaries are the RPCs' proto comments (the generated modules carry none).
    get = next(r for r in ROUTES if r.rpc == "GetCustomer")
    assert get.summary == "Returns one customer by resource name"


def _library_service(name: str, rules: dict[str, tuple[str, str, str]]):
    """A contract the gateway has never seen: a Library service whose RPCs carry the given
    (verb, template, body) annotations, with resource pattern shelves/{shelf_id}/books/{book_id}."""
    package = f"gwtest.{name}.v1"
    fdp = descriptor_pb2.FileDescriptorProto(name=f"gwtest/{name}/v1/library.proto", package=package, syntax="proto3")
    fdp.dependency.extend(["google/api/annotations.proto", "google/api/resource.proto"])
    fdp.options.Extensions[resource_pb2.resource_definition].add(
        type="library.test/Book", pattern=["shelves/{shelf_id}/books/{book_id}"]
    )
    req = fdp.message_type.add(name="Req")
    req.field.add(name="name", number=1, type=9, label=1)
    req.field.add(name="parent", number=2, type=9, label=1)
    svc = fdp.service.add(name="Library")
    for rpc, (verb, template, body) in rules.items():
        m = svc.method.add(name=rpc, input_type=f".{package}.Req", output_type=f".{package}.Req")
        if verb:
            rule = m.options.Extensions[annotations_pb2.http]
            setattr(rule, verb, template)
            rule.body = body
    descriptor_pool.Default().Add(fdp)
    return descriptor_pool.Default().FindServiceByName(f"{package}.Library")


def test_a_new_annotated_rpc_gets_its_route_without_a_gateway_change():
    svc = _library_service(
        "ok",
        {
            "GetBook": ("get", "/v1/{name=shelves/*/books/*}", ""),
            "CreateBook": ("post", "/v1/{parent=shelves/*}/books", "*"),
            "ArchiveBook": ("post", "/v1/{name=shelves/*/books/*}:archive", "*"),
            "GetTag": ("get", "/v1/{name=tags/*}", ""),
            "GrpcOnly": ("", "", ""),
        },
    )
    routes = {r.rpc: r for r in build_routes({"library": svc})}
    assert set(routes) == {"GetBook", "CreateBook", "ArchiveBook", "GetTag"}  # no annotation, no route
    get, create, archive = routes["GetBook"], routes["CreateBook"], routes["ArchiveBook"]
    assert (get.method, get.path, get.bind) == (
        "GET",
        "/v1/shelves/{shelf_id}/books/{book_id}",
        {"name": "shelves/{shelf_id}/books/{book_id}"},
    )
    # The parent of a declared pattern takes its leading variables.
    assert (create.path, create.bind, create.body, create.status) == (
        "/v1/shelves/{shelf_id}/books",
        {"parent": "shelves/{shelf_id}"},
        "*",
        201,
    )
    assert (archive.path, archive.status) == ("/v1/shelves/{shelf_id}/books/{book_id}:archive", 200)
    assert archive.flask_path == "/v1/shelves/<shelf_id>/books/<book_id>:archive"
    # A pattern no resource declares: the wildcard is named after its collection.
    assert (routes["GetTag"].path, routes["GetTag"].bind) == ("/v1/tags/{tag_id}", {"name": "tags/{tag_id}"})


@pytest.mark.parametrize(
    ("name", "rules", "says"),
    [
        ("deep", {"Get": ("get", "/v1/{name=shelves/**}", "")}, "'**'"),
        ("custom", {"Get": ("get", "v1/books", "")}, "must start with '/'"),
        (
            "clash",
            {"A": ("get", "/v1/{name=shelves/*}", ""), "B": ("get", "/v1/{parent=shelves/*}", "")},
            "declared by gwtest.clash.v1.Library.A and gwtest.clash.v1.Library.B",
        ),
    ],
)
def test_an_annotation_the_gateway_cannot_serve_stops_it(name, rules, says):
    with pytest.raises(RouteError) as info:
        build_routes({"library": _library_service(name, rules)})
    assert says in str(info.value)


def test_openapi_does_not_import_the_app():
    """No import circle: the document is built from the routes, not from app.py."""
    code = "import sys, crm_gateway.openapi as o; o.openapi_document(); print('crm_gateway.app' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_downloads_document_and_send_their_real_media_types(suite):
    doc = suite.http.get("/openapi.json").get_json()
    export = doc["paths"]["/v1/customers:export"]["get"]["responses"]["200"]
    assert set(export["content"]) == {CSV, XLSX, PDF, DOCX}
    assert set(export["headers"]) == {"Content-Disposition", "X-Row-Count"}
    for path in (
        "/v1/reports/loyalty:export",
        "/v1/customers/{customer_id}/timeline:export",
        "/v1/reports/value:export",
    ):
        chart = doc["paths"][path]["get"]["responses"]["200"]["content"]
        assert set(chart) == {CSV, XLSX, PDF, "image/png", "image/svg+xml"}, path
    report = doc["paths"]["/v1/importJobs/{job_id}/errorReport"]["get"]["responses"]["200"]
    assert set(report["content"]) == {CSV, XLSX} and set(report["headers"]) == {"Content-Disposition"}
    assert "application/octet-stream" not in str(doc)

    h = suite.headers()
    suite.http.post("/v1/customers", json={"type": "CUSTOMER_TYPE_PERSON", "familyName": "Mediatype"}, headers=h)
    for fmt, want in [
        ("CSV", "text/csv; charset=utf-8"),  # the charset once
        ("XLSX", XLSX),
        ("PDF", PDF),
        ("DOCX", DOCX),
    ]:
        resp = suite.http.get(f"/v1/customers:export?format=EXPORT_FORMAT_{fmt}&query=Mediatype", headers=h)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        assert resp.headers["Content-Type"] == want
        assert resp.mimetype in export["content"]
        resp.close()


def test_every_operation_lists_the_errors_it_can_answer(suite):
    doc = suite.http.get("/openapi.json").get_json()
    validate(doc)  # a valid OpenAPI 3.0 document (references resolve, media types well formed)
    problems = doc["components"]["responses"]
    for code, response in problems.items():
        assert list(response["content"]) == ["application/problem+json"], code
    for path, ops in doc["paths"].items():
        for verb, op in ops.items():
            codes = set(op["responses"])
            assert {"400", "414", "431", "500"} <= codes, (path, verb)
            if op.get("security") != []:
                assert {"401", "403", "404", "409", "503", "504"} <= codes, (path, verb)
            if "requestBody" in op:
                assert "413" in codes, (path, verb)
            for response in op["responses"].values():
                if "$ref" in response:
                    assert response["$ref"].removeprefix("#/components/responses/") in problems
