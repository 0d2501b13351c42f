"""customer-svc's full record over real gRPC and PostgreSQL: validation, update with etags,
soft delete, filters, search with Persian normalisation, notes, groups, ranks, masking,
audit and erasure."""

from __future__ import annotations

import datetime as dt
import re

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from crm.customer.v1 import customer_events_pb2, customer_pb2, resources_pb2
from crm.customer.v1 import customer_service_pb2 as pb
from crm.type.v1 import date_pb2
from crm_chassis.errors import read_rpc_error
from tests.support.harness import md

PERSON, ORG = customer_pb2.CUSTOMER_TYPE_PERSON, customer_pb2.CUSTOMER_TYPE_ORGANIZATION
VALID_NID = "0499370899"  # a well-known valid kod-e melli


def D(y, m, d):  # noqa: N802
    return date_pb2.Date(year=y, month=m, day=d)


def create(stub, roles="admin", sub="tester", **fields):
    fields.setdefault("type", PERSON)
    if fields["type"] == PERSON:
        fields.setdefault("family_name", "Test")
    return stub.CreateCustomer(
        pb.CreateCustomerRequest(customer=customer_pb2.Customer(**fields)), metadata=md(roles, sub)
    )


def err(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return read_rpc_error(info.value)


def fields_of(e) -> set[str]:
    return {v.field for v in e.field_violations}


def update(stub, c, paths, roles="admin", sub="tester"):
    return stub.UpdateCustomer(
        pb.UpdateCustomerRequest(customer=c, update_mask=field_mask_pb2.FieldMask(paths=paths)), metadata=md(roles, sub)
    )


def listed(stub, filter="", order_by="", roles="admin", show_deleted=False, page_size=1000):
    return stub.ListCustomers(
        pb.ListCustomersRequest(filter=filter, order_by=order_by, page_size=page_size, show_deleted=show_deleted),
        metadata=md(roles),
    ).customers


def outbox(svc, subject: str) -> list[tuple[str, bytes]]:
    with svc.ctx.engine.connect() as conn:
        return [
            (r.routing_key, bytes(r.payload))
            for r in conn.execute(
                sa.text("SELECT routing_key, payload FROM outbox WHERE subject = :s ORDER BY id"), {"s": subject}
            )
        ]


# -- the record --------------------------------------------------------------------------------


def test_a_full_person_record_is_normalised_and_round_trips(stub):
    c = create(
        stub,
        title_prefix="Dr.",
        given_name="مریم",
        family_name="احمدی",
        gender=customer_pb2.GENDER_FEMALE,
        mobile="۰۹۱۲ ۱۲۳ ۴۵۶۷",
        phone="021-88776655",
        fax="+98 21 8877 6656",
        email="m.ahmadi@example.ir",
        website="https://example.ir",
        province="تهران",
        city="تهران",
        address="خیابان ولیعصر، پلاک ۱۲",
        postal_code="۱۲۳۴۵۶۷۸۹۰",
        national_id="۰۴۹۹۳۷۰۸۹۹",
        birth_certificate_number="1234",
        birth_date=D(1990, 5, 17),
        marriage_date=D(2015, 9, 1),
        field_of_study="Computer engineering",
        education_degree=customer_pb2.EDUCATION_DEGREE_MASTER,
        kind=customer_pb2.CUSTOMER_KIND_END_CONSUMER,
        acquisition_source="social_telegram",
        acquisition_date=D(2026, 1, 10),
        referrer_staff="reza",
        tags=["VIP", "vip", "early adopter"],
    )
    assert re.fullmatch(r"C-\d{6}", c.customer_code)
    assert (c.mobile, c.phone, c.fax) == ("+989121234567", "+982188776655", "+982188776656")
    assert (c.national_id, c.postal_code) == (VALID_NID, "1234567890")
    assert c.display_name == "Dr. مریم احمدی" and c.address == "خیابان ولیعصر، پلاک ۱۲"  # stored as given
    assert c.birth_date == D(1990, 5, 17) and c.lifecycle_stage == customer_pb2.LIFECYCLE_STAGE_PROSPECT
    assert c.owner == "tester" and list(c.tags) == ["vip", "early adopter"] and c.country == "IR"
    again = stub.GetCustomer(pb.GetCustomerRequest(name=c.name), metadata=md())
    assert again == c
    other = create(stub, given_name="Next")
    assert int(other.customer_code[2:]) > int(c.customer_code[2:])


def test_an_organisation_keeps_its_contact_persons(stub):
    org = create(
        stub,
        type=ORG,
        organization_name="شرکت پارس",
        industry="Food",
        po_box="14155-1234",
        founding_date=D(1998, 3, 21),
        kind=customer_pb2.CUSTOMER_KIND_INTERMEDIARY,
        contact_persons=[
            customer_pb2.ContactPerson(
                given_name="Ali",
                family_name="Karimi",
                role="purchasing manager",
                org_unit="procurement",
                mobile="09121112233",
                email="ali@pars.ir",
            )
        ],
    )
    assert org.display_name == "شرکت پارس" and org.founding_date == D(1998, 3, 21)
    (cp,) = org.contact_persons
    assert cp.contact_id and cp.mobile == "+989121112233" and cp.role == "purchasing manager"


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"national_id": "0499370898"}, "customer.national_id"),
        ({"national_id": "1111111111"}, "customer.national_id"),
        ({"birth_date": D(2999, 1, 1)}, "customer.birth_date"),
        ({"birth_date": D(2026, 2, 30)}, "customer.birth_date"),
        ({"mobile": "12"}, "customer.mobile"),
        ({"phone": "not a phone"}, "customer.phone"),
        ({"email": "a@@b.ir"}, "customer.email"),
        ({"website": "not a site"}, "customer.website"),
        ({"postal_code": "123"}, "customer.postal_code"),
        ({"country": "Iran"}, "customer.country"),
        ({"acquisition_source": "carrier_pigeon"}, "customer.acquisition_source"),
        ({"gender": 9}, "customer.gender"),
        ({"groups": ["groups/nope"]}, "customer.groups[0]"),
        ({"groups": ["groups/00000000-0000-4000-8000-000000000000"]}, "customer.groups"),
        ({"rank": "ranks/00000000-0000-4000-8000-000000000000"}, "customer.rank"),
        ({"contact_persons": [customer_pb2.ContactPerson(given_name="X")]}, "customer.contact_persons"),
        (
            {"custom_fields": {"no_such_field": customer_pb2.CustomFieldValue(text_value="x")}},
            "customer.custom_fields.no_such_field",
        ),
    ],
)
def test_each_validation_error_names_its_field(stub, fields, bad):
    e = err(lambda: create(stub, **fields))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
    assert bad in fields_of(e), e


