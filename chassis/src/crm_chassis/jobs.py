"""Long-running jobs (imports, rebuilds, exports) that survive the process running them.

A job is a row in `jobs` (see work_tables.py): started in the caller's transaction, run by a
`JobWorker` in any replica, resumable from its last checkpoint::

    from crm_chassis import jobs

    with engine.begin() as conn:                      # the RPC
        job = jobs.start(conn, "customer.import", {"policy": "skip"}, input=content,
                         creator=principal.subject, request_id=request.request_id)
    worker.wake()

    worker = jobs.JobWorker(engine)                   # in the service's workers

    @worker.handler("customer.import")
    def run_import(ctx: jobs.JobContext):
        rows = parse(ctx.input())
        done = ctx.checkpoint or 0                    # rows committed by earlier runs
        ctx.progress(total=len(rows))
        for i in range(done, len(rows), 1000):
            with ctx.step() as conn:                  # one transaction per chunk
                created = write(conn, rows[i : i + 1000])
                ctx.save(conn, checkpoint=i + 1000, processed=min(i + 1000, len(rows)),
                         increment={"created": created})
        return {"rows": len(rows)}                    # the job's result; it SUCCEEDED

- State: queued -> running -> succeeded | failed | cancelled. `get`, `list_jobs` (keyset,
  newest first), `cancel`, `cleanup` (ended more than 90 days ago; the worker also runs it).
- Progress: processed / total, named counters, a message; saved with the chunk it describes
  (`ctx.save` in the chunk's transaction), so a job shows exactly what was committed.
- Ownership: a worker claims a job (FOR UPDATE SKIP LOCKED) with a lease it renews by
  heartbeat. Every save is guarded by the claim: a save after the job was cancelled or taken
  over raises `JobStopped` and the chunk's transaction rolls back.
- A process that dies (SIGKILL, OOM, node lost) stops renewing: when the lease expires another
  worker claims the job and the handler runs again from the last checkpoint. A job
  interrupted more than `max_interruptions` times is FAILED with that reason.
- On stop (SIGTERM: Service.stop stops its workers) running handlers are asked to stop at their
  next step (`ctx.step()` / `ctx.check()` raise `JobStopped`), and their jobs are released
  (queued again, lease cleared) so another replica resumes them at once.
- Cancel marks the job CANCELLED at once; its handler stops at its next step, and the chunk in
  flight (if any) rolls back.
- A handler raises `JobFailed("message")` to fail with a message for the user; any other
  exception fails the job with a generic message (the traceback goes to the log).
Handlers must make each step idempotent with respect to its checkpoint: a step's writes and
its `save` commit together, so a resumed run never repeats a committed step.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from .errors import FailedPrecondition
from .filtering import keyset_page, newest_first
from .pagination import PageTokens
from .resources import check_request_id
from .work_tables import job_inputs, jobs
from .workers import PollingWorker

log = logging.getLogger("crm.jobs")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
ENDED = (SUCCEEDED, FAILED, CANCELLED)
RETENTION = dt.timedelta(days=90)
INTERNAL_ERROR = "the job stopped on an internal error; what it reported as processed was committed"
_UNSET: Any = object()
# Every column but the lease internals, as callers read a job.
_COLUMNS = [c for c in jobs.c if c.key != "claim_token"]


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    state: str
    params: dict[str, Any]
    creator: str
    request_id: str | None
    processed: int
    total: int | None
    counters: dict[str, int]
    message: str
    checkpoint: Any
    result: Any
    error: str
    cancel_requested: bool
    owner: str | None
    attempts: int  # times a worker started it (a resumed job counts each run)
    interruptions: int  # times it was taken over from a worker that died holding it
    create_time: dt.datetime
    update_time: dt.datetime
    start_time: dt.datetime | None
    end_time: dt.datetime | None
    lease_until: dt.datetime | None = None
    heartbeat_time: dt.datetime | None = None

    @property
    def ended(self) -> bool:
        return self.state in ENDED


def _job(row) -> Job:
    m = row._mapping
    return Job(**{f: m[f] for f in Job.__dataclass_fields__ if f in m})


class JobStopped(Exception):
    """Raised inside a handler when it must stop now: cancelled, taken over, or the worker is
    stopping. Let it propagate (the worker handles it)."""


class JobFailed(Exception):
    """Raise from a handler to fail the job with this message (shown to the user)."""


def _uuid(value: str) -> str | None:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        return None


def start(
    conn: sa.Connection,
    kind: str,
    params: dict[str, Any] | None = None,
    *,
    input: bytes | None = None,
    creator: str = "",
    request_id: str | None = None,
    total: int | None = None,
) -> Job:
    """Record a queued job in the caller's transaction (wake the worker after commit). With a
    `request_id`, a retry of the same start returns the job the first call made (at most
    resources.REQUEST_ID_LIMIT characters: INVALID_ARGUMENT naming request_id)."""
    request_id = check_request_id(request_id or "")
    jid = str(uuid.uuid4())
    stmt = pg.insert(jobs).values(
        id=jid,
        kind=kind,
        state=QUEUED,
        params=params or {},
        creator=creator,
        request_id=request_id or None,
        total=total,
    )
    if request_id:
        stmt = stmt.on_conflict_do_nothing(
            index_elements=["kind", "request_id"], index_where=sa.text("request_id IS NOT NULL")
        )
    row = conn.execute(stmt.returning(*_COLUMNS)).one_or_none()
    if row is None:  # a job with this request id exists
        return _job(
            conn.execute(sa.select(*_COLUMNS).where(jobs.c.kind == kind, jobs.c.request_id == request_id)).one()
        )
    if input is not None:
        conn.execute(job_inputs.insert().values(job_id=jid, data=input))
    return _job(row)


def get(conn: sa.Connection, job_id: str) -> Job | None:
    """The job (None if there is none, or `job_id` is not a UUID)."""
    jid = _uuid(job_id)
    if jid is None:
        return None
    row = conn.execute(sa.select(*_COLUMNS).where(jobs.c.id == jid)).one_or_none()
    return None if row is None else _job(row)


def list_jobs(
    conn: sa.Connection,
    tokens: PageTokens,
    *,
    kind: str | None = None,
    creator: str | None = None,
    page_size: int = 50,
    page_token: str = "",
) -> tuple[list[Job], str]:
    """One page of jobs, newest first (optionally of one kind / creator); returns (jobs, next
    page token, "" at the end). A bad token is INVALID_ARGUMENT on `page_token`."""
    q = sa.select(*_COLUMNS)
    if kind is not None:
        q = q.where(jobs.c.kind == kind)
    if creator is not None:
        q = q.where(jobs.c.creator == creator)
    purpose = PageTokens.fingerprint(list="jobs", kind=kind, creator=creator)
    rows, nxt = keyset_page(conn, q, newest_first(jobs), tokens, purpose, page_size, page_token)
    return [_job(r) for r in rows], nxt


def cancel(conn: sa.Connection, job_id: str, by: str = "") -> Job | None:
    """Cancel a queued or running job at once (its handler stops at its next step); None if
    there is no such job. Cancelling a cancelled job returns it; a job that succeeded or failed
    is FailedPrecondition (reason JOB_ENDED, metadata id and state)."""
    jid = _uuid(job_id)
    if jid is None:
        return None
    row = conn.execute(
        jobs.update()
        .where(jobs.c.id == jid, jobs.c.state.in_([QUEUED, RUNNING]))
        .values(
            state=CANCELLED,
            cancel_requested=True,
            error=f"cancelled by {by}" if by else "cancelled",
            end_time=sa.func.now(),
            update_time=sa.func.now(),
        )
        .returning(*_COLUMNS)
    ).one_or_none()
    if row is not None:
        log.info("job cancelled", extra={"job": jid, "kind": row.kind, "by": by})
        return _job(row)
    job = get(conn, jid)
    if job is None or job.state == CANCELLED:
        return job
    raise FailedPrecondition(
        f"job {jid} has already ended ({job.state})", reason="JOB_ENDED", metadata={"id": jid, "state": job.state}
    )


def cleanup(conn: sa.Connection, older_than: dt.timedelta = RETENTION, batch: int = 1000) -> int:
    """Delete up to `batch` jobs (with their inputs, and rows of tables that reference jobs.id
    ON DELETE CASCADE) that ended more than `older_than` ago; returns how many."""
    old = (
        sa.select(jobs.c.id)
        .where(jobs.c.end_time < sa.func.now() - sa.literal(older_than, sa.Interval))
        .limit(batch)
        .scalar_subquery()
    )
    return conn.execute(jobs.delete().where(jobs.c.id.in_(old))).rowcount


def active_count(conn: sa.Connection, kind: str) -> int:
    """Jobs of `kind` queued or running (for a service's own limit on work in flight)."""
    return conn.execute(
        sa.select(sa.func.count()).where(jobs.c.kind == kind, jobs.c.state.in_([QUEUED, RUNNING]))
    ).scalar_one()


def _lease(seconds: float):
    return sa.func.now() + sa.literal(dt.timedelta(seconds=seconds), sa.Interval)


class JobContext:
    """What a handler gets: the job as claimed, its checkpoint, and the means to save progress."""

    def __init__(self, worker: JobWorker, job: Job, token: str):
        self.worker = worker
        self.engine = worker.engine
        self.job = job
        self.token = token
        self._checkpoint = job.checkpoint
        self._stop = threading.Event()  # set by the worker: stopping, cancelled or lost
        self.stop_reason = ""
        self._saved = False
        self._pending: Any = _UNSET
        self._in_step = False

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def params(self) -> dict[str, Any]:
        return self.job.params

    @property
    def checkpoint(self) -> Any:
        """The last committed checkpoint (None before the first): where a resumed run continues."""
        return self._checkpoint

    @property
    def resumed(self) -> bool:
        """True when an earlier run of this job committed a checkpoint."""
        return self.job.checkpoint is not None

    def input(self) -> bytes | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(job_inputs.c.data).where(job_inputs.c.job_id == self.id)).scalar()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def check(self) -> None:
        """Raise JobStopped if the job must stop (cancelled, taken over, worker stopping)."""
        if self._stop.is_set():
            raise JobStopped(self.stop_reason or "stop requested")

    @contextlib.contextmanager
    def step(self, uow=None) -> Iterator:
        """One unit of work in one transaction: checks for a stop first, and commits only while
        this worker still owns the job (a `save` in it, or a bare ownership check). Yields the
        connection; with a `uow` (crm_chassis.uow.UnitOfWork), a Transaction of it, so the step's
        events and audit entries commit with it (save with `ctx.save(tx.conn, ...)`)."""
        if self._in_step:
            raise RuntimeError("a step is already open: steps do not nest")
        self.check()
        self._saved, self._pending, self._in_step = False, _UNSET, True
        try:
            with contextlib.ExitStack() as stack:
                if uow is None:
                    tx = conn = stack.enter_context(self.engine.begin())
                else:
                    tx = stack.enter_context(uow.begin())
                    conn = tx.conn
                yield tx
                if not self._saved:
                    self._guarded(conn, {})
        finally:
            self._in_step = False
        self._committed()

    def save(
        self,
        conn: sa.Connection,
        checkpoint: Any = _UNSET,
        *,
        processed: int | None = None,
        total: int | None = None,
        message: str | None = None,
        increment: dict[str, int] | None = None,
    ) -> None:
        """Record progress in `conn`'s transaction (the step's): the checkpoint a resumed run
        starts from (any JSON value), processed / total (absolute), message, and counters to add
        to. Raises JobStopped (rolling the step back) if the job was cancelled or taken over."""
        values: dict[str, Any] = {}
        if checkpoint is not _UNSET:
            values["checkpoint"] = checkpoint
            self._pending = checkpoint
        if processed is not None:
            values["processed"] = processed
        if total is not None:
            values["total"] = total
        if message is not None:
            values["message"] = message
        if increment:
            counters = jobs.c.counters
            for name, n in increment.items():
                current = sa.func.coalesce(sa.cast(jobs.c.counters[name].astext, sa.BigInteger), 0)
                counters = counters.op("||")(sa.func.jsonb_build_object(name, current + int(n)))
            values["counters"] = counters
        self._guarded(conn, values)
        self._saved = True

    def _committed(self) -> None:
        # ctx.checkpoint follows the database once the step (or progress) has committed.
        if self._pending is not _UNSET:
            self._checkpoint, self._pending = self._pending, _UNSET

    def progress(self, checkpoint: Any = _UNSET, **fields: Any) -> None:
        """`save` (the same checkpoint, processed, total, message and increment) in a transaction
        of its own, for work whose results are not in this database. Not inside a step (its
        transaction holds the job's row): use `save` there."""
        if self._in_step:
            raise RuntimeError("inside a step, use ctx.save(conn, ...)")
        self._pending = _UNSET
        with self.engine.begin() as conn:
            self.save(conn, checkpoint, **fields)
        self._committed()

    def _guarded(self, conn: sa.Connection, values: dict[str, Any]) -> None:
        done = conn.execute(
            jobs.update()
            .where(jobs.c.id == self.id, jobs.c.claim_token == self.token, jobs.c.state == RUNNING)
            .values(
                **values,
                update_time=sa.func.now(),
                heartbeat_time=sa.func.now(),
                lease_until=_lease(self.worker.lease_seconds),
            )
        ).rowcount
        if not done:
            self._stop.set()
            self.stop_reason = self.stop_reason or "the job was cancelled or taken over"
            raise JobStopped(self.stop_reason)


