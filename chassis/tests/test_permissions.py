"""Permissions declared in the contracts, roles from a file: what each RPC needs comes from its
descriptor, a server with an RPC that declares none refuses to start, and the role -> permission
policy is a TOML file (the default, or ROLES_FILE) checked at start against the declared names."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

from crm.customer.v1 import customer_service_pb2
from crm.reporting.v1 import reporting_service_pb2, reporting_service_pb2_grpc
from crm_chassis import auth
from crm_chassis.auth import Principal, TokenVerifier, configure_roles, load_roles
from crm_chassis.config import DEFAULT_JWT_SECRET, ConfigError, load_settings
from crm_chassis.grpc_server import GrpcService, Registration
from crm_chassis.permissions import declared_permissions, method_permissions

CUSTOMERS = customer_service_pb2.DESCRIPTOR.services_by_name["CustomerService"]
REPORTING = reporting_service_pb2.DESCRIPTOR.services_by_name["ReportingService"]

# The hand-written maps these replace (customer_svc.api.PERMISSIONS, reporting_svc.api.PERMISSIONS
# and crm_chassis.auth.ROLE_PERMISSIONS before the move), kept here to show nothing changed.
OLD_METHOD_PERMISSIONS = {
    "customers.read": [
        "GetCustomer",
        "ListCustomers",
        "SearchCustomers",
        "FindDuplicates",
        "ListNotes",
        "ListGroups",
        "ListGroupMembers",
        "ListRanks",
        "ListAcquisitionSources",
        "ListCustomFieldDefinitions",
    ],
    "customers.write": ["CreateCustomer", "UpdateCustomer", "AddGroupMembers", "RemoveGroupMembers", "AssignRank"],
    "customers.delete": ["DeleteCustomer", "UndeleteCustomer"],
    "customers.erase": ["EraseCustomer"],
    "customers.export": ["ExportCustomers"],
    "customers.merge": ["MergeCustomers", "UnmergeCustomers"],
    "customers.import": [
        "ImportCustomers",
        "GetImportJob",
        "ListImportJobs",
        "CancelImportJob",
        "DownloadImportErrorReport",
    ],
    "notes.write": ["CreateNote", "UpdateNote"],
    "customers.catalog": ["CreateGroup", "UpdateGroup", "DeleteGroup", "CreateRank", "UpdateRank", "DeleteRank"],
    "customers.admin": ["CreateAcquisitionSource", "UpdateAcquisitionSource", "CreateCustomFieldDefinition"],
    "audit.read": ["ListAuditEntries"],
}
_MANAGER = {
    "customers.read",
    "customers.write",
    "customers.delete",
    "customers.pii",
    "customers.catalog",
    "customers.export",
    "customers.import",
    "customers.merge",
    "notes.write",
    "reports.read",
}
OLD_ROLE_PERMISSIONS = {
    "admin": {"*"},
    "sales_manager": _MANAGER,
    "sales_rep": {"customers.read", "customers.write", "notes.write"},
    "support_manager": _MANAGER,
    "support_agent": {"customers.read", "customers.write", "notes.write"},
    "marketer": {"customers.read", "customers.catalog", "customers.export", "customers.import", "reports.read"},
    "analyst": {"customers.read", "customers.export", "reports.read"},
}


@pytest.fixture(autouse=True)
def default_policy():
    """Every test leaves the process with the default policy it found."""
    yield
    auth.use_roles(load_roles())


def settings(**env):
    return load_settings("perm-test", 50999, env=env)


def test_every_rpc_declares_the_permission_it_had_in_the_hand_written_map():
    want = {f"/{CUSTOMERS.full_name}/{m}": p for p, methods in OLD_METHOD_PERMISSIONS.items() for m in methods}
    want[f"/{REPORTING.full_name}/CountCustomersBySource"] = "reports.read"
    got = method_permissions([CUSTOMERS, REPORTING])
    # ReportingService's reports added since then are read with reports.read, its rebuild is admin's
    later = {k: v for k, v in got.items() if k not in want and k.startswith(f"/{REPORTING.full_name}/")}
    assert set(later.values()) <= {"reports.read", "reports.admin"}
    assert later.get(f"/{REPORTING.full_name}/RebuildProjections") == "reports.admin"
    assert {k: v for k, v in got.items() if k not in later} == want


# What the old policy covered; sales-svc's permissions (leads.*, invoices.*, ...) came later.
OLD_AREAS = ("customers.", "notes.", "reports.", "audit.")
# Permissions of those areas that came later: scheduled reports (reporting-svc), the managers'.
LATER = {"reports.schedule": {"sales_manager", "support_manager"}}


def test_the_default_roles_file_is_the_old_policy_and_passes_its_check():
    policy = load_roles(None, declared_permissions())
    old = {
        role: {p for p in perms if p == "*" or (p.startswith(OLD_AREAS) and p not in LATER)}
        for role, perms in policy.roles.items()
        if role in OLD_ROLE_PERMISSIONS
    }
    assert old == OLD_ROLE_PERMISSIONS
    for perm, roles in LATER.items():
        assert {r for r, perms in policy.roles.items() if perm in perms} == roles
    # Every name the file grants is declared by some contract; customers.pii by CustomerService
    # as a permission it checks inside its RPCs.
    assert {p for perms in policy.roles.values() for p in perms} - {"*"} <= declared_permissions()
    assert "customers.pii" in declared_permissions() and "audit.read" in declared_permissions()


def _service_without_a_permission():
    """A service whose second RPC declares no permission (a new file in the default pool)."""
    fdp = descriptor_pb2.FileDescriptorProto(name="permtest/v1/lacking.proto", package="permtest.v1", syntax="proto3")
    fdp.dependency.append("crm/options/v1/options.proto")
    fdp.message_type.add(name="Empty")
    svc = fdp.service.add(name="LackingService")
    from crm.options.v1 import options_pb2

    ok = svc.method.add(name="Fine", input_type=".permtest.v1.Empty", output_type=".permtest.v1.Empty")
    ok.options.Extensions[options_pb2.permission] = "reports.read"
    svc.method.add(name="Forgotten", input_type=".permtest.v1.Empty", output_type=".permtest.v1.Empty")
    pool = descriptor_pool.Default()
    try:
        return pool.FindServiceByName("permtest.v1.LackingService")
    except KeyError:
        pool.Add(fdp)
        return pool.FindServiceByName("permtest.v1.LackingService")


def test_a_server_with_an_rpc_that_declares_no_permission_refuses_to_start():
    lacking = _service_without_a_permission()
    with pytest.raises(SystemExit) as info:
        method_permissions([lacking])
    assert "/permtest.v1.LackingService/Forgotten" in str(info.value)
    assert "Fine" not in str(info.value).split(";")[0]
    added = []
    with pytest.raises(SystemExit, match="Forgotten"):
        GrpcService(settings(), [Registration(object(), lambda s, server: added.append(s), lacking)])
    assert added == []  # refused before anything was registered or bound


class _Reports(reporting_service_pb2_grpc.ReportingServiceServicer):
    def CountCustomersBySource(self, request, context):
        return reporting_service_pb2.CountCustomersBySourceResponse(total_customers=7)


def _token(*roles: str) -> str:
    return TokenVerifier(DEFAULT_JWT_SECRET).mint("u", list(roles))


def _call(port: int, token: str):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = reporting_service_pb2_grpc.ReportingServiceStub(channel)
        md = [("authorization", f"Bearer {token}")]
        return stub.CountCustomersBySource(reporting_service_pb2.CountCustomersBySourceRequest(), metadata=md)


def _serve(s):
    reg = Registration(_Reports(), reporting_service_pb2_grpc.add_ReportingServiceServicer_to_server, REPORTING)
    return GrpcService(s, [reg], port=0).start()


def test_the_server_enforces_the_declared_permission_with_the_default_roles():
    s = settings()
    configure_roles(s)
    server = _serve(s)
    try:
        assert _call(server.port, _token("analyst")).total_customers == 7
        with pytest.raises(grpc.RpcError) as info:
            _call(server.port, _token("sales_rep"))  # no reports.read
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "reports.read" in info.value.details()
    finally:
        server.stop(0)


def test_a_platform_team_changes_the_roles_with_a_file(tmp_path):
    roles = tmp_path / "roles.toml"
    roles.write_text(
        '[roles]\nadmin = ["*"]\nauditor = ["reports.read", "audit.read"]\nsales_rep = ["customers.read"]\n'
    )
    analyst = _token("analyst")  # minted under the default policy
    s = settings(ROLES_FILE=str(roles))
    assert s.roles_file == str(roles)
    configure_roles(s)
    server = _serve(s)
    try:
        assert _call(server.port, _token("auditor")).total_customers == 7  # a role the default lacks
        with pytest.raises(grpc.RpcError) as info:
            _call(server.port, analyst)  # a role this file does not name grants nothing
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(ValueError, match="unknown roles"):
            _token("analyst")
    finally:
        server.stop(0)
    assert Principal("a", ("auditor",)).has("audit.read") and not Principal("a", ("auditor",)).has("customers.read")


def test_a_bad_roles_file_stops_the_start_naming_the_problem(tmp_path):
    bad = tmp_path / "roles.toml"
    bad.write_text('[roles]\nanalyst = ["customers.raed", "reports.read"]\n')
    with pytest.raises(ConfigError) as info:
        configure_roles(settings(ROLES_FILE=str(bad)))
    (problem,) = info.value.problems
    assert f"ROLES_FILE={bad}" in problem and "'analyst'" in problem and "'customers.raed'" in problem
    assert "did you mean 'customers.read'" in problem

    cases = {
        "analyst = [": "not valid TOML",
        'analyst = ["reports.read"]\n': "needs a [roles] table",
        '[roles]\nanalyst = "reports.read"\n': "must be a list of permission names",
        '[roles]\nAnalyst = ["reports.read"]\n': "lower_snake_case",
        '[roles]\nanalyst = ["reports.read"]\n[extra]\nx = 1\n': "unknown top-level keys ['extra']",
    }
    for text, says in cases.items():
        bad.write_text(text)
        with pytest.raises(ConfigError) as info:
            configure_roles(settings(ROLES_FILE=str(bad)))
        assert any(says in p for p in info.value.problems), (text, info.value.problems)

    with pytest.raises(ConfigError) as info:
        settings(ROLES_FILE=str(tmp_path / "missing.toml"))
    assert any("ROLES_FILE=" in p and "is not a file" in p for p in info.value.problems)


def test_phone_region_is_no_longer_a_chassis_setting():
    assert not hasattr(settings(), "default_phone_region")
