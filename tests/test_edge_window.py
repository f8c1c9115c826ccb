"""The in-flight window and deadline the edge sizes from the answers of the server it meets."""

from __future__ import annotations

import concurrent.futures
import logging

import grpc
import pytest

from hnd.edge.capture import Frame
from hnd.edge.client import ClientSettings
from hnd.edge.modes import EdgeMode, EdgeOptions, Prepared
from hnd.edge.pipeline import EdgeRunner
from hnd.edge.records import FrameRecord, ServerTimings, Timings
from hnd.edge.window import Window
from hnd.proto.v1 import split_inference_pb2 as pb


def _answer(edge_ms: float, network_server_ms: float, queue_ms: float, compute_ms: float, batch: int = 1):
    return FrameRecord(
        0,
        "cam",
        0.0,
        "split",
        ms=Timings(head=edge_ms, network_server=network_server_ms),
        server_ms=ServerTimings(queue=queue_ms, compute=compute_ms),
        batch_size=batch,
    )


@pytest.mark.parametrize(
    "edge_ms,network_server_ms,queue_ms,compute_ms,batch,size",
    [
        (100, 5_100, 0, 5_000, 1, 2),  # a CPU tail: one frame computing, the next ready; more would only queue
        (100, 10_100, 5_000, 5_000, 1, 2),  # time spent in the queue is not a reason to send more
        (300, 80, 0, 50, 1, 2),  # the edge's head is the slow side
        (10, 100, 0, 10, 1, 4),  # a long link: as many as the config allows
        (100, 2_100, 0, 8_000, 4, 2),  # batched compute counts per image
    ],
)
def test_window_keeps_the_slower_side_busy_and_no_more(edge_ms, network_server_ms, queue_ms, compute_ms, batch, size):
    w = Window.start(cap=4, deadline_s=30.0)
    assert w.size == 1  # nothing measured yet: one frame
    for _ in range(5):
        w.observe(_answer(edge_ms, network_server_ms, queue_ms, compute_ms, batch))
    assert w.size == size


def test_deadline_covers_a_slow_server_within_bounds_and_user_choices_are_kept():
    w = Window.start(cap=4, deadline_s=30.0)
    w.observe(_answer(100, 12_000, 0, 11_000))
    assert w.deadline_s == 48.0  # 4 x the slowest answer, above the config's 30 s
    w.observe(_answer(100, 500_000, 0, 11_000))
    assert w.deadline_s == 300.0  # at most 10 x the config's
    fixed = Window.start(cap=4, deadline_s=30.0, fixed_size=True, fixed_deadline=True)
    fixed.observe(_answer(100, 12_000, 0, 11_000))
    assert (fixed.size, fixed.deadline_s) == (4, 30.0)
    assert fixed.describe() == "window 4, deadline 30 s" and w.describe().endswith("(auto)")


def test_window_stays_within_the_servers_advertised_limits():
    w = Window.start(cap=16, deadline_s=30.0)
    w.limit_by_server(max_queue=8, max_stream_inflight=3, stream=True)
    for _ in range(5):
        w.observe(_answer(1, 200, 0, 1))
    assert (w.cap, w.size) == (3, 3)
    unary = Window.start(cap=16, deadline_s=30.0)
    unary.limit_by_server(max_queue=8, max_stream_inflight=3, stream=False)
    assert unary.cap == 8


def test_a_missed_deadline_halves_the_window_and_doubles_the_deadline_within_bounds():
    """A server slower than the base deadline answers nothing to measure: each miss backs off instead."""
    w = Window.start(cap=4, deadline_s=30.0)
    for _ in range(5):
        w.observe(_answer(10, 100, 0, 10))
    assert w.size == 4
    missed = FrameRecord(5, "cam", 0.0, "split", status="DEADLINE_EXCEEDED")
    for expected in ((2, 60.0), (1, 120.0), (1, 240.0), (1, 300.0)):
        w.observe(missed)
        assert (w.size, w.deadline_s) == expected
    fixed = Window.start(cap=4, deadline_s=30.0, fixed_size=True, fixed_deadline=True)
    fixed.observe(missed)
    assert (fixed.size, fixed.deadline_s) == (4, 30.0)


class _Deadline(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self):
        return "Deadline Exceeded"


class _Client:
    def __init__(self) -> None:
        self.settings = ClientSettings("127.0.0.1:50051", timeout_s=30.0)
        self.future: concurrent.futures.Future = concurrent.futures.Future()

    def submit(self, request, stream=False, metadata=None):
        return self.future


def test_a_missed_deadline_is_reported_with_the_deadline_the_frame_was_sent_with(caplog):
    # hnd-demo on a busy machine said "no answer within the 65.3337 s deadline" of a frame that had waited
    # 35 s: the frame was sent with the config's 30 s, and an answer in between raised the self-sized one.
    client = _Client()
    runner = EdgeRunner(EdgeOptions(), EdgeMode(EdgeOptions()), client)
    p = Prepared(Frame(1, "cam", None, 0, 0.0, 0.0), Timings(), request=pb.InferRequest())
    future = runner._send(p)
    client.settings.timeout_s = 66.1308
    future.set_exception(_Deadline())
    with caplog.at_level(logging.WARNING, logger="hnd.edge"):
        assert runner._finish(p, future).status == "DEADLINE_EXCEEDED"
    assert "frame 1: no answer within the 30 s deadline" in caplog.text
    w = Window.start(cap=4, deadline_s=30.0)
    w.deadline_s = 66.1308
    assert w.describe() == "window 1 (auto, up to 4), deadline 66.1 s (auto)"
