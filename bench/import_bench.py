"""`python -m bench.import_bench [ROWS]`: ImportCustomers throughput against a plain COPY.

Generates ROWS (default 100,000; or BENCH_IMPORT_ROWS) valid people as a CSV with Persian
headers (about 2% repeat an earlier row's national id or e-mail, so dedupe has work; birth
dates half ISO, half Jalali), starts customer-svc as its own process (`serve`: gRPC, outbox
relay and all) on a fresh database, imports the file with the default SKIP policy and polls
GetImportJob until it ends. Rows/s is total rows over the wall time from the call to the end.

The baseline, in the same run and on the same database server: `COPY` of the same rows into a
scratch table of text columns (no validation, dedupe, events or audit) — the floor of getting
those bytes into PostgreSQL at all.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import sys
import time

import grpc
import psycopg

from bench.__main__ import RESULTS, start_customer_svc, table
from crm.customer.v1 import customer_pb2
from crm.customer.v1 import customer_service_pb2 as pb
from crm.customer.v1 import customer_service_pb2_grpc as pbg
from crm_chassis.db import normalise_url
from tests.support.harness import ROOT, Broker, Databases, md

HEADER = ["نام", "نام خانوادگی", "ایمیل", "موبایل", "کد ملی", "تاریخ تولد", "شهر", "نحوه آشنایی", "برچسب‌ها"]
GIVEN = ["علی", "مریم", "رضا", "زهرا", "حسین", "فاطمه", "Sara", "Omid", "Neda", "Kaveh"]
FAMILY = ["احمدی", "رضایی", "محمدی", "کریمی", "Hosseini", "Moradi", "Jafari", "Rahimi"]
CITIES = ["تهران", "اصفهان", "شیراز", "تبریز", "مشهد", "Karaj", "Qom", "Rasht"]
SOURCES = ["website", "exhibition", "referral", "social_instagram", "walk_in"]


def national_id(n: int) -> str:
    body = f"{n:09d}"
    total = sum(int(d) * (10 - i) for i, d in enumerate(body)) % 11
    return body + str(total if total < 2 else 11 - total)


def rows(n: int, seed: int = 7) -> list[list[str]]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        if i > 100 and rnd.random() < 0.02:  # a repeat of an earlier person
            again = list(out[rnd.randrange(len(out))])
            again[6] = rnd.choice(CITIES)
            out.append(again)
            continue
        jalali = rnd.random() < 0.5
        birth = (
            f"{rnd.randint(1330, 1385)}/{rnd.randint(1, 12):02d}/{rnd.randint(1, 29):02d}"
            if jalali
            else f"{rnd.randint(1950, 2005)}-{rnd.randint(1, 12):02d}-{rnd.randint(1, 28):02d}"
        )
        out.append(
            [
                rnd.choice(GIVEN),
                rnd.choice(FAMILY),
                f"user{i}@example.ir",
                f"0912{1000000 + i:07d}",
                national_id(100_000_000 + i * 7),
                birth,
                rnd.choice(CITIES),
                rnd.choice(SOURCES),
                "bench, import" if i % 3 == 0 else "",
            ]
        )
    return out


def to_csv(data: list[list[str]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(HEADER)
    w.writerows(data)
    return buf.getvalue().encode("utf-8-sig")


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all processes, everyone's)."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its reaped children (the import's worker processes)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def import_run(db_url: str, amqp_url: str, content: bytes) -> tuple[pb.ImportJob, float, int, dict]:
    proc, port = start_customer_svc(db_url, amqp_url)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pbg.CustomerServiceStub(ch)
            meta = md("admin", "bench")
            req = pb.ImportCustomersRequest(
                content=content, file_format=pb.IMPORT_FILE_FORMAT_CSV, customer_type=customer_pb2.CUSTOMER_TYPE_PERSON
            )
            svc0, busy0, t0 = process_cpu_seconds(proc.pid), machine_busy_seconds(), time.perf_counter()
            job = stub.ImportCustomers(req, metadata=meta)
            polls = 0
            while job.state == pb.IMPORT_STATE_RUNNING:
                time.sleep(0.1)
                job = stub.GetImportJob(pb.GetImportJobRequest(name=job.name), metadata=meta)
                polls += 1
            elapsed = time.perf_counter() - t0
            time.sleep(0.5)  # the worker processes exit and are reaped
            cpu = {
                "service_cpu_s": round(process_cpu_seconds(proc.pid) - svc0, 1),
                "machine_busy_cpu_s": round(machine_busy_seconds() - busy0, 1),
                "load_average_1m": os.getloadavg()[0],
            }
            return job, elapsed, polls, cpu
    finally:
        proc.terminate()
        proc.wait(30)


def copy_baseline(db_url: str, data: list[list[str]]) -> float:
    with psycopg.connect(normalise_url(db_url).replace("postgresql+psycopg://", "postgresql://")) as conn:
        cols = ", ".join(f"c{i} text" for i in range(len(HEADER)))
        conn.execute(f"CREATE TABLE bench_import_copy ({cols})")
        t0 = time.perf_counter()
        with conn.cursor().copy("COPY bench_import_copy FROM STDIN") as cp:
            for r in data:
                cp.write_row(r)
        conn.commit()
        elapsed = time.perf_counter() - t0
        conn.execute("DROP TABLE bench_import_copy")
        conn.commit()
    return elapsed


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get("BENCH_IMPORT_ROWS", "100000"))
    data = rows(n)
    content = to_csv(data)
    print(f"import bench: {n} rows, {len(content) / 1e6:.1f} MB CSV, {os.cpu_count()} cores", flush=True)
    dbs, broker = Databases(), Broker()
    try:
        load_before = os.getloadavg()[0]
        job, elapsed, polls, cpu = import_run(dbs.fresh("bench_import"), broker.url, content)
        copy_s = copy_baseline(dbs.fresh("bench_copy"), data)
    finally:
        dbs.drop_all()
        broker.close()
    if job.state != pb.IMPORT_STATE_SUCCEEDED:
        print(f"import did not succeed: {job}")
        return 1
    result = [
        {
            "what": "ImportCustomers (parse, validate, dedupe, insert, events, audit)",
            "rows": job.total_rows,
            "seconds": round(elapsed, 2),
            "rows_per_s": round(job.total_rows / elapsed),
            "created": job.created_rows,
            "skipped": job.skipped_rows,
            "failed": job.failed_rows,
        },
        {
            "what": "baseline: COPY of the same rows into a text table",
            "rows": n,
            "seconds": round(copy_s, 2),
            "rows_per_s": round(n / copy_s),
        },
    ]
    print(table(result, ["what", "rows", "seconds", "rows_per_s", "created", "skipped", "failed"]))
    print(f"target >= 2000 rows/s: {'met' if job.total_rows / elapsed >= 2000 else 'NOT met'} ({polls} polls)")
    print(
        f"CPU during the import: customer-svc (with its worker processes) {cpu['service_cpu_s']} s, whole machine "
        f"{cpu['machine_busy_cpu_s']} s of {round(elapsed * (os.cpu_count() or 1), 1)} s available (PostgreSQL, "
        f"RabbitMQ and anything else running); load average {load_before:.2f} before, "
        f"{cpu['load_average_1m']:.2f} after: a busy machine gives lower figures"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"import-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"rows": result, "cpu": cpu}, indent=2, ensure_ascii=False))
    print(f"saved {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
