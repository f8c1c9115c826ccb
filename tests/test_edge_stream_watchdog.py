"""The edge's InferStream watchdog (hnd.edge.client._Stream) against a fake call: per-frame deadlines hold,
including a deadline shortened between frames, and frames answered in time never wake the watchdog."""

from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace

import grpc
import pytest

from hnd.edge.client import ClientSettings, FrameDeadlineExceeded, _Stream
from hnd.proto.v1 import split_inference_pb2 as pb


class FakeCall:
    """Stands in for gRPC's InferStream call: answers the requests the test releases, in order."""

    def __init__(self, requests) -> None:
        self.requests = requests
        self.answers: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()

    def initial_metadata(self) -> tuple:
        return ()

    def __iter__(self):
        while True:
            item = self.answers.get()
            if item is None:
                raise grpc.RpcError("cancelled")
            yield item

    def answer(self) -> None:
        request = next(self.requests)  # what the client sent, in order
        self.answers.put(pb.InferResponse(request_id=request.request_id))

    def cancel(self) -> None:
        self.cancelled.set()
        self.answers.put(None)


def fake_stream(timeout_s: float) -> tuple[_Stream, FakeCall, SimpleNamespace]:
    calls: list[FakeCall] = []

    def infer_stream(requests, metadata=()):
        calls.append(FakeCall(requests))
        return calls[-1]

    client = SimpleNamespace(
        settings=ClientSettings("127.0.0.1:1", timeout_s=timeout_s),
        metadata=(),
        stub=SimpleNamespace(InferStream=infer_stream),
        check_weights=lambda md: None,
    )
    return _Stream(client), calls[0], client


def count_watchdog_wakes(stream: _Stream) -> list[int]:
    """Counts the watchdog's returns from its wait (a notify or its own timeout each wake the thread)."""
    wakes = [0]
    wait = stream._cond.wait

    def counting_wait(timeout=None):
        result = wait(timeout)
        if threading.current_thread() is stream.watchdog:
            wakes[0] += 1
        return result

    stream._cond.wait = counting_wait
    return wakes


def test_frames_answered_in_time_never_wake_the_watchdog():
    stream, call, _ = fake_stream(timeout_s=30.0)
    time.sleep(0.05)  # the watchdog waits (from before counting)
    wakes = count_watchdog_wakes(stream)
    for i in range(20):
        future = stream.submit(pb.InferRequest(request_id=str(i)))
        call.answer()
        assert future.result(timeout=5).response.request_id == str(i)
    # Two wake-ups per frame before (its submit and its answer): 40. Now none.
    assert wakes[0] == 0
    assert not call.cancelled.is_set()
    call.cancel()
    stream.close()


@pytest.mark.parametrize("in_flight", [False, True], ids=["idle stream", "behind a frame"])
def test_a_frame_sent_with_a_shorter_timeout_expires_on_its_own_deadline(in_flight):
    """The watchdog plans its next look from the 30 s timeout; a frame sent after the edge shortened the
    timeout to 0.3 s still fails DEADLINE_EXCEEDED at 0.3 s (and the stream is cancelled)."""
    stream, call, client = fake_stream(timeout_s=30.0)
    time.sleep(0.05)
    first = stream.submit(pb.InferRequest(request_id="0")) if in_flight else None
    client.settings.timeout_s = 0.3
    start = time.monotonic()
    late = stream.submit(pb.InferRequest(request_id="1"))
    if first is not None:
        call.answer()  # the first frame answered in time: the second becomes the one timed
        assert first.result(timeout=5).response.request_id == "0"
    with pytest.raises(FrameDeadlineExceeded):
        late.result(timeout=5)
    assert 0.25 <= time.monotonic() - start < 2.0
    assert call.cancelled.wait(5)  # the call's end let the reader finish: close() does not wait
