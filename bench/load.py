"""A closed-loop gRPC load generator: N callers each issue the next call as soon as the last
one returns, for a fixed time. Calls are issued as futures from one thread, so the client
spends as little CPU as possible (it shares the 2 cores with the server)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of values; 0 for none."""
    if not values:
        return 0.0
    data = sorted(values)
    return data[min(len(data) - 1, int(round(p / 100 * (len(data) - 1))))]


def table(rows: list[dict], cols: list[str]) -> str:
    """Rows as a plain-text table of the given columns, as the benchmarks print them."""
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    for r in rows:
        out.append("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths, strict=True)))
    return "\n".join(out)


@dataclass
class Result:
    label: str
    concurrency: int
    calls: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def pct(self, p: float) -> float:
        return pct(self.latencies_ms, p)

    def row(self, ceiling: Result, percentiles: tuple[int, ...] = (50, 99)) -> dict:
        """This measurement as a table row, beside the empty-RPC ceiling of the same run."""
        return {
            "what": self.label,
            "callers": self.concurrency,
            "calls": self.calls,
            "errors": self.errors,
            "rps": round(self.rps, 1),
            **{f"p{p}_ms": round(self.pct(p), 2) for p in percentiles},
            "ratio_to_ceiling": round(self.rps / ceiling.rps, 3) if ceiling.rps else None,
        }


def run(label: str, make_call, concurrency: int, seconds: float, warmup: float = 0.5) -> Result:
    """make_call() -> a grpc future (e.g. lambda: stub.GetCustomer.future(req, metadata=md))."""
    lock = threading.Lock()
    done = threading.Event()
    state = {"calls": 0, "errors": 0, "inflight": 0, "measuring": False}
    latencies: list[float] = []
    stop_at = [time.perf_counter() + warmup + seconds]
    measure_from = [time.perf_counter() + warmup]

    def issue():
        started = time.perf_counter()
        fut = make_call()
        fut.add_done_callback(lambda f: finished(f, started))

    def finished(fut, started):
        now = time.perf_counter()
        ok = fut.exception() is None
        with lock:
            if now >= measure_from[0] and now < stop_at[0]:
                state["calls"] += 1
                if not ok:
                    state["errors"] += 1
                latencies.append((now - started) * 1000)
            if now < stop_at[0]:
                again = True
            else:
                again = False
                state["inflight"] -= 1
                if state["inflight"] == 0:
                    done.set()
        if again:
            issue()

    state["inflight"] = concurrency
    for _ in range(concurrency):
        issue()
    done.wait(warmup + seconds + 30)
    return Result(label, concurrency, state["calls"], state["errors"], seconds, latencies)


def run_one_caller(label: str, call, seconds: float, warmup: float = 0.5) -> Result:
    """One caller in a loop of blocking calls (`call()` raises on failure): the latency a
    person or a script calling one request at a time sees."""
    latencies: list[float] = []
    calls = errors = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    while True:
        t0 = time.perf_counter()
        if t0 >= stop_at:
            break
        try:
            call()
            ok = True
        except Exception:
            ok = False
        t1 = time.perf_counter()
        if t0 >= measure_from:
            calls += 1
            errors += not ok
            latencies.append((t1 - t0) * 1000)
    return Result(label, 1, calls, errors, seconds, latencies)
