"""Consent: the append-only ledger, the current state it derives, suppressions, and the one
question every send asks ("may we send this channel and purpose to this address?").

    entry = consent.record(rt, tx, Change("email", "a@b.ir", "granted", "confirmation_link",
                                      customer_id=cid, text_version="v3", proof={"ip": ...}))
    consent.suppress(tx, "email", "a@b.ir", "hard_bounce", "5.1.1")
    q = q.where(consent.sendable("email", "marketing", messages.c.address))    # at send time

- Every change is a new `consent_ledger` row (who, when, from where, which consent text, the
  proof); `consent_state` holds the newest status per (channel, address, purpose) and is
  written in the same transaction; a changed status publishes consent.changed.v1 and updates
  the customer's audience summary (email_consent / sms_consent) when the address is theirs.
- Actions: requested (a double opt-in confirmation was sent: status pending), granted,
  revoked. Purpose "all" in a revocation revokes every purpose of the address (an
  unsubscribe-from-everything, an SMS stop keyword).
- `sendable` is a SQL condition: not suppressed, not revoked, and — where the channel's mode
  is opt_in — granted. The mode per channel comes from settings CONSENT_MODE_EMAIL,
  CONSENT_MODE_SMS, CONSENT_MODE_TELEGRAM, CONSENT_MODE_BALE: "opt_out" (the default: existing
  customers may be written to until they say no) or "opt_in" (only after a grant).
- Addresses are normalised: e-mail lower-cased and trimmed, phone numbers E.164
  (crm_chassis.persian.phone_e164 in the deployment's region), chat ids as given.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm.campaign.v1 import campaign_events_pb2 as ev
from crm_chassis import persian
from crm_chassis.errors import InvalidArgument

from .tables import audience, consent_ledger, consent_state, suppressions

CHANNELS = ("email", "sms", "telegram", "bale")
ACTIONS = {"requested": "pending", "granted": "granted", "revoked": "revoked"}
SUMMARY = {"email": "email_consent", "sms": "sms_consent"}  # audience columns
ALL = "all"


def mode(channel: str, env=os.environ) -> str:
    """opt_in or opt_out for this channel (settings CONSENT_MODE_<CHANNEL>)."""
    value = env.get(f"CONSENT_MODE_{channel.upper()}", "opt_out").strip().lower()
    return "opt_in" if value == "opt_in" else "opt_out"


def normalise(channel: str, address: str, region: str = "IR", field_name: str = "address") -> str:
    """The address as stored; INVALID_ARGUMENT naming `field_name` when it is not one."""
    raw = (address or "").strip()
    if channel not in CHANNELS:
        raise InvalidArgument.field("channel", f"must be one of {', '.join(CHANNELS)}")
    if not raw:
        raise InvalidArgument.field(field_name, "is required")
    if channel == "email":
        value = raw.lower()
        local, at, domain = value.rpartition("@")
        if not at or not local or "." not in domain or " " in value:
            raise InvalidArgument.field(field_name, f"{address!r} is not an e-mail address")
        return value
    if channel == "sms":
        e164 = persian.phone_e164(raw, region)
        if not e164:
            raise InvalidArgument.field(field_name, f"{address!r} is not a phone number")
        return e164
    return raw


@dataclass(frozen=True)
class Change:
    channel: str
    address: str  # normalised (see `normalise`)
    action: str  # requested | granted | revoked
    source: str  # web_form, confirmation_link, unsubscribe_link, list_unsubscribe, sms_stop, ...
    purpose: str = "marketing"
    customer_id: str = ""
    text_version: str = ""
    proof: dict = field(default_factory=dict)
    actor: str = ""
    occur_time: dt.datetime | None = None


@dataclass(frozen=True)
class Recorded:
    entry_id: int
    status: str
    previous: str  # "" when never asked
    purpose: str


def record(rt, tx, change: Change) -> list[Recorded]:
    """Append the change to the ledger and apply it to the state (every purpose of the address
    for a revocation of purpose "all"); publish consent.changed.v1 where the status changed;
    the owner's audience summary follows (rt.audience_changed, cause "consent")."""
    if change.action not in ACTIONS:
        raise InvalidArgument.field("action", f"must be one of {', '.join(ACTIONS)}")
    conn = tx.conn
    purposes = [change.purpose]
    if change.purpose == ALL:
        if change.action != "revoked":
            raise InvalidArgument.field("purpose", 'only a revocation may name purpose "all"')
        # every purpose known for the address, and "all" itself: `sendable` reads that row for
        # the purposes never asked (a newsletter after an SMS stop), until one is granted again
        purposes = [
            *conn.execute(
                sa.select(consent_state.c.purpose).where(
                    consent_state.c.channel == change.channel, consent_state.c.address == change.address
                )
            ).scalars(),
            "marketing",
            ALL,
        ]
    out = []
    for purpose in sorted(set(purposes)):
        prev = conn.execute(
            sa.select(consent_state.c.status, consent_state.c.customer_id)
            .where(
                consent_state.c.channel == change.channel,
                consent_state.c.address == change.address,
                consent_state.c.purpose == purpose,
            )
            .with_for_update()
        ).first()
        customer_id = change.customer_id or (prev.customer_id if prev else "")
        status = ACTIONS[change.action]
        if change.action == "requested" and _effective(conn, change.channel, change.address, purpose) == "revoked":
            status = "revoked"  # an unsubscribed address stays so until the person confirms
        values = {
            "channel": change.channel,
            "address": change.address,
            "purpose": purpose,
            "customer_id": customer_id,
            "action": change.action,
            "source": change.source,
            "text_version": change.text_version,
            "proof": change.proof,
            "actor": change.actor,
        }
        if change.occur_time is not None:
            values["occur_time"] = change.occur_time
        entry = conn.execute(consent_ledger.insert().values(**values).returning(consent_ledger.c.id)).scalar_one()
        if change.occur_time is not None and _newer_than(conn, change, purpose):
            # a change back-dated before the one in force (an import of old sign-ups) is proof
            # kept in the ledger, not the state: it never undoes a later revocation
            kept = prev.status if prev else ""
            out.append(Recorded(entry, kept, kept, purpose))
            continue
        state = {
            "channel": change.channel,
            "address": change.address,
            "purpose": purpose,
            "customer_id": customer_id,
            "status": status,
            "ledger_id": entry,
            "source": change.source,
        }
        stmt = pg_insert(consent_state).values(**state)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["channel", "address", "purpose"],
                set_={**{k: stmt.excluded[k] for k in state if k not in ("channel", "address", "purpose")},
                      "update_time": sa.func.now()},
            )
        )  # fmt: skip
        previous = prev.status if prev else ""
        out.append(Recorded(entry, status, previous, purpose))
        if previous != status:
            e = ev.ConsentEvent(
                customer=f"customers/{customer_id}" if customer_id else "",
                channel=change.channel,
                purpose=purpose,
                status=status,
                previous_status=previous,
                source=change.source,
                entry=f"consentEntries/{entry}",
            )
            e.event_time.GetCurrentTime()
            tx.publish("consent.changed.v1", e, f"consentEntries/{entry}")
    if owner := change.customer_id or _owner(conn, change.channel, change.address):
        _summarise(conn, change.channel, owner)
        rt.audience_changed(conn, [owner], "consent")
    return out


