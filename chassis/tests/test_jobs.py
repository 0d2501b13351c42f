"""Long-running jobs against real PostgreSQL, with real worker processes where it matters:
SIGKILL mid-way (another worker resumes from the checkpoint), SIGTERM (released, resumed at
once), cancel, progress, paging, clean-up.

This file is also the worker process those tests start:
``python test_jobs.py DATABASE_URL LEASE_SECONDS``.
"""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest
import sqlalchemy as sa

from crm_chassis import jobs
from crm_chassis.db import create_engine
from crm_chassis.errors import FailedPrecondition, InvalidArgument
from crm_chassis.jobs import JobContext, JobFailed, JobStopped, JobWorker
from crm_chassis.pagination import PageTokens
from crm_chassis.work_tables import work_metadata

KIND = "test.chunks"
HERE = pathlib.Path(__file__).resolve()


def chunked(ctx: JobContext):
    """N chunks, each one row in `items` and the checkpoint in one transaction."""
    n, delay = ctx.params["chunks"], ctx.params.get("delay", 0.0)
    start = ctx.checkpoint or 0
    ctx.progress(total=n, message=f"starting at chunk {start}")
    for i in range(start, n):
        with ctx.step() as conn:
            conn.execute(sa.text("INSERT INTO items VALUES (:j, :c, :p)"), {"j": ctx.id, "c": i, "p": os.getpid()})
            ctx.save(conn, checkpoint=i + 1, processed=i + 1, increment={"rows": 10})
        time.sleep(delay)
    return {"resumed_from": start, "pid": os.getpid()}


def worker_process(url: str, lease: float) -> None:
    engine = create_engine(url, pool_size=4)
    worker = JobWorker(engine, {KIND: chunked}, lease_seconds=lease, poll_seconds=0.1)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    worker.start()
    print("ready", flush=True)
    while not done.wait(0.1):
        pass
    worker.stop(timeout=10)  # what Service.stop does on SIGTERM
    engine.dispose()


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def url(databases):
    return databases.fresh("jobs")


@pytest.fixture
def engine(url):
    eng = create_engine(url, pool_size=6)
    work_metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(sa.text("CREATE TABLE items (job_id uuid, chunk int, pid int)"))
    yield eng
    eng.dispose()


def get(engine, job_id):
    with engine.connect() as conn:
        return jobs.get(conn, job_id)


def start(engine, kind=KIND, params=None, **kw):
    with engine.begin() as conn:
        return jobs.start(conn, kind, params if params is not None else {"chunks": 3}, **kw)


def items(engine, job_id) -> list:
    with engine.connect() as conn:
        return conn.execute(
            sa.text("SELECT chunk, pid FROM items WHERE job_id = :j ORDER BY chunk, pid"), {"j": job_id}
        ).all()


def spawn(url: str, lease: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, str(HERE), url, str(lease)], stdout=subprocess.PIPE, text=True, cwd=HERE.parent
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.slow
def test_a_job_whose_process_was_killed_is_resumed_from_its_checkpoint_by_another_worker(engine, url):
    job = start(engine, params={"chunks": 8, "delay": 0.3})
    proc = spawn(url, lease=1.0)
    try:
        wait_for(lambda: (get(engine, job.id).checkpoint or 0) >= 2, what="two committed chunks")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    killed_at = get(engine, job.id)
    assert killed_at.state == "running" and killed_at.owner  # nobody released it: the process died

    survivor = JobWorker(engine, {KIND: chunked}, lease_seconds=5, poll_seconds=0.1)
    survivor.start()
    try:
        wait_for(lambda: get(engine, job.id).state == "succeeded", what="the job to finish elsewhere")
    finally:
        survivor.stop()
    done = get(engine, job.id)
    resumed_from = done.result["resumed_from"]
    assert resumed_from >= killed_at.checkpoint >= 2  # continued after the last committed chunk
    rows = items(engine, job.id)
    assert [c for c, _ in rows] == list(range(8))  # every chunk exactly once: none lost, none repeated
    assert {p for c, p in rows if c < resumed_from} == {proc.pid}
    assert {p for c, p in rows if c >= resumed_from} == {os.getpid()}
    assert done.processed == 8 and done.total == 8 and done.counters == {"rows": 80}
    assert done.attempts == 2 and done.interruptions == 1
    assert done.owner is None and done.end_time is not None


