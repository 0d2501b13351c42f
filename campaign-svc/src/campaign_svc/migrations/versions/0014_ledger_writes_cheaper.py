"""The ledger's writes cheaper per row, the same rules kept.

- A movement's member and programme are checked by ONE foreign key, (member_id, program_id)
  to the member's (id, program_id), instead of one each: a movement cannot name a programme its
  member is not in (the two keys allowed that), at one check per row instead of two. Deleting a
  programme still removes its members and, through them, their movements. Movements that
  already name another programme than their member's stop the migration, counted, to be
  corrected by hand (which of the two is wrong cannot be told here).
- loyalty_members is kept 30% free per page (fillfactor 70): a member's row is rewritten by
  every earning, redemption and expiry, and with room on its page the new version is a heap-only
  tuple, no entry added to the member's indexes.
- `loyalty_check_queued` (0013), evaluated in the triggers' WHEN for every row written, becomes
  one SQL expression that PostgreSQL inlines into the WHEN instead of a PL/pgSQL call per row;
  the check itself (`loyalty_check_balance`) reads the member's balance and its ledger sum in
  one query instead of two. What is checked and when is unchanged.

Revision ID: 0014
"""

from alembic import op

revision = "0014"
down_revision = "0013"

QUEUED_SQL = """
CREATE OR REPLACE FUNCTION loyalty_check_queued(mid uuid) RETURNS boolean LANGUAGE sql VOLATILE AS $$
  SELECT CASE
           -- a uuid is 36 characters without a comma: "<id>," matches that entry only
           WHEN strpos(coalesce(current_setting('loyalty.ledger_checks', true), ''), mid::text || ',') > 0 THEN false
           -- a bulk change past 32 KiB (885 members) queues a check for every further row
           WHEN octet_length(coalesce(current_setting('loyalty.ledger_checks', true), '')) >= 32768 THEN true
           ELSE set_config('loyalty.ledger_checks',
                           coalesce(current_setting('loyalty.ledger_checks', true), '') || mid::text || ',',
                           true) IS NOT NULL
         END
$$;
"""

QUEUED_PLPGSQL = """
DROP FUNCTION loyalty_check_queued(uuid) CASCADE;
CREATE FUNCTION loyalty_check_queued(mid uuid) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
  pending text := coalesce(current_setting('loyalty.ledger_checks', true), '');
  entry text := mid::text || ',';
BEGIN
  IF strpos(pending, entry) > 0 THEN
    RETURN false;
  END IF;
  IF octet_length(pending) < 32768 THEN
    PERFORM set_config('loyalty.ledger_checks', pending || entry, true);
  END IF;
  RETURN true;
END $$;
"""

CHECK_ONE_QUERY = """
CREATE OR REPLACE FUNCTION loyalty_check_balance() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE mid uuid; total bigint; now_balance bigint;
BEGIN
  IF TG_TABLE_NAME = 'loyalty_members' THEN mid := NEW.id; ELSE mid := NEW.member_id; END IF;
  -- no longer pending: a later change of this member in the transaction queues a check again
  PERFORM set_config('loyalty.ledger_checks',
                     replace(coalesce(current_setting('loyalty.ledger_checks', true), ''), mid::text || ',', ''),
                     true);
  -- NEW is the row as this event wrote it; the check is of the member as the transaction leaves it
  SELECT mb.balance, (SELECT coalesce(sum(l.points), 0) FROM loyalty_movements l WHERE l.member_id = mid)
    INTO now_balance, total
    FROM loyalty_members mb WHERE mb.id = mid;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  IF total <> now_balance THEN
    RAISE EXCEPTION 'loyalty member % balance % is not the sum of its movements %', mid, now_balance, total
      USING ERRCODE = 'check_violation';
  END IF;
  RETURN NULL;
END $$;
"""