def test_national_id_of_another_country_is_not_checked_as_iranian(stub):
    c = create(stub, country="DE", national_id="12345", phone="030 1234567")
    assert c.national_id == "12345" and c.phone == "+49301234567"


def test_custom_fields_are_typed(stub):
    for d in (
        resources_pb2.CustomFieldDefinition(key="shoe_size", type=resources_pb2.CUSTOM_FIELD_TYPE_NUMBER),
        resources_pb2.CustomFieldDefinition(key="contract_end", type=resources_pb2.CUSTOM_FIELD_TYPE_DATE),
        resources_pb2.CustomFieldDefinition(
            key="colour", type=resources_pb2.CUSTOM_FIELD_TYPE_CHOICE, choices=["red", "blue"]
        ),
    ):
        stub.CreateCustomFieldDefinition(
            pb.CreateCustomFieldDefinitionRequest(custom_field_definition=d), metadata=md()
        )
    cf = customer_pb2.CustomFieldValue
    c = create(
        stub,
        custom_fields={
            "shoe_size": cf(number_value=43),
            "contract_end": cf(date_value=D(2027, 1, 1)),
            "colour": cf(choice_value="red"),
        },
    )
    assert c.custom_fields["shoe_size"].number_value == 43
    assert c.custom_fields["contract_end"].date_value == D(2027, 1, 1)
    assert c.custom_fields["colour"].choice_value == "red"
    e = err(lambda: create(stub, custom_fields={"shoe_size": cf(text_value="big"), "colour": cf(choice_value="green")}))
    assert {"customer.custom_fields.shoe_size", "customer.custom_fields.colour"} <= fields_of(e)
    assert [x.name for x in listed(stub, "custom.shoe_size >= 40")] == [c.name]
    e = err(
        lambda: stub.CreateCustomFieldDefinition(
            pb.CreateCustomFieldDefinitionRequest(
                custom_field_definition=resources_pb2.CustomFieldDefinition(
                    key="x", type=resources_pb2.CUSTOM_FIELD_TYPE_TEXT
                )
            ),
            metadata=md("sales_manager"),
        )
    )
    assert e.code == grpc.StatusCode.PERMISSION_DENIED


# -- update, delete, undelete ------------------------------------------------------------------


