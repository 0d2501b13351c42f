"""Teams (SalesService): CRUD, membership, who may write them, and record access through them."""

from __future__ import annotations

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from crm.sales.v1 import sales_service_pb2 as pb
from crm.sales.v1 import sales_service_pb2_grpc
from crm_chassis.audit import audit_entries
from crm_chassis.auth import Principal
from crm_chassis.errors import read_rpc_error
from sales_svc.access import Scope
from sales_svc.tables import leads, teams
from tests.support.harness import md

ADMIN = md("admin", "ada")


def rep(sub):
    return md("sales_rep", sub)


def manager(sub):
    return md("sales_manager", sub)


@pytest.fixture(scope="module")
def stub(ch):
    return sales_service_pb2_grpc.SalesServiceStub(ch)


def error_of(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return read_rpc_error(info.value)


def create(stub, name, members=(), md=ADMIN, request_id="", **kw):
    team = pb.Team(display_name=name, members=list(members), **kw)
    return stub.CreateTeam(pb.CreateTeamRequest(team=team, request_id=request_id), metadata=md)


def count(svc, table, *where) -> int:
    with svc.ctx.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()


def test_create_get_update_and_idempotent_create(svc, stub):
    t = create(stub, "Tehran North", ["sara", "ali", "ali"], manager="mina", description="north branch")
    assert t.name.startswith("teams/") and t.etag == '"1"'
    assert list(t.members) == ["ali", "sara"] and t.manager == "mina"
    assert stub.GetTeam(pb.GetTeamRequest(name=t.name), metadata=rep("ali")) == t  # reps read teams

    again = [
        create(stub, "Isfahan", request_id="req-isf-1", manager="omid"),
        create(stub, "Isfahan", request_id="req-isf-1", manager="omid"),
    ]
    assert again[0].name == again[1].name
    assert count(svc, teams, teams.c.name == "Isfahan") == 1

    up = stub.UpdateTeam(
        pb.UpdateTeamRequest(
            team=pb.Team(name=t.name, display_name="Tehran North 2", description="", etag=t.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name", "description"]),
        ),
        metadata=ADMIN,
    )
    assert up.display_name == "Tehran North 2" and up.description == "" and up.etag == '"2"'
    assert up.manager == "mina"  # not in the mask: unchanged
    stale = error_of(
        lambda: stub.UpdateTeam(
            pb.UpdateTeamRequest(
                team=pb.Team(name=t.name, display_name="x", etag=t.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=ADMIN,
        )
    )
    assert stale.code == grpc.StatusCode.ABORTED
    dup = error_of(
        lambda: stub.UpdateTeam(
            pb.UpdateTeamRequest(
                team=pb.Team(name=t.name, display_name="Isfahan"),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=ADMIN,
        )
    )
    assert dup.code == grpc.StatusCode.ALREADY_EXISTS
    assert error_of(lambda: create(stub, "Isfahan")).code == grpc.StatusCode.ALREADY_EXISTS
    with svc.ctx.engine.connect() as conn:
        actions = (
            conn.execute(
                sa.select(audit_entries.c.action).where(audit_entries.c.resource == t.name).order_by(audit_entries.c.id)
            )
            .scalars()
            .all()
        )
    assert actions == ["team.create", "team.update"]


def test_membership(svc, stub):
    t = create(stub, "Shiraz", ["a1"], manager="mina")
    added = stub.AddTeamMembers(pb.AddTeamMembersRequest(team=t.name, members=["a1", "b2", "c3"]), metadata=ADMIN)
    assert added.added == 2 and list(added.team.members) == ["a1", "b2", "c3"] and added.team.etag == '"2"'
    removed = stub.RemoveTeamMembers(pb.RemoveTeamMembersRequest(team=t.name, members=["b2", "zz"]), metadata=ADMIN)
    assert removed.removed == 1 and list(removed.team.members) == ["a1", "c3"]
    # Nothing to add: nothing written, the etag stays.
    same = stub.AddTeamMembers(pb.AddTeamMembersRequest(team=t.name, members=["a1"]), metadata=ADMIN)
    assert same.added == 0 and same.team.etag == removed.team.etag

    stub.AddTeamMembers(pb.AddTeamMembersRequest(team=t.name, members=[f"m{i:02}" for i in range(5)]), metadata=ADMIN)
    seen, token = [], ""
    while True:
        page = stub.ListTeamMembers(
            pb.ListTeamMembersRequest(team=t.name, page_size=3, page_token=token), metadata=ADMIN
        )
        seen += [m.member for m in page.members]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["a1", "c3", "m00", "m01", "m02", "m03", "m04"]

    listed = stub.ListTeams(pb.ListTeamsRequest(filter='member = "c3"'), metadata=ADMIN)
    assert [x.name for x in listed.teams] == [t.name]
    by_manager = stub.ListTeams(pb.ListTeamsRequest(filter='manager = "mina"', order_by="display_name"), metadata=ADMIN)
    names = [x.display_name for x in by_manager.teams]
    assert "Shiraz" in names and names == sorted(names)
    page1 = stub.ListTeams(pb.ListTeamsRequest(page_size=1), metadata=ADMIN)
    page2 = stub.ListTeams(pb.ListTeamsRequest(page_size=1, page_token=page1.next_page_token), metadata=ADMIN)
    assert page1.next_page_token and page1.teams[0].name != page2.teams[0].name


def test_delete_is_refused_while_records_reference_the_team(svc, stub):
    t = create(stub, "Tabriz", ["r1"], manager="mina")
    tid = t.name.split("/")[1]
    with svc.ctx.engine.begin() as conn:
        lead = conn.execute(leads.insert().values(owner_id="r1", team_id=tid).returning(leads.c.id)).scalar()
    err = error_of(lambda: stub.DeleteTeam(pb.DeleteTeamRequest(name=t.name), metadata=ADMIN))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and err.reason == "TEAM_IN_USE"
    assert "1 leads" in err.message
    with svc.ctx.engine.begin() as conn:
        conn.execute(leads.update().where(leads.c.id == lead).values(team_id=None))
    stale = error_of(lambda: stub.DeleteTeam(pb.DeleteTeamRequest(name=t.name, etag='"9"'), metadata=ADMIN))
    assert stale.code == grpc.StatusCode.ABORTED
    done = stub.DeleteTeam(pb.DeleteTeamRequest(name=t.name, etag=t.etag), metadata=ADMIN)
    assert done.removed_members == 1
    assert error_of(lambda: stub.GetTeam(pb.GetTeamRequest(name=t.name), metadata=ADMIN)).reason == "TEAM_NOT_FOUND"


def test_who_may_write_teams(stub):
    # A rep reads teams but may not write them.
    assert error_of(lambda: create(stub, "Reps", md=rep("ali"))).code == grpc.StatusCode.PERMISSION_DENIED
    # A manager creates a team they manage (the manager defaults to the caller)...
    mine = create(stub, "Mashhad", ["p1"], md=manager("neda"))
    assert mine.manager == "neda"
    stub.AddTeamMembers(pb.AddTeamMembersRequest(team=mine.name, members=["p2"]), metadata=manager("neda"))
    # ... but not one for someone else, nor changes another manager's team, nor gives theirs away.
    other = error_of(lambda: create(stub, "Karaj", manager="omid", md=manager("neda")))
    assert other.code == grpc.StatusCode.PERMISSION_DENIED and other.reason == "NOT_TEAM_MANAGER"
    err = error_of(
        lambda: stub.AddTeamMembers(pb.AddTeamMembersRequest(team=mine.name, members=["x"]), metadata=manager("omid"))
    )
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    give = error_of(
        lambda: stub.UpdateTeam(
            pb.UpdateTeamRequest(
                team=pb.Team(name=mine.name, manager="omid"), update_mask=field_mask_pb2.FieldMask(paths=["manager"])
            ),
            metadata=manager("neda"),
        )
    )
    assert give.code == grpc.StatusCode.PERMISSION_DENIED
    # An admin may.
    moved = stub.UpdateTeam(
        pb.UpdateTeamRequest(
            team=pb.Team(name=mine.name, manager="omid"), update_mask=field_mask_pb2.FieldMask(paths=["manager"])
        ),
        metadata=ADMIN,
    )
    assert moved.manager == "omid"


def test_validation_errors_name_the_fields(stub):
    err = error_of(lambda: create(stub, "  ", ["ok", "has space"]))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in err.field_violations} == {"team.display_name", "team.members[1]"}
    bad_name = error_of(lambda: stub.GetTeam(pb.GetTeamRequest(name="teams/42"), metadata=ADMIN))
    assert [v.field for v in bad_name.field_violations] == ["name"]
    mask = error_of(
        lambda: stub.UpdateTeam(
            pb.UpdateTeamRequest(
                team=pb.Team(name="teams/" + "0" * 8 + "-0000-0000-0000-" + "0" * 12),
                update_mask=field_mask_pb2.FieldMask(paths=["members"]),
            ),
            metadata=ADMIN,
        )
    )
    assert [v.field for v in mask.field_violations] == ["update_mask"]
    flt = error_of(lambda: stub.ListTeams(pb.ListTeamsRequest(filter="colour = 1"), metadata=ADMIN))
    assert [v.field for v in flt.field_violations] == ["filter"]
    none = error_of(lambda: stub.AddTeamMembers(pb.AddTeamMembersRequest(team="teams/x"), metadata=ADMIN))
    assert {v.field for v in none.field_violations} == {"team"}


def test_a_manager_sees_their_members_and_team_records(svc, stub):
    t = create(stub, "Rasht", ["rep1"], manager="boss")
    tid = t.name.split("/")[1]
    with svc.ctx.engine.begin() as conn:
        ids = {
            who: conn.execute(leads.insert().values(owner_id=who, team_id=team).returning(leads.c.id)).scalar()
            for who, team in (("rep1", None), ("rep2", None), ("outsider", tid), ("boss", None))
        }

    def visible(principal):
        scope = Scope.of(principal)
        with svc.ctx.engine.connect() as conn:
            got = conn.execute(
                sa.select(leads.c.owner_id).where(
                    leads.c.id.in_(ids.values()), scope.visible(leads.c.owner_id, leads.c.team_id)
                )
            ).scalars()
            return set(got)

    assert visible(Principal("boss", ("sales_manager",))) == {"rep1", "outsider", "boss"}
    assert visible(Principal("rep1", ("sales_rep",))) == {"rep1"}
    assert visible(Principal("other_boss", ("sales_manager",))) == set()
    assert visible(Principal("ada", ("admin",))) == {"rep1", "rep2", "outsider", "boss"}
    # Removing the member takes their records out of the manager's sight at once.
    stub.RemoveTeamMembers(pb.RemoveTeamMembersRequest(team=t.name, members=["rep1"]), metadata=ADMIN)
    assert visible(Principal("boss", ("sales_manager",))) == {"outsider", "boss"}
