"""Record-level access: who sees and edits which leads, opportunities, activities, quotes,
orders and invoices. One rule, applied inside the SQL of every read (get, list, search, board,
forecast, export), so a record a caller may not see is never fetched, counted or summed:

- sales.records.all (admin): every record;
- sales.records.team (a sales manager): their own, those owned by a member of a team they
  manage, and those assigned to a team they manage;
- anyone else (a sales rep): the records they own.

A record outside the caller's scope answers NOT_FOUND, as if it did not exist (its existence
is not leaked).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.sql import ColumnElement

from crm_chassis.auth import Principal
from crm_chassis.errors import InvalidArgument, PermissionDenied

from .tables import team_members, teams

ALL = "sales.records.all"
TEAM = "sales.records.team"

# An owner is a principal's subject; what a lead, opportunity or activity takes as its owner
# (characters, after stripping). The owner columns are keys of btree indexes, whose entries
# PostgreSQL caps at about 2,700 bytes: an unchecked owner failed the insert as INTERNAL.
OWNER_LIMIT = 200


def owner_of(value: str, field: str) -> str:
    """An owner given in a request, stripped ("" when none is given): InvalidArgument naming
    `field` when it is longer than any owner can be."""
    v = value.strip()
    if len(v) > OWNER_LIMIT:
        raise InvalidArgument.field(field, f"must be at most {OWNER_LIMIT} characters (an owner is a subject)")
    return v


class Reach(enum.Enum):
    OWN = "own"
    TEAM = "team"
    ALL = "all"


@dataclass(frozen=True)
class Scope:
    subject: str
    reach: Reach

    @classmethod
    def of(cls, principal: Principal) -> Scope:
        if principal.has(ALL):
            return cls(principal.subject, Reach.ALL)
        if principal.has(TEAM):
            return cls(principal.subject, Reach.TEAM)
        return cls(principal.subject, Reach.OWN)

    def managed_teams(self) -> sa.Select:
        return sa.select(teams.c.id).where(teams.c.manager_id == self.subject)

    def managed_members(self) -> sa.Select:
        return (
            sa.select(team_members.c.member_id)
            .join(teams, teams.c.id == team_members.c.team_id)
            .where(teams.c.manager_id == self.subject)
        )

    def visible(self, owner: ColumnElement, team: ColumnElement | None = None) -> ColumnElement[bool]:
        """The WHERE condition: rows whose owner column (and team column, if the table has one)
        put them in this scope."""
        if self.reach is Reach.ALL:
            return sa.true()
        if self.reach is Reach.OWN:
            return owner == self.subject
        either = [owner == self.subject, owner.in_(self.managed_members())]
        if team is not None:
            either.append(team.in_(self.managed_teams()))
        return sa.or_(*either)

    def can_assign(self, conn: sa.Connection, owner_id: str, team_id: str | None = None) -> bool:
        """May this caller give a record to owner_id (and team_id)? A rep only to themself, a
        manager to themself or a member of (or one of) their teams, admin to anyone."""
        if self.reach is Reach.ALL or (owner_id == self.subject and team_id is None):
            return True
        if self.reach is Reach.OWN:
            return False
        ok = owner_id == self.subject or bool(
            conn.execute(
                sa.select(sa.exists(self.managed_members().where(team_members.c.member_id == owner_id)))
            ).scalar()
        )
        if ok and team_id is not None:
            ok = bool(conn.execute(sa.select(sa.exists(self.managed_teams().where(teams.c.id == team_id)))).scalar())
        return ok

    def require_assign(
        self, conn: sa.Connection, owner_id: str, team_id: str | None = None, field: str = "owner"
    ) -> None:
        if not self.can_assign(conn, owner_id, team_id):
            raise PermissionDenied(
                f"{field}: you may not give a record to {owner_id!r}"
                + (f" in team {team_id!r}" if team_id else "")
                + " (a rep assigns only to themself, a manager within the teams they manage)",
                reason="ASSIGNMENT_NOT_ALLOWED",
                metadata={"field": field, "owner": owner_id},
            )