def test_update_with_mask_and_etag(svc, stub):
    c = create(stub, given_name="Old", city="Shiraz", email="old@example.com")
    u = update(
        stub,
        customer_pb2.Customer(name=c.name, etag=c.etag, given_name="New", city="Tabriz", email="ignored@x.ir"),
        ["given_name", "city"],
    )
    assert (u.given_name, u.city, u.email) == ("New", "Tabriz", "old@example.com")
    assert u.etag != c.etag and u.display_name == "New Test"
    e = err(lambda: update(stub, customer_pb2.Customer(name=c.name, etag=c.etag, city="Yazd"), ["city"]))
    assert e.code == grpc.StatusCode.ABORTED and e.metadata["current_etag"] == u.etag
    e = err(lambda: update(stub, customer_pb2.Customer(name=c.name, type=ORG), ["type"]))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and fields_of(e) == {"update_mask"}
    e = err(lambda: update(stub, customer_pb2.Customer(name=c.name), ["colour_of_eyes"]))
    assert fields_of(e) == {"update_mask"}
    e = err(
        lambda: update(
            stub, customer_pb2.Customer(name=c.name, given_name="", family_name=""), ["given_name", "family_name"]
        )
    )
    assert fields_of(e) == {"customer.family_name"}
    same = update(stub, customer_pb2.Customer(name=c.name, city="Tabriz"), ["city"])
    assert same.etag == u.etag  # nothing changed, nothing written
    events = outbox(svc, c.name)
    assert [k for k, _ in events] == ["customer.created.v1", "customer.updated.v1"]
    upd = customer_events_pb2.CustomerUpdated.FromString(events[1][1])
    assert set(upd.changed_fields) == {"given_name", "city"} and upd.customer.city == "Tabriz"


def test_soft_delete_hides_and_undelete_restores(svc, stub):
    c = create(stub, given_name="Deleted", city="DeleteTown")
    e = err(lambda: stub.DeleteCustomer(pb.DeleteCustomerRequest(name=c.name, etag='"999"'), metadata=md()))
    assert e.code == grpc.StatusCode.ABORTED
    e = err(lambda: stub.DeleteCustomer(pb.DeleteCustomerRequest(name=c.name), metadata=md("sales_rep")))
    assert e.code == grpc.StatusCode.PERMISSION_DENIED
    d = stub.DeleteCustomer(pb.DeleteCustomerRequest(name=c.name, etag=c.etag), metadata=md("sales_manager"))
    assert d.HasField("delete_time")
    assert listed(stub, 'city = "DeleteTown"') == []
    assert [x.name for x in listed(stub, 'city = "DeleteTown"', show_deleted=True)] == [c.name]
    r = stub.UndeleteCustomer(pb.UndeleteCustomerRequest(name=c.name), metadata=md())
    assert not r.HasField("delete_time")
    assert [x.name for x in listed(stub, 'city = "DeleteTown"')] == [c.name]
    assert [k for k, _ in outbox(svc, c.name)][-2:] == ["customer.deleted.v1", "customer.undeleted.v1"]


# -- filters and order -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def town(stub):
    """Six customers in a town of their own, with known values for every filter."""
    g = stub.CreateGroup(pb.CreateGroupRequest(group=resources_pb2.Group(display_name="Filter VIPs")), metadata=md())
    gold = stub.CreateRank(
        pb.CreateRankRequest(rank=resources_pb2.Rank(display_name="Filter Gold", position=30)), metadata=md()
    )
    silver = stub.CreateRank(
        pb.CreateRankRequest(rank=resources_pb2.Rank(display_name="Filter Silver", position=20)), metadata=md()
    )
    k = customer_pb2
    rows = [
        dict(
            given_name="A",
            kind=k.CUSTOMER_KIND_END_CONSUMER,
            acquisition_source="website",
            groups=[g.name],
            rank=gold.name,
        ),
        dict(given_name="B", kind=k.CUSTOMER_KIND_INTERMEDIARY, acquisition_source="website", rank=silver.name),
        dict(given_name="C", kind=k.CUSTOMER_KIND_INTERMEDIARY, acquisition_source="referral", groups=[g.name]),
        dict(given_name="D", kind=k.CUSTOMER_KIND_INTERNAL, acquisition_source="exhibition"),
        dict(type=ORG, organization_name="E Co", acquisition_source="referral", rank=gold.name),
        dict(type=ORG, organization_name="F Co", acquisition_source="phone", lifecycle_stage=k.LIFECYCLE_STAGE_ACTIVE),
    ]
    made = [create(stub, city="Filterabad", **r) for r in rows]
    return {"group": g, "gold": gold, "silver": silver, "made": made}


def names(stub, f, order_by=""):
    by_name = {}
    for c in listed(stub, f'city = "Filterabad" AND ({f})' if f else 'city = "Filterabad"', order_by):
        by_name[c.name] = c.display_name.split()[0]
    return sorted(by_name.values())


