"""A whole campaign run through campaign-svc's delivery workers against a plain smtplib loop on
the same sink: `python -m bench.campaign_delivery_bench`.

BENCH_DELIVERY_MESSAGES (100000) customers are generated set-based in a fresh database, all
members of one static segment; one Persian RTL e-mail template (bench.campaign_mail_bench.HTML:
<style> inlined by css-inline, text part from the HTML, unsubscribe link). Then:

1. baseline: a plain smtplib loop on one connection sending one pre-built campaign message of
   the same size BENCH_BASELINE_MESSAGES times (20000; its rate does not depend on the count):
   the transport's and the sink's ceiling here;
2. the run: campaign.run queues one message per member in one INSERT ... SELECT (consent,
   frequency cap and quiet hours checked; timed apart), then the delivery worker's rounds
   (claim 500 with consent re-checked, committed; render each for its recipient with its
   signed unsubscribe link; send from CAMPAIGN_SEND_THREADS threads over as many SMTP sessions;
   record the outcomes and message.sent.v1 events set-based) until every message is sent, with
   throttling off. The sink's count is checked (every message arrived once).

The sink is aiosmtpd in its own process (bench.campaign_mail_bench's), counting only.
Results: bench/results/campaign-delivery-<stamp>.txt.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
import time
import uuid

import sqlalchemy as sa

from bench.campaign_mail_bench import HTML, Sink, campaign_message, plain_loop
from tests.support.harness import ROOT, Broker, Databases

N = int(os.environ.get("BENCH_DELIVERY_MESSAGES", "100000"))
BASE_N = int(os.environ.get("BENCH_BASELINE_MESSAGES", "20000"))
RESULTS = ROOT / "bench" / "results"
GOAL = 1000.0
CITIES = ["تهران", "اصفهان", "شیراز", "تبریز", "مشهد", ""]


def say(msg: str = "", out: list | None = None) -> None:
    print(msg, flush=True)
    if out is not None:
        out.append(msg)


def load(engine, n: int) -> tuple[str, str]:
    """n customers in the audience, one static segment of them all, one e-mail template."""
    seg, tpl = str(uuid.uuid4()), str(uuid.uuid4())
    cities = "ARRAY[" + ",".join(f"'{c}'" for c in CITIES) + "]"
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"""
            INSERT INTO audience (customer_id, display_name, email, mobile, city, rank)
            SELECT md5('bench' || g)::uuid::text, 'مشتری شماره ' || g, 'r' || g || '@example.ir',
                   '+98912' || lpad(g::text, 7, '0'), ({cities})[1 + g % 6],
                   CASE WHEN g % 3 = 0 THEN 'طلایی' ELSE '' END
              FROM generate_series(1, :n) g
            """
            ),
            {"n": n},
        )
        conn.execute(
            sa.text(
                "INSERT INTO segments (id, display_name, kind, member_count) VALUES (:id, 'bench all', 'static', :n)"
            ),
            {"id": seg, "n": n},
        )
        conn.execute(
            sa.text(
                "INSERT INTO segment_members (segment_id, customer_id, source) "
                "SELECT :s, customer_id, 'manual' FROM audience"
            ),
            {"s": seg},
        )
        subject = "{{ customer.display_name }}، جشنواره پاییز"
        conn.execute(
            sa.text(
                "INSERT INTO templates (id, display_name, channel, subject, html_body, text_body, language, direction) "
                "VALUES (:id, 'bench', 'email', :subject, :html, '', 'fa', 'rtl')"
            ),
            {"id": tpl, "subject": subject, "html": HTML},
        )
        conn.execute(
            sa.text(
                "INSERT INTO template_versions (template_id, version, channel, subject, html_body, text_body, "
                "language, direction) VALUES (:id, 1, 'email', :subject, :html, '', 'fa', 'rtl')"
            ),
            {"id": tpl, "subject": subject, "html": HTML},
        )
        conn.execute(sa.text("ANALYZE"))
    return seg, tpl


def main() -> int:
    out: list[str] = []
    stamp = f"{dt.datetime.now():%Y%m%d-%H%M%S}"
    say(
        f"campaign delivery bench: {platform.node()} {os.cpu_count()} cores, python {platform.python_version()}; "
        f"{N:,} messages; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (the machine is shared)",
        out,
    )
    sink = Sink()
    dbs, broker = Databases(), Broker()
    svc = None
    try:
        say("\n== baseline: a plain smtplib loop on one connection, one pre-built message ==", out)
        data = campaign_message()
        secs = plain_loop(sink.port, BASE_N, data)
        base = BASE_N / secs
        say(f"  {BASE_N:,} messages of {len(data):,} bytes in {secs:.1f} s: {base:,.0f} msg/s", out)

        url = dbs.fresh("bench_delivery")
        os.environ.update(
            SMTP_PORT=str(sink.port), SMTP_FROM="news@crm.test", MAIL_DOMAIN="crm.test",
            PUBLIC_BASE_URL="https://crm.example.com", CAMPAIGN_FREQUENCY_CAP="0",
        )  # fmt: skip
        from campaign_svc import campaigns as C
        from campaign_svc import delivery
        from campaign_svc.__main__ import PARTS, SPEC
        from campaign_svc.runtime import campaign
        from crm_chassis.service import Service
        from tests.support.harness import service_settings

        svc = Service(SPEC, service_settings("campaign-svc", url, broker.url))
        rt = campaign(svc.ctx, PARTS)
        say("\n== load ==", out)
        t0 = time.perf_counter()
        seg, tpl = load(svc.ctx.engine, N)
        say(f"  {N:,} customers in one static segment, one template: {time.perf_counter() - t0:.1f} s", out)
        with svc.ctx.engine.begin() as conn:
            cid = conn.execute(
                sa.text(
                    "INSERT INTO campaigns (display_name, channel, segment_id, state, quiet_start_hour, quiet_end_hour, "
                    "launch_time) VALUES ('bench', 'email', :s, 'running', 0, 0, now()) RETURNING id"
                ),
                {"s": seg},
            ).scalar()
            conn.execute(
                sa.text(
                    "INSERT INTO campaign_variants (campaign_id, key, position, template_id, template_version, weight) "
                    "VALUES (:c, '', 0, :t, 1, 1)"
                ),
                {"c": cid, "t": tpl},
            )
        uc = C.use_cases(rt)
        say("\n== the run ==", out)
        t0 = time.perf_counter()
        with svc.ctx.engine.begin() as conn:
            uc.run(conn, type("T", (), {"key": str(cid)})())
        queue_s = time.perf_counter() - t0
        with svc.ctx.engine.connect() as conn:
            queued = conn.execute(sa.text("SELECT count(*) FROM messages WHERE state = 'queued'")).scalar()
        say(f"  campaign.run queued {queued:,} messages in {queue_s:.2f} s (one INSERT ... SELECT)", out)
        worker = delivery.Delivery(rt)
        before = sink.count()
        t0 = time.perf_counter()
        sent = 0
        last = t0
        while True:
            n = worker.run_once()
            if not n:
                break
            sent += n
            if time.perf_counter() - last > 10:
                last = time.perf_counter()
                say(f"    ... {sent:,} sent, {sent / (last - t0):,.0f} msg/s", out)
        secs = time.perf_counter() - t0
        arrived = sink.count() - before
        with svc.ctx.engine.connect() as conn:
            states = dict(conn.execute(sa.text("SELECT state, count(*) FROM messages GROUP BY state")).all())
        rate = sent / secs if secs else 0.0
        say(
            f"  delivery: {sent:,} in {secs:.1f} s: {rate:,.0f} msg/s with {worker.threads} send threads; "
            f"the sink got {arrived:,}; states {states}",
            out,
        )
        say("\n== summary ==", out)
        say(f"  plain smtplib loop (baseline)      {base:8,.0f} msg/s", out)
        say(f"  campaign-svc delivery (100% path)  {rate:8,.0f} msg/s  ratio {rate / base:.2f}", out)
        ok = rate >= GOAL and arrived == N and states.get("sent") == N
        say(f"  goal >= {GOAL:,.0f} msg/s with every message arrived once: {'met' if ok else 'MISSED'}", out)
        say(f"  load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", out)
    finally:
        if svc is not None:
            svc.ctx.engine.dispose()
        sink.stop()
        dbs.drop_all()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"campaign-delivery-{stamp}.txt"
    path.write_text("\n".join(out) + "\n")
    print(f"saved {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