def _effective(conn: sa.Connection, channel: str, address: str, purpose: str) -> str:
    """The status `sendable` reads: the purpose's own, or a newer revocation of every purpose."""
    c = consent_state.c
    return (
        conn.execute(
            sa.select(c.status)
            .where(c.channel == channel, c.address == address, c.purpose.in_((purpose, ALL)))
            .order_by(c.ledger_id.desc())
            .limit(1)
        ).scalar()
        or ""
    )


def _newer_than(conn: sa.Connection, change: Change, purpose: str) -> bool:
    """Whether the entry in force for the purpose (its own, or a revocation of every purpose)
    happened after `change.occur_time`."""
    c, ledger = consent_state.c, consent_ledger.c
    return (
        conn.execute(
            sa.select(sa.literal(1))
            .select_from(consent_state.join(consent_ledger, ledger.id == c.ledger_id))
            .where(
                c.channel == change.channel,
                c.address == change.address,
                c.purpose.in_((purpose, ALL)),
                ledger.occur_time > change.occur_time,
            )
            .limit(1)
        ).first()
        is not None
    )


def _owner(conn: sa.Connection, channel: str, address: str) -> str:
    if channel == "email":
        cond = audience.c.email == address
    elif channel == "sms":
        cond = sa.or_(audience.c.mobile == address, audience.c.phone == address)
    else:
        return ""
    return conn.execute(sa.select(audience.c.customer_id).where(cond, ~audience.c.deleted).limit(1)).scalar() or ""