@pytest.mark.parametrize(
    ("f", "expected"),
    [
        ('source = "website"', ["A", "B"]),
        ('acquisition_source != "website"', ["C", "D", "E", "F"]),
        ("kind = INTERMEDIARY", ["B", "C"]),
        ("kind = CUSTOMER_KIND_INTERNAL OR type = ORGANIZATION", ["D", "E", "F"]),
        ('(source = "referral" OR source = "phone") AND type = ORGANIZATION', ["E", "F"]),
        ('source = "referral" OR source = "phone" AND type = ORGANIZATION', ["C", "E", "F"]),
        ("NOT type = PERSON", ["E", "F"]),
        ('group = "Filter VIPs"', ["A", "C"]),
        ('group != "Filter VIPs"', ["B", "D", "E", "F"]),
        ('rank = "Filter Gold"', ["A", "E"]),
        ('rank >= "Filter Silver"', ["A", "B", "E"]),
        ('rank > "Filter Silver"', ["A", "E"]),
        ('rank < "Filter Gold"', ["B"]),
        ('rank <= "Filter Gold"', ["A", "B", "E"]),
        ("lifecycle_stage = ACTIVE", ["F"]),
        ('display_name = "E*"', ["E"]),
        ('create_time > "2000-01-01T00:00:00Z"', ["A", "B", "C", "D", "E", "F"]),
        ('create_time < "2000-01-01"', []),
    ],
)
def test_each_filter_operator(stub, town, f, expected):
    assert names(stub, f) == expected


def test_filter_on_group_by_resource_name_and_order_by(stub, town):
    g = town["group"].name
    assert names(stub, f'groups:"{g}"') == ["A", "C"]
    ordered = listed(stub, 'city = "Filterabad"', order_by="display_name desc")
    assert [c.display_name for c in ordered] == ["F Co", "E Co", "D Test", "C Test", "B Test", "A Test"]


@pytest.mark.parametrize(
    "bad", ['cty = "x"', "city = ", '(city = "x"', "kind = WIZARD", 'create_time > "yesterday"', "city ~ x"]
)
def test_a_bad_filter_is_invalid_argument_on_filter(stub, bad):
    e = err(lambda: listed(stub, bad))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and fields_of(e) == {"filter"}


def test_a_bad_order_by_is_invalid_argument_on_order_by(stub):
    e = err(lambda: listed(stub, "", order_by="national_id"))
    assert fields_of(e) == {"order_by"}


def test_filtered_pages_neither_skip_nor_repeat(stub, town):
    seen, token = [], ""
    while True:
        page = stub.ListCustomers(
            pb.ListCustomersRequest(
                filter='city = "Filterabad"', order_by="display_name", page_size=4, page_token=token
            ),
            metadata=md(),
        )
        seen += [c.display_name for c in page.customers]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(seen) and len(seen) == 6
    e = err(
        lambda: stub.ListCustomers(
            pb.ListCustomersRequest(
                filter='city = "Elsewhere"', order_by="display_name", page_size=4, page_token=page_token_for(stub)
            ),
            metadata=md(),
        )
    )
    assert fields_of(e) == {"page_token"}  # a token belongs to its own filter


def page_token_for(stub):
    return stub.ListCustomers(
        pb.ListCustomersRequest(filter='city = "Filterabad"', order_by="display_name", page_size=1), metadata=md()
    ).next_page_token


# -- search ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def persians(stub):
    return {
        "karimi": create(stub, given_name="علی", family_name="کریمی‌زاده", city="کرمان", mobile="09131234567"),
        "rezaei": create(stub, given_name="Hossein", family_name="Rezaei", city="Mashhad"),
        "yas": create(stub, type=ORG, organization_name="شرکت ياس", city="قم"),  # written with Arabic yeh
        "nima": create(stub, given_name="Nima", family_name="Tavakkoli", city="Sari"),
        "sara": create(stub, given_name="سارا", family_name="محمدی", city="Sari"),
    }


def search(stub, q, roles="admin"):
    return [
        r.customer.name for r in stub.SearchCustomers(pb.SearchCustomersRequest(query=q), metadata=md(roles)).results
    ]


@pytest.mark.parametrize(
    ("query", "who"),
    [
        ("علي كريمي زاده", "karimi"),  # Arabic yeh and kaf, a space for the ZWNJ
        ("کریمی‌زاده", "karimi"),  # as stored
        ("كريمي", "karimi"),
        ("کری", "karimi"),  # a prefix
        ("۰۹۱۳۱۲۳۴۵۶۷", "karimi"),  # Persian digits
        ("+989131234567", "karimi"),
        ("09131234567", "karimi"),
        ("یاس", "yas"),  # stored with Arabic yeh, typed with Persian
        ("rezaei", "rezaei"),
        ("Rezaie", "rezaei"),  # a typo: fuzzy
        ("Nmia Tavakkoli", "nima"),  # two letters swapped in a short word
        ("Nima Tavakolli", "nima"),  # ... and in a long one
        ("ساار محمدی", "sara"),  # in Persian
        ("علی کریمیزاده", "karimi"),  # a compound name typed as one word
        ("علی کریمیازده", "karimi"),  # ... with two letters swapped
        ("mashhad", "rezaei"),
    ],
)
def test_search_finds_however_it_is_typed(stub, persians, query, who):
    assert persians[who].name in search(stub, query)


