"""Resource names, etags, update masks and the declarative Update (against real PostgreSQL)."""

from __future__ import annotations

import uuid

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2
from sqlalchemy.dialects import postgresql as pg

from crm.customer.v1 import resources_pb2
from crm_chassis.db import create_engine
from crm_chassis.errors import Aborted, AlreadyExists, InvalidArgument, NotFound, PermissionDenied
from crm_chassis.resources import (
    FieldChange,
    ResourceName,
    Updatable,
    UpdateMask,
    changes,
    check_etag,
    etag,
    required_text,
    text,
)

CID = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
NID = "9b2e7f04-1c1d-4d6b-8e44-9d4f1e8a7c55"
CUSTOMER = ResourceName("customers/{id}")
NOTE = ResourceName("customers/{customer_id}/notes/{note_id}")
SOURCE = ResourceName("acquisitionSources/{key}", key=r"[a-z0-9_-]{1,40}")


def violation(exc: InvalidArgument) -> tuple[str, str]:
    assert len(exc.violations) == 1, exc.violations
    return exc.violations[0].field, exc.violations[0].description


# -- names --------------------------------------------------------------------------------------


def test_parse_and_format_names():
    assert CUSTOMER.parse(f"customers/{CID}").id == CID
    customer_id, note_id = NOTE.parse(f"customers/{CID}/notes/{NID}", "note.name")
    assert (customer_id, note_id) == (CID, NID)
    ids = NOTE.parse(f"customers/{CID}/notes/{NID}")
    assert ids.customer_id == CID and ids.note_id == NID and ids.id == NID
    assert NOTE.format(CID, NID) == f"customers/{CID}/notes/{NID}"
    assert NOTE.format(customer_id=CID, note_id=NID) == f"customers/{CID}/notes/{NID}"
    assert SOURCE.parse("acquisitionSources/web-form").key == "web-form"
    assert NOTE.parent.pattern == "customers/{customer_id}" and CUSTOMER.parent is None
    assert NOTE.matches(f"customers/{CID}/notes/{NID}") and not NOTE.matches(f"customers/{CID}")


@pytest.mark.parametrize(
    "name",
    [
        "",
        "customers",
        f"customers/{CID}/",
        f"customer/{CID}",
        f"customers/{CID.upper()}",  # ids are canonical lower-case UUIDs
        "customers/123",
        f"customers/{CID}/notes/{NID}",
        f"groups/{CID}",
    ],
)
def test_a_bad_name_is_invalid_argument_naming_the_field(name):
    with pytest.raises(InvalidArgument) as e:
        CUSTOMER.parse(name, "customer.name")
    where, why = violation(e.value)
    assert where == "customer.name"
    assert "must be 'customers/{id}' with a UUID id" in why
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_nested_and_non_uuid_names_say_what_they_expect():
    with pytest.raises(InvalidArgument) as e:
        NOTE.parse(f"customers/{CID}/notes/x", "note.name")
    assert violation(e.value) == ("note.name", "must be 'customers/{customer_id}/notes/{note_id}' with UUID ids")
    with pytest.raises(InvalidArgument) as e:
        SOURCE.parse("acquisitionSources/Web Form")
    assert violation(e.value) == ("name", "must be 'acquisitionSources/{key}'")


def test_not_found_has_a_reason_and_the_name():
    e = NOTE.not_found(f"customers/{CID}/notes/{NID}")
    assert isinstance(e, NotFound) and e.code == grpc.StatusCode.NOT_FOUND
    assert e.reason == "NOTE_NOT_FOUND" and e.metadata == {"name": f"customers/{CID}/notes/{NID}"}
    assert e.message == f"note customers/{CID}/notes/{NID} does not exist"
    assert CUSTOMER.not_found([CID]).message == f"customer customers/{CID} does not exist"
    assert ResourceName("acquisitionSources/{key}", key="[a-z]+").reason == "ACQUISITION_SOURCE_NOT_FOUND"
    assert ResourceName("auditEntries/{id}", id="[0-9]+").not_found(["7"]).reason == "AUDIT_ENTRY_NOT_FOUND"
    assert ResourceName("importJobs/{id}").reason == "IMPORT_JOB_NOT_FOUND"
    # The status a client reads back carries the reason (ErrorInfo) in its details.
    status = e.to_status()
    assert status.code == grpc.StatusCode.NOT_FOUND.value[0] and len(status.details) == 1


def test_bad_patterns_are_refused_when_declared():
    for bad in ("customers", "customers/{id}/notes", "customers/id", "customers/{id}/notes/{id}", "/x/{id}"):
        with pytest.raises(ValueError):
            ResourceName(bad)
    with pytest.raises(ValueError):
        ResourceName("customers/{id}", key="[a-z]+")


# -- etags --------------------------------------------------------------------------------------


