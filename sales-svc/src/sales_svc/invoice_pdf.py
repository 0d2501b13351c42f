"""RenderInvoicePdf: an invoice or credit note as a PDF a customer reads, in Persian, right to
left, with Jalali and Gregorian dates, through crm_chassis.documents (which shapes and orders
the Persian text)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

from crm.sales.v1 import invoices_pb2 as pb
from crm_chassis import documents, persian
from crm_chassis.money import MINOR_DIGITS, NAMES_FA

TITLES = {"invoice": "صورتحساب فروش کالا و خدمات", "credit_note": "صورتحساب برگشت از فروش"}
STATES = {
    "draft": "پیش‌نویس",
    "issued": "صادر شده",
    "partially_paid": "بخشی پرداخت شده",
    "paid": "تسویه شده",
    "overdue": "سررسید گذشته",
    "cancelled": "باطل شده",
}
BUYER_TYPES = {1: "حقیقی", 2: "حقوقی", 3: "مشارکت مدنی", 4: "اتباع غیر ایرانی", 5: "مصرف‌کننده نهایی"}
COLUMNS = [
    documents.Column("position", "ردیف", 0.5),
    documents.Column("description", "شرح کالا یا خدمت", 2.5),
    documents.Column("quantity", "تعداد / مقدار", 0.8),
    documents.Column("unit_price", "مبلغ واحد", 1.2),
    documents.Column("discount", "تخفیف", 1.0),
    documents.Column("amount", "مبلغ پس از تخفیف", 1.2),
    documents.Column("tax", "مالیات بر ارزش افزوده", 1.1),
    documents.Column("total", "جمع", 1.2),
]


def _day(d) -> str:
    """A date both ways: ۱۴۰۵/۰۹/۱۱ (2026-12-02)."""
    if not d.year:
        return "—"
    day = dt.date(d.year, d.month, d.day)
    return f"{persian.format_jalali(day, persian_digits=True)} ({day.isoformat()})"


def _amount(m, currency: str) -> str:
    from crm_chassis.money import to_decimal

    return persian.format_number(to_decimal(m), decimals=MINOR_DIGITS.get(currency, 2), persian_digits=True)


def document(inv: pb.Invoice, credited_number: str = "") -> documents.Document:
    cur = inv.currency_code
    unit = NAMES_FA.get(cur, cur)
    t = inv.tax
    fields = [
        ("شماره صورتحساب", inv.number or "پیش‌نویس"),
        ("تاریخ صدور", _day(inv.issue_date)),
        ("وضعیت", STATES.get(inv.state, inv.state)),
    ]
    if inv.kind == "invoice":
        fields.append(("سررسید پرداخت", _day(inv.due_date)))
    else:  # a credit note: the invoice it reverses (without a tax id it was named nowhere)
        fields.append(("صورتحساب مرجع", credited_number or inv.credited_invoice or "—"))
    fields += [
        ("فروشنده", t.seller_name or "—"),
        ("شماره اقتصادی فروشنده", t.seller_economic_code or "—"),
        ("شناسه ملی فروشنده", t.seller_national_id or "—"),
    ]
    if t.buyer_type:
        fields += [
            ("خریدار", t.buyer_name or inv.customer),
            ("نوع خریدار", BUYER_TYPES.get(t.buyer_type, "")),
            ("شماره اقتصادی خریدار", t.buyer_economic_code or "—"),
            ("شناسه / کد ملی خریدار", t.buyer_national_id or "—"),
            ("کد پستی خریدار", t.buyer_postal_code or "—"),
        ]
    if t.tax_id:
        fields.append(("شماره منحصر به فرد مالیاتی", t.tax_id))
    if t.reference_tax_id:
        fields.append(("شماره مالیاتی صورتحساب مرجع", t.reference_tax_id))
    fields.append(("واحد پول", unit))
    rows = [
        {
            "position": persian.to_persian_digits(ln.position),
            "description": ln.description,
            "quantity": persian.to_persian_digits(ln.quantity) + (f" {ln.unit}" if ln.unit != "unit" else ""),
            "unit_price": _amount(ln.unit_price, cur),
            "discount": _amount(ln.discount_amount, cur),
            "amount": _amount(ln.amount, cur),
            "tax": _amount(ln.tax_amount, cur),
            "total": _amount(ln.total, cur),
        }
        for ln in inv.lines
    ]
    totals = [
        ("جمع پس از تخفیف", _amount(inv.subtotal, cur)),
        ("مالیات و عوارض ارزش افزوده", _amount(inv.tax_total, cur)),
        (f"مبلغ کل ({unit})", _amount(inv.total, cur)),
    ]
    if inv.kind == "invoice" and inv.state not in ("draft", "cancelled"):
        totals += [("پرداخت شده", _amount(inv.paid_total, cur)), ("مانده", _amount(inv.outstanding, cur))]
    return documents.Document(
        title=TITLES.get(inv.kind, TITLES["invoice"]),
        columns=COLUMNS,
        rows=rows,
        fields=fields,
        totals=totals,
        notes=inv.description,
        rtl=True,
    )


def render(inv: pb.Invoice, credited_number: str = "") -> Iterator[pb.RenderInvoicePdfResponse]:
    filename = f"invoice-{inv.number or inv.name.split('/')[-1]}"
    yield from documents.stream_document(
        pb.RenderInvoicePdfResponse, "pdf", document(inv, credited_number), filename=filename
    )
