"""A daemon job's thread: :meth:`Job.round` on every :meth:`~Job.wake` and every ``interval``
seconds, until :meth:`~Job.close`. The policy and stale-detection jobs run on it."""

from __future__ import annotations

import threading


class Job:
    name = "envelope-job"

    def __init__(self, interval: float):
        self.interval = max(0.01, float(interval))
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def round(self) -> None:  # pragma: no cover - each job has its own
        raise NotImplementedError

    def start_thread(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def wake(self, *_args) -> None:
        """Run a round soon (an informer event, a judgement that changed)."""
        self._wake.set()

    def close(self, timeout: float = 20.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.round()
            self._wake.wait(self.interval)
            self._wake.clear()