JobHandler = Callable[[JobContext], Any]


class JobWorker(PollingWorker):
    """Runs queued jobs (and jobs whose owner died) of the kinds it has handlers for, up to
    `concurrency` at once. One per process; replicas share the work."""

    name = "job-worker"

    def __init__(
        self,
        engine: sa.Engine,
        handlers: dict[str, JobHandler] | None = None,
        *,
        concurrency: int = 2,
        poll_seconds: float = 1.0,
        lease_seconds: float = 30.0,
        max_interruptions: int = 3,
        retention: dt.timedelta = RETENTION,
        worker_id: str | None = None,
    ):
        self.engine = engine
        self.concurrency = concurrency
        self.poll_seconds = poll_seconds
        self.lease_seconds = lease_seconds
        self.max_interruptions = max_interruptions
        self.retention = retention
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._handlers: dict[str, JobHandler] = dict(handlers or {})
        self._running: dict[str, tuple[JobContext, threading.Thread]] = {}
        self._lock = threading.Lock()
        super().__init__()
        self._next_cleanup = 0.0
        self._next_heartbeat = 0.0

    # -- handlers ----------------------------------------------------------------------------
    def register(self, kind: str, handler: JobHandler) -> None:
        """Run jobs of `kind` with `handler(ctx)`; its return value (JSON) is the result."""
        self._handlers[kind] = handler

    def stop(self, timeout: float = 10.0) -> None:
        """Ask running handlers to stop at their next step, wait up to `timeout`, and release
        their jobs (queued again, lease cleared) for another replica to resume at once."""
        deadline = time.monotonic() + timeout
        self._stopping.set()  # no new claims; the wake-up comes once the handlers are told
        with self._lock:
            running = list(self._running.values())
        for ctx, _ in running:
            ctx.stop_reason = ctx.stop_reason or "the worker is stopping"
            ctx._stop.set()
        self._wake.set()
        self._join(deadline - time.monotonic())
        for _ctx, thread in running:
            thread.join(max(0.0, deadline - time.monotonic()))
        for ctx, thread in running:
            if thread.is_alive():  # it did not reach a step in time: release it anyway (its
                self._release(ctx)  # saves now fail, so it cannot commit after another run starts)
                log.warning("job still running at stop; released", extra={"job": ctx.id})

    @property
    def running(self) -> list[str]:
        with self._lock:
            return list(self._running)

    # -- claiming ----------------------------------------------------------------------------
    def claim(self) -> JobContext | None:
        """Claim one queued job, or a running one whose lease expired; None when there is none."""
        j = jobs.c
        pick = (
            sa.select(j.id, j.owner.label("old_owner"), j.state.label("old_state"))
            .where(
                j.kind.in_(list(self._handlers)),
                sa.or_(j.state == QUEUED, sa.and_(j.state == RUNNING, j.lease_until < sa.func.now())),
            )
            .order_by(j.create_time)
            .limit(1)
            .with_for_update(skip_locked=True)
            .cte("pick")
        )
        token = str(uuid.uuid4())
        with self.engine.begin() as conn:
            row = conn.execute(
                jobs.update()
                .where(j.id == pick.c.id)
                .values(
                    state=RUNNING,
                    owner=self.worker_id,
                    claim_token=token,
                    lease_until=_lease(self.lease_seconds),
                    heartbeat_time=sa.func.now(),
                    attempts=j.attempts + 1,
                    interruptions=j.interruptions + sa.case((pick.c.old_state == RUNNING, 1), else_=0),
                    start_time=sa.func.coalesce(j.start_time, sa.func.now()),
                    update_time=sa.func.now(),
                )
                .returning(*_COLUMNS, pick.c.old_owner, pick.c.old_state)
            ).one_or_none()
        if row is None:
            return None
        ctx = JobContext(self, _job(row), token)
        if row.old_state == RUNNING:
            log.warning(
                "job taken over from a worker that stopped renewing its lease",
                extra={"job": row.id, "kind": row.kind, "previous_owner": row.old_owner, "checkpoint": row.checkpoint},
            )
            if row.interruptions > self.max_interruptions:
                self._finish(
                    ctx,
                    FAILED,
                    error=f"interrupted {row.interruptions} times: the process running it stopped without "
                    f"releasing it (last: {row.old_owner})",
                )
                return None
        return ctx

    def _finish(self, ctx: JobContext, state: str, *, result: Any = None, error: str = "") -> bool:
        with self.engine.begin() as conn:
            done = conn.execute(
                jobs.update()
                .where(jobs.c.id == ctx.id, jobs.c.claim_token == ctx.token, jobs.c.state == RUNNING)
                .values(
                    state=state,
                    result=sa.null() if result is None else result,
                    error=error,
                    end_time=sa.func.now(),
                    update_time=sa.func.now(),
                    owner=None,
                    claim_token=None,
                    lease_until=None,
                )
            ).rowcount
        return bool(done)

    def _release(self, ctx: JobContext) -> bool:
        try:
            with self.engine.begin() as conn:
                done = conn.execute(
                    jobs.update()
                    .where(jobs.c.id == ctx.id, jobs.c.claim_token == ctx.token, jobs.c.state == RUNNING)
                    .values(state=QUEUED, owner=None, claim_token=None, lease_until=None, update_time=sa.func.now())
                ).rowcount
        except sa.exc.SQLAlchemyError as exc:  # its lease expires instead
            log.warning("could not release a job", extra={"job": ctx.id, "error": str(exc)})
            return False
        if done:
            log.info("job released for another worker", extra={"job": ctx.id, "kind": ctx.job.kind})
        return bool(done)

    # -- running -----------------------------------------------------------------------------
    def _execute(self, ctx: JobContext) -> None:
        job = ctx.job
        extra = {"job": job.id, "kind": job.kind, "attempt": job.attempts}
        try:
            log.info("job started" if not ctx.resumed else "job resumed", extra=extra)
            result = self._handlers[job.kind](ctx)
        except JobStopped as stop:
            if self._stopping.is_set():
                self._release(ctx)
            else:
                log.info("job stopped", extra={**extra, "reason": str(stop)})
        except JobFailed as exc:
            if self._finish(ctx, FAILED, error=str(exc)):
                log.info("job failed", extra={**extra, "error": str(exc)})
        except sa.exc.DBAPIError as exc:
            if exc.connection_invalidated or isinstance(exc, sa.exc.OperationalError):
                # The database went away: nothing can be written now; the lease expires and a
                # worker resumes the job from its checkpoint.
                log.warning("job interrupted by a database error", extra={**extra, "error": str(exc)})
            else:
                log.exception("job failed", extra=extra)
                self._finish_quietly(ctx, FAILED, error=INTERNAL_ERROR)
        except Exception:
            log.exception("job failed", extra=extra)
            self._finish_quietly(ctx, FAILED, error=INTERNAL_ERROR)
        else:
            if self._finish(ctx, SUCCEEDED, result=result):
                log.info("job succeeded", extra=extra)
        finally:
            with self._lock:
                self._running.pop(job.id, None)
            self._wake.set()  # a slot is free

    def _finish_quietly(self, ctx: JobContext, state: str, error: str) -> None:
        try:
            self._finish(ctx, state, error=error)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("could not record a job's failure", extra={"job": ctx.id, "error": str(exc)})

    def heartbeat(self) -> None:
        """Renew the leases of this worker's running jobs; stop the handlers of jobs that were
        cancelled or taken over."""
        with self._lock:
            running = {ctx.token: ctx for ctx, _ in self._running.values()}
        if not running:
            return
        tokens = list(running)
        j = jobs.c
        with self.engine.begin() as conn:
            # Rows a step is saving right now are locked: skip them (the save renews the lease).
            locked = (
                sa.select(j.id)
                .where(j.claim_token.in_(tokens), j.state == RUNNING)
                .with_for_update(skip_locked=True)
                .scalar_subquery()
            )
            conn.execute(
                jobs.update()
                .where(j.id.in_(locked))
                .values(lease_until=_lease(self.lease_seconds), heartbeat_time=sa.func.now())
            )
            alive = set(
                conn.execute(sa.select(j.claim_token).where(j.claim_token.in_(tokens), j.state == RUNNING)).scalars()
            )
        for token, ctx in running.items():
            if token not in alive and not ctx._stop.is_set():
                ctx.stop_reason = "the job was cancelled or taken over"
                ctx._stop.set()

    def _run(self) -> None:
        backoff = 0.2
        while not self._stopping.is_set():
            try:
                now = time.monotonic()
                if now >= self._next_heartbeat:
                    self._next_heartbeat = now + self.lease_seconds / 3
                    self.heartbeat()
                claimed = False
                if self._handlers and len(self.running) < self.concurrency:
                    ctx = self.claim()
                    if ctx is not None and not self._stopping.is_set():
                        thread = threading.Thread(
                            target=self._execute, args=(ctx,), name=f"job-{ctx.id[:8]}", daemon=True
                        )
                        with self._lock:
                            self._running[ctx.id] = (ctx, thread)
                        thread.start()
                        claimed = True
                    elif ctx is not None:
                        self._release(ctx)
                backoff = 0.2
                if claimed:
                    continue
                if now >= self._next_cleanup:
                    self._next_cleanup = now + 600
                    with self.engine.begin() as conn:
                        cleanup(conn, self.retention)
                self._idle(min(self.poll_seconds, self.lease_seconds / 3))
            except sa.exc.SQLAlchemyError as exc:
                log.warning("job worker database error", extra={"error": str(exc)})
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                log.exception("job worker error")
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
