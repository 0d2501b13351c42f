"""search at scale: a lexicon of the words in the search keys, for typo correction

SearchCustomers matched typos with `search_text %> query` (pg_trgm word similarity over
every field). On a million customers that costs seconds: `search_text` is ~145 characters
(~27 us of word_similarity a row) and a short or common query has tens of thousands of
trigram candidates to recheck and rank. Typos are now corrected word by word against the
distinct words of the search keys (a few thousand, even for millions of customers; numbers
and e-mail addresses are left out), by edit distance (fuzzystrmatch), and the corrected
words are looked up in the full-text index like any other query. Statement-level triggers
keep the lexicon up to date from every insert and update (one set-based INSERT per
statement, words in sorted order so concurrent writers cannot deadlock).

More statistics on `search_tsv` let the planner estimate prefix queries (`ali:*`), so it
chooses between walking the newest-first index and a bitmap scan correctly.

Revision ID: 0005
"""

from alembic import op

revision = "0005"
down_revision = "0004"

# A lexicon word: 3 to 40 characters, no digit, no e-mail or web address.
WORDS = """
    SELECT DISTINCT w FROM {source}
    WHERE length(w) BETWEEN 3 AND 40 AND w !~ '[0-9@./:-]'
    ORDER BY w
"""


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS fuzzystrmatch")
    op.execute("CREATE TABLE search_words (word text PRIMARY KEY)")
    op.execute(
        "INSERT INTO search_words (word) "
        + WORDS.format(source="ts_stat('SELECT search_tsv FROM customers') AS s(w, ndoc, nentry)")
    )
    op.execute("CREATE INDEX search_words_length ON search_words (length(word))")
    op.execute(
        f"""
        CREATE FUNCTION customers_search_words() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO search_words (word)
            {WORDS.format(source="new_rows, unnest(tsvector_to_array(new_rows.search_tsv)) AS w")}
            ON CONFLICT DO NOTHING;
            RETURN NULL;
        END $$
        """
    )
    for event in ("INSERT", "UPDATE"):
        op.execute(
            f"CREATE TRIGGER customers_search_words_{event.lower()} AFTER {event} ON customers "
            "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION customers_search_words()"
        )
    op.execute("ALTER TABLE customers ALTER COLUMN search_tsv SET STATISTICS 1000")
    op.execute("ANALYZE customers")


def downgrade() -> None:
    op.execute("ALTER TABLE customers ALTER COLUMN search_tsv SET STATISTICS -1")
    op.execute("DROP TRIGGER customers_search_words_update ON customers")
    op.execute("DROP TRIGGER customers_search_words_insert ON customers")
    op.execute("DROP FUNCTION customers_search_words()")
    op.execute("DROP TABLE search_words")
