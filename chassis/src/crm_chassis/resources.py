"""Resource names, etags and update masks (AIP-122, AIP-154, AIP-134), with the errors every
service answers for them: INVALID_ARGUMENT naming the field, NOT_FOUND with an ErrorInfo
reason, ABORTED for a stale etag.

Names::

    CUSTOMER = ResourceName("customers/{id}")
    NOTE = ResourceName("customers/{customer_id}/notes/{note_id}")
    SOURCE = ResourceName("acquisitionSources/{key}", key=r"[a-z0-9_-]{1,40}")

    cid = CUSTOMER.parse(request.name).id                  # INVALID_ARGUMENT on "name" if bad
    customer_id, note_id = NOTE.parse(note.name, "note.name")
    NOTE.format(cid, nid)                                  # "customers/<cid>/notes/<nid>"
    raise NOTE.not_found(note.name)                        # NOT_FOUND, reason NOTE_NOT_FOUND

Etags: `etag(version)` is ``'"3"'``; `check_etag(given, version, name)` passes an empty etag
(an unconditional write) and raises ABORTED (reason ETAG_MISMATCH, metadata name and
current_etag) for any other that is not the current one.

Update masks::

    MASK = UpdateMask(["display_name", "description"], immutable={"type": "create a new one instead"})
    paths = MASK.paths(request.update_mask)   # a FieldMask or a list; "*" = every updatable field
    values = MASK.apply(request.group, paths, prefix="group", convert={"display_name": required_text(100)})

An Update use case (mask, parse, lock, not found, precondition, etag, write with the version
bumped, what changed for the audit trail) in a few declarative lines::

    GROUPS = Updatable(groups, ResourceName("groups/{id}"), UpdateMask(["display_name", "description"]),
                       message_field="group", convert={"display_name": required_text(100), "description": text()})

    def update_group(self, conn, group, mask, principal):
        change = GROUPS.update(conn, group, mask)     # the row, locked, written, or unchanged
        if change.changes:
            audit(conn, change.name, "group.update", principal, change.audit_changes())
        return group_to_proto(change.row)
"""

from __future__ import annotations

import re
from collections import namedtuple
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from google.protobuf import json_format
from google.protobuf.message import Message

from . import audit
from .errors import Aborted, AlreadyExists, FieldViolation, InvalidArgument, NotFound

UUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_VARIABLE = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
_COLLECTION = re.compile(r"[a-z][A-Za-z0-9]*")


def singular_of(collection: str) -> str:
    """customers -> customer, auditEntries -> audit entry, acquisitionSources -> acquisition source."""
    words = re.sub(r"([A-Z])", r" \1", collection).lower().split()
    last = words[-1]
    if last.endswith("ies"):
        last = last[:-3] + "y"
    elif last.endswith(("sses", "xes", "ches", "shes")):
        last = last[:-2]
    elif last.endswith("s") and not last.endswith("ss"):
        last = last[:-1]
    return " ".join([*words[:-1], last])


