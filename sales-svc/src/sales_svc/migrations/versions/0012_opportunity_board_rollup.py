"""opportunities: the pipeline board's rollup, kept exact by a trigger, and an index by owner

- opportunity_board_rollup: the open (not deleted) opportunities per (pipeline, stage, owner,
  team, product line, currency): how many, Σ amount and Σ amount × probability / 100 (exact
  numeric). GetPipelineBoard sums a stage's few rows of it instead of reading every open
  opportunity. The key is unique with NULLS NOT DISTINCT (team and product line may be null).
- opportunities_board_rollup (AFTER INSERT / UPDATE / DELETE, FOR EACH ROW): takes the old
  row's contribution out if it was open and not deleted, puts the new one's in, with upserts
  (INSERT … ON CONFLICT DO UPDATE, so concurrent writers add up; two keys are touched in key
  order, so two single-row moves in opposite directions cannot deadlock). The WHEN clauses
  skip the function for rows that are not (or were not) on a board and for updates that change
  none of the columns it reads. Rows that reach count 0 stay (at most one per key ever seen).
  TRUNCATE of opportunities empties it too.
- Backfilled from the current rows with one INSERT … SELECT, after the trigger exists and
  under a lock that keeps writers out until this migration commits (exact from the start).
- opportunities_board_owner (pipeline, stage, owner, stage entry time INCLUDE team, product
  line, amount, currency, probability, id; open and not deleted): the board counts the
  opportunities of a stage that are not rotting yet, owner by owner (the visible owners come
  from the rollup), and takes the cards of a narrow scope (a rep, a manager, an owner filter)
  from the visible owners' entries alone — both in the index alone. It replaces
  opportunities_board (pipeline, stage; same predicate), a prefix of it and of
  opportunities_board_cards, so an insert still maintains as many indexes as before.

Revision ID: 0012
"""

from alembic import op

revision = "0012"
down_revision = "0011"

KEY = "pipeline_id, stage_id, owner_id, team_id, product_line_id, currency_code"

UPSERT = f"""
        INSERT INTO opportunity_board_rollup AS r ({KEY}, open_count, amount, weighted_amount)
        VALUES (d.pipeline_id, d.stage_id, d.owner_id, d.team_id, d.product_line_id, d.currency_code,
                d.open_count, d.amount, d.weighted_amount)
        ON CONFLICT ({KEY}) DO UPDATE SET
            open_count = r.open_count + EXCLUDED.open_count,
            amount = r.amount + EXCLUDED.amount,
            weighted_amount = r.weighted_amount + EXCLUDED.weighted_amount;"""

# One function for the three row triggers: the old row's contribution out (a), the new one's in
# (b); one delta when the key is the same, else the lower key first (so that concurrent moves
# lock rollup rows in one order). amount × probability × 0.01 is exact in numeric (÷ 100 might
# round). The upsert is written out, not called: its plan is prepared once per session.
FUNCTION = f"""
CREATE FUNCTION opportunity_board_rollup_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    has_a boolean := TG_OP <> 'INSERT' AND OLD.state = 'open' AND OLD.delete_time IS NULL;
    has_b boolean := TG_OP <> 'DELETE' AND NEW.state = 'open' AND NEW.delete_time IS NULL;
    a opportunity_board_rollup;
    b opportunity_board_rollup;
    d opportunity_board_rollup;
BEGIN
    IF has_a THEN
        a := ROW(OLD.pipeline_id, OLD.stage_id, OLD.owner_id, OLD.team_id, OLD.product_line_id, OLD.currency_code,
                 -1, -OLD.amount, -(OLD.amount * OLD.probability * 0.01));
    END IF;
    IF has_b THEN
        b := ROW(NEW.pipeline_id, NEW.stage_id, NEW.owner_id, NEW.team_id, NEW.product_line_id, NEW.currency_code,
                 1, NEW.amount, NEW.amount * NEW.probability * 0.01);
    END IF;
    IF has_a AND has_b THEN
        IF (a.pipeline_id, a.stage_id, a.owner_id, a.team_id, a.product_line_id, a.currency_code)
           IS NOT DISTINCT FROM (b.pipeline_id, b.stage_id, b.owner_id, b.team_id, b.product_line_id, b.currency_code)
        THEN
            a.open_count := 0;
            a.amount := a.amount + b.amount;
            a.weighted_amount := a.weighted_amount + b.weighted_amount;
            has_b := false;
            has_a := a.amount <> 0 OR a.weighted_amount <> 0;
        ELSIF (b.pipeline_id::text, b.stage_id::text, b.owner_id, coalesce(b.team_id::text, ''),
               coalesce(b.product_line_id::text, ''), b.currency_code)
            < (a.pipeline_id::text, a.stage_id::text, a.owner_id, coalesce(a.team_id::text, ''),
               coalesce(a.product_line_id::text, ''), a.currency_code)
        THEN
            d := a;
            a := b;
            b := d;
        END IF;
    END IF;
    IF has_a THEN
        d := a;{UPSERT}
    END IF;
    IF has_b THEN
        d := b;{UPSERT}
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION opportunity_board_rollup_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE opportunity_board_rollup;
    RETURN NULL;
END
$$;
"""

