"""merge_subscriptions: how the parts' handlers, batch handlers and batch_all handlers of one
producer domain become one subscription."""

from __future__ import annotations

from crm_chassis.messaging.consumer import Subscription
from crm_chassis.parts import merge_subscriptions


class E:
    def __init__(self, key: str, n: int):
        self.routing_key, self.n = key, n


def test_a_single_part_with_batch_all_keeps_it():
    def all_of(conn, events):
        pass

    (merged,) = merge_subscriptions([Subscription("d", {"a": lambda c, e: None}, batch_all=all_of)])
    assert merged.batch_all is all_of


def test_no_part_with_batch_all_gives_none():
    (merged,) = merge_subscriptions(
        [Subscription("d", {"a": lambda c, e: None}), Subscription("d", {"a": lambda c, e: None})]
    )
    assert merged.batch_all is None


def test_merged_batch_all_gives_each_part_its_own_events_in_arrival_order():
    seen: list = []

    def all_of(conn, events):
        seen.append(("A", [(e.routing_key, e.n) for e in events]))

    def b_batch(conn, events):
        seen.append(("B-batch", [(e.routing_key, e.n) for e in events]))

    def b_single(conn, e):
        seen.append(("B-one", (e.routing_key, e.n)))

    a = Subscription("d", {"x": lambda c, e: None, "y": lambda c, e: None}, batch_all=all_of)
    b = Subscription("d", {"x": b_single, "z": b_single}, batch={"x": b_batch})
    other = Subscription("e", {"x": b_single})
    merged = {s.domain: s for s in merge_subscriptions([a, b, other])}
    assert merged["e"].batch_all is None
    events = [E("x", 1), E("y", 2), E("z", 3), E("x", 4), E("x", 5), E("y", 6)]
    merged["d"].batch_all(None, events)
    assert seen == [
        ("A", [("x", 1), ("y", 2), ("x", 4), ("x", 5), ("y", 6)]),  # A first, its keys only, in one call
        ("B-batch", [("x", 1)]),  # B: run by run of one key, its batch handler where it has one
        ("B-one", ("z", 3)),
        ("B-batch", [("x", 4), ("x", 5)]),
    ]
