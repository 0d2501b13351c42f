"""campaign-svc's e-mail sender against a plain smtplib loop: `python -m bench.campaign_mail_bench`.

One aiosmtpd sink (tests/support/smtp_capture.py, counting only) runs in its own process on
loopback; both sides send BENCH_MAIL_MESSAGES messages (2000) to it, one recipient each:

1. baselines: a plain smtplib loop on one connection sending one pre-built message again and
   again (no personalisation, no MIME building): a small one, and one of the campaign's
   messages (the same bytes on the wire): the transport's and the sink's ceiling here;
2. campaign-svc: for each recipient, a Persian RTL e-mail template rendered in the sandbox with
   that recipient's values (templates.render: subject, HTML with its <style> inlined by
   css-inline, the text part made from the HTML), the Outgoing built with List-Unsubscribe
   headers and sent by channels.EmailSender (crm_chassis.mail.SmtpPool: persistent sessions),
   from 1 thread and from BENCH_MAIL_THREADS threads (4) sharing a pool of as many sessions.

The sink's count is checked after each run (every message arrived). Figures: messages/s of
each, and the share of the campaign path's time spent rendering (render only, no send).
Results: bench/results/campaign-mail-<stamp>.txt.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import smtplib
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage

from tests.support.harness import ROOT

MESSAGES = int(os.environ.get("BENCH_MAIL_MESSAGES", "2000"))
THREADS = int(os.environ.get("BENCH_MAIL_THREADS", "4"))

HTML = """<html><head><style>
  body { font-family: Tahoma, sans-serif; background-color: #fafafa; }
  .box { background-color: #ffffff; padding: 16px; border: 1px solid #dddddd; }
  h1 { color: #1a5276; font-size: 20px; }
  .cta { background-color: #c0392b; color: #ffffff; padding: 8px 16px; text-decoration: none; }
  .note { font-size: 11px; color: #888888; }
</style></head><body><div class="box">
<h1>{{ customer.given_name | default("مشتری گرامی") }}، سلام!</h1>
<p>{{ customer.display_name }} عزیز، به عنوان مشتری {{ customer.rank | default("ویژه") }} ما در
{{ customer.city | default("ایران") }}، تا پایان هفته ۲۰٪ تخفیف روی همه محصولات دارید.</p>
<p>آخرین خرید شما: {{ customer.last_purchase_date | default("—") }}</p>
<p><a class="cta" href="https://shop.example.com/autumn?c={{ campaign.display_name }}">خرید</a></p>
<p class="note"><a href="{{ unsubscribe_url }}">لغو اشتراک</a></p>
</div></body></html>"""

CITIES = ["تهران", "اصفهان", "شیراز", "تبریز", "مشهد", ""]


def sink_main() -> int:
    """The sink process: prints its port, then answers each line on stdin with its count."""
    from tests.support.smtp_capture import SmtpCapture

    sink = SmtpCapture(keep=False).start()
    print(sink.port, flush=True)
    for _ in sys.stdin:
        print(sink.count, flush=True)
    sink.stop()
    return 0


class Sink:
    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.campaign_mail_bench", "sink"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port = int(self.proc.stdout.readline())

    def count(self) -> int:
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def small_message() -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "news@crm.test", "r@example.ir", "جشنواره پاییز"
    m.set_content("سلام، تا پایان هفته ۲۰٪ تخفیف.")
    m.add_alternative("<p dir='rtl'>سلام، تا پایان هفته ۲۰٪ تخفیف.</p>", subtype="html")
    return m.as_bytes()


def campaign_message() -> bytes:
    """One of the campaign's messages as the sender writes it (the same size on the wire)."""
    from campaign_svc import templates as T
    from campaign_svc.channels import EmailSender
    from campaign_svc.outgoing import Outgoing
    from crm_chassis.mail import SmtpSettings

    draft = T.Draft("email", "{{ customer.display_name }}، جشنواره پاییز", HTML, "", "fa", "rtl", 1)
    _, values = next(recipients(1))
    r = T.render(draft, values)
    out = Outgoing(
        "email",
        "r0@example.ir",
        r.text,
        r.subject,
        r.html,
        message_id="bench-0",
        unsubscribe_url="https://crm.example.com/u/00000000",
        unsubscribe_mailto="mailto:u+0@crm.test",
    )
    return EmailSender(SmtpSettings(sender="news@crm.test", domain="crm.test")).build(out)


def plain_loop(port: int, n: int, data: bytes) -> float:
    start = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo()
        for i in range(n):
            s.sendmail("news@crm.test", [f"r{i}@example.ir"], data)
    return time.perf_counter() - start


def recipients(n: int):
    from campaign_svc import templates as T

    for i in range(n):
        c = {"display_name": f"مشتری شماره {i}", "rank": "طلایی" if i % 3 == 0 else ""}
        if i % 2:
            c["given_name"] = f"نام{i}"
        if CITIES[i % len(CITIES)]:
            c["city"] = CITIES[i % len(CITIES)]
        if i % 4:
            c["last_purchase_date"] = "۱۴۰۵/۰۸/۲۱"
        yield (
            i,
            T.values_of(
                T.Group("customer", c),
                "fa",
                campaign={"display_name": "autumn"},
                unsubscribe_url=f"https://crm.example.com/u/{i:08d}",
            ),
        )


def campaign_path(port: int, n: int, threads: int, send: bool = True) -> float:
    from campaign_svc import templates as T
    from campaign_svc.channels import EmailSender
    from campaign_svc.outgoing import Outgoing
    from crm_chassis.mail import SmtpSettings

    draft = T.Draft("email", "{{ customer.display_name }}، جشنواره پاییز", HTML, "", "fa", "rtl", 1)
    sender = EmailSender(SmtpSettings(port=port, sender="news@crm.test", domain="crm.test"), connections=threads)
    people = list(recipients(n))

    def one(item):
        i, values = item
        r = T.render(draft, values)
        out = Outgoing(
            channel="email",
            address=f"r{i}@example.ir",
            text=r.text,
            subject=r.subject,
            html=r.html,
            message_id=f"bench-{i}",
            campaign_id="bench",
            unsubscribe_url=f"https://crm.example.com/u/{i:08d}",
            unsubscribe_mailto=f"mailto:unsubscribe+{i}@crm.test",
        )
        if send:
            sender.send(out)

    start = time.perf_counter()
    try:
        if threads == 1:
            for item in people:
                one(item)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(one, people, chunksize=16))
    finally:
        sender.close()
    return time.perf_counter() - start


def main() -> int:
    if sys.argv[1:] == ["sink"]:
        return sink_main()
    sink = Sink()
    lines = [
        f"campaign-svc e-mail sender vs plain smtplib, {MESSAGES} messages each, "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}",
    ]
    try:
        campaign_path(sink.port, 50, 1)  # warm: imports, the compiled template, the inliner
        base = sink.count()
        rows = []
        for label, data in (
            ("a small pre-built message", small_message()),
            ("one pre-built campaign message", campaign_message()),
        ):
            base = sink.count()
            t = plain_loop(sink.port, MESSAGES, data)
            assert sink.count() - base == MESSAGES
            rows.append((f"plain smtplib loop, 1 connection, {label} ({len(data):,} bytes)", t))
        for threads in (1, THREADS):
            base = sink.count()
            t = campaign_path(sink.port, MESSAGES, threads)
            got = sink.count() - base
            assert got == MESSAGES, f"the sink received {got} of {MESSAGES}"
            rows.append((f"campaign-svc render + build + send, {threads} thread(s), {threads} session(s)", t))
        t_render = campaign_path(sink.port, MESSAGES, 1, send=False)
        rows.append(("campaign-svc render only (no send), 1 thread", t_render))
    finally:
        sink.stop()
    width = max(len(r[0]) for r in rows)
    for name, t in rows:
        lines.append(f"  {name:<{width}}  {MESSAGES / t:8.0f} msg/s  ({t:.2f} s)")
    text = "\n".join(lines)
    print(text)
    out = ROOT / "bench" / "results" / f"campaign-mail-{dt.datetime.now():%Y%m%d-%H%M%S}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