def test_etags():
    assert etag(3) == '"3"'
    check_etag("", 3, "groups/x")  # no etag: an unconditional write
    check_etag('"3"', 3, "groups/x")
    with pytest.raises(Aborted) as e:
        check_etag('"2"', 3, "groups/x")
    assert e.value.code == grpc.StatusCode.ABORTED and e.value.reason == "ETAG_MISMATCH"
    assert e.value.metadata == {"name": "groups/x", "current_etag": '"3"'}
    with pytest.raises(Aborted):
        check_etag("3", 3, "groups/x")  # an unquoted etag is not the current one


# -- update masks -------------------------------------------------------------------------------

MASK = UpdateMask(
    ["display_name", "description"], immutable={"type": "create a new customer instead", "create_time": ""}
)


def test_mask_paths_validate_and_expand():
    assert MASK.paths(field_mask_pb2.FieldMask(paths=["description"])) == ["description"]
    assert MASK.paths(["description", "display_name", "description"]) == ["description", "display_name"]
    assert MASK.paths(["*"]) == ["display_name", "description"]
    assert MASK.paths(field_mask_pb2.FieldMask(paths=["*"])) == ["display_name", "description"]


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (None, 'name at least one field, or "*" for all updatable fields'),
        (field_mask_pb2.FieldMask(), 'name at least one field, or "*" for all updatable fields'),
        (["*", "description"], '"*" stands alone: it already names every updatable field'),
        (["type"], "type cannot be changed: create a new customer instead"),
        (["create_time", "description"], "create_time cannot be changed"),
        (["etag", "colour"], "not updatable: etag, colour; updatable fields: display_name, description"),
    ],
)
def test_bad_masks_are_invalid_argument_on_update_mask(mask, message):
    with pytest.raises(InvalidArgument) as e:
        MASK.paths(mask)
    assert violation(e.value) == ("update_mask", message)


def test_apply_reads_masked_fields_and_reports_every_bad_value():
    g = resources_pb2.Group(display_name="  VIP  ", description=" d ", member_count=3)
    convert = {"display_name": required_text(5), "description": text()}
    assert MASK.apply(g, ["display_name"], prefix="group", convert=convert) == {"display_name": "VIP"}
    assert MASK.apply(g, ["description"], convert=convert) == {"description": "d"}
    assert MASK.apply(g, ["display_name", "member_count"]) == {"display_name": "  VIP  ", "member_count": 3}
    bad = resources_pb2.Group(display_name="   ", description="x")
    with pytest.raises(InvalidArgument) as e:
        MASK.apply(bad, ["display_name", "description"], prefix="group", convert={**convert, "description": text(0)})
    assert [(v.field, v.description) for v in e.value.violations] == [
        ("group.display_name", "must not be empty"),
        ("group.description", "must be at most 0 characters"),
    ]
    # Messages and repeated fields come out as plain values; an unset message is None.
    entry = resources_pb2.AuditEntry(changes=[resources_pb2.FieldChange(field="a", old_value="1", new_value="2")])
    plain = UpdateMask(["changes", "create_time"]).apply(entry, ["changes", "create_time"])
    assert plain == {"changes": [{"field": "a", "old_value": "1", "new_value": "2"}], "create_time": None}


def test_changes_lists_what_differs():
    assert changes({"a": 1, "b": "x"}, {"a": 1, "b": "y"}) == [FieldChange("b", "x", "y")]
    assert FieldChange("b", "x", "یک").as_audit() == {"field": "b", "old_value": '"x"', "new_value": '"یک"'}


# -- a declarative Update against PostgreSQL ----------------------------------------------------