ON_BOARD = "state = 'open' AND delete_time IS NULL"
READ = ("state", "delete_time", "pipeline_id", "stage_id", "owner_id", "team_id", "product_line_id")
READ += ("currency_code", "amount", "probability")


def _row(prefix: str) -> str:
    return "(" + ", ".join(f"{prefix}.{c}" for c in READ) + ")"


TRIGGERS = f"""
CREATE TRIGGER opportunities_board_rollup_insert AFTER INSERT ON opportunities FOR EACH ROW
    WHEN (NEW.state = 'open' AND NEW.delete_time IS NULL)
    EXECUTE FUNCTION opportunity_board_rollup_trigger();
CREATE TRIGGER opportunities_board_rollup_update AFTER UPDATE ON opportunities FOR EACH ROW
    WHEN (((OLD.state = 'open' AND OLD.delete_time IS NULL) OR (NEW.state = 'open' AND NEW.delete_time IS NULL))
          AND {_row("OLD")} IS DISTINCT FROM {_row("NEW")})
    EXECUTE FUNCTION opportunity_board_rollup_trigger();
CREATE TRIGGER opportunities_board_rollup_delete AFTER DELETE ON opportunities FOR EACH ROW
    WHEN (OLD.state = 'open' AND OLD.delete_time IS NULL)
    EXECUTE FUNCTION opportunity_board_rollup_trigger();
CREATE TRIGGER opportunities_board_rollup_truncate AFTER TRUNCATE ON opportunities FOR EACH STATEMENT
    EXECUTE FUNCTION opportunity_board_rollup_truncate();
"""


def upgrade() -> None:
    op.execute(
        "CREATE TABLE opportunity_board_rollup ("
        " pipeline_id uuid NOT NULL, stage_id uuid NOT NULL, owner_id text NOT NULL,"
        " team_id uuid, product_line_id uuid, currency_code text NOT NULL,"
        " open_count bigint NOT NULL DEFAULT 0, amount numeric NOT NULL DEFAULT 0,"
        " weighted_amount numeric NOT NULL DEFAULT 0)"
        # Every write to a board's opportunity updates a row in place: room for HOT updates,
        # and vacuumed after a fixed number of them (the table stays a few pages).
        " WITH (fillfactor = 50, autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000)"
    )
    op.execute(
        f"CREATE UNIQUE INDEX opportunity_board_rollup_key ON opportunity_board_rollup ({KEY}) NULLS NOT DISTINCT"
    )
    # Writers wait from here until this migration commits: the trigger and the backfill see the
    # same rows, and none is counted twice or missed.
    op.execute("LOCK TABLE opportunities IN SHARE ROW EXCLUSIVE MODE")
    op.execute(FUNCTION)
    op.execute(TRIGGERS)
    op.execute(
        f"INSERT INTO opportunity_board_rollup ({KEY}, open_count, amount, weighted_amount) "
        f"SELECT {KEY}, count(*), sum(amount), sum(amount * probability * 0.01) "
        f"FROM opportunities WHERE {ON_BOARD} GROUP BY {KEY}"
    )
    op.execute(
        "CREATE INDEX opportunities_board_owner ON opportunities (pipeline_id, stage_id, owner_id, stage_enter_time) "
        f"INCLUDE (team_id, product_line_id, amount, currency_code, probability, id) WHERE {ON_BOARD}"
    )
    op.execute("DROP INDEX IF EXISTS opportunities_board")
    op.execute("ANALYZE opportunity_board_rollup")


def downgrade() -> None:
    op.execute(
        f"CREATE INDEX IF NOT EXISTS opportunities_board ON opportunities (pipeline_id, stage_id) WHERE {ON_BOARD}"
    )
    op.execute("DROP INDEX IF EXISTS opportunities_board_owner")
    for name in ("insert", "update", "delete", "truncate"):
        op.execute(f"DROP TRIGGER IF EXISTS opportunities_board_rollup_{name} ON opportunities")
    op.execute("DROP FUNCTION IF EXISTS opportunity_board_rollup_truncate()")
    op.execute("DROP FUNCTION IF EXISTS opportunity_board_rollup_trigger()")
    op.execute("DROP TABLE IF EXISTS opportunity_board_rollup")
