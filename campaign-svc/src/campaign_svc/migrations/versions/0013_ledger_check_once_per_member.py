"""The ledger check (migration 0005) once per member per transaction instead of once per row.

The deferred constraint triggers of 0005 queue an event for every movement written and every
member row whose balance is written; at commit each one sums the member's whole ledger. A
consumer batch writes a movement and the member's row for each earning: two checks or more
per member, each a sum over all its movements. Now a check is queued for a member only when
none is pending for it in the transaction (the triggers' WHEN, evaluated as the row is
written): `loyalty_check_queued` keeps the members with a pending check in a transaction-local
setting, and the check removes its member from it as it runs, so a change after a check has
run (SET CONSTRAINTS ... IMMEDIATE) queues another one. Every change of a member's ledger or
balance is still followed by a check that runs after it: the one pending when the change was
written (it runs at commit, or at the end of a statement in IMMEDIATE mode, after that
change), or the one the change queued. A savepoint rolled back drops its queued events and
its changes of the setting together.

Revision ID: 0013
"""

from alembic import op

revision = "0013"
down_revision = "0012"

# The pending list is a string searched and copied at every row written, so it is kept to
# 32 KiB (885 members): a transaction that writes more members than that (a bulk change) has a
# check queued for every further row, as before, instead of a search that grows with it.
QUEUED = """
CREATE FUNCTION loyalty_check_queued(mid uuid) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
  pending text := coalesce(current_setting('loyalty.ledger_checks', true), '');
  entry text := mid::text || ',';
BEGIN
  -- a uuid is 36 characters without a comma: "<id>," matches that entry only
  IF strpos(pending, entry) > 0 THEN
    RETURN false;
  END IF;
  IF octet_length(pending) < 32768 THEN
    PERFORM set_config('loyalty.ledger_checks', pending || entry, true);
  END IF;
  RETURN true;
END $$;
"""

CHECK = """
CREATE OR REPLACE FUNCTION loyalty_check_balance() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE mid uuid; total bigint; now_balance bigint;
BEGIN
  IF TG_TABLE_NAME = 'loyalty_members' THEN mid := NEW.id; ELSE mid := NEW.member_id; END IF;
  -- no longer pending: a later change of this member in the transaction queues a check again
  PERFORM set_config('loyalty.ledger_checks',
                     replace(coalesce(current_setting('loyalty.ledger_checks', true), ''), mid::text || ',', ''),
                     true);
  -- NEW is the row as this event wrote it; the check is of the member as the transaction leaves it
  SELECT balance INTO now_balance FROM loyalty_members WHERE id = mid;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  SELECT coalesce(sum(points), 0) INTO total FROM loyalty_movements WHERE member_id = mid;
  IF total <> now_balance THEN
    RAISE EXCEPTION 'loyalty member % balance % is not the sum of its movements %', mid, now_balance, total
      USING ERRCODE = 'check_violation';
  END IF;
  RETURN NULL;
END $$;
"""

OLD_CHECK = """
CREATE OR REPLACE FUNCTION loyalty_check_balance() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE mid uuid; total bigint; now_balance bigint;
BEGIN
  IF TG_TABLE_NAME = 'loyalty_members' THEN mid := NEW.id; ELSE mid := NEW.member_id; END IF;
  -- NEW is the row as this event wrote it; the check is of the member as the transaction leaves it
  SELECT balance INTO now_balance FROM loyalty_members WHERE id = mid;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  SELECT coalesce(sum(points), 0) INTO total FROM loyalty_movements WHERE member_id = mid;
  IF total <> now_balance THEN
    RAISE EXCEPTION 'loyalty member % balance % is not the sum of its movements %', mid, now_balance, total
      USING ERRCODE = 'check_violation';
  END IF;
  RETURN NULL;
END $$;
"""


def _triggers(when_members: str, when_movements: str) -> str:
    return f"""
DROP TRIGGER loyalty_members_balance_is_ledger_sum ON loyalty_members;
DROP TRIGGER loyalty_movements_balance_is_ledger_sum ON loyalty_movements;
CREATE CONSTRAINT TRIGGER loyalty_members_balance_is_ledger_sum
  AFTER INSERT OR UPDATE OF balance ON loyalty_members
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW {when_members} EXECUTE FUNCTION loyalty_check_balance();
CREATE CONSTRAINT TRIGGER loyalty_movements_balance_is_ledger_sum
  AFTER INSERT OR UPDATE OF points, member_id ON loyalty_movements
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW {when_movements} EXECUTE FUNCTION loyalty_check_balance();
"""


def upgrade() -> None:
    op.execute(QUEUED)
    op.execute(CHECK)
    op.execute(_triggers("WHEN (loyalty_check_queued(NEW.id))", "WHEN (loyalty_check_queued(NEW.member_id))"))


def downgrade() -> None:
    op.execute(_triggers("", ""))
    op.execute(OLD_CHECK)
    op.execute("DROP FUNCTION loyalty_check_queued(uuid)")
