"""crm_chassis.persian: search keys, digits, phones, national ids and the Jalali calendar."""

from __future__ import annotations

import datetime as dt

import pytest

from crm_chassis import persian
from crm_chassis.persian import (
    JALALI_MONTHS,
    AmbiguousDate,
    DateError,
    JalaliDate,
    format_jalali,
    jalali_month_bounds,
    jalali_period,
    jalali_quarter_bounds,
    jalali_to_gregorian,
    jalali_year_bounds,
    parse_date,
    parse_jalali,
    to_jalali,
)

# (Gregorian, Jalali) pairs checked against the Iranian calendar (Nowruz days, leap years).
PAIRS = [
    (dt.date(2024, 3, 20), (1403, 1, 1)),  # Nowruz 1403
    (dt.date(2025, 3, 20), (1403, 12, 30)),  # 1403 is a leap year: Esfand has 30 days
    (dt.date(2025, 3, 21), (1404, 1, 1)),
    (dt.date(2023, 3, 21), (1402, 1, 1)),
    (dt.date(2024, 3, 19), (1402, 12, 29)),  # 1402 is not: Esfand ends on the 29th
    (dt.date(1990, 8, 3), (1369, 5, 12)),
    (dt.date(1979, 2, 11), (1357, 11, 22)),
    (dt.date(2024, 9, 22), (1403, 7, 1)),  # Mehr 1: the second half-year (30-day months)
    (dt.date(2024, 9, 21), (1403, 6, 31)),
]


# --------------------------------------------------------------------------- text and digits


def test_normalize_unifies_arabic_letters_digits_and_invisible_characters():
    assert persian.normalize("علي  كريمي") == persian.normalize("علی کریمی") == "علی کریمی"
    assert persian.normalize("مدرسة") == "مدرسه"
    assert persian.normalize("٠٩١٢ ۱۲۳") == "0912 123"
    assert persian.normalize("می\u200cخواهم") == "می خواهم"  # ZWNJ -> space
    assert persian.normalize("مُحَمَّد") == "محمد"  # diacritics
    assert persian.normalize("تهـــران") == "تهران"  # tatweel
    assert persian.normalize("  Ali  REZAEI ") == "ali rezaei"
    assert persian.normalize(None) == persian.normalize("") == ""


def test_digits_both_ways_touch_nothing_else():
    assert persian.to_ascii_digits("۱۴۰۳/۰۵/۱۲ و ٢٠٢٤") == "1403/05/12 و 2024"
    assert persian.to_persian_digits("1403/05/12 ABC") == "۱۴۰۳/۰۵/۱۲ ABC"
    assert persian.to_persian_digits(42) == "۴۲"
    assert persian.to_persian_digits("٤٢") == "۴۲"  # Arabic-Indic -> Persian
    assert persian.digits_only("تلفن: ۰۲۱-۸۸ ۷۷") == "0218877"


def test_numbers_for_display_and_back():
    assert persian.format_number(12_500_000) == "۱۲٬۵۰۰٬۰۰۰"
    assert persian.format_number(1234.5, decimals=2) == "۱٬۲۳۴٫۵۰"
    assert persian.format_number(12_500_000, persian_digits=False) == "12,500,000"
    assert persian.parse_number("۱۲٬۵۰۰٬۰۰۰") == 12_500_000
    assert persian.parse_number("۳٫۵") == 3.5 and persian.parse_number("1,234.5") == 1234.5
    with pytest.raises(ValueError):
        persian.parse_number("ده")


# --------------------------------------------------------------------------- identifiers


@pytest.mark.parametrize(
    ("raw", "region", "e164"),
    [
        ("۰۹۱۲۱۱۱۲۲۳۳", "IR", "+989121112233"),  # Persian digits
        ("٠٩١٢١١١٢٢٣٣", "IR", "+989121112233"),  # Arabic-Indic digits
        ("0912 111 2233", "IR", "+989121112233"),
        ("+98 21 8888 7777", "DE", "+982188887777"),  # international: the region does not matter
        ("0098 21 8888 7777", "IR", "+982188887777"),
        ("030 1234567", "DE", "+49301234567"),  # the default region is the caller's
    ],
)
def test_phones_become_e164(raw, region, e164):
    assert persian.phone_e164(raw, region) == e164


@pytest.mark.parametrize("raw", ["12", "not a phone", "+98 1", "۰۹۱۲۱۱۱۲۲۳۳۴۴۵۵۶۶۷۷۸"])
def test_impossible_phones_are_refused(raw):
    assert persian.phone_e164(raw, "IR") is None


def _with_check_digit(body: str) -> str:
    total = sum(int(d) * (10 - i) for i, d in enumerate(body)) % 11
    return body + str(total if total < 2 else 11 - total)


def test_national_id_check_digit():
    good = _with_check_digit("049937089")
    assert good == "0499370899"
    assert persian.iran_national_id_ok(good)
    assert persian.iran_national_id_ok(persian.to_persian_digits(good))  # typed in Persian digits
    assert persian.iran_national_id_ok("049-937089-9")  # separators are ignored
    for bad in (
        "0499370898",  # wrong check digit
        "1111111111",  # all the same digit (its check digit would be right)
        "049937089",  # nine digits
        "04993708990",  # eleven
        "",
    ):
        assert not persian.iran_national_id_ok(bad), bad
    assert persian.iran_postal_code_ok("۱۳۱۴۵-۶۷۸۹۰") and not persian.iran_postal_code_ok("12345")


# --------------------------------------------------------------------------- Jalali


