"""The Batcher on its own: adaptive batches, keys, limits, deadlines, cancellation, errors, stop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from hnd.server.batching import Batcher, BatcherEvents, BatcherStopped, DeadlineExpired, QueueFull


class Recorder:
    """compute() that records each batch; ``gate`` (when set) holds the first batch until released."""

    def __init__(self, hold_first: bool = False, fail: bool = False) -> None:
        self.batches: list[list] = []
        self.started: list[float] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.hold_first = hold_first
        self.fail = fail
        if not hold_first:
            self.gate.set()

    def __call__(self, payloads: list) -> list:
        self.started.append(time.monotonic())
        self.batches.append(list(payloads))
        self.entered.set()
        if len(self.batches) == 1:
            self.gate.wait(10)
        if self.fail:
            raise RuntimeError("tail exploded")
        return [f"r{p}" for p in payloads]


async def _entered(rec: Recorder) -> None:
    await asyncio.get_running_loop().run_in_executor(None, rec.entered.wait, 10)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_idle_batcher_runs_a_request_at_once_and_busy_one_batches_what_queued():
    async def main():
        rec = Recorder(hold_first=True)
        b = Batcher(rec, max_batch=8, max_delay_ms=0)
        b.start()
        first = asyncio.ensure_future(b.submit("k", 0, None))
        await _entered(rec)  # running alone: nothing waited for a batch to fill
        rest = [asyncio.ensure_future(b.submit("k", i, None)) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        assert b.busy and b.depth == 5
        rec.gate.set()
        results = await asyncio.gather(first, *rest)
        await b.stop()
        return rec, results

    rec, results = run(main())
    assert rec.batches == [[0], [1, 2, 3, 4, 5]]
    assert [r for _, r in results] == [f"r{i}" for i in range(6)]
    assert [item.batch_size for item, _ in results] == [1] + [5] * 5
    first_item = results[0][0]
    assert first_item.compute_ns > 0 and first_item.started_ns >= first_item.enqueued_ns


def test_max_batch_counts_images_and_keys_never_mix():
    async def main():
        rec = Recorder(hold_first=True)
        b = Batcher(rec, max_batch=4)
        b.start()
        first = asyncio.ensure_future(b.submit("a", "a0", None))
        await _entered(rec)
        queued = [
            asyncio.ensure_future(b.submit(k, p, None, images=n))
            for k, p, n in [("a", "a1", 3), ("b", "b1", 1), ("a", "a2", 1), ("a", "a3", 1), ("b", "b2", 2)]
        ]
        await asyncio.sleep(0.05)
        rec.gate.set()
        await asyncio.gather(first, *queued)
        await b.stop()
        return rec

    rec = run(main())
    # oldest first; same key only; at most 4 images (a1 carries 3)
    assert rec.batches == [["a0"], ["a1", "a2"], ["b1", "b2"], ["a3"]]


def test_positive_delay_waits_for_the_batch_to_fill():
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch=2, max_delay_ms=1000)
        b.start()
        t0 = time.monotonic()
        one = asyncio.ensure_future(b.submit("k", 1, None))
        await asyncio.sleep(0.05)
        two = asyncio.ensure_future(b.submit("k", 2, None))
        await asyncio.gather(one, two)  # full at 2: no need to wait the whole delay
        waited = time.monotonic() - t0
        lone = await b.submit("k", 3, None)  # alone: runs once the delay has passed
        await b.stop()
        return rec, waited, lone, time.monotonic() - t0

    rec, waited, lone, total = run(main())
    assert rec.batches == [[1, 2], [3]]
    assert waited < 0.75 and total >= 1.0
    assert lone[0].started_ns - lone[0].enqueued_ns >= 0.95e9


def test_queue_bound_deadline_and_cancellation():
    async def main():
        rec = Recorder(hold_first=True)
        b = Batcher(rec, max_batch=1, max_queue=3)
        b.start()
        first = asyncio.ensure_future(b.submit("k", 0, None))
        await _entered(rec)
        expired = asyncio.ensure_future(b.submit("k", 1, time.monotonic() + 0.01))
        cancelled = asyncio.ensure_future(b.submit("k", 2, None))
        kept = asyncio.ensure_future(b.submit("k", 3, None))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await b.submit("k", 4, None)
        cancelled.cancel()
        rec.gate.set()
        await first
        with pytest.raises(DeadlineExpired):
            await expired
        await kept
        await b.stop()
        return rec

    rec = run(main())
    assert rec.batches == [[0], [3]]  # neither the expired nor the cancelled request was computed


def test_compute_error_reaches_every_request_of_the_batch():
    async def main():
        rec = Recorder(hold_first=True, fail=True)
        b = Batcher(rec, max_batch=4)
        b.start()
        futs = [asyncio.ensure_future(b.submit("k", 0, None))]
        await _entered(rec)
        futs += [asyncio.ensure_future(b.submit("k", i, None)) for i in (1, 2)]
        await asyncio.sleep(0.05)
        rec.gate.set()
        out = await asyncio.gather(*futs, return_exceptions=True)
        again = await asyncio.gather(b.submit("k", 9, None), return_exceptions=True)
        await b.stop()
        return out, again

    out, again = run(main())
    assert all(isinstance(e, RuntimeError) and "exploded" in str(e) for e in out + again)


def test_stop_fails_what_is_still_queued():
    async def main():
        rec = Recorder(hold_first=True)
        b = Batcher(rec, max_batch=1)
        b.start()
        first = asyncio.ensure_future(b.submit("k", 0, None))
        await _entered(rec)
        queued = asyncio.ensure_future(b.submit("k", 1, None))
        await asyncio.sleep(0.05)
        stopping = asyncio.ensure_future(b.stop())
        await asyncio.sleep(0.05)
        rec.gate.set()
        await stopping
        with pytest.raises(BatcherStopped):
            await queued
        with pytest.raises(BatcherStopped):
            await b.submit("k", 2, None)
        return await first

    _, result = run(main())
    assert result == "r0"


def test_compute_thread_takes_the_next_batch_without_the_event_loop():
    """While the loop is blocked, the compute thread goes on with what queued: no loop round trip."""

    async def main():
        rec = Recorder(hold_first=True)
        b = Batcher(rec, max_batch=1)
        b.start()
        futs = [asyncio.ensure_future(b.submit("k", 0, None))]
        await _entered(rec)
        futs += [asyncio.ensure_future(b.submit("k", i, None)) for i in (1, 2)]
        await asyncio.sleep(0.05)
        threading.Timer(0.05, rec.gate.set).start()
        time.sleep(0.5)  # blocks the event loop: it cannot hand out batches meanwhile
        loop_back = time.monotonic()
        await asyncio.gather(*futs)
        await b.stop()
        return rec, loop_back

    rec, loop_back = run(main())
    assert rec.batches == [[0], [1], [2]]
    assert rec.started[2] < loop_back


def test_a_cancelled_wait_leaves_the_queue_at_once_and_late_computes_are_counted():
    """The caller going away frees its queue slot at once (dropped "cancelled", never computed); a caller that
    goes while its batch runs is counted as a late compute."""
    dropped: list[tuple[str, int]] = []
    late: list[int] = []

    async def main():
        rec = Recorder(hold_first=True)
        events = BatcherEvents(dropped=lambda r, n: dropped.append((r, n)), late=late.append)
        b = Batcher(rec, max_batch=1, max_queue=2, events=events)
        b.start()
        running = asyncio.ensure_future(b.submit("k", 0, None))
        await _entered(rec)
        gone = asyncio.ensure_future(b.submit("k", 1, None, images=2))
        kept = asyncio.ensure_future(b.submit("k", 2, None))
        await asyncio.sleep(0.05)
        assert b.depth == 2
        gone.cancel()
        await asyncio.sleep(0)
        assert b.depth == 1 and dropped == [("cancelled", 2)]
        newcomer = asyncio.ensure_future(b.submit("k", 3, None))  # the freed slot is usable at once
        await asyncio.sleep(0.05)
        running.cancel()  # its batch is being computed: it finishes for nobody
        rec.gate.set()
        await asyncio.gather(kept, newcomer)
        await b.stop()
        return rec

    rec = run(main())
    assert rec.batches == [[0], [2], [3]]
    assert late == [1]


def test_a_batch_that_cannot_end_before_the_deadline_drops_the_request():
    """After a batch of this key took >= 0.3 s, a request with 0.1 s left is dropped before compute."""
    dropped: list[tuple[str, int]] = []

    def slow(payloads):
        time.sleep(0.3)
        return payloads

    async def main():
        b = Batcher(slow, max_batch=1, events=BatcherEvents(dropped=lambda r, n: dropped.append((r, n))))
        b.start()
        await b.submit("k", 0, None)
        with pytest.raises(DeadlineExpired, match="would pass"):
            await b.submit("k", 1, time.monotonic() + 0.1)
        other_key = await b.submit("other", 2, time.monotonic() + 10)  # no timing known for this key yet
        await b.stop()
        return other_key

    _, result = run(main())
    assert result == 2 and dropped == [("deadline", 1)]


def test_batches_go_round_robin_across_clients():
    """Client a queued 5 requests (behind its running a0) before client b's 2: b's alternate with a's instead of
    waiting behind all of them."""

    async def main():
        rec = Recorder(hold_first=True)
        b = Batcher(rec, max_batch=1)
        b.start()
        first = asyncio.ensure_future(b.submit("k", "a0", None, client="a"))
        await _entered(rec)
        futs = [asyncio.ensure_future(b.submit("k", f"a{i}", None, client="a")) for i in range(1, 6)]
        futs += [asyncio.ensure_future(b.submit("k", f"b{i}", None, client="b")) for i in range(2)]
        await asyncio.sleep(0.05)
        rec.gate.set()
        await asyncio.gather(first, *futs)
        await b.stop()
        return rec

    rec = run(main())
    assert [p for (p,) in rec.batches] == ["a0", "a1", "b0", "a2", "b1", "a3", "a4", "a5"]


def test_a_batch_takes_same_key_requests_from_each_client_in_turn():
    async def main():
        rec = Recorder(hold_first=True)
        b = Batcher(rec, max_batch=4)
        b.start()
        first = asyncio.ensure_future(b.submit("k", "x", None, client="a"))
        await _entered(rec)
        futs = [asyncio.ensure_future(b.submit("k", f"a{i}", None, client="a")) for i in range(4)]
        futs += [asyncio.ensure_future(b.submit("k", f"b{i}", None, client="b")) for i in range(2)]
        await asyncio.sleep(0.05)
        rec.gate.set()
        await asyncio.gather(first, *futs)
        await b.stop()
        return rec

    rec = run(main())
    assert rec.batches == [["x"], ["a0", "b0", "a1", "b1"], ["a2", "a3"]]


def test_a_full_queue_pushes_out_the_heaviest_clients_newest_request():
    """max_queue 4 held by client a: client b still gets in (a's newest is refused RESOURCE_EXHAUSTED-style),
    while another request of a's own is refused."""
    dropped: list[tuple[str, int]] = []

    async def main():
        rec = Recorder(hold_first=True)
        b = Batcher(rec, max_batch=1, max_queue=4, events=BatcherEvents(dropped=lambda r, n: dropped.append((r, n))))
        b.start()
        first = asyncio.ensure_future(b.submit("k", "a0", None, client="a"))
        await _entered(rec)
        a = [asyncio.ensure_future(b.submit("k", f"a{i}", None, client="a")) for i in range(1, 5)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await b.submit("k", "a5", None, client="a")
        victim = asyncio.ensure_future(b.submit("k", "b0", None, client="b"))
        await asyncio.sleep(0.05)
        rec.gate.set()
        out = await asyncio.gather(first, *a, victim, return_exceptions=True)
        await b.stop()
        return rec, out

    rec, out = run(main())
    assert isinstance(out[4], QueueFull) and "pushed out" in str(out[4])  # a4, the newest of a's
    assert out[5][1] == "rb0"
    assert [p for (p,) in rec.batches] == ["a0", "a1", "b0", "a2", "a3"]
    assert dropped == [("pushed_out", 1)]


def test_the_queue_holds_at_most_max_queue_bytes():
    async def main():
        rec = Recorder(hold_first=True)
        b = Batcher(rec, max_batch=1, max_queue=64, max_queue_bytes=1000)
        b.start()
        first = asyncio.ensure_future(b.submit("k", 0, None, nbytes=900))
        await _entered(rec)  # taken into a batch: no longer queued
        kept = asyncio.ensure_future(b.submit("k", 1, None, nbytes=600))
        await asyncio.sleep(0.05)
        assert b.queued_bytes == 600
        with pytest.raises(QueueFull, match="1000 bytes"):
            await b.submit("k", 2, None, nbytes=500)
        with pytest.raises(QueueFull, match="holds 1001 bytes"):
            await b.submit("k", 3, None, nbytes=1001)
        rec.gate.set()
        await asyncio.gather(first, kept)
        assert b.queued_bytes == 0
        await b.stop()

    run(main())
