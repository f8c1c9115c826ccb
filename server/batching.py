"""Dynamic batching: same-shape bottlenecks waiting together run as one tail batch.

Requests enter a bounded queue (full -> the caller answers RESOURCE_EXHAUSTED). One compute
thread owns the model: it takes the oldest request, adds the queued requests with the same
batching key up to ``max_batch`` images, optionally waits up to ``max_delay_ms`` (counted from
the oldest request's arrival) for more, drops those whose deadline has passed or whose client
went away (they are never computed), runs the batch and hands the results back to the event
loop. It then takes the next batch itself, without a round trip through the loop, so the model
is fed back to back while requests queue; the loop only validates, decodes and answers.

Policy: with ``max_delay_ms = 0`` (the default) nothing ever waits for a batch to fill: an idle
compute thread starts on the first request at once, and a busy one finds, when it is done,
everything that queued meanwhile -- batches grow only while the model is busy (adaptive).
A positive delay trades that latency for fuller batches when requests arrive just apart.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from hnd.common.errors import UsageError


class QueueFull(Exception):
    """The batch queue holds max_queue requests already."""


class DeadlineExpired(Exception):
    """The request's deadline passed while it waited; it was not computed."""


class BatcherStopped(Exception):
    """The server stopped before the request was computed."""


@dataclass
class WorkItem:
    """One request waiting for the tail.

    key: requests with equal keys may share a batch (e.g. bottleneck shape and padded size).
    payload: what the compute function needs for this request.
    deadline: ``time.monotonic()`` by which the client stops waiting, or None.
    images: how many images the request carries (counted against ``max_batch``).
    started_ns / compute_ns: when its batch started on the compute thread and how long it ran.
    """

    key: Hashable
    payload: Any
    deadline: float | None
    images: int = 1
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    future: asyncio.Future | None = None
    started_ns: int = 0
    batch_size: int = 0
    compute_ns: int = 0


class Batcher:
    """Bounded queue + one compute thread around ``compute(payloads) -> results``.

    ``submit`` is called on the event loop; ``compute`` runs on the compute thread only.
    """

    def __init__(
        self,
        compute: Callable[[list[Any]], list[Any]],
        max_batch: int = 8,
        max_delay_ms: float = 0.0,
        max_queue: int = 64,
        on_batch: Callable[[int], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_delay_ms < 0:
            raise UsageError("max_batch and max_queue must be >= 1, max_delay_ms >= 0")
        self.compute = compute
        self.max_batch = max_batch
        self.max_delay_ns = int(max_delay_ms * 1e6)
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.on_depth = on_depth
        self._waiting: deque[WorkItem] = deque()  # arrival order; guarded by _cond
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False  # the compute thread is running a batch (read for metrics and benchmarks)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def depth(self) -> int:
        """Requests queued, not yet taken into a batch."""
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return self._busy

    def start(self) -> None:
        """Start the compute thread; results are delivered on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._work, name="hnd-compute", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the compute thread after its current batch; requests still queued fail with BatcherStopped."""
        with self._cond:
            self._stopping = True
            left = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for item in left:
            if not item.future.done():
                item.future.set_exception(BatcherStopped("server stopping; request not computed"))
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None

    async def submit(
        self, key: Hashable, payload: Any, deadline: float | None, images: int = 1
    ) -> tuple[WorkItem, Any]:
        """Queue one request and wait for it; returns (the item with its timings, the compute result).

        Raises QueueFull at once when the queue is full, DeadlineExpired when it expired waiting.
        """
        future = asyncio.get_running_loop().create_future()
        item = WorkItem(key, payload, deadline, images, future=future)
        with self._cond:
            if self._stopping:
                raise BatcherStopped("server stopping")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"server queue is full ({self.max_queue} requests waiting)")
            self._waiting.append(item)
            self._cond.notify()
        self._report_depth()
        return await future

    def _report_depth(self) -> None:
        if self.on_depth is not None:
            self.on_depth(self.depth)

    # --- compute thread -------------------------------------------------------------------------

    def _take(self) -> list[WorkItem] | None:
        """Block until a batch is ready (None: stopping); called with the condition held."""
        while True:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._waiting[0]
            batch = self._same_key(first)
            if self.max_delay_ns and sum(i.images for i in batch) < self.max_batch:
                remaining = (first.enqueued_ns + self.max_delay_ns - time.perf_counter_ns()) / 1e9
                if remaining > 0:
                    self._cond.wait(remaining)  # woken by each submit: look again
                    continue
            for item in batch:
                self._waiting.remove(item)
            return batch

    def _same_key(self, first: WorkItem) -> list[WorkItem]:
        """The oldest requests sharing ``first``'s key, up to max_batch images (``first`` always)."""
        batch, images = [first], first.images
        for item in self._waiting:
            if item is first or item.key != first.key:
                continue
            if images + item.images > self.max_batch:
                break
            batch.append(item)
            images += item.images
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                batch = self._take()
            if batch is None:
                return
            now = time.monotonic()
            live: list[WorkItem] = []
            expired: list[WorkItem] = []
            for item in batch:
                if item.future.done():  # the client went away (cancelled on the loop)
                    continue
                (expired if item.deadline is not None and item.deadline <= now else live).append(item)
            results: list[Any] | None = None
            error: BaseException | None = None
            start = time.perf_counter_ns()
            if live:
                self._busy = True
                try:
                    results = self.compute([i.payload for i in live])
                except Exception as exc:  # noqa: BLE001 - delivered to each waiting request
                    error = exc
                finally:
                    self._busy = False
            compute_ns = time.perf_counter_ns() - start
            if live and error is None and self.on_batch is not None:
                self.on_batch(sum(i.images for i in live))
            try:
                self._loop.call_soon_threadsafe(self._deliver, live, expired, results, error, start, compute_ns)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    # --- back on the event loop -------------------------------------------------------------------

    def _deliver(
        self,
        live: list[WorkItem],
        expired: list[WorkItem],
        results: list[Any] | None,
        error: BaseException | None,
        start_ns: int,
        compute_ns: int,
    ) -> None:
        for item in expired:
            if not item.future.done():
                item.future.set_exception(DeadlineExpired("deadline expired while queued; not computed"))
        images = sum(i.images for i in live)
        for k, item in enumerate(live):
            item.started_ns, item.compute_ns, item.batch_size = start_ns, compute_ns, images
            if item.future.done():
                continue
            if error is not None:
                item.future.set_exception(error)
            else:
                item.future.set_result((item, results[k]))
        self._report_depth()
