"""Segment ids in creation order: a new segment's id sorts after every one created in an earlier
millisecond (the millisecond clock in its first 48 bits, the rest random: the layout of a
version 7 UUID; two of the same millisecond sort either way), so a
first build's members, inserted in customer order, append at the right edge of the
segment_members key (segments.py `_first_build`): PostgreSQL's fast path for the rightmost leaf,
no descent of the tree per member and leaves split 90/10 instead of in halves. Existing ids stay.

Revision ID: 0012
"""

from alembic import op

revision = "0012"
down_revision = "0011"  # re-chained after main's 0011 (web behaviour)

# A random (version 4) UUID whose first 6 bytes are replaced by the Unix time in milliseconds and
# whose version nibble is set to 7 (bits 52 and 53 added to the 4's bit 54).
SEGMENT_ID = """
CREATE FUNCTION segment_id() RETURNS uuid LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
  SELECT encode(
           set_bit(set_bit(
             overlay(uuid_send(gen_random_uuid())
                     PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                     FROM 1 FOR 6),
             52, 1), 53, 1),
           'hex')::uuid
$$
"""


def upgrade() -> None:
    op.execute(SEGMENT_ID)
    op.execute("ALTER TABLE segments ALTER COLUMN id SET DEFAULT segment_id()")


def downgrade() -> None:
    op.execute("ALTER TABLE segments ALTER COLUMN id SET DEFAULT gen_random_uuid()")
    op.execute("DROP FUNCTION segment_id()")