@pytest.mark.parametrize(("gregorian", "jalali"), PAIRS)
def test_jalali_gregorian_both_ways(gregorian, jalali):
    assert jalali_to_gregorian(*jalali) == gregorian
    assert to_jalali(gregorian) == jalali
    assert to_jalali(dt.datetime.combine(gregorian, dt.time(23, 59))) == jalali
    assert JalaliDate(*jalali).to_gregorian() == gregorian


def test_no_such_jalali_day():
    assert jalali_to_gregorian(1402, 12, 30) is None  # 1402 is not a leap year
    assert jalali_to_gregorian(1399, 7, 31) is None  # the second half-year has 30-day months
    assert jalali_to_gregorian(1403, 13, 1) is None
    assert jalali_to_gregorian(1403, 1, 0) is None
    assert jalali_to_gregorian(0, 1, 1) is None


def test_jalali_formatting_and_month_names():
    day = dt.date(2024, 8, 2)
    assert format_jalali(day) == "1403/05/12"
    assert format_jalali(day, "-") == "1403-05-12"
    assert format_jalali(day, persian_digits=True) == "۱۴۰۳/۰۵/۱۲"
    j = to_jalali(day)
    assert (j.year, j.month, j.day, j.quarter) == (1403, 5, 12, 2)
    assert j.month_name == "مرداد" and j.long() == "۱۲ مرداد ۱۴۰۳"
    assert JALALI_MONTHS[0] == "فروردین" and JALALI_MONTHS[11] == "اسفند" and len(JALALI_MONTHS) == 12


def test_jalali_parsing():
    assert parse_jalali("1403/05/12") == dt.date(2024, 8, 2)
    assert parse_jalali("۱۴۰۳-۵-۱۲") == dt.date(2024, 8, 2)
    with pytest.raises(DateError, match="not a valid Jalali"):
        parse_jalali("1402/12/30")
    with pytest.raises(DateError, match="not a Jalali date"):
        parse_jalali("12 Mordad")


def test_jalali_bounds_for_grouping():
    # Esfand 1403 has 30 days (leap year), Esfand 1402 29: the bounds are half-open.
    assert jalali_month_bounds(1403, 12) == (dt.date(2025, 2, 19), dt.date(2025, 3, 21))
    assert jalali_month_bounds(1402, 12) == (dt.date(2024, 2, 20), dt.date(2024, 3, 20))
    assert jalali_month_bounds(1403, 1) == (dt.date(2024, 3, 20), dt.date(2024, 4, 20))  # 31 days
    assert jalali_month_bounds(1403, 7) == (dt.date(2024, 9, 22), dt.date(2024, 10, 22))  # 30 days
    assert jalali_quarter_bounds(1403, 1) == (dt.date(2024, 3, 20), dt.date(2024, 6, 21))
    assert jalali_quarter_bounds(1403, 4) == (dt.date(2024, 12, 21), dt.date(2025, 3, 21))
    assert jalali_year_bounds(1403) == (dt.date(2024, 3, 20), dt.date(2025, 3, 21))
    assert (jalali_year_bounds(1403)[1] - jalali_year_bounds(1403)[0]).days == 366
    assert (jalali_year_bounds(1402)[1] - jalali_year_bounds(1402)[0]).days == 365
    with pytest.raises(ValueError):
        jalali_month_bounds(1403, 13)
    with pytest.raises(ValueError):
        jalali_quarter_bounds(1403, 5)


def test_every_day_of_a_year_falls_in_its_own_period():
    start, end = jalali_year_bounds(1403)
    day, months = start, {}
    while day < end:
        p = jalali_period(day, "month")
        assert p.start <= day < p.end
        months.setdefault(p.label, []).append(day)
        day += dt.timedelta(days=1)
    assert sorted(months) == [f"1403/{m:02d}" for m in range(1, 13)]
    assert [len(months[f"1403/{m:02d}"]) for m in range(1, 13)] == [31] * 6 + [30] * 5 + [30]
    assert jalali_period(dt.date(2024, 8, 2), "quarter") == ("1403-Q2", dt.date(2024, 6, 21), dt.date(2024, 9, 22))
    assert jalali_period(dt.date(2025, 3, 20), "year").label == "1403"
    with pytest.raises(ValueError):
        jalali_period(dt.date(2024, 8, 2), "week")


# --------------------------------------------------------------------------- date cells


def test_parse_date_cells():
    assert parse_date("۱۳۶۹/۰۵/۱۲") == dt.date(1990, 8, 3)  # Jalali, Persian digits
    assert parse_date("1990-08-03") == parse_date("1990/8/3") == parse_date("1990.08.03 10:00") == dt.date(1990, 8, 3)
    assert parse_date(dt.datetime(1990, 8, 3, 12)) == parse_date(dt.date(1990, 8, 3)) == dt.date(1990, 8, 3)
    assert parse_date("03/08/1990", "day") == dt.date(1990, 8, 3)
    assert parse_date("03/08/1990", "month") == dt.date(1990, 3, 8)
    assert parse_date("۱۲/۰۵/۱۳۶۹", "day") == dt.date(1990, 8, 3)
    with pytest.raises(AmbiguousDate):
        parse_date("03/08/1990")
    for bad, why in (
        ("yesterday", "is not a date"),
        ("1990-02-30", "not a valid calendar date"),
        ("1402/12/30", "not a valid Jalali"),
    ):
        with pytest.raises(DateError, match=why):
            parse_date(bad)
    with pytest.raises(DateError):
        parse_date("13/08/1990", "month")