def test_search_ranks_the_better_match_first_and_rejects_empty(stub, persians):
    create(stub, given_name="Rezaei-Nejad", family_name="Other")
    hits = search(stub, "Hossein Rezaei")
    assert hits[0] == persians["rezaei"].name
    e = err(lambda: search(stub, "   "))
    assert fields_of(e) == {"query"}


# -- notes -------------------------------------------------------------------------------------


def test_notes_add_list_edit_own_and_survive_owner_change(svc, stub):
    c = create(stub, given_name="Noted")
    n1 = stub.CreateNote(
        pb.CreateNoteRequest(parent=c.name, note=resources_pb2.Note(text="Prefers calls after 4pm")),
        metadata=md("sales_rep", "sara"),
    )
    n2 = stub.CreateNote(
        pb.CreateNoteRequest(parent=c.name, note=resources_pb2.Note(text="دوست دارد با ایمیل مکاتبه شود")),
        metadata=md("support_agent", "omid"),
    )
    assert n1.author == "sara" and n1.name.startswith(c.name + "/notes/")
    listed_notes = stub.ListNotes(pb.ListNotesRequest(parent=c.name), metadata=md("analyst")).notes
    assert [n.name for n in listed_notes] == [n2.name, n1.name]
    edited = stub.UpdateNote(
        pb.UpdateNoteRequest(
            note=resources_pb2.Note(name=n1.name, text="Calls after 5pm", etag=n1.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["text"]),
        ),
        metadata=md("sales_rep", "sara"),
    )
    assert edited.text == "Calls after 5pm"
    e = err(
        lambda: stub.UpdateNote(
            pb.UpdateNoteRequest(
                note=resources_pb2.Note(name=n1.name, text="mine now"),
                update_mask=field_mask_pb2.FieldMask(paths=["text"]),
            ),
            metadata=md("sales_manager", "boss"),
        )
    )
    assert e.code == grpc.StatusCode.PERMISSION_DENIED
    e = err(
        lambda: stub.CreateNote(pb.CreateNoteRequest(parent=c.name, note=resources_pb2.Note(text=" ")), metadata=md())
    )
    assert fields_of(e) == {"note.text"}
    update(stub, customer_pb2.Customer(name=c.name, owner="someone-else"), ["owner"])
    assert len(stub.ListNotes(pb.ListNotesRequest(parent=c.name), metadata=md()).notes) == 2
    assert "note.added.v1" in [k for k, _ in outbox(svc, c.name)]


# -- groups and ranks --------------------------------------------------------------------------