def _summarise(conn: sa.Connection, channel: str, customer_id: str) -> None:
    """The customer's marketing consent on this channel for segmentation (their own address)."""
    column = SUMMARY.get(channel)
    if column is None:
        return
    addr = audience.c.email if channel == "email" else audience.c.mobile
    status = (
        sa.select(consent_state.c.status)
        .where(
            consent_state.c.channel == channel,
            consent_state.c.address == addr,
            consent_state.c.purpose == "marketing",
        )
        .scalar_subquery()
    )
    conn.execute(
        audience.update().where(audience.c.customer_id == customer_id).values({column: sa.func.coalesce(status, "")})
    )


def suppress(tx, channel: str, address: str, reason: str, detail: str = "") -> bool:
    """Never send to this address on this channel again (until an admin lifts it); True if new."""
    stmt = pg_insert(suppressions).values(channel=channel, address=address, reason=reason, detail=detail)
    return tx.conn.execute(stmt.on_conflict_do_nothing().returning(suppressions.c.channel)).first() is not None


# An erased customer's suppressed address is kept as a keyed hash only (HMAC-SHA256 with the
# deployment's SUPPRESSION_HASH_KEY): without the key a phone number's hash cannot be found by
# trying every number. Rows an earlier version wrote as an unkeyed SHA-256 still match.
HASHED = "hmac-sha256:"
LEGACY_HASHED = "sha256:"
_pads: tuple[bytes, bytes, bytes] | None = None  # (key, inner pad, outer pad), set by configure


def link_secret_of(env=os.environ, jwt_secret: str | None = None) -> bytes:
    """The consent links' signing secret: CONSENT_LINK_SECRET, else one derived from the JWT
    secret (consent_api signs its links with it; the suppression hash key derives from it)."""
    from crm_chassis.config import DEFAULT_JWT_SECRET
    from crm_chassis.links import link_secret

    jwt = jwt_secret if jwt_secret is not None else env.get("JWT_SECRET", "") or DEFAULT_JWT_SECRET
    return link_secret(env.get("CONSENT_LINK_SECRET", ""), jwt, "consent-links")


def hash_key_of(env=os.environ, jwt_secret: str | None = None) -> bytes:
    """SUPPRESSION_HASH_KEY, else a key derived from the consent links' secret: keep it for the
    life of the deployment, since a new key no longer matches the hashes already kept."""
    if given := env.get("SUPPRESSION_HASH_KEY", ""):
        return given.encode()
    return hashlib.sha256(b"suppression-hash:" + link_secret_of(env, jwt_secret)).digest()


