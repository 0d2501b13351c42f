"""Persian text, digits, Iranian identifiers, phone numbers and the Jalali calendar.

Every service that stores or shows Persian data needs the same handful of rules; they live here
once. Nothing here touches a database or a setting: a phone's default region, for instance, is
a parameter the service passes from its own configuration.

Search keys
    ``normalize(text)``: the key a search or a duplicate check compares (NFKC, Arabic letter
    variants to Persian, Persian/Arabic-Indic digits to ASCII, no diacritics, tatweel or
    zero-width characters, lower case, single spaces). Store text as given; compare keys.
    ``persian_letters(text)``: for display, Arabic Yeh/Kaf and digits as the Persian ones only.
Digits
    ``to_ascii_digits`` / ``to_persian_digits`` convert digits only (nothing else changes);
    ``digits_only`` keeps the ASCII digits of a text typed in any script; ``format_number``
    groups thousands for display (``۱۲٬۵۰۰٬۰۰۰``); ``parse_number`` reads one back.
Identifiers
    ``phone_e164(value, region)``: E.164 (``+982112345678``) with the ``phonenumbers`` library
    (Google's libphonenumber metadata), Persian digits accepted. ``iran_national_id_ok``: the
    kod-e melli check digit. ``iran_postal_code_ok``: ten digits.
Jalali (Solar Hijri) calendar, both ways, with ``jdatetime`` (its conversion is jalali-core's)
    ``jalali_to_gregorian(1403, 1, 1) -> date(2024, 3, 20)``; ``to_jalali(date) -> JalaliDate``
    (year, month, day, ``month_name``, ``quarter``, ``format()`` -> ``"1403/05/12"``);
    ``format_jalali(date)``; ``parse_jalali("1403/05/12") -> date``; the half-open Gregorian
    bounds ``[start, end)`` of a Jalali month, quarter or year for grouping
    (``jalali_month_bounds``, ``jalali_quarter_bounds``, ``jalali_year_bounds``,
    ``jalali_period``); ``JALALI_MONTHS`` (فروردین ... اسفند).
Date cells
    ``parse_date(text, order=None)``: an ISO / ``YYYY/MM/DD`` date, a Jalali date for years
    before 1700 (``1369/05/12`` is 1990-08-03), or with the year last (``03/08/1990``) when
    ``order`` says whether the day or the month comes first; raises ``DateError``
    (``AmbiguousDate`` when the year is last and ``order`` is None).
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from decimal import Decimal
from typing import Literal, NamedTuple

import jdatetime
import phonenumbers

__all__ = [
    "DATE_HELP",
    "JALALI_MONTHS",
    "JALALI_QUARTERS",
    "JalaliPeriod",
    "AmbiguousDate",
    "DateError",
    "JalaliDate",
    "digits_only",
    "format_jalali",
    "format_number",
    "iran_national_id_ok",
    "iran_postal_code_ok",
    "jalali_month_bounds",
    "jalali_period",
    "jalali_quarter_bounds",
    "jalali_to_gregorian",
    "jalali_year_bounds",
    "normalize",
    "parse_date",
    "parse_jalali",
    "parse_number",
    "persian_letters",
    "phone_e164",
    "to_ascii_digits",
    "to_jalali",
    "to_persian_digits",
]

# --------------------------------------------------------------------------- search keys

_PERSIAN_DIGITS = "۰۱۲۳۴۵۶۷۸۹"  # U+06F0..U+06F9
_ARABIC_DIGITS = "٠١٢٣٤٥٦٧٨٩"  # U+0660..U+0669
_TO_ASCII = str.maketrans(_PERSIAN_DIGITS + _ARABIC_DIGITS, "0123456789" * 2)
_TO_PERSIAN = str.maketrans("0123456789" + _ARABIC_DIGITS, _PERSIAN_DIGITS * 2)

_TRANSLATE = str.maketrans(
    {
        # Arabic letter variants -> Persian
        "ي": "ی",  # U+064A ARABIC YEH -> U+06CC FARSI YEH
        "ى": "ی",  # U+0649 ALEF MAKSURA
        "ئ": "ی",  # U+0626 YEH WITH HAMZA ABOVE
        "ك": "ک",  # U+0643 ARABIC KAF -> U+06A9 KEHEH
        "ة": "ه",  # U+0629 TEH MARBUTA
        "ۀ": "ه",  # U+06C0 HEH WITH YEH ABOVE
        "أ": "ا",
        "إ": "ا",
        "آ": "ا",
        "ٱ": "ا",
        "ؤ": "و",
        # Persian (U+06F0..) and Arabic-Indic (U+0660..) digits -> ASCII
        **{chr(0x06F0 + i): str(i) for i in range(10)},
        **{chr(0x0660 + i): str(i) for i in range(10)},
        # zero-width non-joiner / joiner, BOM, tatweel -> space or nothing
        "\u200c": " ",
        "\u200d": "",
        "\ufeff": "",
        "\u0640": "",
    }
)
# Arabic diacritics (harakat, tanwin, shadda, sukun, superscript alef)
_DIACRITICS = re.compile("[\u064b-\u065f\u0670\u06d6-\u06ed]")
_SPACES = re.compile(r"\s+")


def normalize(text: str | None) -> str:
    """The search key of a text: NFKC, Persian letter/digit unification, no diacritics or
    zero-width characters, lower case, single spaces."""
    if not text:
        return ""
    t = unicodedata.normalize("NFKC", text).translate(_TRANSLATE)
    t = _DIACRITICS.sub("", t)
    return _SPACES.sub(" ", t).strip().lower()


_LETTERS = str.maketrans(
    {
        "ي": "ی",  # ARABIC YEH -> FARSI YEH
        "ى": "ی",  # ALEF MAKSURA
        "ك": "ک",  # ARABIC KAF -> KEHEH
        **{chr(0x0660 + i): chr(0x06F0 + i) for i in range(10)},  # Arabic-Indic -> Persian digits
    }
)


_ARABIC_FORMS = re.compile("[\u064a\u0649\u0643\u0660-\u0669]")


def persian_letters(text: str | None) -> str:
    """A text to show: Arabic Yeh and Kaf (an Arabic keyboard's) as the Persian letters and
    Arabic-Indic digits as Persian ones; nothing else changes (spaces, ZWNJ, Latin, case)."""
    if not text or not _ARABIC_FORMS.search(text):  # the common case, a scan without copying
        return text or ""
    return text.translate(_LETTERS)


def digits_only(text: str | None) -> str:
    """ASCII digits of a text, whatever script they were typed in."""
    return "".join(ch for ch in normalize(text) if ch.isdigit())


# --------------------------------------------------------------------------- digits and numbers


def to_ascii_digits(text: str) -> str:
    """Persian and Arabic-Indic digits as ASCII digits; every other character unchanged."""
    return text.translate(_TO_ASCII)


def to_persian_digits(value: object) -> str:
    """A text (or number) with ASCII and Arabic-Indic digits as Persian digits, for display."""
    return str(value).translate(_TO_PERSIAN)


def format_number(value: int | float | Decimal, *, decimals: int = 0, persian_digits: bool = True) -> str:
    """A number with grouped thousands for display: ``12500000`` -> ``۱۲٬۵۰۰٬۰۰۰`` (Persian
    digits, Arabic thousands and decimal separators) or ``12,500,000`` (``persian_digits=False``)."""
    text = f"{value:,.{decimals}f}"
    if not persian_digits:
        return text
    return to_persian_digits(text.replace(",", "\u066c").replace(".", "\u066b"))


def parse_number(text: str) -> float:
    """A number typed with any digits and separators (``۱۲٬۵۰۰``, ``1,234.5``, ``۳٫۵``); raises
    ValueError if it is not one."""
    s = normalize(text).replace(",", "").replace("\u066c", "").replace("\u066b", ".")
    return float(s)


# --------------------------------------------------------------------------- identifiers


def phone_e164(value: str, region: str) -> str | None:
    """The number in E.164 (+982112345678), or None if it is not a possible number.
    Persian digits are accepted; a national number is read in `region` (ISO 3166-1 alpha-2)."""
    raw = value.strip()
    plus = raw.startswith("+") or raw.startswith("00")
    digits = digits_only(raw)
    if raw.startswith("00"):
        digits = digits[2:]
    if not 4 <= len(digits) <= 17:
        return None
    try:
        num = phonenumbers.parse(("+" if plus else "") + digits, None if plus else region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(num):
        return None
    return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)


def iran_national_id_ok(value: str) -> bool:
    """The 10-digit kod-e melli with its check digit (mod 11 scheme); all-same digits are invalid."""
    d = digits_only(value)
    if len(d) != 10 or len(set(d)) == 1:
        return False
    total = sum(int(d[i]) * (10 - i) for i in range(9)) % 11
    check = int(d[9])
    return check == total if total < 2 else check == 11 - total


def iran_postal_code_ok(value: str) -> bool:
    """An Iranian postal code: ten digits (in any script, separators allowed)."""
    return len(digits_only(value)) == 10


# --------------------------------------------------------------------------- the Jalali calendar

JALALI_MONTHS = tuple(jdatetime.date.j_months_fa)  # فروردین, اردیبهشت, ... اسفند
JALALI_QUARTERS = ("بهار", "تابستان", "پاییز", "زمستان")  # the seasons: three months each


class JalaliDate(NamedTuple):
    year: int
    month: int
    day: int

    @property
    def month_name(self) -> str:
        return JALALI_MONTHS[self.month - 1]

    @property
    def quarter(self) -> int:
        return (self.month - 1) // 3 + 1

    def format(self, sep: str = "/", *, persian_digits: bool = False) -> str:
        """``1403/05/12`` (or ``۱۴۰۳/۰۵/۱۲``)."""
        text = f"{self.year:04d}{sep}{self.month:02d}{sep}{self.day:02d}"
        return to_persian_digits(text) if persian_digits else text

    def long(self, *, persian_digits: bool = True) -> str:
        """``۱۲ مرداد ۱۴۰۳``: day, month name, year, as a letter or invoice writes it."""
        text = f"{self.day} {self.month_name} {self.year}"
        return to_persian_digits(text) if persian_digits else text

    def to_gregorian(self) -> dt.date:
        return jdatetime.date(self.year, self.month, self.day).togregorian()


def jalali_to_gregorian(jy: int, jm: int, jd: int) -> dt.date | None:
    """The Gregorian date of a Jalali (Persian calendar) date, or None if there is no such day."""
    try:
        return jdatetime.date(jy, jm, jd).togregorian()
    except (ValueError, OverflowError):
        return None


def to_jalali(day: dt.date) -> JalaliDate:
    """The Jalali date of a Gregorian date (a datetime: of its own wall-clock date; convert an
    aware one to the zone it is reported in first, e.g. Asia/Tehran)."""
    if isinstance(day, dt.datetime):
        day = day.date()
    j = jdatetime.date.fromgregorian(date=day)
    return JalaliDate(j.year, j.month, j.day)


def format_jalali(day: dt.date, sep: str = "/", *, persian_digits: bool = False) -> str:
    """``date(2024, 8, 2)`` -> ``"1403/05/12"``."""
    return to_jalali(day).format(sep, persian_digits=persian_digits)


def _month_start(jy: int, jm: int) -> dt.date:
    jy, jm = jy + (jm - 1) // 12, (jm - 1) % 12 + 1
    return jdatetime.date(jy, jm, 1).togregorian()


def jalali_month_bounds(jy: int, jm: int) -> tuple[dt.date, dt.date]:
    """The Gregorian days ``[start, end)`` of Jalali month ``jm`` of year ``jy``."""
    if not 1 <= jm <= 12:
        raise ValueError(f"a Jalali month is 1..12, not {jm}")
    return _month_start(jy, jm), _month_start(jy, jm + 1)


def jalali_quarter_bounds(jy: int, quarter: int) -> tuple[dt.date, dt.date]:
    """The Gregorian days ``[start, end)`` of quarter 1..4 (بهار, تابستان, پاییز, زمستان) of ``jy``."""
    if not 1 <= quarter <= 4:
        raise ValueError(f"a quarter is 1..4, not {quarter}")
    return _month_start(jy, quarter * 3 - 2), _month_start(jy, quarter * 3 + 1)


def jalali_year_bounds(jy: int) -> tuple[dt.date, dt.date]:
    """The Gregorian days ``[start, end)`` of Jalali year ``jy`` (Nowruz to Nowruz)."""
    return _month_start(jy, 1), _month_start(jy + 1, 1)


class JalaliPeriod(NamedTuple):
    label: str  # "1403/05", "1403-Q2", "1403"
    start: dt.date  # first Gregorian day
    end: dt.date  # the day after the last (half-open)


def jalali_period(day: dt.date, unit: Literal["month", "quarter", "year"]) -> JalaliPeriod:
    """The Jalali month, quarter or year a day falls in: a sortable label and its bounds, so a
    report can group rows by Jalali period (``WHERE t >= start AND t < end``)."""
    j = to_jalali(day)
    if unit == "month":
        return JalaliPeriod(f"{j.year:04d}/{j.month:02d}", *jalali_month_bounds(j.year, j.month))
    if unit == "quarter":
        return JalaliPeriod(f"{j.year:04d}-Q{j.quarter}", *jalali_quarter_bounds(j.year, j.quarter))
    if unit == "year":
        return JalaliPeriod(f"{j.year:04d}", *jalali_year_bounds(j.year))
    raise ValueError(f"unit must be 'month', 'quarter' or 'year', not {unit!r}")


# --------------------------------------------------------------------------- parsing dates

DATE_HELP = "write YYYY-MM-DD, or a Jalali (Persian calendar) date such as 1369/05/12"
_YMD = re.compile(r"^(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})(?:[ t].*)?$")
_YEAR_LAST = re.compile(r"^(\d{1,2})[-/.](\d{1,2})[-/.](\d{4})(?:[ t].*)?$")
JALALI_BEFORE = 1700  # a year below this is read as Jalali (1369 is 1990; 1700 AD is no birth date)


class DateError(ValueError):
    """A text that is no (valid) date; the message says why, quoting the text."""


class AmbiguousDate(DateError):
    """The year comes last and nobody said whether the day or the month comes first."""


def parse_jalali(text: str) -> dt.date:
    """``"1403/05/12"`` (or ``1403-5-12``, Persian digits) as the Gregorian date it is."""
    m = _YMD.match(normalize(text))
    if not m:
        raise DateError(f"{text!r} is not a Jalali date such as 1403/05/12")
    g = jalali_to_gregorian(*(int(x) for x in m.groups()))
    if g is None:
        raise DateError(f"{text!r} is not a valid Jalali (Persian calendar) date")
    return g


def parse_date(value: str | dt.date, order: Literal["day", "month"] | None = None) -> dt.date:
    """A date cell: a date, YYYY-MM-DD, YYYY/MM/DD or, for years before 1700, the Jalali
    calendar (1369/05/12 is 1990-08-03); Persian digits are fine. With the year last
    (03/08/1990, 12/05/1369) only when ``order`` says which of the two is the day."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    s = normalize(value)
    m = _YMD.match(s)
    if m:
        y, mo, d = (int(x) for x in m.groups())
    elif (m := _YEAR_LAST.match(s)) and order in ("day", "month"):
        a, b, y = (int(x) for x in m.groups())
        d, mo = (a, b) if order == "day" else (b, a)
    elif m:
        raise AmbiguousDate(
            f"{value!r} is not a date without saying whether the day or the month comes first "
            "(with the year last they are ambiguous), or write YYYY-MM-DD"
        )
    else:
        raise DateError(f"{value!r} is not a date: {DATE_HELP}")
    if y < JALALI_BEFORE:
        g = jalali_to_gregorian(y, mo, d)
        if g is None:
            raise DateError(f"{value!r} is not a valid Jalali (Persian calendar) date")
        return g
    try:
        return dt.date(y, mo, d)
    except ValueError:
        raise DateError(f"{value!r} is not a valid calendar date") from None
