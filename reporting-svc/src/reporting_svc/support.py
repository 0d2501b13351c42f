"""The support desk projection (support-svc's events) and its rollup, support_daily.

Facts: ticket_facts (newest version per ticket), survey_facts (CSAT per survey), sla_breach_facts
(one per ticket and metric), call_facts (one per call). Each fact contributes to support_daily
rows (Tehran day x team x agent x channel); a changed fact moves its contributions (Rollup).

- A ticket counts as a request on its opening day, with its complaint flag, exchanges, first
  response (seconds from opening, wall clock), resolution (seconds from opening to the last
  resolution) and SLA targets (first response and resolution, when under a policy) measured and
  met; and as closed on its closing day, with the agent who had it.
- A CSAT survey counts on its answer day with its agent and team (channel "").
- An expectation survey (expectation_facts) counts in expectation_daily per dimension on its
  answer day with its agent and team: one answer with its adequate, desired and perceived
  levels (the zone of tolerance of report 4).
- A breach (ticket.sla_breached.v1) counts once per ticket and metric on its day.
- A call counts on its start day with its agent (channel "phone"); its newest version
  (CallEvent.version) wins.

The same contributions go to support_monthly (migration 0016) on the day's Gregorian month and
on its Jalali month (`monthly`): the long-range reports read whole months there.
"""

from __future__ import annotations

import datetime as dt

from crm.support.v1 import support_events_pb2 as ev
from crm.support.v1 import ticket_pb2
from crm_chassis.messaging.consumer import Requires
from crm_chassis.messaging.envelope import Event

from . import periods
from .projection import Facts, Projection, Rollup, per_event, tehran_day
from .tables import (
    EXPECTATION_MEASURES,
    SUPPORT_MEASURES,
    call_facts,
    expectation_daily,
    expectation_facts,
    sla_breach_facts,
    support_daily,
    support_monthly,
    survey_facts,
    ticket_facts,
)

ROLLUP = Rollup(support_daily, ("day", "team", "agent", "channel"), SUPPORT_MEASURES)
MONTHLY = Rollup(support_monthly, ("calendar", "month", "team", "agent", "channel"), SUPPORT_MEASURES)


def monthly(contributions: list) -> list:
    """support_daily contributions -> support_monthly's: each (day, ...) counts on its Gregorian
    month and on its Jalali month (both keyed by the month's first day)."""
    out = []
    for key, measures in contributions:
        dims = {k: v for k, v in key.items() if k != "day"}
        for calendar in ("gregorian", "jalali"):
            out.append(({"calendar": calendar, "month": periods.month_start(key["day"], calendar), **dims}, measures))
    return out


EXPECTATION_ROLLUP = Rollup(expectation_daily, ("day", "team", "agent", "dimension"), EXPECTATION_MEASURES)

TICKET_KEYS = [
    "ticket.opened.v1",
    "ticket.assigned.v1",
    "ticket.first_responded.v1",
    "ticket.message_added.v1",
    "ticket.state_changed.v1",
    "ticket.escalated.v1",
    "ticket.resolved.v1",
    "ticket.reopened.v1",
    "ticket.closed.v1",
]


def _ts(msg, name: str) -> dt.datetime | None:
    return getattr(msg, name).ToDatetime(tzinfo=dt.UTC) if msg.HasField(name) else None


def channel_name(value: int) -> str:
    return ticket_pb2.Channel.Name(value).removeprefix("CHANNEL_").lower() if value else "unspecified"


def _seconds(a: dt.datetime, b: dt.datetime | None) -> int:
    return max(0, int((b - a).total_seconds())) if b else 0


def ticket_contributions(f) -> list:
    """What one ticket fact (a row or a dict) adds to support_daily."""
    if f is None:
        return []
    m = f._mapping if hasattr(f, "_mapping") else f
    dims = {"team": m["team"], "agent": m["assignee"], "channel": m["channel"]}
    fr, res, policy = m["first_response_time"], m["resolve_time"], bool(m["sla_policy"])
    opened = {
        "requests": 1,
        "complaints": int(m["complaint"]),
        "exchanges": m["exchange_count"],
        "first_responses": int(fr is not None),
        "first_response_seconds": _seconds(m["create_time"], fr),
        "resolutions": int(res is not None),
        "resolution_seconds": _seconds(m["create_time"], res),
        "sla_targets": int(policy and fr is not None) + int(policy and res is not None),
        "sla_met": int(policy and fr is not None and m["sla_first_response_met"])
        + int(policy and res is not None and m["sla_resolution_met"]),
    }
    out = [({"day": tehran_day(m["create_time"]), **dims}, opened)]
    if m["close_time"] is not None:
        out.append(({"day": tehran_day(m["close_time"]), **dims}, {"closed": 1}))
    return out


def fact_ticket(event: Event):
    t = event.parse(ev.TicketEvent)
    values = {
        "version": t.version,
        "channel": channel_name(t.channel),
        "team": t.team,
        "assignee": t.assignee,
        "complaint": t.complaint,
        "exchange_count": t.exchange_count,
        "create_time": _ts(t, "create_time"),
        "first_response_time": _ts(t, "first_response_time"),
        "resolve_time": _ts(t, "resolve_time"),
        "close_time": _ts(t, "close_time"),
        "sla_policy": t.sla_policy,
        "sla_first_response_met": t.sla_first_response_met,
        "sla_resolution_met": t.sla_resolution_met,
    }
    return TICKETS, {"ticket_id": t.ticket.removeprefix("tickets/")}, values


