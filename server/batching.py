"""Dynamic batching: same-shape bottlenecks waiting together run as one tail batch.

Requests enter a bounded queue: at most ``max_queue`` requests and ``max_queue_bytes`` bytes of decoded
payload (full -> the caller answers RESOURCE_EXHAUSTED). One compute thread owns the model: it takes the
next request, adds queued requests with the same batching key up to ``max_batch`` images, optionally waits
up to ``max_delay_ms`` (counted from the oldest request's arrival) for more, drops those whose client went
away or whose deadline has passed or would pass before the batch is computed (they are never computed),
runs the batch and hands the results back to the event loop. It then takes the next batch itself, without
a round trip through the loop, so the model is fed back to back while requests queue; the loop only
validates, decodes and answers.

Fairness: requests queue per client (a connection: the peer address), and batches are formed round robin
across clients -- the next batch starts with the next client's oldest request and takes same-key requests
from each client in turn -- so a client with many requests in flight delays another by about one of its
requests per batch, not by all of them. When the queue is full, a newcomer from a client holding fewer
requests than the heaviest one pushes out that client's newest request (RESOURCE_EXHAUSTED for it).

Policy: with ``max_delay_ms = 0`` (the default) nothing ever waits for a batch to fill: an idle
compute thread starts on the first request at once, and a busy one finds, when it is done,
everything that queued meanwhile -- batches grow only while the model is busy (adaptive).
A positive delay trades that latency for fuller batches when requests arrive just apart.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from hnd.common import tracing
from hnd.common.errors import UsageError

# Keys (bottleneck shape and padded size) whose compute time is remembered for deadline checks.
MAX_TIMED_KEYS = 64


class QueueFull(Exception):
    """The batch queue holds max_queue requests (or max_queue_bytes) already."""


class DeadlineExpired(Exception):
    """The request's deadline passed while it waited, or would pass before its batch is computed; not computed."""


class BatcherStopped(Exception):
    """The server stopped before the request was computed."""


@dataclass(eq=False)  # identity: a queue finds "this request", never compares payload tensors
class WorkItem:
    """One request waiting for the tail.

    key: requests with equal keys may share a batch (e.g. bottleneck shape and padded size).
    payload: what the compute function needs for this request.
    deadline: ``time.monotonic()`` by which the client stops waiting, or None.
    images: how many images the request carries (counted against ``max_batch``).
    client: whose request it is (batches are formed round robin across clients).
    nbytes: what its payload holds in memory (counted against ``max_queue_bytes``).
    started_ns / compute_ns: when its batch started on the compute thread and how long it ran.
    """

    key: Hashable
    payload: Any
    deadline: float | None
    images: int = 1
    client: Hashable = None
    nbytes: int = 0
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    future: asyncio.Future | None = None
    started_ns: int = 0
    batch_size: int = 0
    compute_ns: int = 0
    span_context: Any = None  # the request's OpenTelemetry span, when tracing is on (the batch links to it)


@dataclass
class BatcherEvents:
    """Callbacks for metrics (each optional).

    batch(images): a batch was computed. depth(requests, bytes): the queue changed.
    dropped(reason, images): a request left the queue without compute ("cancelled", "deadline", "pushed_out").
    late(images): images computed whose caller had gone (cancelled or past its deadline) when the batch ended.
    """

    batch: Callable[[int], None] | None = None
    depth: Callable[[int, int], None] | None = None
    dropped: Callable[[str, int], None] | None = None
    late: Callable[[int], None] | None = None