class ResourceName:
    """A resource name pattern: collections and ``{variable}`` ids, alternating."""

    def __init__(self, pattern: str, *, singular: str | None = None, **id_patterns: str):
        segments = pattern.split("/")
        if len(segments) % 2 or not segments[0]:
            raise ValueError(f"{pattern!r}: a name is collection/{{id}} pairs")
        self.pattern = pattern
        self.collections: list[str] = []
        self.variables: list[str] = []
        for collection, variable in zip(segments[::2], segments[1::2], strict=True):
            m = _VARIABLE.fullmatch(variable)
            if not _COLLECTION.fullmatch(collection) or not m:
                raise ValueError(f"{pattern!r}: expected collection/{{variable}} pairs")
            self.collections.append(collection)
            self.variables.append(m.group(1))
        if len(set(self.variables)) != len(self.variables):
            raise ValueError(f"{pattern!r}: a variable appears twice")
        unknown = set(id_patterns) - set(self.variables)
        if unknown:
            raise ValueError(f"{pattern!r}: no variable {sorted(unknown)}")
        self.id_patterns = {v: id_patterns.get(v, UUID_PATTERN) for v in self.variables}
        regex = "/".join(
            f"{re.escape(c)}/(?P<{v}>{self.id_patterns[v]})"
            for c, v in zip(self.collections, self.variables, strict=True)
        )
        self._regex = re.compile(regex)
        self.singular = singular or singular_of(self.collections[-1])
        self.reason = self.singular.upper().replace(" ", "_") + "_NOT_FOUND"
        ids = namedtuple("Ids", self.variables)
        if "id" not in self.variables:
            ids.id = property(lambda t: t[-1])  # the last id: the resource's own
        self._ids = ids
        uuids = [v for v in self.variables if self.id_patterns[v] == UUID_PATTERN]
        if len(uuids) == len(self.variables):
            self._expected = f"must be '{pattern}' with {'a UUID id' if len(uuids) == 1 else 'UUID ids'}"
        else:
            self._expected = f"must be '{pattern}'"

    def __repr__(self) -> str:
        return f"ResourceName({self.pattern!r})"

    @property
    def parent(self) -> ResourceName | None:
        """The pattern of the parent resource (customers/{customer_id} for a note), if any."""
        if len(self.variables) == 1:
            return None
        pattern = "/".join(self.pattern.split("/")[:-2])
        return ResourceName(pattern, **{v: self.id_patterns[v] for v in self.variables[:-1]})

    def matches(self, name: str) -> bool:
        return isinstance(name, str) and self._regex.fullmatch(name) is not None

    def parse(self, name: str, field: str = "name"):
        """The ids in `name` as a named tuple by variable (`.id` is the last one, unless a
        variable is itself called id); INVALID_ARGUMENT on `field` for anything else."""
        m = self._regex.fullmatch(name) if isinstance(name, str) else None
        if m is None:
            raise InvalidArgument.field(field, self._expected if name else f"is required; {self._expected}")
        return self._ids(*(m.group(v) for v in self.variables))

    def format(self, *ids: Any, **named: Any) -> str:
        """The name of the resource with these ids (positional in order, or by variable)."""
        if ids and named:
            raise TypeError("give the ids by position or by name, not both")
        values = list(ids) if ids else [named[v] for v in self.variables]
        if len(values) != len(self.variables):
            raise TypeError(f"{self.pattern} takes {len(self.variables)} ids")
        return "/".join(f"{c}/{v}" for c, v in zip(self.collections, values, strict=True))

    def one(self, conn, query, name: str):
        """The row `query` finds, or NOT_FOUND naming `name` (a get, or a read FOR UPDATE)."""
        row = conn.execute(query).one_or_none()
        if row is None:
            raise self.not_found(name)
        return row

    def not_found(self, name: str | Sequence[Any]) -> NotFound:
        """NOT_FOUND for this resource: message, reason (NOTE_NOT_FOUND...) and metadata name."""
        if not isinstance(name, str):
            name = self.format(*name)
        return NotFound(f"{self.singular} {name} does not exist", reason=self.reason, metadata={"name": name})


REQUEST_ID_LIMIT = 128  # AIP-155's request_id is a UUID (36): room for other unique keys


def request_id_violation(value: str, field: str = "request_id") -> FieldViolation | None:
    """The violation of an idempotency key past REQUEST_ID_LIMIT characters (it goes in a
    unique index, whose keys stop at ~2,700 bytes), for a handler that names every bad field."""
    if len((value or "").strip()) > REQUEST_ID_LIMIT:
        return FieldViolation(field, f"must be at most {REQUEST_ID_LIMIT} characters (a UUID)")
    return None


def check_request_id(value: str, field: str = "request_id") -> str | None:
    """An idempotency key as stored (None when empty); INVALID_ARGUMENT naming `field` when it
    is too long (request_id_violation)."""
    if bad := request_id_violation(value, field):
        raise InvalidArgument([bad])
    return (value or "").strip() or None


def same_requester(creator: str, principal, what: str) -> None:
    """A retried create finds the resource its request_id made; a request_id another caller
    used is ALREADY_EXISTS (AIP-155: the key is the caller's), naming request_id."""
    if creator != principal.subject:
        raise AlreadyExists(
            f"request_id was already used for another caller's {what}; use a new one",
            reason="REQUEST_ID_REUSED",
            metadata={"field": "request_id"},
        )


# -- etags -------------------------------------------------------------------------------------


def etag(version: int) -> str:
    """The etag of a row at `version`: a quoted string, as HTTP writes it."""
    return f'"{version}"'


def check_etag(given: str, version: int, name: str) -> None:
    """Nothing for an empty etag (unconditional) or the current one; else ABORTED."""
    current = etag(version)
    if given and given != current:
        raise Aborted(
            f"{name} was changed by someone else (etag {given} is stale); read it again",
            metadata={"name": name, "current_etag": current},
        )


# -- update masks ------------------------------------------------------------------------------

Converter = Callable[[Any, str], Any]  # (value from the message, field path for errors) -> stored value