@pytest.mark.slow
def test_sigterm_releases_a_running_job_and_another_worker_resumes_it_at_once(engine, url):
    job = start(engine, params={"chunks": 8, "delay": 0.3})
    proc = spawn(url, lease=600.0)  # a lease that would keep the job for ten minutes if not released
    try:
        wait_for(lambda: (get(engine, job.id).checkpoint or 0) >= 2, what="two committed chunks")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    released = get(engine, job.id)
    assert released.state == "queued" and released.owner is None and released.lease_until is None
    assert released.checkpoint >= 2

    other = JobWorker(engine, {KIND: chunked}, poll_seconds=0.1)
    other.start()
    try:
        wait_for(lambda: get(engine, job.id).state == "succeeded", timeout=30, what="the resumed job")
    finally:
        other.stop()
    done = get(engine, job.id)
    assert done.result["resumed_from"] == released.checkpoint
    assert [c for c, _ in items(engine, job.id)] == list(range(8))
    assert done.interruptions == 0 and done.attempts == 2
    assert done.counters == {"rows": 80}


def test_timer_and_job_workers_run_in_a_grpc_services_workers_and_stop_with_it(engine, url):
    """The services' lifecycle: GrpcService starts its workers and, on stop (SIGTERM), stops
    them; a job running then is released for another replica."""
    from crm_chassis.grpc_server import GrpcService
    from crm_chassis.timers import TimerWorker
    from tests.support.harness import service_settings

    job = start(engine, params={"chunks": 1000, "delay": 0.02})
    job_worker = JobWorker(engine, {KIND: chunked}, poll_seconds=0.1, lease_seconds=600)
    timer_worker = TimerWorker(engine, {"noop": lambda conn, timer: None})
    settings = service_settings("jobs-test", url, "amqp://unused")
    server = GrpcService(settings, [], [timer_worker, job_worker], port=0).start()
    try:
        wait_for(lambda: (get(engine, job.id).checkpoint or 0) >= 1, what="the job to run")
    finally:
        server.stop(1.0)
    released = get(engine, job.id)
    assert released.state == "queued" and released.owner is None and released.checkpoint >= 1
    assert not job_worker.running


def test_a_worker_that_lost_its_job_cannot_commit_a_chunk(engine):
    job = start(engine)
    a = JobWorker(engine, {KIND: chunked}, lease_seconds=30)
    b = JobWorker(engine, {KIND: chunked}, lease_seconds=30)
    ctx_a = a.claim()
    assert ctx_a.id == job.id
    assert b.claim() is None  # leased: not claimable
    with engine.begin() as conn:  # a's process hangs; its lease runs out
        conn.execute(sa.text("UPDATE jobs SET lease_until = now() - interval '1 second'"))
    ctx_b = b.claim()
    assert ctx_b.id == job.id and ctx_b.job.interruptions == 1
    with pytest.raises(JobStopped), ctx_a.step() as conn:
        conn.execute(sa.text("INSERT INTO items VALUES (:j, 0, 1)"), {"j": job.id})
        ctx_a.save(conn, checkpoint=1, processed=1)
    assert items(engine, job.id) == []  # a's chunk rolled back with its failed save
    assert get(engine, job.id).checkpoint is None
    assert ctx_a.stop_requested
    with ctx_b.step() as conn:
        ctx_b.save(conn, checkpoint=1, processed=1)
    assert get(engine, job.id).checkpoint == 1 and ctx_b.checkpoint == 1