def test_groups_bulk_membership(svc, stub):
    g = stub.CreateGroup(
        pb.CreateGroupRequest(group=resources_pb2.Group(display_name="Wholesalers")), metadata=md("marketer")
    )
    e = err(
        lambda: stub.CreateGroup(
            pb.CreateGroupRequest(group=resources_pb2.Group(display_name="wholesalers")), metadata=md()
        )
    )
    assert e.code == grpc.StatusCode.ALREADY_EXISTS
    members = [create(stub, given_name=f"M{i}") for i in range(5)]
    added = stub.AddGroupMembers(
        pb.AddGroupMembersRequest(group=g.name, customers=[m.name for m in members] * 2), metadata=md()
    )
    assert added.added == 5
    again = stub.AddGroupMembers(pb.AddGroupMembersRequest(group=g.name, customers=[members[0].name]), metadata=md())
    assert again.added == 0
    page = stub.ListGroupMembers(pb.ListGroupMembersRequest(group=g.name), metadata=md())
    assert {c.name for c in page.customers} == {m.name for m in members}
    assert all(g.name in c.groups for c in page.customers)
    removed = stub.RemoveGroupMembers(
        pb.RemoveGroupMembersRequest(group=g.name, customers=[members[0].name]), metadata=md()
    )
    assert removed.removed == 1
    renamed = stub.UpdateGroup(
        pb.UpdateGroupRequest(
            group=resources_pb2.Group(name=g.name, display_name="Wholesale partners"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=md(),
    )
    assert renamed.display_name == "Wholesale partners" and renamed.member_count == 4
    assert any(x.name == g.name for x in stub.ListGroups(pb.ListGroupsRequest(page_size=1000), metadata=md()).groups)
    assert stub.DeleteGroup(pb.DeleteGroupRequest(name=g.name), metadata=md()).removed_members == 4
    assert stub.GetCustomer(pb.GetCustomerRequest(name=members[1].name), metadata=md()).groups == []
    e = err(
        lambda: stub.AddGroupMembers(
            pb.AddGroupMembersRequest(group=g.name, customers=[members[1].name]), metadata=md()
        )
    )
    assert e.code == grpc.StatusCode.NOT_FOUND
    e = err(
        lambda: stub.CreateGroup(
            pb.CreateGroupRequest(group=resources_pb2.Group(display_name="x")), metadata=md("sales_rep")
        )
    )
    assert e.code == grpc.StatusCode.PERMISSION_DENIED
    kinds = [k for k, _ in outbox(svc, members[1].name)]
    assert kinds.count("customer.updated.v1") == 2  # added, then the group was deleted


def test_ranks_assign_in_bulk_and_delete(stub):
    r = stub.CreateRank(
        pb.CreateRankRequest(rank=resources_pb2.Rank(display_name="Platinum", position=99)), metadata=md()
    )
    cs = [create(stub, given_name=f"R{i}") for i in range(3)]
    assert (
        stub.AssignRank(pb.AssignRankRequest(rank=r.name, customers=[c.name for c in cs]), metadata=md()).updated == 3
    )
    assert stub.GetCustomer(pb.GetCustomerRequest(name=cs[0].name), metadata=md()).rank == r.name
    assert [x.name for x in stub.ListRanks(pb.ListRanksRequest(), metadata=md()).ranks][-1] == r.name
    assert stub.AssignRank(pb.AssignRankRequest(rank="", customers=[cs[0].name]), metadata=md()).updated == 1
    assert stub.DeleteRank(pb.DeleteRankRequest(name=r.name), metadata=md()).cleared_customers == 2
    assert stub.GetCustomer(pb.GetCustomerRequest(name=cs[1].name), metadata=md()).rank == ""


# -- managed sources ---------------------------------------------------------------------------


def test_retired_source_stays_on_old_customers_but_not_new(stub):
    s = stub.CreateAcquisitionSource(
        pb.CreateAcquisitionSourceRequest(
            acquisition_source=resources_pb2.AcquisitionSource(key="radio_ad", display_name="Radio")
        ),
        metadata=md(),
    )
    old = create(stub, acquisition_source="radio_ad")
    stub.UpdateAcquisitionSource(
        pb.UpdateAcquisitionSourceRequest(
            acquisition_source=resources_pb2.AcquisitionSource(name=s.name, retired=True),
            update_mask=field_mask_pb2.FieldMask(paths=["retired"]),
        ),
        metadata=md(),
    )
    e = err(lambda: create(stub, acquisition_source="radio_ad"))
    assert fields_of(e) == {"customer.acquisition_source"}
    update(stub, customer_pb2.Customer(name=old.name, city="Rasht"), ["city"])  # still valid on the old one
    keys = [
        x.key
        for x in stub.ListAcquisitionSources(pb.ListAcquisitionSourcesRequest(), metadata=md()).acquisition_sources
    ]
    assert "website" in keys and "radio_ad" not in keys
    assert "campaign" in keys  # seeded (migration 0010): sales-svc's campaign leads convert with it


# -- masking, audit, erasure -------------------------------------------------------------------


def test_pii_is_masked_for_roles_without_pii_rights(stub):
    c = create(stub, national_id=VALID_NID, birth_certificate_number="556677", birth_date=D(1985, 1, 2))
    rep = stub.GetCustomer(pb.GetCustomerRequest(name=c.name), metadata=md("sales_rep"))
    assert rep.national_id == "********99" and rep.birth_certificate_number == "****77"
    assert not rep.HasField("birth_date")
    mgr = stub.GetCustomer(pb.GetCustomerRequest(name=c.name), metadata=md("sales_manager"))
    assert mgr.national_id == VALID_NID and mgr.birth_date == D(1985, 1, 2)
    listed_rep = [x for x in listed(stub, f'customer_code = "{c.customer_code}"', roles="analyst")]
    assert listed_rep[0].national_id == "********99"


def test_every_change_is_audited_and_only_admins_read_it(stub):
    c = create(stub, given_name="Audited", city="Ahvaz", sub="creator")
    update(stub, customer_pb2.Customer(name=c.name, city="Abadan"), ["city"], sub="editor")
    entries = stub.ListAuditEntries(pb.ListAuditEntriesRequest(resource=c.name), metadata=md()).audit_entries
    assert [(e.action, e.actor) for e in entries] == [("update", "editor"), ("create", "creator")]
    (change,) = entries[0].changes
    assert (change.field, change.old_value, change.new_value) == ("city", '"Ahvaz"', '"Abadan"')
    assert entries[0].request_id
    e = err(lambda: stub.ListAuditEntries(pb.ListAuditEntriesRequest(resource=c.name), metadata=md("sales_manager")))
    assert e.code == grpc.StatusCode.PERMISSION_DENIED


def test_erase_forgets_the_person_but_keeps_the_aggregates(svc, stub):
    c = create(
        stub,
        given_name="Forget",
        family_name="Me",
        email="forget@me.ir",
        mobile="09120000001",
        national_id=VALID_NID,
        city="Karaj",
        acquisition_source="website",
        birth_date=D(1980, 1, 1),
    )
    stub.CreateNote(pb.CreateNoteRequest(parent=c.name, note=resources_pb2.Note(text="private")), metadata=md())
    e = err(lambda: stub.EraseCustomer(pb.EraseCustomerRequest(name=c.name), metadata=md("sales_manager")))
    assert e.code == grpc.StatusCode.PERMISSION_DENIED
    gone = stub.EraseCustomer(pb.EraseCustomerRequest(name=c.name, reason="GDPR request 42"), metadata=md())
    assert gone.erased and gone.given_name == "" and gone.email == "" and gone.national_id == ""
    assert not gone.HasField("birth_date") and gone.display_name == "[erased]"
    assert (gone.city, gone.acquisition_source, gone.type) == ("Karaj", "website", PERSON)
    assert search(stub, "forget@me.ir") == []
    assert stub.ListNotes(pb.ListNotesRequest(parent=c.name), metadata=md()).notes == []
    entries = stub.ListAuditEntries(pb.ListAuditEntriesRequest(resource=c.name), metadata=md()).audit_entries
    assert entries[0].action == "erase"
    assert "forget" not in str([e.changes for e in entries[1:]]).lower()
    routing_key, payload = outbox(svc, c.name)[-1]
    assert routing_key == "customer.erased.v1"
    assert customer_events_pb2.CustomerErased.FromString(payload).customer.email == ""
    e = err(lambda: update(stub, customer_pb2.Customer(name=c.name, city="X"), ["city"]))
    assert e.code == grpc.StatusCode.NOT_FOUND


def test_today_is_not_the_future(stub):
    today = dt.date.today()
    c = create(stub, acquisition_date=D(today.year, today.month, today.day))
    assert c.acquisition_date.year == today.year


# -- exports -----------------------------------------------------------------------------------


def export_file(stub, roles="admin", **req):
    chunks = list(stub.ExportCustomers(pb.ExportCustomersRequest(**req), metadata=md(roles)))
    head, body = chunks[0], b"".join(c.data for c in chunks[1:])
    return head, body


def test_export_a_filtered_list_to_every_format_and_read_it_back(stub, town, persians):
    import csv
    import io

    import docx
    import openpyxl
    import pypdf

    head, body = export_file(stub, format=pb.EXPORT_FORMAT_CSV, filter='city = "Filterabad"', order_by="display_name")
    assert head.content_type.startswith("text/csv") and head.filename.endswith(".csv") and head.row_count == 6
    rows = list(csv.DictReader(io.StringIO(body.decode("utf-8-sig"))))
    assert [r["Name"] for r in rows] == ["A Test", "B Test", "C Test", "D Test", "E Co", "F Co"]
    assert rows[0]["Source"] == "website" and rows[0]["City"] == "Filterabad"

    head, body = export_file(
        stub,
        format=pb.EXPORT_FORMAT_XLSX,
        filter='city = "Filterabad"',
        order_by="display_name",
        language_code="fa",
        fields=["customer_code", "display_name", "create_time"],
    )
    ws = openpyxl.load_workbook(io.BytesIO(body)).active
    values = list(ws.values)
    assert values[0] == ("کد مشتری", "نام", "تاریخ ایجاد (UTC)")
    assert [v[1] for v in values[1:]] == ["A Test", "B Test", "C Test", "D Test", "E Co", "F Co"]
    assert isinstance(values[1][2], dt.datetime)

    head, body = export_file(stub, format=pb.EXPORT_FORMAT_DOCX, query="کریمی")
    table = docx.Document(io.BytesIO(body)).tables[0]
    assert any("کریمی‌زاده" in cell.text for cell in table.column_cells(1))

    head, body = export_file(stub, format=pb.EXPORT_FORMAT_PDF, filter='city = "Filterabad"', title="مشتریان")
    pdf = pypdf.PdfReader(io.BytesIO(body))
    assert head.row_count == 6 and len(pdf.pages) >= 1 and "Filterabad" in pdf.pages[0].extract_text()


def test_export_masks_pii_and_checks_its_input(stub):
    c = create(stub, national_id=VALID_NID, city="Maskville")
    _, body = export_file(
        stub,
        roles="analyst",
        format=pb.EXPORT_FORMAT_CSV,
        filter='city = "Maskville"',
        fields=["display_name", "national_id"],
    )
    assert "********99" in body.decode("utf-8-sig") and VALID_NID not in body.decode("utf-8-sig")
    assert c.name
    e = err(lambda: export_file(stub, format=pb.EXPORT_FORMAT_UNSPECIFIED))
    assert fields_of(e) == {"format"}
    e = err(lambda: export_file(stub, format=pb.EXPORT_FORMAT_CSV, fields=["password"]))
    assert fields_of(e) == {"fields"}
    e = err(lambda: export_file(stub, format=pb.EXPORT_FORMAT_CSV, filter="nonsense ="))
    assert fields_of(e) == {"filter"}
    e = err(lambda: export_file(stub, roles="sales_rep", format=pb.EXPORT_FORMAT_CSV))
    assert e.code == grpc.StatusCode.PERMISSION_DENIED


def test_customer_codes_grow_past_a_million(svc, stub):
    with svc.ctx.engine.begin() as conn:
        conn.execute(sa.text("SELECT setval('customer_code_seq', 999998)"))
    codes = [create(stub, given_name=f"Million{i}").customer_code for i in range(3)]
    assert codes == ["C-999999", "C-1000000", "C-1000001"]
    with svc.ctx.engine.begin() as conn:  # the column default agrees with the service
        code = conn.execute(
            sa.text("INSERT INTO customers (type, display_name) VALUES (1, 'x') RETURNING customer_code")
        ).scalar()
    assert code == "C-1000002"


def test_masked_fields_cannot_be_read_back_through_filters_order_or_search(stub):
    c = create(stub, national_id=VALID_NID, birth_date=D(1975, 6, 1), city="Probeville")
    for role, f in (("sales_rep", 'birth_date < "1980-01-01"'), ("analyst", f'national_id = "{VALID_NID}"')):
        e = err(lambda r=role, q=f: listed(stub, q, roles=r))
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT and fields_of(e) == {"filter"}
    e = err(lambda: listed(stub, 'city = "Probeville"', order_by="birth_date", roles="sales_rep"))
    assert fields_of(e) == {"order_by"}
    assert search(stub, VALID_NID, roles="sales_rep") == []
    assert search(stub, VALID_NID, roles="admin") == []  # search keys hold no national id at all
    # With PII rights, filters and order on them work.
    assert [
        x.name for x in listed(stub, f'national_id = "{VALID_NID}" AND city = "Probeville"', roles="sales_manager")
    ] == [c.name]
    assert [x.name for x in listed(stub, 'city = "Probeville"', order_by="birth_date", roles="support_manager")] == [
        c.name
    ]


def test_erase_redacts_the_audit_entries_of_the_customers_notes(svc, stub):
    c = create(stub, given_name="Noted", family_name="Person", email="noted@me.ir")
    note = stub.CreateNote(
        pb.CreateNoteRequest(parent=c.name, note=resources_pb2.Note(text="lives at 12 Secret St")), metadata=md()
    )
    stub.UpdateNote(
        pb.UpdateNoteRequest(
            note=resources_pb2.Note(name=note.name, text="moved to 14 Hidden Ln"),
            update_mask=field_mask_pb2.FieldMask(paths=["text"]),
        ),
        metadata=md(),
    )
    stub.EraseCustomer(pb.EraseCustomerRequest(name=c.name, reason="asked"), metadata=md())
    entries = stub.ListAuditEntries(pb.ListAuditEntriesRequest(resource=c.name), metadata=md()).audit_entries
    assert {e.resource for e in entries} == {c.name, note.name}
    kept = str([(e.changes) for e in entries if e.action != "erase"])
    assert "Secret" not in kept and "Hidden" not in kept and "noted@me.ir" not in kept


def test_a_source_update_audits_what_it_was_and_a_missing_source_is_not_found(stub):
    s = stub.CreateAcquisitionSource(
        pb.CreateAcquisitionSourceRequest(
            acquisition_source=resources_pb2.AcquisitionSource(key="tv_ad", display_name="TV")
        ),
        metadata=md(),
    )
    stub.UpdateAcquisitionSource(
        pb.UpdateAcquisitionSourceRequest(
            acquisition_source=resources_pb2.AcquisitionSource(name=s.name, display_name="Television"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=md(),
    )
    [entry] = [
        e
        for e in stub.ListAuditEntries(pb.ListAuditEntriesRequest(resource=s.name), metadata=md()).audit_entries
        if e.action == "source.update"
    ]
    assert [(c.field, c.old_value, c.new_value) for c in entry.changes] == [("display_name", '"TV"', '"Television"')]
    e = err(
        lambda: stub.UpdateAcquisitionSource(
            pb.UpdateAcquisitionSourceRequest(
                acquisition_source=resources_pb2.AcquisitionSource(name="acquisitionSources/nowhere", retired=True),
                update_mask=field_mask_pb2.FieldMask(paths=["retired"]),
            ),
            metadata=md(),
        )
    )
    assert e.code == grpc.StatusCode.NOT_FOUND and e.reason == "SOURCE_NOT_FOUND"
