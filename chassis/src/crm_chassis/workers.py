"""What every background worker of a service shares (the timer and job workers, the outbox relay):
a daemon thread running `_run` until stopped, `wake()` to cut its idle wait short, and
handlers registered per kind (`register(kind, fn)` or the `@worker.handler(kind)` decorator).
Service.stop / GrpcService.stop call `stop(timeout)` on SIGTERM."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class PollingWorker:
    name = "worker"

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look for work now (after a commit that made some) instead of at the next poll."""
        self._wake.set()

    def _signal_stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def _join(self, timeout: float) -> None:
        if self._thread:
            self._thread.join(max(0.0, timeout))

    def _idle(self, seconds: float) -> None:
        """Wait for a wake-up, a stop or `seconds`, whichever comes first."""
        self._wake.wait(seconds)
        self._wake.clear()

    def _run(self) -> None:  # pragma: no cover - each worker has its own loop
        raise NotImplementedError

    # -- handlers --------------------------------------------------------------------------
    def register(self, kind: str, handler: Callable, **options: Any) -> None:  # pragma: no cover
        raise NotImplementedError

    def handler(self, kind: str, **options: Any) -> Callable[[Callable], Callable]:
        """Decorator form of `register`."""

        def deco(fn: Callable) -> Callable:
            self.register(kind, fn, **options)
            return fn

        return deco