def _survey_contrib(f) -> list:
    if f is None:
        return []
    m = f._mapping if hasattr(f, "_mapping") else f
    key = {"day": tehran_day(m["version"]), "team": m["team"], "agent": m["agent"], "channel": ""}
    return [(key, {"csat_sum": m["csat"], "csat_count": 1})]


def _expectation_contrib(f) -> list:
    """One contribution per dimension of an expectation survey, on its answer day."""
    if f is None:
        return []
    m = f._mapping if hasattr(f, "_mapping") else f
    base = {"day": tehran_day(m["version"]), "team": m["team"], "agent": m["agent"]}
    return [
        (
            {**base, "dimension": d["dimension"]},
            {"answers": 1, "adequate_sum": d["adequate"], "desired_sum": d["desired"], "perceived_sum": d["perceived"]},
        )
        for d in m["scores"]
    ]


def _levels(d) -> bool:
    return bool(d.dimension) and all(1 <= v <= 9 for v in (d.adequate, d.desired, d.perceived))


def fact_survey(event: Event):
    """A CSAT survey (its score) or an expectation survey (its dimensions' adequate, desired and
    perceived levels; a dimension missing one of them, or a second copy of a dimension, is left
    out)."""
    s = event.parse(ev.SurveyEvent)
    key = {"survey_id": s.survey.removeprefix("surveys/")}
    if s.kind == "expectation":
        scores = {}
        for d in s.dimensions:
            if _levels(d) and d.dimension not in scores:
                scores[d.dimension] = {
                    "dimension": d.dimension, "adequate": d.adequate, "desired": d.desired, "perceived": d.perceived,
                }  # fmt: skip
        values = {"version": _ts(s, "answer_time"), "agent": s.agent, "team": s.team, "scores": list(scores.values())}
        return EXPECTATIONS, key, values
    if s.kind != "csat" or not 1 <= s.csat <= 5:
        return None
    values = {"version": _ts(s, "answer_time"), "agent": s.agent, "team": s.team, "csat": s.csat}
    return SURVEYS, key, values


def _breach_contrib(f) -> list:
    if f is None:
        return []
    m = f._mapping if hasattr(f, "_mapping") else f
    key = {"day": tehran_day(m["version"]), "team": m["team"], "agent": m["assignee"], "channel": ""}
    return [(key, {"sla_breaches": 1})]


def fact_sla_breach(event: Event):
    s = event.parse(ev.SlaEvent)
    values = {"version": _ts(s, "event_time"), "team": s.team, "assignee": s.assignee}
    key = {"ticket_id": s.ticket.removeprefix("tickets/"), "metric": s.metric}
    return BREACHES, key, values


def _call_contrib(f) -> list:
    if f is None:
        return []
    m = f._mapping if hasattr(f, "_mapping") else f
    key = {"day": tehran_day(m["start_time"]), "team": "", "agent": m["agent"], "channel": "phone"}
    return [(key, {"calls": 1})]


def fact_call(event: Event):
    """The call's newest version (CallEvent.version, the call log's etag: an agent or outcome
    corrected later replaces the first report); it counts on its start day."""
    c = event.parse(ev.CallEvent)
    values = {"version": c.version, "agent": c.agent, "start_time": _ts(c, "start_time")}
    return CALLS, {"call_id": c.call.removeprefix("calls/")}, values


TICKETS = Facts(ticket_facts, ROLLUP, ticket_contributions, derived=((MONTHLY, monthly),))
SURVEYS = Facts(survey_facts, ROLLUP, _survey_contrib, derived=((MONTHLY, monthly),))
EXPECTATIONS = Facts(expectation_facts, EXPECTATION_ROLLUP, _expectation_contrib)
BREACHES = Facts(sla_breach_facts, ROLLUP, _breach_contrib, derived=((MONTHLY, monthly),))
CALLS = Facts(call_facts, ROLLUP, _call_contrib, derived=((MONTHLY, monthly),))
on_ticket = per_event(fact_ticket)
on_survey = per_event(fact_survey)
on_sla_breached = per_event(fact_sla_breach)
on_call = per_event(fact_call)


TICKET = Requires(ev.TicketEvent, ("ticket", "create_time", "version"))

PROJECTION = Projection(
    name="support",
    domain="support",
    handlers={
        **dict.fromkeys(TICKET_KEYS, on_ticket),
        "survey.answered.v1": on_survey,
        "ticket.sla_breached.v1": on_sla_breached,
        "call.logged.v1": on_call,
    },
    requires={
        **dict.fromkeys(TICKET_KEYS, TICKET),
        "survey.answered.v1": Requires(ev.SurveyEvent, ("survey", "answer_time")),
        "ticket.sla_breached.v1": Requires(ev.SlaEvent, ("ticket", "metric", "event_time")),
        "call.logged.v1": Requires(ev.CallEvent, ("call", "start_time")),
    },
    tables=[
        ticket_facts,
        survey_facts,
        sla_breach_facts,
        call_facts,
        support_daily,
        support_monthly,
        expectation_facts,
        expectation_daily,
    ],
)


def subscriptions(rt=None):
    return [PROJECTION.subscription()]