def test_steps_do_not_nest_and_progress_is_not_called_inside_one(engine):
    start(engine)
    ctx = JobWorker(engine, {KIND: chunked}).claim()
    with ctx.step() as conn:
        with pytest.raises(RuntimeError):  # it would wait for the row this step holds
            ctx.progress(processed=1)
        with pytest.raises(RuntimeError), ctx.step():
            pass
        ctx.save(conn, checkpoint=1, processed=1)
    assert get(engine, ctx.id).processed == 1 and ctx.checkpoint == 1


def test_a_job_interrupted_too_often_fails_with_the_reason(engine):
    job = start(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE jobs SET state = 'running', owner = 'host-1:42', lease_until = now() - interval '1 second', "
                "interruptions = 3, attempts = 4"
            )
        )
    worker = JobWorker(engine, {KIND: chunked}, max_interruptions=3)
    assert worker.claim() is None
    failed = get(engine, job.id)
    assert failed.state == "failed" and failed.end_time is not None
    assert failed.error.startswith("interrupted 4 times") and "host-1:42" in failed.error


def test_cancel_stops_a_running_job_at_its_next_step(engine):
    job = start(engine, params={"chunks": 1000, "delay": 0.02})
    worker = JobWorker(engine, {KIND: chunked}, poll_seconds=0.1, lease_seconds=3)
    worker.start()
    try:
        wait_for(lambda: (get(engine, job.id).checkpoint or 0) >= 2, what="a few chunks")
        with engine.begin() as conn:
            cancelled = jobs.cancel(conn, job.id, by="alice")
        assert cancelled.state == "cancelled" and cancelled.error == "cancelled by alice"
        wait_for(lambda: not worker.running, what="the handler to stop")
    finally:
        worker.stop()
    final = get(engine, job.id)
    assert final.state == "cancelled" and final.end_time is not None and final.result is None
    written = items(engine, job.id)
    assert len(written) < 1000
    assert final.processed == final.checkpoint == len(written)  # exactly what was committed


def test_cancel_of_queued_ended_and_missing_jobs(engine):
    queued = start(engine)
    with engine.begin() as conn:
        assert jobs.cancel(conn, queued.id, by="bob").state == "cancelled"
        assert jobs.cancel(conn, queued.id, by="bob").state == "cancelled"  # again: the same answer
        assert jobs.cancel(conn, "8c0b0a52-2f3a-4c43-9b7e-7b7f6a1b9c11") is None
        assert jobs.cancel(conn, "not-a-uuid") is None
    done = start(engine, params={"chunks": 1})
    worker = JobWorker(engine, {KIND: chunked}, poll_seconds=0.1)
    worker.start()
    try:
        wait_for(lambda: get(engine, done.id).state == "succeeded", what="the job to succeed")
    finally:
        worker.stop()
    with engine.begin() as conn, pytest.raises(FailedPrecondition) as e:
        jobs.cancel(conn, done.id)
    assert e.value.reason == "JOB_ENDED" and e.value.metadata == {"id": done.id, "state": "succeeded"}
    assert get(engine, queued.id).attempts == 0  # a job cancelled while queued never ran


