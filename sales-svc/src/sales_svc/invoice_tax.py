"""Iranian e-invoicing (samaneh-ye moadian): the seller's settings, the 22-character tax id and
an invoice in the tax system's header/body shape, as the tax export writes it.

Tax id (taxid), 22 characters: the seller's 6-character fiscal memory id (given by the tax
system), the issue day as 5 hexadecimal digits (days since 1970-01-01 UTC), the internal
serial (inno) as 10 hexadecimal digits, and one Verhoeff check digit computed over the decimal
form of the same three parts (the memory id with each letter as its ASCII code, the day as 6
decimal digits, the serial as 12). Upper case.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from decimal import Decimal

from crm_chassis.money import round_minor

# Verhoeff's dihedral group D5 multiplication, position permutation and inverse tables.
_D = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
    [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
    [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
    [4, 0, 1, 2, 3, 9, 5, 6, 7, 8],
    [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
    [6, 5, 9, 8, 7, 1, 0, 4, 3, 2],
    [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
    [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
    [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
]
_P = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
    [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
    [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
    [9, 4, 5, 3, 1, 2, 7, 8, 6, 0],
    [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
    [2, 7, 9, 3, 8, 0, 6, 4, 1, 5],
    [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
]
_INV = [0, 4, 3, 2, 1, 5, 6, 7, 8, 9]


def verhoeff_digit(digits: str) -> int:
    """The Verhoeff check digit to append to a string of decimal digits."""
    c = 0
    for i, ch in enumerate(reversed(digits)):
        c = _D[c][_P[(i + 1) % 8][int(ch)]]
    return _INV[c]


def verhoeff_ok(digits: str) -> bool:
    c = 0
    for i, ch in enumerate(reversed(digits)):
        c = _D[c][_P[i % 8][int(ch)]]
    return c == 0


def tax_id(memory_id: str, issue_time: dt.datetime, serial: int) -> str:
    """The 22-character taxid of the invoice with this internal serial, issued at issue_time."""
    if len(memory_id) != 6 or not memory_id.isalnum() or not memory_id.isascii():
        raise ValueError("the fiscal memory id is 6 letters or digits")
    day = int(issue_time.timestamp() // 86400)
    decimal = "".join(ch if ch.isdigit() else str(ord(ch.upper())) for ch in memory_id)
    check = verhoeff_digit(f"{decimal}{day:06d}{serial:012d}")
    return f"{memory_id}{day:05x}{serial:010x}{check}".upper()


@dataclass
class Seller:
    """Who issues the invoices: from the service settings (environment)."""

    economic_code: str = ""
    national_id: str = ""
    name: str = ""
    memory_id: str = ""  # the tax system's fiscal memory id (6 characters); builds tax ids
    address: str = ""  # printed on quotes and invoices
    phone: str = ""

    @classmethod
    def from_env(cls, env=None) -> Seller:
        env = os.environ if env is None else env
        return cls(
            env.get("SELLER_ECONOMIC_CODE", ""),
            env.get("SELLER_NATIONAL_ID", ""),
            env.get("SELLER_NAME", ""),
            env.get("TAX_MEMORY_ID", ""),
            env.get("SELLER_ADDRESS", ""),
            env.get("SELLER_PHONE", ""),
        )


def rials(amount: Decimal, currency: str, exchange_rate: str) -> int:
    """An amount as whole rials (the tax system's unit): IRT x 10; a foreign currency times its
    exchange rate when one is given (else the amount itself)."""
    if currency == "IRT":
        amount = amount * 10
    elif currency != "IRR" and exchange_rate:
        amount = amount * Decimal(exchange_rate)
    return int(round_minor(amount, "IRR"))


def _number(d: Decimal):
    d = d.normalize()
    return int(d) if d == d.to_integral_value() else float(d)


def _ms(t: dt.datetime | None) -> int | None:
    return int(t.timestamp() * 1000) if t is not None else None


def tax_record(inv, lines) -> dict:
    """One invoice (a row of invoices joined with invoice_details) and its lines in the tax
    system's shape: {"header": {...}, "body": [{...}, ...]}. Amounts in rials."""
    cur, exr = inv.currency_code, inv.exchange_rate

    def r(x: Decimal) -> int:
        return rials(x, cur, exr)

    with_buyer = inv.invoice_type == 1
    body = []
    for ln in lines:
        body.append(
            {
                "sstid": ln.tax_product_code or None,
                "sstt": ln.description,
                "am": _number(ln.quantity),
                "mu": ln.unit,
                "fee": r(ln.unit_price),
                "cfee": _number(ln.unit_price) if cur not in ("IRR", "IRT") else None,
                "cut": cur if cur not in ("IRR", "IRT") else None,
                "exr": _number(Decimal(exr)) if exr and cur not in ("IRR", "IRT") else None,
                "prdis": r(ln.gross_amount),
                "dis": r(ln.discount_amount),
                "adis": r(ln.amount),
                "vra": _number(ln.tax_rate),
                "vam": r(ln.tax_amount),
                "odt": None,
                "odr": None,
                "odam": None,
                "olt": None,
                "olr": None,
                "olam": None,
                "tsstam": r(ln.amount) + r(ln.tax_amount),
            }
        )
    tprdis = sum(b["prdis"] for b in body)
    tdis = sum(b["dis"] for b in body)
    tadis = sum(b["adis"] for b in body)
    tvam = sum(b["vam"] for b in body)
    tbill = tadis + tvam
    setm = inv.settlement_method or 2
    header = {
        "taxid": inv.tax_id or None,
        "indatim": _ms(inv.issue_time),
        "indati2m": _ms(inv.create_time),
        "inty": inv.invoice_type,
        "inno": f"{inv.tax_serial:010x}".upper() if inv.tax_serial is not None else None,
        "irtaxid": inv.reference_tax_id or None,
        "inp": inv.invoice_pattern,
        "ins": inv.subject,
        "tins": inv.seller_economic_code or None,
        "tob": (inv.buyer_type or None) if with_buyer else None,
        "bid": (inv.buyer_national_id or None) if with_buyer else None,
        "tinb": (inv.buyer_economic_code or None) if with_buyer else None,
        "sbc": None,
        "bpc": (inv.buyer_postal_code or None) if with_buyer else None,
        "bbc": None,
        "tprdis": tprdis,
        "tdis": tdis,
        "tadis": tadis,
        "tvam": tvam,
        "todam": 0,
        "tbill": tbill,
        "setm": setm,
        "cap": tbill if setm == 1 else 0,
        "insp": tbill if setm == 2 else 0,
        "tvop": tvam if setm == 1 else 0,
        "tax17": 0,
    }
    if setm == 3:  # both: what was paid so far in cash, the rest on credit
        paid = min(r(inv.paid_total), tbill)
        header.update(cap=paid, insp=tbill - paid)
    return {"header": header, "body": body, "number": inv.number, "kind": inv.kind}
