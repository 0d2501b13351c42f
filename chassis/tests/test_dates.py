"""crm_chassis.dates: the contracts' Date messages and the Tehran business day."""

from __future__ import annotations

import datetime as dt

import pytest

from crm.type.v1 import date_pb2
from crm_chassis import dates
from crm_chassis.errors import InvalidArgument


def test_a_date_message_round_trips_and_all_zero_is_unset():
    day = dt.date(2026, 3, 21)
    assert dates.from_proto(dates.to_proto(day), "d") == day
    assert dates.from_proto(date_pb2.Date(), "d") is None and dates.to_proto(None) is None


def test_an_impossible_or_out_of_business_day_names_the_field_raised_or_collected():
    with pytest.raises(InvalidArgument) as err:
        dates.from_proto(date_pb2.Date(year=2026, month=2, day=30), "order.order_date")
    assert err.value.violations[0].field == "order.order_date"
    bad: list = []
    assert dates.from_proto(date_pb2.Date(year=1, month=1, day=1), "close", bad) is None
    assert [v.field for v in bad] == ["close"] and "1900" in bad[0].description
    assert dates.from_proto(date_pb2.Date(year=1, month=1, day=1), "birth", business=False) == dt.date(1, 1, 1)


def test_the_business_day_is_tehrans():
    day = dt.date(2026, 3, 21)
    assert dates.start_of_day(day) == dt.datetime(2026, 3, 20, 20, 30, tzinfo=dt.UTC)
    assert dates.end_of_day(day) - dates.start_of_day(day) == dt.timedelta(days=1)


def test_country_zones_only_where_the_country_tells_the_clock():
    zones = dates.country_zones()
    assert zones["IR"] == "Asia/Tehran"
    assert zones["DE"] == "Europe/Berlin"  # Busingen is listed too, and keeps Berlin's clock
    assert zones["AE"] == "Asia/Dubai"
    for several in ("US", "RU", "BR", "AU", "ES"):  # zones with different offsets: unknown
        assert several not in zones


def test_set_timestamp_is_from_datetime_for_aware_and_naive_times():
    import zoneinfo

    from google.protobuf import timestamp_pb2

    from crm_chassis.dates import set_timestamp

    tehran = zoneinfo.ZoneInfo("Asia/Tehran")
    for value in (
        dt.datetime(2026, 12, 3, 15, 40, 1, 123456, tzinfo=dt.UTC),
        dt.datetime(1960, 1, 1, 0, 0, 0, 5, tzinfo=tehran),  # before the epoch
        dt.datetime(2026, 3, 20, 23, 59, 59, 999999),  # naive: read as UTC
        dt.datetime(2100, 1, 1, tzinfo=tehran),
    ):
        want, got = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
        want.FromDatetime(value)
        set_timestamp(got, value)
        assert (got.seconds, got.nanos) == (want.seconds, want.nanos), value
