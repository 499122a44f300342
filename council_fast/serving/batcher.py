"""Dynamic batching: one bounded queue, one worker thread that forms batches and runs them.

``submit(item, key)`` queues an item and returns a ``concurrent.futures.Future`` for its result, or
raises :class:`QueueFull` when ``max_queue`` items are already waiting. The worker takes the oldest
item, then waits at most ``max_wait_s`` (counted from that item's arrival) for more items with the
same ``key`` (the image size: a batch is one tensor) until it has ``max_batch``; items of other keys
keep their place for the next batch. ``run_batch(items) -> results`` runs one batch; when it raises,
only that batch's futures get the exception. ``close()`` stops taking new items and, by default,
finishes everything already queued before the worker exits (graceful shutdown).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

__all__ = ["Batcher", "QueueFull", "ShuttingDown"]


class QueueFull(RuntimeError):
    """The queue holds max_queue items: the caller should answer 503 and ask the client to retry."""


class ShuttingDown(RuntimeError):
    """The batcher is closing and takes no new items."""


@dataclass
class _Entry:
    item: Any
    key: Hashable
    future: Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(self, run_batch: Callable[[list], Sequence], max_batch: int = 32, max_wait_s: float = 0.005,
                 max_queue: int = 256, on_batch: Callable[[int, float, bool], None] | None = None,
                 before_start: Callable[[], None] | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be at least 1, max_wait_s not negative")
        self.run_batch, self.max_batch, self.max_wait_s, self.max_queue = run_batch, max_batch, max_wait_s, max_queue
        self.on_batch = on_batch  # (batch size, seconds, ok) after every batch, for metrics
        self.before_start = before_start  # runs on the worker thread before the first batch (warm-up)
        self._queue: deque[_Entry] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="council-fast-batcher", daemon=True)
        self.started = threading.Event()  # set once before_start has finished
        self.start_error: BaseException | None = None

    def start(self) -> "Batcher":
        self._thread.start()
        return self

    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit(self, item: Any, key: Hashable = None) -> Future:
        future: Future = Future()
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self._queue.append(_Entry(item, key, future))
            self._cond.notify()
        return future

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no more items; finish the queued ones (drain) or fail them with ShuttingDown."""
        with self._cond:
            self._closing = True
            dropped = [] if drain else list(self._queue)
            if not drain:
                self._queue.clear()
            self._cond.notify_all()
        for entry in dropped:
            entry.future.set_exception(ShuttingDown("the server shut down before this request ran"))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        try:
            if self.before_start is not None:
                self.before_start()
        except BaseException as e:  # noqa: BLE001 - reported through start_error and every future
            self.start_error = e
        finally:
            self.started.set()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Entry] | None:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._queue[0]
            deadline = first.arrived + self.max_wait_s
            while self._count(first.key) < self.max_batch and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._take(first.key)

    def _count(self, key) -> int:
        return sum(1 for e in self._queue if e.key == key)

    def _take(self, key) -> list[_Entry]:
        taken, kept = [], deque()
        while self._queue:
            e = self._queue.popleft()
            (taken if e.key == key and len(taken) < self.max_batch else kept).append(e)
        self._queue = kept
        return taken

    def _run(self, batch: list[_Entry]) -> None:
        start = time.monotonic()
        live = [e for e in batch if e.future.set_running_or_notify_cancel()]
        ok = True
        try:
            if self.start_error is not None:
                raise RuntimeError(f"the model failed to warm up: {self.start_error}")
            results = list(self.run_batch([e.item for e in live])) if live else []
            if len(results) != len(live):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} items")
        except Exception as e:  # noqa: BLE001 - a failing batch fails only its own requests
            ok = False
            for entry in live:
                entry.future.set_exception(e)
        else:
            for entry, result in zip(live, results):
                entry.future.set_result(result)
        if self.on_batch is not None:
            self.on_batch(len(live), time.monotonic() - start, ok)