meta = sa.MetaData()
groups = sa.Table(
    "groups",
    meta,
    sa.Column("id", pg.UUID(as_uuid=False), primary_key=True),
    sa.Column("display_name", sa.Text, nullable=False, unique=True),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
)
notes = sa.Table(
    "notes",
    meta,
    sa.Column("id", pg.UUID(as_uuid=False), primary_key=True),
    sa.Column("customer_id", pg.UUID(as_uuid=False), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("author", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

GROUPS = Updatable(
    groups,
    ResourceName("groups/{id}"),
    UpdateMask(["display_name", "description"]),
    message_field="group",
    convert={"display_name": required_text(100), "description": text()},
)
NOTES = Updatable(
    notes,
    NOTE,
    UpdateMask(["text"]),
    message_field="note",
    convert={"text": required_text(10_000)},
    key_columns=["customer_id", "id"],
    touch={"update_time": sa.func.clock_timestamp()},
)


@pytest.fixture(scope="module")
def engine(databases):
    eng = create_engine(databases.fresh("resources"), pool_size=4)
    meta.create_all(eng)
    yield eng
    eng.dispose()


def new_group(engine, name: str) -> str:
    gid = str(uuid.uuid4())
    with engine.begin() as conn:
        conn.execute(groups.insert().values(id=gid, display_name=name, description="old"))
    return gid


def test_update_writes_masked_fields_and_bumps_the_version(engine):
    gid = new_group(engine, f"Group {uuid.uuid4().hex[:6]}")
    with engine.begin() as conn:
        change = GROUPS.update(
            conn,
            resources_pb2.Group(name=f"groups/{gid}", display_name="ignored", description=" new ", etag='"1"'),
            field_mask_pb2.FieldMask(paths=["description"]),
        )
    assert change.name == f"groups/{gid}"
    assert change.row.description == "new" and change.row.version == 2
    assert change.row.display_name == change.old.display_name  # not in the mask: untouched
    assert change.changes == [FieldChange("description", "old", "new")]
    assert change.audit_changes() == [{"field": "description", "old_value": '"old"', "new_value": '"new"'}]
    with engine.begin() as conn:  # the same values again: nothing written, the etag stays
        again = GROUPS.update(conn, resources_pb2.Group(name=f"groups/{gid}", description="new"), ["description"])
    assert again.changes == [] and again.row.version == 2


def test_update_refuses_a_stale_etag_and_a_missing_resource(engine):
    gid = new_group(engine, f"Group {uuid.uuid4().hex[:6]}")
    with engine.begin() as conn:
        GROUPS.update(conn, resources_pb2.Group(name=f"groups/{gid}", description="v2"), ["description"])
    with pytest.raises(Aborted) as e, engine.begin() as conn:
        GROUPS.update(conn, resources_pb2.Group(name=f"groups/{gid}", description="v3", etag='"1"'), ["description"])
    assert e.value.metadata == {"name": f"groups/{gid}", "current_etag": '"2"'}
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound) as e, engine.begin() as conn:
        GROUPS.update(conn, resources_pb2.Group(name=f"groups/{missing}", description="x"), ["description"])
    assert e.value.reason == "GROUP_NOT_FOUND" and e.value.metadata == {"name": f"groups/{missing}"}
    with engine.connect() as conn:
        assert conn.execute(sa.select(groups.c.description).where(groups.c.id == gid)).scalar() == "v2"


def test_update_reports_bad_input_before_touching_the_row(engine):
    gid = new_group(engine, f"Group {uuid.uuid4().hex[:6]}")
    cases = [
        (resources_pb2.Group(name="groups/nope", display_name="x"), ["display_name"], "group.name"),
        (resources_pb2.Group(name=f"groups/{gid}", display_name="  "), ["display_name"], "group.display_name"),
        (resources_pb2.Group(name=f"groups/{gid}"), ["member_count"], "update_mask"),
        (resources_pb2.Group(name=f"groups/{gid}"), [], "update_mask"),
    ]
    for message, mask, where in cases:
        with pytest.raises(InvalidArgument) as e, engine.begin() as conn:
            GROUPS.update(conn, message, mask)
        assert violation(e.value)[0] == where


def test_update_breaking_a_unique_name_is_already_exists(engine):
    taken = f"Taken {uuid.uuid4().hex[:6]}"
    new_group(engine, taken)
    gid = new_group(engine, f"Group {uuid.uuid4().hex[:6]}")
    with pytest.raises(AlreadyExists) as e, engine.begin() as conn:
        GROUPS.update(conn, resources_pb2.Group(name=f"groups/{gid}", display_name=taken), ["display_name"])
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and e.value.metadata == {"name": f"groups/{gid}"}


def test_a_nested_resource_with_a_precondition(engine):
    nid = str(uuid.uuid4())
    with engine.begin() as conn:
        conn.execute(notes.insert().values(id=nid, customer_id=CID, text="first", author="alice"))
    name = f"customers/{CID}/notes/{nid}"

    def only_the_author(principal):
        def check(row):
            if row.author != principal:
                raise PermissionDenied("only the author may edit a note", reason="NOT_NOTE_AUTHOR")

        return check

    with pytest.raises(PermissionDenied), engine.begin() as conn:
        NOTES.update(conn, resources_pb2.Note(name=name, text="mine now"), ["text"], check=only_the_author("bob"))
    with engine.begin() as conn:
        change = NOTES.update(
            conn, resources_pb2.Note(name=name, text=" edited ", etag='"1"'), ["text"], check=only_the_author("alice")
        )
    assert change.row.text == "edited" and change.row.version == 2
    assert change.row.update_time > change.old.update_time  # `touch` applied
    # The customer id in the name is part of the key: the note under another customer is not found.
    other = f"customers/{uuid.uuid4()}/notes/{nid}"
    with pytest.raises(NotFound) as e, engine.begin() as conn:
        NOTES.update(conn, resources_pb2.Note(name=other, text="x"), ["text"])
    assert e.value.reason == "NOTE_NOT_FOUND"