class UpdateMask:
    """Which fields of a resource an Update may name, and how their values are read."""

    def __init__(
        self,
        updatable: Iterable[str],
        *,
        immutable: Mapping[str, str] | Iterable[str] = (),
        field: str = "update_mask",
    ):
        self.updatable = list(dict.fromkeys(updatable))
        if isinstance(immutable, Mapping):
            self.immutable = dict(immutable)
        else:
            self.immutable = dict.fromkeys(immutable, "")
        self.field = field

    def paths(self, mask: Any) -> list[str]:
        """The validated paths of `mask` (a FieldMask, a list of paths, or None), in the order
        given and without repeats; ``*`` names every updatable field."""
        raw = [mask] if isinstance(mask, str) else list(getattr(mask, "paths", mask) or [])
        paths = list(dict.fromkeys(p.strip() for p in raw))
        if not paths or paths == [""]:
            raise InvalidArgument.field(self.field, 'name at least one field, or "*" for all updatable fields')
        if "*" in paths:
            if len(paths) > 1:
                raise InvalidArgument.field(self.field, '"*" stands alone: it already names every updatable field')
            return list(self.updatable)
        fixed = [p for p in paths if p in self.immutable]
        if fixed:
            why = "; ".join(
                f"{p} cannot be changed" + (f": {self.immutable[p]}" if self.immutable[p] else "") for p in fixed
            )
            raise InvalidArgument.field(self.field, why)
        unknown = [p for p in paths if p not in self.updatable]
        if unknown:
            raise InvalidArgument.field(
                self.field, f"not updatable: {', '.join(unknown)}; updatable fields: {', '.join(self.updatable)}"
            )
        return paths

    def apply(
        self,
        message: Message,
        paths: Iterable[str],
        *,
        prefix: str = "",
        convert: Mapping[str, Converter] | None = None,
    ) -> dict[str, Any]:
        """The values of `paths` in `message`, as plain values (or through `convert[path]`,
        which gets the value and its field path, e.g. "group.display_name", and may raise
        InvalidArgument or ValueError; every problem is reported at once)."""
        convert = convert or {}
        out: dict[str, Any] = {}
        bad: list[FieldViolation] = []
        for path in paths:
            where = f"{prefix}.{path}" if prefix else path
            try:
                value = _read(message, path)
                out[path] = convert[path](value, where) if path in convert else value
            except InvalidArgument as e:
                bad += e.violations
            except ValueError as e:
                bad.append(FieldViolation(where, str(e)))
        if bad:
            raise InvalidArgument(bad)
        return out


def _read(message: Message, path: str) -> Any:
    """A field's value as plain Python: scalars as they are, enums as numbers, repeated fields
    as lists, a message field as a dict (None when unset); dotted paths go into sub-messages."""
    head, _, rest = path.partition(".")
    fd = message.DESCRIPTOR.fields_by_name.get(head)
    if fd is None:
        raise ValueError(f"{type(message).__name__} has no field {head!r}")
    value = getattr(message, head)
    if rest:
        return _read(value, rest)
    is_message = fd.message_type is not None
    if _repeated(fd):
        if is_message and fd.message_type.GetOptions().map_entry:
            return {k: _plain(v) for k, v in value.items()}
        return [_plain(v) for v in value]
    if is_message:
        return _plain(value) if message.HasField(head) else None
    return value


def _repeated(fd) -> bool:
    is_repeated = getattr(fd, "is_repeated", None)  # protobuf >= 5.x
    return bool(is_repeated) if is_repeated is not None else fd.label == fd.LABEL_REPEATED


def _plain(value: Any) -> Any:
    if isinstance(value, Message):
        return json_format.MessageToDict(value, preserving_proto_field_name=True)
    return value


def text(limit: int | None = None, *, strip: bool = True) -> Converter:
    """A converter for a text field: stripped, at most `limit` characters."""

    def convert(value: str, where: str) -> str:
        v = value.strip() if strip else value
        if limit is not None and len(v) > limit:
            raise InvalidArgument.field(where, f"must be at most {limit} characters")
        return v

    return convert


def required_text(limit: int | None = None) -> Converter:
    """Like `text`, and not empty."""
    base = text(limit)

    def convert(value: str, where: str) -> str:
        v = base(value, where)
        if not v:
            raise InvalidArgument.field(where, "must not be empty")
        return v

    return convert