def configure(key: bytes) -> None:
    """The key the service read at start (consent_api.install), with HMAC's two pads of it for
    the SQL form, computed once."""
    global _pads
    block = (hashlib.sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
    _pads = (key, bytes(b ^ 0x36 for b in block), bytes(b ^ 0x5C for b in block))


def _key_pads() -> tuple[bytes, bytes, bytes]:
    if _pads is None:  # outside a started service: the key its settings would give
        configure(hash_key_of())
    return _pads


def hash_key() -> bytes:
    """The key erased suppressions are hashed with in this process."""
    return _key_pads()[0]


def _hex(prefix: str, digest) -> sa.ColumnElement:
    return sa.literal(prefix) + sa.func.encode(digest, "hex")


def address_hash(address: str) -> str:
    """The form an erased customer's suppressed address is kept in: HMAC-SHA256, hex."""
    return HASHED + hmac.new(hash_key(), address.encode(), hashlib.sha256).hexdigest()


def _legacy_hash(address: str) -> str:
    return LEGACY_HASHED + hashlib.sha256(address.encode()).hexdigest()


def _hash_sql(address_col) -> sa.ColumnElement:
    """address_hash in SQL (HMAC from the built-in sha256: no extension needed)."""
    _key, inner, outer = _key_pads()
    text = sa.func.convert_to(address_col, "UTF8")
    inner_digest = sa.func.sha256(sa.literal(inner, sa.LargeBinary).op("||")(text))
    return _hex(HASHED, sa.func.sha256(sa.literal(outer, sa.LargeBinary).op("||")(inner_digest)))


def _legacy_hash_sql(address_col) -> sa.ColumnElement:
    return _hex(LEGACY_HASHED, sa.func.sha256(sa.func.convert_to(address_col, "UTF8")))


def _forms(address: str) -> list[str]:
    return [address, address_hash(address), _legacy_hash(address)]


def suppressed(channel: str, address_col) -> sa.ColumnElement:
    """SQL: the address (a column or value) is suppressed on the channel, as written or as the
    hash an erasure left."""
    s = suppressions.c
    forms = [address_col, _hash_sql(address_col), _legacy_hash_sql(address_col)]
    return sa.exists().where(s.channel == channel, s.address.in_(forms))


def suppression_of(conn: sa.Connection, channel: str, address: str):
    """The suppression row of an address (plain or hashed, the plain one first), or None."""
    s = suppressions.c
    forms = _forms(address)
    q = sa.select(suppressions).where(s.channel == channel, s.address.in_(forms))
    return conn.execute(q.order_by(s.address != address)).first()


BOT_CHANNELS = ("telegram", "bale")


def chat_ids(conn: sa.Connection, customer_id: str) -> dict[str, list[str]]:
    """The customer's bot chat ids (their consent entries name them), by channel: an erasure
    reads them before it blanks those entries."""
    out: dict[str, set[str]] = {}
    for table in (consent_state, consent_ledger):
        q = sa.select(table.c.channel, table.c.address).where(
            table.c.customer_id == customer_id, table.c.channel.in_(BOT_CHANNELS), table.c.address != ""
        )
        for channel, address in conn.execute(q):
            out.setdefault(channel, set()).add(address)
    return {channel: sorted(ids) for channel, ids in out.items()}


def hash_suppressions(conn: sa.Connection, emails=(), phones=(), chats: dict | None = None) -> None:
    """An erasure: the customer's suppressed addresses (e-mail, phone, bot chat ids) are kept as
    their hashes only, so nothing is sent to them again (a re-imported address still matches)
    while the address itself goes."""
    s = suppressions
    by_channel = {"email": emails, "sms": phones, **(chats or {})}
    for channel, given in sorted(by_channel.items()):
        addresses = sorted(set(given) - {""})
        if not addresses:
            continue
        mine = sa.and_(s.c.channel == channel, s.c.address.in_(addresses))
        moved = sa.select(s.c.channel, _hash_sql(s.c.address), s.c.reason, sa.literal(""), s.c.create_time).where(mine)
        conn.execute(
            pg_insert(s)
            .from_select(["channel", "address", "reason", "detail", "create_time"], moved)
            .on_conflict_do_nothing()
        )
        conn.execute(s.delete().where(mine))


def lift(tx, channel: str, address: str) -> bool:
    """An admin lifts a suppression (the address was fixed); True if there was one."""
    return (
        tx.conn.execute(
            suppressions.delete().where(suppressions.c.channel == channel, suppressions.c.address.in_(_forms(address)))
        ).rowcount
        > 0
    )


def sendable(channel: str, purpose: str, address_col, env=os.environ) -> sa.ColumnElement:
    """SQL: may `purpose` be sent on `channel` to the address in `address_col` now."""
    c = consent_state
    not_suppressed = ~suppressed(channel, address_col)
    # the purpose's own status, or a revocation of every purpose ("all") recorded after it
    status = (
        sa.select(c.c.status)
        .where(c.c.channel == channel, c.c.address == address_col, c.c.purpose.in_((purpose, ALL)))
        .order_by(c.c.ledger_id.desc())
        .limit(1)
        .scalar_subquery()
    )
    if mode(channel, env) == "opt_in":
        allowed = status == "granted"
    else:
        allowed = sa.func.coalesce(status, "") != "revoked"
    return sa.and_(not_suppressed, allowed)


def status_of(conn: sa.Connection, channel: str, address: str, purpose: str = "marketing") -> str:
    """pending, granted, revoked, or "" (never asked)."""
    return (
        conn.execute(
            sa.select(consent_state.c.status).where(
                consent_state.c.channel == channel,
                consent_state.c.address == address,
                consent_state.c.purpose == purpose,
            )
        ).scalar()
        or ""
    )