CHECK_TWO_QUERIES = """
CREATE OR REPLACE FUNCTION loyalty_check_balance() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE mid uuid; total bigint; now_balance bigint;
BEGIN
  IF TG_TABLE_NAME = 'loyalty_members' THEN mid := NEW.id; ELSE mid := NEW.member_id; END IF;
  PERFORM set_config('loyalty.ledger_checks',
                     replace(coalesce(current_setting('loyalty.ledger_checks', true), ''), mid::text || ',', ''),
                     true);
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

# the triggers of 0013, created again after the function they name in WHEN is replaced
TRIGGERS = """
CREATE CONSTRAINT TRIGGER loyalty_members_balance_is_ledger_sum
  AFTER INSERT OR UPDATE OF balance ON loyalty_members
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (loyalty_check_queued(NEW.id))
  EXECUTE FUNCTION loyalty_check_balance();
CREATE CONSTRAINT TRIGGER loyalty_movements_balance_is_ledger_sum
  AFTER INSERT OR UPDATE OF points, member_id ON loyalty_movements
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (loyalty_check_queued(NEW.member_id))
  EXECUTE FUNCTION loyalty_check_balance();
"""

DROP_TRIGGERS = """
DROP TRIGGER loyalty_members_balance_is_ledger_sum ON loyalty_members;
DROP TRIGGER loyalty_movements_balance_is_ledger_sum ON loyalty_movements;
"""


def upgrade() -> None:
    # a movement of another programme than its member's cannot be right, nor guessed right here
    bad = (
        op.get_bind()
        .exec_driver_sql(
            "SELECT count(*) FROM loyalty_movements l JOIN loyalty_members mb ON mb.id = l.member_id "
            "WHERE mb.program_id <> l.program_id"
        )
        .scalar_one()
    )
    if bad:
        raise RuntimeError(
            f"migration 0014: {bad} loyalty movements name another programme than their member's "
            "(SELECT l.* FROM loyalty_movements l JOIN loyalty_members mb ON mb.id = l.member_id "
            "WHERE mb.program_id <> l.program_id); correct them, then migrate again"
        )
    op.execute("ALTER TABLE loyalty_members ADD CONSTRAINT loyalty_members_id_program UNIQUE (id, program_id)")
    op.execute(
        "ALTER TABLE loyalty_movements ADD CONSTRAINT loyalty_movements_member_fkey FOREIGN KEY (member_id, program_id) "
        "REFERENCES loyalty_members (id, program_id) ON DELETE CASCADE"
    )
    op.execute("ALTER TABLE loyalty_movements DROP CONSTRAINT loyalty_movements_member_id_fkey")
    op.execute("ALTER TABLE loyalty_movements DROP CONSTRAINT loyalty_movements_program_id_fkey")
    op.execute("ALTER TABLE loyalty_members SET (fillfactor = 70)")
    op.execute(DROP_TRIGGERS)
    op.execute(QUEUED_SQL)
    op.execute(CHECK_ONE_QUERY)
    op.execute(TRIGGERS)


def downgrade() -> None:
    op.execute(DROP_TRIGGERS)
    op.execute(QUEUED_PLPGSQL)
    op.execute(CHECK_TWO_QUERIES)
    op.execute(TRIGGERS)
    op.execute("ALTER TABLE loyalty_members RESET (fillfactor)")
    op.execute(
        "ALTER TABLE loyalty_movements ADD CONSTRAINT loyalty_movements_program_id_fkey FOREIGN KEY (program_id) "
        "REFERENCES loyalty_programs (id) ON DELETE CASCADE"
    )
    op.execute(
        "ALTER TABLE loyalty_movements ADD CONSTRAINT loyalty_movements_member_id_fkey FOREIGN KEY (member_id) "
        "REFERENCES loyalty_members (id) ON DELETE CASCADE"
    )
    op.execute("ALTER TABLE loyalty_movements DROP CONSTRAINT loyalty_movements_member_fkey")
    op.execute("ALTER TABLE loyalty_members DROP CONSTRAINT loyalty_members_id_program")