def test_progress_input_result_and_failures(engine):
    seen: dict = {}

    def reads_input(ctx: JobContext):
        data = ctx.input()
        seen["input"] = data
        ctx.progress(total=len(data), processed=len(data) // 2, message="halfway", increment={"bytes": 5})
        seen["halfway"] = get(engine, ctx.id)
        ctx.progress(processed=len(data), increment={"bytes": 5})
        return {"size": len(data)}

    def bad_file(ctx):
        raise JobFailed("row 1: the header is missing")

    def bug(ctx):
        raise KeyError("oops")

    worker = JobWorker(engine, {"read": reads_input, "bad": bad_file, "bug": bug}, poll_seconds=0.1)
    ok = start(engine, "read", {}, input=b"a,b\n1,2\n", creator="alice")
    refused = start(engine, "bad", {})
    broken = start(engine, "bug", {})
    worker.start()
    try:
        wait_for(lambda: all(get(engine, j.id).ended for j in (ok, refused, broken)), what="three jobs")
    finally:
        worker.stop()
    assert seen["input"] == b"a,b\n1,2\n"
    half = seen["halfway"]
    assert (half.state, half.processed, half.total, half.message, half.counters) == (
        "running",
        4,
        8,
        "halfway",
        {"bytes": 5},
    )
    final = get(engine, ok.id)
    assert final.state == "succeeded" and final.result == {"size": 8} and final.counters == {"bytes": 10}
    assert final.creator == "alice" and final.processed == 8 and final.error == ""
    assert (get(engine, refused.id).state, get(engine, refused.id).error) == ("failed", "row 1: the header is missing")
    assert (get(engine, broken.id).state, get(engine, broken.id).error) == ("failed", jobs.INTERNAL_ERROR)


def test_start_with_a_request_id_is_idempotent(engine):
    first = start(engine, request_id="req-1", input=b"x")
    again = start(engine, request_id="req-1", input=b"y")
    other_kind = start(engine, "other", {}, request_id="req-1")
    assert again.id == first.id and other_kind.id != first.id
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM jobs WHERE kind = :k"), {"k": KIND}).scalar() == 1
        assert jobs.active_count(conn, KIND) == 1


def test_list_pages_newest_first(engine):
    made = [start(engine).id for _ in range(7)]
    start(engine, "other", {})
    tokens = PageTokens("secret", "jobs")
    pages, token = [], ""
    with engine.connect() as conn:
        while True:
            page, token = jobs.list_jobs(conn, tokens, kind=KIND, page_size=3, page_token=token)
            pages.append([j.id for j in page])
            if not token:
                break
        expected = [
            str(r[0])
            for r in conn.execute(
                sa.text("SELECT id FROM jobs WHERE kind = :k ORDER BY create_time DESC, id DESC"), {"k": KIND}
            )
        ]
        everything, _ = jobs.list_jobs(conn, tokens, page_size=50)
        _, first_token = jobs.list_jobs(conn, tokens, kind=KIND, page_size=3)
        with pytest.raises(InvalidArgument) as e:  # a token continues only the listing it came from
            jobs.list_jobs(conn, tokens, kind="other", page_size=3, page_token=first_token)
    assert [len(p) for p in pages] == [3, 3, 1]
    assert sum(pages, []) == expected and sorted(expected) == sorted(made)
    assert expected[0] == made[-1]  # newest first
    assert len(everything) == 8
    assert e.value.violations[0].field == "page_token"


def test_cleanup_deletes_jobs_ended_long_ago_with_their_inputs(engine):
    old = start(engine, input=b"old")
    recent = start(engine, input=b"recent")
    running = start(engine, input=b"running")
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE jobs SET state = 'succeeded', end_time = now() - interval '91 days' WHERE id = :i"),
            {"i": old.id},
        )
        conn.execute(
            sa.text("UPDATE jobs SET state = 'failed', end_time = now() - interval '10 days' WHERE id = :i"),
            {"i": recent.id},
        )
        conn.execute(
            sa.text("UPDATE jobs SET create_time = now() - interval '200 days' WHERE id = :i"), {"i": running.id}
        )
    with engine.begin() as conn:
        assert jobs.cleanup(conn) == 1
        assert jobs.cleanup(conn, older_than=dt.timedelta(days=5)) == 1
        assert jobs.cleanup(conn) == 0
        left = {str(r[0]) for r in conn.execute(sa.text("SELECT id FROM jobs"))}
        inputs = {str(r[0]) for r in conn.execute(sa.text("SELECT job_id FROM job_inputs"))}
    assert left == inputs == {running.id}


if __name__ == "__main__":
    worker_process(sys.argv[1], float(sys.argv[2]))