# -- what changed ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldChange:
    field: str
    old: Any
    new: Any
    # Their JSON text, when `changes` already made it to compare them (not part of equality).
    old_text: str | None = field(default=None, compare=False, repr=False)
    new_text: str | None = field(default=None, compare=False, repr=False)

    def as_audit(self) -> dict[str, str]:
        """The audit trail's form: old and new values as JSON text."""
        return audit.change(
            self.field,
            self.old_text if self.old_text is not None else _json(self.old),
            self.new_text if self.new_text is not None else _json(self.new),
        )


_json = audit.value  # the audit trail's JSON text of a value


def changes(old: Mapping[str, Any], new: Mapping[str, Any], fields: Iterable[str] | None = None) -> list[FieldChange]:
    """The fields (of `fields`, default those in `new`) whose value differs between the two."""
    out = []
    for f in fields if fields is not None else new:
        before, after = old.get(f), new.get(f)
        before_text, after_text = _json(before), _json(after)
        if before_text != after_text:
            out.append(FieldChange(f, before, after, before_text, after_text))
    return out


# -- a declarative Update ----------------------------------------------------------------------


@dataclass
class Updated:
    """What `Updatable.update` did: the row before and after, and the fields that changed
    (none: nothing was written and the version did not move)."""

    name: str
    old: Any
    row: Any
    changes: list[FieldChange]

    def audit_changes(self) -> list[dict[str, str]]:
        return [c.as_audit() for c in self.changes]


@dataclass
class Updatable:
    """How one kind of resource is updated: its table, name, mask and value conversion.

    - `key_columns`: the table columns the name's ids select on (default: "id" for the last id
      and "<variable>" for the others, e.g. customer_id for a note).
    - `columns`: path -> column where the column is named otherwise.
    - `version_column`: bumped on every write and compared with the request's etag (None for
      a resource without etags).
    - `touch`: more values on every write (e.g. {"update_time": sa.func.now()}).
    - `conflict`: the message of ALREADY_EXISTS when a write breaks a unique constraint
      (None to let the IntegrityError through).
    """

    table: sa.Table
    name: ResourceName
    mask: UpdateMask
    message_field: str = ""  # "group": errors name "group.name", "group.display_name"
    convert: Mapping[str, Converter] = field(default_factory=dict)
    key_columns: Sequence[str] | None = None
    columns: Mapping[str, str] = field(default_factory=dict)
    version_column: str | None = "version"
    touch: Mapping[str, Any] = field(default_factory=dict)
    conflict: str | None = "a record with that name already exists"

    def _where(self, ids) -> list:
        keys = self.key_columns or [*self.name.variables[:-1], "id"]
        return [self.table.c[k] == v for k, v in zip(keys, ids, strict=True)]

    def update(
        self,
        conn: sa.Connection,
        message: Message,
        update_mask: Any,
        *,
        check: Callable[[Any], None] | None = None,
    ) -> Updated:
        """Validate the mask and values, lock the row (NOT_FOUND if missing), run `check(row)`
        (a precondition such as "only the author may edit"), compare the etag, and write the
        changed fields with the version bumped, in `conn`'s transaction."""
        prefix = self.message_field
        paths = self.mask.paths(update_mask)
        name_field = f"{prefix}.name" if prefix else "name"
        ids = self.name.parse(message.name, name_field)
        values = self.mask.apply(message, paths, prefix=prefix, convert=self.convert)
        row = conn.execute(sa.select(self.table).where(*self._where(ids)).with_for_update()).one_or_none()
        if row is None:
            raise self.name.not_found(message.name)
        if check is not None:
            check(row)
        if self.version_column:
            check_etag(getattr(message, "etag", ""), getattr(row, self.version_column), message.name)
        stored = {self.columns.get(p, p): v for p, v in values.items()}
        old = {p: row._mapping[self.columns.get(p, p)] for p in values}
        diff = changes(old, values)
        if not diff:
            return Updated(message.name, row, row, [])
        write = {self.columns.get(c.field, c.field): stored[self.columns.get(c.field, c.field)] for c in diff}
        if self.version_column:
            write[self.version_column] = self.table.c[self.version_column] + 1
        stmt = self.table.update().where(*self._where(ids)).values(**write, **self.touch).returning(*self.table.c)
        try:
            with conn.begin_nested():
                new = conn.execute(stmt).one()
        except sa.exc.IntegrityError as exc:
            if self.conflict is None or getattr(exc.orig, "sqlstate", None) != "23505":
                raise
            raise AlreadyExists(self.conflict, metadata={"name": message.name}) from None
        return Updated(message.name, row, new, diff)
