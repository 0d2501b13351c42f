"""Money: crm.type.v1.Money (units + nanos) <-> Decimal, currency checks, and amounts as people
read them (IRR in rials, IRT in tomans, Persian or Latin digits). Never a float."""

from __future__ import annotations

import re
from decimal import ROUND_HALF_EVEN, Context, Decimal

import grpc

from crm.type.v1 import money_pb2

from . import persian
from .errors import DomainError, InvalidArgument

NANO = Decimal("1e-9")
_CODE = re.compile(r"^[A-Z]{3}$")
# Minor-unit digits where not 2 (ISO 4217); IRT (toman) is not ISO but used everywhere in Iran.
MINOR_DIGITS = {"IRR": 0, "IRT": 0, "JPY": 0, "KRW": 0, "IQD": 3, "KWD": 3, "BHD": 3, "OMR": 3}
NAMES_FA = {"IRR": "ریال", "IRT": "تومان", "USD": "دلار", "EUR": "یورو", "AED": "درهم"}
RIALS_PER_TOMAN = 10
INT64_MAX = 2**63 - 1  # Money.units
# Enough digits for any sum of stored amounts (NUMERIC(28, 9) each): the default context's 28
# made quantize() raise InvalidOperation for a total of 10^19 or more (a 500 on the board).
_WIDE = Context(prec=80)


class AmountOutOfRange(DomainError):
    """An amount (a total, a sum over many records) that Money's int64 units cannot hold."""

    code = grpc.StatusCode.OUT_OF_RANGE
    reason = "AMOUNT_OUT_OF_RANGE"


def check_currency(code: str, field: str = "currency_code") -> str:
    if not _CODE.match(code or ""):
        raise InvalidArgument.field(field, f"{code!r} is not a currency code (three capital letters: IRR, IRT, USD)")
    return code


def to_decimal(m: money_pb2.Money, field: str = "amount", currency: str | None = None) -> Decimal:
    """The amount a Money holds; INVALID_ARGUMENT naming the field for a bad code, nanos out of
    range or of the other sign, or (given `currency`) another currency than the one expected."""
    check_currency(m.currency_code, f"{field}.currency_code")
    if currency is not None and m.currency_code != currency:
        raise InvalidArgument.field(
            f"{field}.currency_code", f"{m.currency_code} given where the amount is in {currency}"
        )
    if not -999_999_999 <= m.nanos <= 999_999_999:
        raise InvalidArgument.field(f"{field}.nanos", "must be within -999999999..999999999")
    if (m.units > 0 and m.nanos < 0) or (m.units < 0 and m.nanos > 0):
        raise InvalidArgument.field(f"{field}.nanos", "must have the same sign as units")
    return Decimal(m.units) + Decimal(m.nanos) * NANO


def to_money(amount: Decimal | int, currency: str) -> money_pb2.Money:
    """The Money of an amount; OUT_OF_RANGE AMOUNT_OUT_OF_RANGE if its units exceed int64 (a sum
    of many large amounts), never a bare InvalidOperation or ValueError."""
    amount = Decimal(amount).quantize(NANO, rounding=ROUND_HALF_EVEN, context=_WIDE)
    units = int(amount)  # truncates toward zero: nanos keep the sign
    if abs(units) > INT64_MAX:
        raise AmountOutOfRange(
            f"an amount of {amount:f} {currency} is beyond what Money holds (units up to {INT64_MAX}); "
            "narrow the request (a filter, a shorter period)",
            metadata={"currency_code": currency},
        )
    nanos = int((amount - units) / NANO)
    return money_pb2.Money(currency_code=currency, units=units, nanos=nanos)


def round_minor(amount: Decimal, currency: str) -> Decimal:
    """Rounded to the currency's minor unit (rials and tomans are whole)."""
    return amount.quantize(Decimal(1).scaleb(-MINOR_DIGITS.get(currency, 2)), rounding=ROUND_HALF_EVEN, context=_WIDE)


def rials(amount: Decimal, currency: str) -> Decimal:
    """IRR or IRT as rials (1 toman = 10 rials); other currencies unchanged."""
    return amount * RIALS_PER_TOMAN if currency == "IRT" else amount


def format_amount(amount: Decimal, currency: str, persian_digits: bool = False) -> str:
    """'1,250,000 IRR' or, with Persian digits, '۱٬۲۵۰٬۰۰۰ ریال'."""
    text = persian.format_number(
        round_minor(amount, currency), decimals=MINOR_DIGITS.get(currency, 2), persian_digits=persian_digits
    )
    return f"{text} {NAMES_FA.get(currency, currency)}" if persian_digits else f"{text} {currency}"