class Batcher:
    """Bounded per-client queues + one compute thread around ``compute(payloads) -> results``.

    ``submit`` is called on the event loop; ``compute`` runs on the compute thread only.
    """

    def __init__(
        self,
        compute: Callable[[list[Any]], list[Any]],
        max_batch: int = 8,
        max_delay_ms: float = 0.0,
        max_queue: int = 64,
        max_queue_bytes: int | None = None,
        events: BatcherEvents | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_delay_ms < 0 or (max_queue_bytes is not None and max_queue_bytes < 1):
            raise UsageError("max_batch, max_queue and max_queue_bytes must be >= 1, max_delay_ms >= 0")
        self.compute = compute
        self.max_batch = max_batch
        self.max_delay_ns = int(max_delay_ms * 1e6)
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.events = events or BatcherEvents()
        self.tracer = tracing.get_tracer("hnd.server")  # None: tracing off (hnd.common.tracing)
        # client -> its requests in arrival order; the first client is the next to start a batch. Guarded by _cond.
        self._clients: OrderedDict[Hashable, deque[WorkItem]] = OrderedDict()
        self._count = 0
        self._bytes = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False  # the compute thread is running a batch (read for metrics and benchmarks)
        # Fastest compute seen per image, by key: a batch that cannot end before a deadline drops that request.
        self._seconds_per_image: dict[Hashable, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def depth(self) -> int:
        """Requests queued, not yet taken into a batch."""
        return self._count

    @property
    def queued_bytes(self) -> int:
        """Payload bytes of the requests queued."""
        return self._bytes

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
            left = [item for queue in self._clients.values() for item in queue]
            self._clients.clear()
            self._count = self._bytes = 0
            self._cond.notify_all()
        for item in left:
            if not item.future.done():
                item.future.set_exception(BatcherStopped("server stopping; request not computed"))
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None

    async def submit(
        self,
        key: Hashable,
        payload: Any,
        deadline: float | None,
        images: int = 1,
        client: Hashable = None,
        nbytes: int = 0,
    ) -> tuple[WorkItem, Any]:
        """Queue one request and wait for it; returns (the item with its timings, the compute result).

        Raises QueueFull at once when the queue is full (or later, when a lighter client pushes it out),
        DeadlineExpired when it expired waiting. Cancelling the wait takes the request out of the queue.
        """
        future = asyncio.get_running_loop().create_future()
        item = WorkItem(key, payload, deadline, images, client, nbytes, future=future)
        if self.tracer is not None:
            item.span_context = tracing.current_span_context()
        pushed: list[WorkItem] = []
        with self._cond:
            if self._stopping:
                raise BatcherStopped("server stopping")
            if self.max_queue_bytes is not None and nbytes > self.max_queue_bytes:
                raise QueueFull(f"request holds {nbytes} bytes decoded; the queue's budget is {self.max_queue_bytes}")
            while self._full(nbytes):
                heaviest = self._push_out_candidate(client)
                if heaviest is None:
                    raise QueueFull(self._full_message())
                pushed.append(self._clients[heaviest][-1])
                self._remove(pushed[-1])
            self._clients.setdefault(client, deque()).append(item)
            self._count += 1
            self._bytes += nbytes
            self._cond.notify()
        for other in pushed:
            if not other.future.done():  # cancelled meanwhile: its done callback has not run yet
                other.future.set_exception(
                    QueueFull(self._full_message() + "; pushed out by a client with fewer queued")
                )
            self._emit_dropped("pushed_out", other.images)
        future.add_done_callback(lambda f: self._forget(item) if f.cancelled() else None)
        self._report_depth()
        result = await future
        # The future holds (item, result) and the item its future: a cycle that kept every answer (a 1080p
        # frame's pasted masks: 166 MB) until a full garbage collection. The loop is done with the item here.
        item.future = None
        return result

    def _full(self, nbytes: int) -> bool:
        over_bytes = self.max_queue_bytes is not None and self._bytes + nbytes > self.max_queue_bytes
        return self._count >= self.max_queue or over_bytes

    def _full_message(self) -> str:
        budget = f" or {self.max_queue_bytes} bytes" if self.max_queue_bytes is not None else ""
        return f"server queue is full ({self.max_queue} requests{budget} waiting)"

    def _push_out_candidate(self, client: Hashable) -> Hashable | None:
        """The client holding the most queued requests, when it holds more than ``client`` would after admission."""
        own = len(self._clients.get(client, ()))
        heaviest = max(self._clients, key=lambda c: len(self._clients[c]), default=None)
        if heaviest is None or heaviest == client or len(self._clients[heaviest]) <= own + 1:
            return None
        return heaviest

    def _remove(self, item: WorkItem) -> None:
        """Take ``item`` out of its client's queue (called with the condition held)."""
        queue = self._clients[item.client]
        queue.remove(item)
        if not queue:
            del self._clients[item.client]
        self._count -= 1
        self._bytes -= item.nbytes

    def _forget(self, item: WorkItem) -> None:
        """A cancelled wait (the caller went away): out of the queue at once, never computed."""
        with self._cond:
            queued = item in self._clients.get(item.client, ())
            if queued:
                self._remove(item)
        if queued:
            self._emit_dropped("cancelled", item.images)
            self._report_depth()

    def _emit_dropped(self, reason: str, images: int) -> None:
        if self.events.dropped is not None:
            self.events.dropped(reason, images)

    def _report_depth(self) -> None:
        if self.events.depth is not None:
            self.events.depth(self._count, self._bytes)

    # --- compute thread -------------------------------------------------------------------------

    def _take(self) -> list[WorkItem] | None:
        """Block until a batch is ready (None: stopping); called with the condition held."""
        while True:
            while not self._count and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            batch = self._gather()
            first = batch[0]
            if self.max_delay_ns and sum(i.images for i in batch) < self.max_batch:
                remaining = (first.enqueued_ns + self.max_delay_ns - time.perf_counter_ns()) / 1e9
                if remaining > 0:
                    self._cond.wait(remaining)  # woken by each submit: look again
                    continue
            for item in batch:
                self._remove(item)
            if first.client in self._clients:  # its next request waits for the other clients' turns
                self._clients.move_to_end(first.client)
            return batch

    def _gather(self) -> list[WorkItem]:
        """The next client's oldest request, then same-key requests taken from each client in turn (round
        robin, each client's in arrival order) up to max_batch images."""
        first = next(iter(self._clients.values()))[0]
        candidates = [[i for i in queue if i.key == first.key] for queue in self._clients.values()]
        taken = [0] * len(candidates)
        batch: list[WorkItem] = []
        images = 0
        active = list(range(len(candidates)))
        while active:
            for c in list(active):
                if taken[c] == len(candidates[c]):
                    active.remove(c)
                    continue
                item = candidates[c][taken[c]]
                if batch and images + item.images > self.max_batch:
                    active.remove(c)  # keep each client's order: nothing of it jumps this one
                    continue
                batch.append(item)
                images += item.images
                taken[c] += 1
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                batch = self._take()
            if batch is None:
                return
            delivered = self._run(batch)
            # Nothing of this batch may wait here for the next one: its payloads and answers (a 1080p frame's
            # pasted masks: 166 MB each) stayed resident while the server sat idle.
            del batch
            if not delivered:
                return

    def _run(self, batch: list[WorkItem]) -> bool:
        """Compute one batch on this thread and hand the answers to the loop; False when the loop is closed."""
        now = time.monotonic()
        # A batch that cannot end before a request's deadline (at the fastest rate seen for this key)
        # would compute it for nobody: drop it now.
        expected = self._seconds_per_image.get(batch[0].key, 0.0) * sum(i.images for i in batch)
        live: list[WorkItem] = []
        expired: list[WorkItem] = []
        cancelled: list[WorkItem] = []
        for item in batch:
            if item.future.done():  # the client went away (cancelled on the loop) just now
                cancelled.append(item)
            elif item.deadline is not None and item.deadline <= now + expected:
                expired.append(item)
            else:
                live.append(item)
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
        images = sum(i.images for i in live)
        if live and error is None:
            self._timed(live[0].key, compute_ns / 1e9 / images)
            if self.events.batch is not None:
                self.events.batch(images)
        try:
            self._loop.call_soon_threadsafe(self._deliver, live, expired, cancelled, results, error, start, compute_ns)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            return False
        return True

    def _timed(self, key: Hashable, seconds_per_image: float) -> None:
        known = self._seconds_per_image
        if key not in known and len(known) >= MAX_TIMED_KEYS:
            known.clear()
        known[key] = min(known.get(key, seconds_per_image), seconds_per_image)

    # --- back on the event loop -------------------------------------------------------------------

    def _deliver(
        self,
        live: list[WorkItem],
        expired: list[WorkItem],
        cancelled: list[WorkItem],
        results: list[Any] | None,
        error: BaseException | None,
        start_ns: int,
        compute_ns: int,
    ) -> None:
        for item in expired:
            if not item.future.done():
                item.future.set_exception(
                    DeadlineExpired("deadline passed, or would pass before its batch is computed; not computed")
                )
        for reason, items in (("deadline", expired), ("cancelled", cancelled)):
            if items:
                self._emit_dropped(reason, sum(i.images for i in items))
        images = sum(i.images for i in live)
        if self.tracer is not None and live:  # one span per batch, linked to every request in it
            tracing.batch_span(self.tracer, [i.span_context for i in live], start_ns, compute_ns, images)
        late = 0
        for k, item in enumerate(live):
            item.started_ns, item.compute_ns, item.batch_size = start_ns, compute_ns, images
            if item.future.done():  # its caller went away while the batch ran
                late += item.images
                continue
            if error is not None:
                item.future.set_exception(error)
            else:
                item.future.set_result((item, results[k]))
        if late and self.events.late is not None:
            self.events.late(late)
        self._report_depth()
