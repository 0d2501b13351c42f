"""A quote as the PDF a customer reads: a Persian, right-to-left proforma (پیش‌فاکتور) through
crm_chassis.documents (which shapes the Persian text and embeds the font): the quote number and
version, dates in Jalali and Gregorian, the seller's and the buyer's details, the lines, the
totals and the total in Persian words.

The seller's details come from the service's settings (SELLER_NAME, SELLER_NATIONAL_ID,
SELLER_ECONOMIC_CODE, SELLER_ADDRESS, SELLER_PHONE); the buyer's from the customer projection
(customer_refs), which customer-svc's events keep current.

Amount in words: `words_fa` below, not num2words. num2words is not a dependency of the suite
(it would be a new package in constraints.txt for one function), and its Persian converter
is a contributed module that is not where that project's attention goes; what a proforma needs
is small and exact: whole numbers of any size with the scale words Iranian documents use
(هزار، میلیون، میلیارد، تریلیون ...) joined by «و», and the minor unit for currencies that
have one.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import sqlalchemy as sa

from crm_chassis import documents, money, persian
from crm_chassis.dates import TEHRAN

from .invoice_tax import Seller
from .tables import customer_refs

_ONES = ["", "یک", "دو", "سه", "چهار", "پنج", "شش", "هفت", "هشت", "نه"]
_TEENS = ["ده", "یازده", "دوازده", "سیزده", "چهارده", "پانزده", "شانزده", "هفده", "هجده", "نوزده"]
_TENS = ["", "", "بیست", "سی", "چهل", "پنجاه", "شصت", "هفتاد", "هشتاد", "نود"]
_HUNDREDS = ["", "صد", "دویست", "سیصد", "چهارصد", "پانصد", "ششصد", "هفتصد", "هشتصد", "نهصد"]
_SCALES = ["", "هزار", "میلیون", "میلیارد", "تریلیون", "کوادریلیون", "کوینتیلیون", "سکستیلیون"]
_AND = " و "
MINOR_FA = {"USD": "سنت", "EUR": "سنت", "AED": "فلس", "IQD": "فلس", "KWD": "فلس", "BHD": "فلس", "OMR": "بیسه"}


def _below_thousand(n: int) -> str:
    parts = []
    h, rest = divmod(n, 100)
    if h:
        parts.append(_HUNDREDS[h])
    if 10 <= rest < 20:
        parts.append(_TEENS[rest - 10])
    else:
        t, o = divmod(rest, 10)
        if t:
            parts.append(_TENS[t])
        if o:
            parts.append(_ONES[o])
    return _AND.join(parts)


def words_fa(n: int) -> str:
    """A whole number in Persian words: 1250000 -> «یک میلیون و دویست و پنجاه هزار»."""
    if n == 0:
        return "صفر"
    if n < 0:
        return "منفی " + words_fa(-n)
    groups = []
    while n:
        n, g = divmod(n, 1000)
        groups.append(g)
    if len(groups) > len(_SCALES):
        raise ValueError("number too large for words")
    parts = []
    for scale in range(len(groups) - 1, -1, -1):
        g = groups[scale]
        if g:
            text = _below_thousand(g)
            parts.append(f"{text} {_SCALES[scale]}" if scale else text)
    return _AND.join(parts)


def amount_in_words(amount: Decimal, currency: str) -> str:
    """«یک میلیون و دویست و پنجاه هزار ریال»; with cents: «... دلار و پنج سنت»."""
    amount = money.round_minor(amount, currency)
    digits = money.MINOR_DIGITS.get(currency, 2)
    sign = "منفی " if amount < 0 else ""
    amount = abs(amount)
    whole = int(amount)
    minor = int((amount - whole) * (10**digits))
    text = f"{sign}{words_fa(whole)} {money.NAMES_FA.get(currency, currency)}"
    if minor:
        text += f"{_AND}{words_fa(minor)} {MINOR_FA.get(currency, 'صدم' if digits == 2 else 'هزارم')}"
    return text


def _amount(value: Decimal, currency: str) -> str:
    return money.format_amount(value, currency, persian_digits=True)


def _day(d: dt.date) -> str:
    """«۱۴۰۵/۰۹/۱۱ (2026-12-02)»: the Jalali date, then the Gregorian."""
    return f"{persian.format_jalali(d, persian_digits=True)} ({d.isoformat()})"


def _local_day(t: dt.datetime) -> dt.date:
    return t.astimezone(TEHRAN).date()


def seller() -> dict[str, str]:
    """The seller block (the settings invoices read too: invoice_tax.Seller)."""
    s = Seller.from_env()
    return {
        "name": s.name or "—",
        "national_id": s.national_id,
        "economic_code": s.economic_code,
        "address": s.address,
        "phone": s.phone,
    }


COLUMNS = [
    documents.Column("n", "ردیف", 0.5),
    documents.Column("description", "شرح کالا / خدمات", 3.0),
    documents.Column("quantity", "تعداد", 0.8),
    documents.Column("unit_price", "فی", 1.5),
    documents.Column("discount", "تخفیف", 1.3),
    documents.Column("tax", "مالیات بر ارزش افزوده", 1.3),
    documents.Column("total", "مبلغ کل", 1.6),
]


def document(conn: sa.Connection, row, lines: list) -> documents.Document:
    """The Document of one version of a quote (row: quotes joined with the version, v_*)."""
    c = row.currency_code
    buyer = conn.execute(sa.select(customer_refs).where(customer_refs.c.customer_id == row.customer_id)).one_or_none()
    s = seller()
    issued = _local_day(row.v_send_time or row.v_create_time)
    fields: list[tuple[str, str]] = [
        ("شماره پیش‌فاکتور", row.number),
        ("نسخه", persian.to_persian_digits(str(row.v_quote_version))),
        ("تاریخ", _day(issued)),
        ("اعتبار تا", _day(row.v_valid_until)),
        ("فروشنده", s["name"]),
    ]
    for label, key in (
        ("شناسه ملی فروشنده", "national_id"),
        ("کد اقتصادی فروشنده", "economic_code"),
        ("نشانی فروشنده", "address"),
        ("تلفن فروشنده", "phone"),
    ):
        if s[key]:
            fields.append((label, s[key]))
    fields.append(("خریدار", (buyer.display_name if buyer else "") or f"customers/{row.customer_id}"))
    if buyer is not None:
        place = "، ".join(x for x in (buyer.province, buyer.city) if x)
        for label, value in (
            ("شناسه / کد ملی خریدار", buyer.national_id),
            ("محل خریدار", place),
            ("تلفن خریدار", buyer.phone or buyer.mobile),
        ):
            if value:
                fields.append((label, value))
    rows = [
        {
            "n": persian.to_persian_digits(str(i + 1)),
            "description": x.description,
            "quantity": persian.to_persian_digits(format(x.quantity.normalize(), "f")),
            "unit_price": _amount(x.unit_price, c),
            "discount": _amount(x.discount_amount, c) if x.discount_amount else "",
            "tax": _amount(x.tax_amount, c) if x.tax_amount else "",
            "total": _amount(x.amount + x.tax_amount, c),
        }
        for i, x in enumerate(lines)
    ]
    totals = [
        ("جمع کل", _amount(row.v_subtotal, c)),
        ("تخفیف", _amount(row.v_discount_total, c)),
        ("جمع پس از تخفیف", _amount(row.v_subtotal - row.v_discount_total, c)),
        ("مالیات و عوارض ارزش افزوده", _amount(row.v_tax_total, c)),
        ("مبلغ قابل پرداخت", _amount(row.v_total, c)),
    ]
    if c == "IRR":  # what people say: tomans too
        totals.append(("معادل به تومان", _amount(money.round_minor(row.v_total / 10, "IRT"), "IRT")))
    notes = f"مبلغ قابل پرداخت به حروف: {amount_in_words(row.v_total, c)}"
    if row.v_notes:
        notes += "\n" + row.v_notes
    return documents.Document(
        title=f"پیش‌فاکتور {row.number}",
        columns=COLUMNS,
        rows=rows,
        fields=fields,
        totals=totals,
        notes=notes,
        rtl=True,
    )


def stream(message, doc: documents.Document, filename: str):
    """The PDF as a server-streaming download (head: content type and file name, then chunks)."""
    return documents.stream_document(message, "pdf", doc, filename=filename)
