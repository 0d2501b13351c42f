"""Duplicates over real gRPC and PostgreSQL: finding, merge preview vs merge vs unmerge."""

from __future__ import annotations

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from crm.customer.v1 import customer_events_pb2, customer_pb2, resources_pb2
from crm.customer.v1 import customer_service_pb2 as pb
from crm_chassis.errors import read_rpc_error
from tests.support.harness import md

NID = "0499370899"


def create(stub, **fields):
    fields.setdefault("type", customer_pb2.CUSTOMER_TYPE_PERSON)
    return stub.CreateCustomer(pb.CreateCustomerRequest(customer=customer_pb2.Customer(**fields)), metadata=md())


def get(stub, c):
    return stub.GetCustomer(pb.GetCustomerRequest(name=c.name), metadata=md())


def err(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return read_rpc_error(info.value)


@pytest.fixture(scope="module")
def family(stub):
    a = create(
        stub,
        given_name="Reza",
        family_name="Ahmadi",
        national_id=NID,
        city="Tabriz",
        tags=["old"],
        acquisition_source="website",
    )
    b = create(
        stub,
        given_name="Reza",
        family_name="Ahmadi",
        email="reza@example.ir",
        mobile="09141234567",
        city="Tabriz",
        tags=["new"],
    )
    c = create(
        stub, given_name="R.", family_name="Ahmadi", national_id=NID, mobile="+989141234567", address="Valiasr St. 10"
    )
    d = create(stub, given_name="رضا", family_name="احمدي", city="تبریز")  # Arabic yeh: same as below
    e = create(stub, given_name="رضا", family_name="احمدی", city="تبریز")
    loner = create(stub, given_name="Nobody", family_name="Similar", city="Tabriz")
    return {"a": a, "b": b, "c": c, "d": d, "e": e, "loner": loner}


def test_find_duplicates_links_by_national_id_phone_email_and_name_in_city(stub, family):
    sets = stub.FindDuplicates(pb.FindDuplicatesRequest(), metadata=md("sales_rep")).duplicate_sets
    by_first = {tuple(s.customers): set(s.reasons) for s in sets}
    f = family
    abc = tuple(x.name for x in (f["a"], f["b"], f["c"]))
    assert by_first[abc] >= {"national_id", "phone", "name_city"}  # a~c by id, b~c by mobile, a~b by name+city
    assert by_first[(f["d"].name, f["e"].name)] == {"name_city"}
    assert not any(f["loner"].name in s for s in by_first)
    one = stub.FindDuplicates(pb.FindDuplicatesRequest(customer=f["b"].name), metadata=md()).duplicate_sets
    assert one[0].customers[0] == f["b"].name and set(one[0].customers) == set(abc)
    assert {"phone", "name_city"} <= set(one[0].reasons)


def test_pages_of_duplicate_sets(stub, family):
    first = stub.FindDuplicates(pb.FindDuplicatesRequest(page_size=1), metadata=md())
    second = stub.FindDuplicates(pb.FindDuplicatesRequest(page_size=1, page_token=first.next_page_token), metadata=md())
    assert first.duplicate_sets[0].customers != second.duplicate_sets[0].customers


def test_merge_preview_changes_nothing_then_merge_then_unmerge(svc, stub, family):
    a, b, c = family["a"], family["b"], family["c"]
    stub.CreateNote(pb.CreateNoteRequest(parent=c.name, note=resources_pb2.Note(text="note on c")), metadata=md())
    g = stub.CreateGroup(pb.CreateGroupRequest(group=resources_pb2.Group(display_name="Dup group")), metadata=md())
    stub.AddGroupMembers(pb.AddGroupMembersRequest(group=g.name, customers=[b.name]), metadata=md())
    a_before = get(stub, a)
    req = pb.MergeCustomersRequest(
        survivor=a.name,
        merged=[b.name, c.name],
        validate_only=True,
        field_sources=[pb.FieldSource(field="given_name", customer=c.name)],
    )
    preview = stub.MergeCustomers(req, metadata=md("sales_manager"))
    s = preview.survivor
    assert s.given_name == "R." and s.email == "reza@example.ir" and s.mobile == "+989141234567"
    assert s.address == "Valiasr St. 10" and s.national_id == NID and s.acquisition_source == "website"
    assert list(s.tags) == ["old", "new"] and g.name in s.groups and preview.moved_notes == 1 and not preview.merge
    assert {(fs.field, fs.customer) for fs in preview.field_sources} >= {("given_name", c.name), ("email", b.name)}
    assert get(stub, a) == a_before and not get(stub, b).HasField("delete_time")  # a preview writes nothing

    req.validate_only = False
    done = stub.MergeCustomers(req, metadata=md("sales_manager"))
    assert done.merge.startswith("merges/") and done.survivor.email == "reza@example.ir"
    for m in (b, c):
        gone = get(stub, m)
        assert gone.merged_into == a.name and gone.HasField("delete_time")
    assert [n.text for n in stub.ListNotes(pb.ListNotesRequest(parent=a.name), metadata=md()).notes] == ["note on c"]
    with svc.ctx.engine.connect() as conn:
        payload = conn.execute(
            sa.text("SELECT payload FROM outbox WHERE routing_key = 'customer.merged.v1' AND subject = :s"),
            {"s": a.name},
        ).scalar_one()
    event = customer_events_pb2.CustomerMerged.FromString(bytes(payload))
    assert set(event.merged) == {b.name, c.name} and event.survivor.email == "reza@example.ir"

    # An edit after the merge survives the unmerge; the merged fields go back.
    now = get(stub, a)
    stub.UpdateCustomer(
        pb.UpdateCustomerRequest(
            customer=customer_pb2.Customer(name=a.name, etag=now.etag, city="Urmia"),
            update_mask=field_mask_pb2.FieldMask(paths=["city"]),
        ),
        metadata=md(),
    )
    undone = stub.UnmergeCustomers(pb.UnmergeCustomersRequest(merge=done.merge), metadata=md("support_manager"))
    s = undone.survivor
    assert (s.given_name, s.email, s.mobile, list(s.tags), s.city) == ("Reza", "", "", ["old"], "Urmia")
    assert {r.name for r in undone.restored} == {b.name, c.name}
    b_back = get(stub, b)
    assert not b_back.HasField("delete_time") and not b_back.merged_into and g.name in b_back.groups
    assert [n.text for n in stub.ListNotes(pb.ListNotesRequest(parent=c.name), metadata=md()).notes] == ["note on c"]
    e = err(lambda: stub.UnmergeCustomers(pb.UnmergeCustomersRequest(merge=done.merge), metadata=md()))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "MERGE_ALREADY_UNDONE"


def test_merge_refuses_bad_requests(stub, family):
    a, b, d = family["a"], family["b"], family["d"]
    cases = [
        (pb.MergeCustomersRequest(survivor=a.name), "merged"),
        (pb.MergeCustomersRequest(survivor=a.name, merged=[a.name]), "merged"),
        (pb.MergeCustomersRequest(survivor="customers/x", merged=[b.name]), "survivor"),
        (
            pb.MergeCustomersRequest(
                survivor=a.name, merged=[b.name], field_sources=[pb.FieldSource(field="tags", customer=b.name)]
            ),
            "field_sources[0].field",
        ),
        (
            pb.MergeCustomersRequest(
                survivor=a.name, merged=[b.name], field_sources=[pb.FieldSource(field="email", customer=d.name)]
            ),
            "field_sources[0].customer",
        ),
    ]
    for req, field in cases:
        e = err(lambda r=req: stub.MergeCustomers(r, metadata=md()))
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT and field in [v.field for v in e.field_violations], (field, e)
    org = create(stub, type=customer_pb2.CUSTOMER_TYPE_ORGANIZATION, organization_name="Ahmadi Co")
    e = err(lambda: stub.MergeCustomers(pb.MergeCustomersRequest(survivor=a.name, merged=[org.name]), metadata=md()))
    assert "merged[0]" in [v.field for v in e.field_violations]
    e = err(
        lambda: stub.MergeCustomers(
            pb.MergeCustomersRequest(survivor=a.name, merged=[b.name]), metadata=md("sales_rep")
        )
    )
    assert e.code == grpc.StatusCode.PERMISSION_DENIED
    e = err(
        lambda: stub.UnmergeCustomers(
            pb.UnmergeCustomersRequest(merge="merges/00000000-0000-4000-8000-000000000000"), metadata=md()
        )
    )
    assert e.code == grpc.StatusCode.NOT_FOUND
