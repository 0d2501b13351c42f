"""CategoryService (proto/crm/support/v1/tickets.proto): the managed list of ticket categories.

A category's key is unique and fixed; its complaint flag is copied onto a ticket when the
ticket is categorised (ticketing.Tickets.open / update), so a later change of the flag does
not rewrite past tickets (nor the complaint rate already reported). Deleting a category that
tickets use deactivates it instead: new tickets cannot take it, the old ones keep it.
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm.support.v1 import tickets_pb2 as pb
from crm.support.v1 import tickets_pb2_grpc
from crm_chassis import audit
from crm_chassis.auth import Principal
from crm_chassis.dates import set_times
from crm_chassis.errors import AlreadyExists, FieldViolation
from crm_chassis.filtering import keyset_page
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import UpdateMask, check_etag, etag

from .runtime import Support
from .tables import categories, tickets
from .tickets_api import CATEGORY, TEAM, _id, _raise, _text, check_team

KEY = re.compile(r"[a-z][a-z0-9_]{0,39}")
SKILL = re.compile(r"[a-z][a-z0-9_]{0,39}")
DISPLAY_LIMIT = 100
MASK = UpdateMask(
    ["display_name", "complaint", "skill", "team", "active"],
    immutable={"key": "create another category instead", "name": ""},
)
c = categories.c


def to_proto(row) -> pb.Category:
    out = pb.Category(
        name=CATEGORY.format(row.id),
        key=row.key,
        display_name=row.display_name,
        complaint=row.complaint,
        skill=row.skill,
        team=TEAM.format(row.team_id) if row.team_id else "",
        active=row.active,
        etag=etag(row.version),
    )
    set_times(out, row, "create_time", "update_time")
    return out


def _skill(value: str, field: str, bad: list) -> str:
    v = value.strip().lower()
    if v and not SKILL.fullmatch(v):
        bad.append(FieldViolation(field, "must be lower_snake_case, at most 40 characters (or empty)"))
    return v


class Categories:
    def __init__(self, support: Support):
        self.uow = support.uow
        self.tokens = PageTokens(support.settings.jwt_secret, "categories")

    def create(self, cat: pb.Category, principal: Principal) -> pb.Category:
        bad: list[FieldViolation] = []
        key = cat.key.strip()
        if not key:
            bad.append(FieldViolation("category.key", "is required"))
        elif not KEY.fullmatch(key):
            bad.append(FieldViolation("category.key", "must be lower_snake_case, 1..40 characters (billing)"))
        display = _text(cat.display_name, "category.display_name", DISPLAY_LIMIT, bad, required=True)
        skill = _skill(cat.skill, "category.skill", bad)
        team_id = _id(TEAM, cat.team, "category.team", bad) if cat.team else None
        _raise(bad)
        with self.uow.begin() as tx:
            check_team(tx.conn, team_id, "category.team", bad)
            _raise(bad)
            row = tx.execute(
                pg_insert(categories)
                .values(key=key, display_name=display, complaint=cat.complaint, skill=skill, team_id=team_id)
                .on_conflict_do_nothing(index_elements=["key"])
                .returning(categories)
            ).one_or_none()
            if row is None:
                raise AlreadyExists(
                    f"a category with key {key!r} already exists", reason="CATEGORY_EXISTS", metadata={"key": key}
                )
            name = CATEGORY.format(row.id)
            changes = [audit.change(f, "null", audit.value(row._mapping[f])) for f in ("key", "display_name")]
            changes += [
                audit.change(f, "null", audit.value(row._mapping[f])) for f in ("complaint", "skill", "team_id")
            ]
            tx.audit(name, "create", principal, changes)
        return to_proto(row)

    def get(self, name: str) -> pb.Category:
        cid = CATEGORY.parse(name).id
        with self.uow.read() as conn:
            row = conn.execute(sa.select(categories).where(c.id == cid)).one_or_none()
        if row is None:
            raise CATEGORY.not_found(name)
        return to_proto(row)

    def list(self, req: pb.ListCategoriesRequest) -> pb.ListCategoriesResponse:
        limit = page_size(req.page_size)
        q = sa.select(categories)
        if not req.show_inactive:
            q = q.where(c.active)
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn, q, [(c.key, False)], self.tokens, f"inactive={req.show_inactive}", limit, req.page_token
            )
        return pb.ListCategoriesResponse(categories=[to_proto(r) for r in rows], next_page_token=token)

    def update(self, cat: pb.Category, mask, principal: Principal) -> pb.Category:
        paths = MASK.paths(mask)
        cid = CATEGORY.parse(cat.name, "category.name").id
        bad: list[FieldViolation] = []
        new: dict = {}
        for p in paths:
            where = f"category.{p}"
            if p == "display_name":
                new[p] = _text(cat.display_name, where, DISPLAY_LIMIT, bad, required=True)
            elif p == "skill":
                new[p] = _skill(cat.skill, where, bad)
            elif p == "team":
                new["team_id"] = _id(TEAM, cat.team, where, bad) if cat.team else None
            else:  # complaint, active
                new[p] = getattr(cat, p)
        _raise(bad)
        with self.uow.begin() as tx:
            row = tx.execute(sa.select(categories).where(c.id == cid).with_for_update()).one_or_none()
            if row is None:
                raise CATEGORY.not_found(cat.name)
            check_etag(cat.etag, row.version, cat.name)
            changed = {k: v for k, v in new.items() if audit.value(row._mapping[k]) != audit.value(v)}
            if not changed:
                return to_proto(row)
            if "team_id" in changed:
                check_team(tx.conn, changed["team_id"], "category.team", bad)
                _raise(bad)
            after = tx.execute(
                categories.update()
                .where(c.id == cid)
                .values(**changed, version=c.version + 1, update_time=sa.func.now())
                .returning(categories)
            ).one()
            tx.audit(
                cat.name,
                "update",
                principal,
                [audit.change(k, audit.value(row._mapping[k]), audit.value(v)) for k, v in changed.items()],
            )
        return to_proto(after)

    def delete(self, req: pb.DeleteCategoryRequest, principal: Principal) -> pb.DeleteCategoryResponse:
        cid = CATEGORY.parse(req.name).id
        with self.uow.begin() as tx:
            row = tx.execute(sa.select(categories).where(c.id == cid).with_for_update()).one_or_none()
            if row is None:
                raise CATEGORY.not_found(req.name)
            check_etag(req.etag, row.version, req.name)
            used = tx.execute(sa.select(sa.exists().where(tickets.c.category_id == cid))).scalar()
            if not used:
                tx.execute(categories.delete().where(c.id == cid))
                tx.audit(req.name, "delete", principal, [])
                return pb.DeleteCategoryResponse(deactivated=False)
            after = row
            if row.active:
                after = tx.execute(
                    categories.update()
                    .where(c.id == cid)
                    .values(active=False, version=c.version + 1, update_time=sa.func.now())
                    .returning(categories)
                ).one()
                tx.audit(req.name, "deactivate", principal, [audit.change("active", "true", "false")])
        return pb.DeleteCategoryResponse(deactivated=True, category=to_proto(after))


class CategoryServicer(tickets_pb2_grpc.CategoryServiceServicer):
    def __init__(self, uc: Categories):
        self.uc = uc

    def CreateCategory(self, request, context):
        return self.uc.create(request.category, current_principal())

    def GetCategory(self, request, context):
        return self.uc.get(request.name)

    def ListCategories(self, request, context):
        return self.uc.list(request)

    def UpdateCategory(self, request, context):
        return self.uc.update(request.category, request.update_mask, current_principal())

    def DeleteCategory(self, request, context):
        return self.uc.delete(request, current_principal())


def registration(support: Support) -> Registration:
    return Registration.of(CategoryServicer(support.once("categories", lambda: Categories(support))))
