"""Dynamic batching: same-shape bottlenecks waiting together run as one tail batch.

Requests enter a bounded queue (full -> the caller answers RESOURCE_EXHAUSTED). One
worker task takes the oldest request, gathers more with the same batching key for up to
``max_delay_ms`` or ``max_batch`` items, drops those whose deadline has passed (they are
never computed), and runs the batch in a single compute thread so the event loop keeps
accepting and validating requests meanwhile.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The batch queue holds max_queue requests already."""


class DeadlineExpired(Exception):
    """The request's deadline passed while it waited; it was not computed."""


@dataclass
class WorkItem:
    """One request waiting for the tail.

    key: requests with equal keys may share a batch (e.g. bottleneck shape and padded size).
    payload: what the compute function needs for this request.
    deadline: ``time.monotonic()`` by which the client stops waiting, or None.
    """

    key: Hashable
    payload: Any
    deadline: float | None
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    future: asyncio.Future | None = None
    started_ns: int = 0
    batch_size: int = 0
    compute_ns: int = 0


class Batcher:
    """Bounded queue + batching worker around ``compute(payloads) -> results`` (run in one thread)."""

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
            raise ValueError("max_batch and max_queue must be >= 1, max_delay_ms >= 0")
        self.compute = compute
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.on_depth = on_depth
        self._queue: asyncio.Queue[WorkItem] = asyncio.Queue()
        self._held: deque[WorkItem] = deque()  # taken from the queue, waiting for a batch of their key
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hnd-compute")
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return self._queue.qsize() + len(self._held)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hnd-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def submit(self, key: Hashable, payload: Any, deadline: float | None) -> tuple[WorkItem, Any]:
        """Queue one request and wait for it; returns (the item with its timings, the compute result).

        Raises QueueFull at once when the queue is full, DeadlineExpired when it expired waiting.
        """
        if self.depth >= self.max_queue:
            raise QueueFull(f"server queue is full ({self.max_queue} requests waiting)")
        item = WorkItem(key, payload, deadline, future=asyncio.get_running_loop().create_future())
        self._queue.put_nowait(item)
        self._report_depth()
        return await item.future

    def _report_depth(self) -> None:
        if self.on_depth is not None:
            self.on_depth(self.depth)

    async def _next(self) -> WorkItem:
        if self._held:
            return self._held.popleft()
        return await self._queue.get()

    def _take(self, first: WorkItem, batch: list[WorkItem]) -> None:
        """Move held items with ``first``'s key into ``batch``."""
        keep: deque[WorkItem] = deque()
        while self._held and len(batch) < self.max_batch:
            item = self._held.popleft()
            (batch if item.key == first.key else keep).append(item)
        keep.extend(self._held)
        self._held = keep

    async def _gather(self, first: WorkItem) -> list[WorkItem]:
        batch = [first]
        self._take(first, batch)
        loop = asyncio.get_running_loop()
        until = loop.time() + self.max_delay
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = until - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if item.key == first.key:
                batch.append(item)
            else:
                self._held.append(item)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next()
            batch = await self._gather(first)
            self._report_depth()
            now = time.monotonic()
            live = []
            for item in batch:
                if item.future.done():  # cancelled by the client
                    continue
                if item.deadline is not None and item.deadline <= now:
                    item.future.set_exception(DeadlineExpired("deadline expired while queued; not computed"))
                    continue
                live.append(item)
            if not live:
                continue
            start = time.perf_counter_ns()
            for item in live:
                item.started_ns = start
            try:
                results = await loop.run_in_executor(self._executor, self.compute, [i.payload for i in live])
            except Exception as exc:  # noqa: BLE001 - delivered to each waiting request
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            compute_ns = time.perf_counter_ns() - start
            if self.on_batch is not None:
                self.on_batch(len(live))
            for item, result in zip(live, results):
                item.batch_size = len(live)
                item.compute_ns = compute_ns
                if not item.future.done():
                    item.future.set_result((item, result))
