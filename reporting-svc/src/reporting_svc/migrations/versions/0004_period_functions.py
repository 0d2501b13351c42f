"""SQL functions for grouping by period: Tehran day, Saturday weeks, Jalali year/quarter/month/day

Revision ID: 0004

The Gregorian -> Jalali conversion is the 33-year-cycle arithmetic (the same as jdatetime's for
the years in business use; tests compare them day by day). Keys sort as text: 1405-09, 1405-Q3.
"""

from alembic import op

revision = "0004"
down_revision = "0003"

FUNCTIONS = r"""
CREATE OR REPLACE FUNCTION jalali_ymd(d date) RETURNS int[]
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
  gy int := extract(year FROM d);
  gm int := extract(month FROM d);
  gd int := extract(day FROM d);
  gdm int[] := ARRAY[0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
  gy2 int;
  days int;
  jy int;
  jm int;
  jd int;
BEGIN
  gy2 := CASE WHEN gm > 2 THEN gy + 1 ELSE gy END;
  days := 355666 + 365 * gy + (gy2 + 3) / 4 - (gy2 + 99) / 100 + (gy2 + 399) / 400 + gd + gdm[gm];
  jy := -1595 + 33 * (days / 12053);
  days := days % 12053;
  jy := jy + 4 * (days / 1461);
  days := days % 1461;
  IF days > 365 THEN
    jy := jy + (days - 1) / 365;
    days := (days - 1) % 365;
  END IF;
  IF days < 186 THEN
    jm := 1 + days / 31;
    jd := 1 + days % 31;
  ELSE
    jm := 7 + (days - 186) / 30;
    jd := 1 + (days - 186) % 30;
  END IF;
  RETURN ARRAY[jy, jm, jd];
END $$;

CREATE OR REPLACE FUNCTION tehran_day(t timestamptz) RETURNS date
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT (t AT TIME ZONE 'Asia/Tehran')::date $$;

CREATE OR REPLACE FUNCTION jalali_date(d date) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  SELECT to_char(j[1], 'FM0000') || '-' || to_char(j[2], 'FM00') || '-' || to_char(j[3], 'FM00')
  FROM jalali_ymd(d) AS j $$;

CREATE OR REPLACE FUNCTION jalali_month(d date) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  SELECT to_char(j[1], 'FM0000') || '-' || to_char(j[2], 'FM00') FROM jalali_ymd(d) AS j $$;

CREATE OR REPLACE FUNCTION jalali_quarter(d date) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  SELECT to_char(j[1], 'FM0000') || '-Q' || ((j[2] + 2) / 3)::text FROM jalali_ymd(d) AS j $$;

CREATE OR REPLACE FUNCTION jalali_year(d date) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT to_char((jalali_ymd(d))[1], 'FM0000') $$;

CREATE OR REPLACE FUNCTION jalali_day_of_month(d date) RETURNS int
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT (jalali_ymd(d))[3] $$;

-- The same of an instant, on its Asia/Tehran day.
CREATE OR REPLACE FUNCTION jalali_month(t timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT jalali_month(tehran_day(t)) $$;
CREATE OR REPLACE FUNCTION jalali_quarter(t timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT jalali_quarter(tehran_day(t)) $$;
CREATE OR REPLACE FUNCTION jalali_year(t timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT jalali_year(tehran_day(t)) $$;

-- Weeks run Saturday to Friday: the week's Saturday, and the weekday 0 (Saturday) .. 6 (Friday).
CREATE OR REPLACE FUNCTION week_start_saturday(d date) RETURNS date
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT d - ((extract(dow FROM d)::int + 1) % 7) $$;
CREATE OR REPLACE FUNCTION weekday_from_saturday(d date) RETURNS int
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT (extract(dow FROM d)::int + 1) % 7 $$;
"""

DROPS = [
    "weekday_from_saturday(date)",
    "week_start_saturday(date)",
    "jalali_year(timestamptz)",
    "jalali_quarter(timestamptz)",
    "jalali_month(timestamptz)",
    "jalali_day_of_month(date)",
    "jalali_year(date)",
    "jalali_quarter(date)",
    "jalali_month(date)",
    "jalali_date(date)",
    "tehran_day(timestamptz)",
    "jalali_ymd(date)",
]


def upgrade() -> None:
    op.execute(FUNCTIONS)


def downgrade() -> None:
    for f in DROPS:
        op.execute(f"DROP FUNCTION IF EXISTS {f}")
