"""hnd-edge temporal coding against a live server: split key / delta frames (--key-interval), key frames
after refusals and when the server keeps no session, and H.264 / HEVC / WebP offload."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

import grpc
import pytest
import torch
from runtime_support import assert_same_detections, client_for, edge_argv, frames, run_edge, serving
from test_streams import STREAM, bottleneck_requests, in_process, video_frames, video_requests, wait_sessions_free

from hnd.common import wire
from hnd.common.checkpoint import fingerprint
from hnd.common.codec import CodecSettings
from hnd.common.split import split_model
from hnd.common.stream_codec import StreamEncoder
from hnd.common.video import VideoDecoder, VideoEncoder, VideoSettings, available_formats
from hnd.edge import cli
from hnd.edge.capture import ArrayFrames
from hnd.edge.client import EdgeError
from hnd.edge.api import make_mode
from hnd.edge.modes import EdgeOptions
from hnd.edge.pipeline import EdgeRunner, ServerGone
from hnd.edge.torch_modes import to_tensor
from hnd.proto.v1 import split_inference_pb2 as pb
from hnd.server.service import ServerLimits
from hnd.server.streams import StreamLimits


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("faster_rcnn")


def expected_temporal(model, images, bits, key_interval):
    """In process: the same stream decisions, dequantized without the delta step, through the tail."""
    head, _ = split_model(model)
    mirror = StreamEncoder(bits, "tensor", key_interval=key_interval, max_clamped=0.001)
    out = []
    for img in images:
        with torch.inference_mode():
            z, meta = head([to_tensor(img)])
        out.append(in_process(model, mirror.quantize(z).dequantize(), meta))
    return out


def test_split_key_interval_is_exact_and_smaller(model):
    images = video_frames(5)
    with serving(model) as server:
        client = client_for(server)
        try:
            summary, records, dets = run_edge(
                model, client, images, bits=4, key_interval=3, stream=True, max_inflight=2
            )
            _, intra_records, _ = run_edge(model, client, images, bits=4, stream=True, max_inflight=2)
        finally:
            client.close()
        wait_sessions_free(server)
    assert summary.failed == 0
    assert [r["frame_type"] for r in records] == ["key", "delta", "delta", "key", "delta"]
    assert "frame_type" not in intra_records[0]  # key_interval 1: today's per-frame coding
    for got, want in zip(dets, expected_temporal(model, images, 4, 3)):
        assert_same_detections(got, want)
    delta_bytes = [r["bytes"]["payload"] for r in records if r["frame_type"] == "delta"]
    assert max(delta_bytes) < min(r["bytes"]["payload"] for r in intra_records)


def test_refused_frame_is_resent_as_a_key_frame(model):
    images = video_frames(4)
    with serving(model) as server:
        client = client_for(server)
        head, _ = split_model(model)
        mode = make_mode(
            EdgeOptions(codec=CodecSettings(bits=4), key_interval=100, stream=True, max_inflight=1),
            head,
            fingerprint(model),
        )
        original = mode.prepare

        def prepare_skipping(frame):  # frame 2's delta skips a sequence number: the server has no reference
            if frame.index == 2:
                mode.coder.encoder.sequence += 1
            return original(frame)

        mode.prepare = prepare_skipping
        records = []
        runner = EdgeRunner(mode.options, client=client, mode=mode)
        try:
            summary = runner.run(ArrayFrames(images), lambda r, f: records.append(r.to_dict()))
        finally:
            client.close()
        wait_sessions_free(server)
    assert summary.failed == 0
    assert [(r["frame_type"], r.get("attempts", 1)) for r in records] == [
        ("key", 1),
        ("delta", 1),
        ("key", 2),
        ("delta", 1),
    ]


def test_server_without_free_session_gets_key_frames_only(model):
    images = video_frames(3)
    limits = ServerLimits(streams=StreamLimits(max_sessions=1))
    holder, _, _ = bottleneck_requests(model, images[:1], StreamEncoder(4))
    with serving(model, limits=limits) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            outbox: queue.Queue = queue.Queue()
            call = channel.stream_stream(STREAM)(iter(outbox.get, None), timeout=120)
            outbox.put(holder[0].SerializeToString())
            next(call)  # another stream holds the only session
            client = client_for(server)
            try:
                summary, records, dets = run_edge(
                    model, client, images, bits=4, key_interval=10, stream=True, max_inflight=2
                )
            finally:
                client.close()
            outbox.put(None)
            list(call)
        wait_sessions_free(server)
    assert summary.failed == 0  # every frame answered: the refused delta was resent as a key frame
    assert [r["frame_type"] for r in records] == ["key", "key", "key"]
    assert [r.get("attempts", 1) for r in records] == [1, 2, 1]


def test_timeout_is_a_per_frame_deadline_on_streams(model):
    """--timeout on InferStream: a frame the server holds for 10 s fails DEADLINE_EXCEEDED after 1.5 s (it used
    to be answered OK whenever the server got to it), its stream is cancelled and the next frame goes on a
    new one."""
    with serving(model) as server:
        infer = server.service.infer
        held = threading.Event()

        async def hold_first(request, *args, **kwargs):
            if not held.is_set():
                held.set()
                await asyncio.sleep(10)
            return await infer(request, *args, **kwargs)

        server.service.infer = hold_first
        client = client_for(server, timeout_s=1.5)
        head, _ = split_model(model)
        runner = EdgeRunner(
            opts := EdgeOptions(stream=True, max_inflight=1), make_mode(opts, head, fingerprint(model)), client
        )
        records = []
        start = time.monotonic()
        try:
            runner.run(ArrayFrames(frames(2)), lambda r, f: records.append((time.monotonic() - start, r.to_dict())))
        finally:
            client.close()
        wait_sessions_free(server)
    assert [r["status"] for _, r in records] == ["DEADLINE_EXCEEDED", "OK"], records
    assert "no answer on InferStream within 1.5 s" in records[0][1]["error"]
    assert records[0][0] < 8  # the frame's own deadline, not the server's 10 s


def test_interrupted_stream_is_quiet(model, monkeypatch):
    """SIGTERM / Ctrl-C (KeyboardInterrupt) with stream frames in flight: they are recorded CANCELLED, and
    the answers that arrive afterwards are dropped without the reader thread's InvalidStateError traceback."""
    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    with serving(model) as server:
        infer = server.service.infer

        async def slow(request, *args, **kwargs):
            await asyncio.sleep(1.0)
            return await infer(request, *args, **kwargs)

        server.service.infer = slow

        class Interrupted(ArrayFrames):
            def __iter__(self):
                yield from super().__iter__()
                raise KeyboardInterrupt

        client = client_for(server)
        head, _ = split_model(model)
        runner = EdgeRunner(
            opts := EdgeOptions(stream=True, max_inflight=3), make_mode(opts, head, fingerprint(model)), client
        )
        records = []
        with pytest.raises(KeyboardInterrupt):
            runner.run(Interrupted(frames(2)), lambda r, f: records.append(r.status))
        client.close()  # half-closes: the server answers both, after the futures were cancelled
    assert records == ["CANCELLED", "CANCELLED"]
    assert thread_errors == []


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_a_hung_server_gets_deadlines_a_warning_and_the_give_up(model, stream, caplog):
    """The server's event loop blocks (as under SIGSTOP: connected, silent): frames fail DEADLINE_EXCEEDED
    after --timeout, one warning says so, and the run gives up after --give-up-after, on streams as on unary
    calls (a stream used to wait silently and then answer everything OK)."""
    release = threading.Event()
    with serving(model) as server:
        client = client_for(server, timeout_s=2.0)

        class HangingServer(ArrayFrames):
            def __iter__(self):
                for frame in super().__iter__():
                    if frame.index == 1:
                        server.loop.call_soon_threadsafe(release.wait, 60)
                    yield frame

        head, _ = split_model(model)
        runner = EdgeRunner(
            opts := EdgeOptions(stream=stream, max_inflight=2, give_up_after_s=3.0),
            make_mode(opts, head, fingerprint(model)),
            client,
        )
        records = []
        start = time.monotonic()
        try:
            with caplog.at_level(logging.WARNING, logger="hnd.edge"), pytest.raises(ServerGone, match="giving up"):
                runner.run(HangingServer(frames(40)), lambda r, f: records.append(r.to_dict()))
            elapsed = time.monotonic() - start
        finally:
            release.set()
            client.close()
    assert elapsed < 30, elapsed  # not until the server wakes up
    statuses = [r["status"] for r in records]
    assert len(records) < 40 and "DEADLINE_EXCEEDED" in statuses and "OK" not in statuses[2:], statuses
    warnings = [r.getMessage() for r in caplog.records if "no answer within the 2 s deadline" in r.getMessage()]
    assert len(warnings) == 1, warnings


class SessionHolder:
    """Streams of one other client (its own connection) that each send one key frame and go idle, holding
    a session each until ``release``."""

    def __init__(self, server, requests: list[pb.InferRequest]) -> None:
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{server.port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self.calls = []
        for request in requests:
            outbox: queue.Queue = queue.Queue()
            call = self.channel.stream_stream(STREAM)(iter(outbox.get, None), timeout=120)
            outbox.put(request.SerializeToString())
            assert not pb.InferResponse.FromString(next(call)).key_frame_required  # kept: it holds a session
            self.calls.append((outbox, call))

    def release(self) -> None:
        for outbox, call in self.calls:
            outbox.put(None)
            list(call)
        self.calls.clear()
        self.channel.close()


def run_releasing(model, client, images, holder: SessionHolder, release_at: int, server, **options):
    """run_edge, with ``holder`` releasing its sessions when frame ``release_at`` is read."""

    class Releasing(ArrayFrames):
        def __iter__(self):
            for frame in super().__iter__():
                if frame.index == release_at:
                    holder.release()
                    deadline = time.monotonic() + 10
                    while server.service.streams.active and time.monotonic() < deadline:
                        time.sleep(0.02)
                yield frame

    head, _ = split_model(model)
    runner = EdgeRunner(opts := EdgeOptions(**options), make_mode(opts, head, fingerprint(model), model), client)
    records = []
    runner.run(Releasing(images), lambda r, f: records.append(r.to_dict()))
    return records


def test_temporal_coding_resumes_once_sessions_free_up(model):
    """Another client holds every bottleneck session: the edge falls back to key frames (all answered), and
    goes back to delta frames once they are released (it used to send key frames for the rest of the run)."""
    images = video_frames(8)
    held, _, _ = bottleneck_requests(model, images[:1], StreamEncoder(4))
    with serving(model, limits=ServerLimits(streams=StreamLimits(max_sessions=1))) as server:
        holder = SessionHolder(server, held)
        client = client_for(server)
        try:
            records = run_releasing(
                model,
                client,
                images,
                holder,
                4,
                server,
                codec=CodecSettings(bits=4),
                key_interval=100,
                stream=True,
                max_inflight=1,
            )
        finally:
            holder.release()
            client.close()
        wait_sessions_free(server)
    assert [r["status"] for r in records] == ["OK"] * 8
    kinds = [r["frame_type"] for r in records]
    assert kinds[:5] == ["key"] * 5 and kinds[5:] == ["delta"] * 3, kinds


@pytest.mark.parametrize("fmt", available_formats()[:1])  # the fall-back is the same for both codecs
def test_video_offload_falls_back_to_key_frames_and_back(model, fmt):
    """Idle streams of another client hold the video sessions: an offload camera's key frames are answered
    but not kept; it sends key frames (every frame answered: it used to get FAILED_PRECONDITION for its
    P-frames) and resumes P-frames once the sessions are free."""
    images = video_frames(8)
    held = video_requests(images[:1], fmt)
    limits = ServerLimits(streams=StreamLimits(max_video_sessions=1))
    with serving(model, limits=limits) as server:
        holder = SessionHolder(server, held)
        client = client_for(server)
        try:
            records = run_releasing(
                model,
                client,
                images,
                holder,
                4,
                server,
                mode="offload",
                image_format=fmt,
                stream=True,
                max_inflight=2,
                preset="ultrafast",
            )
        finally:
            holder.release()
            client.close()
        wait_sessions_free(server)
    assert [r["status"] for r in records] == ["OK"] * 8, records
    kinds = [r["frame_type"] for r in records]
    assert kinds[:4] == ["key"] * 4 and "delta" in kinds[5:], kinds


@pytest.mark.parametrize("fmt", available_formats()[:1])
def test_a_client_holding_every_video_session_yields_one(model, fmt):
    """One client's two idle streams hold both video sessions: the camera (another connection, holding none)
    takes the least recently used of them (fair share per client), so its P-frames are kept from the start."""
    images = video_frames(4)
    limits = ServerLimits(streams=StreamLimits(max_video_sessions=2, max_client_video_sessions=2))
    with serving(model, limits=limits) as server:
        holder = SessionHolder(server, video_requests(images[:1], fmt) * 2)
        client = client_for(server)
        try:
            summary, records, _ = run_edge(
                model,
                client,
                images,
                mode="offload",
                image_format=fmt,
                stream=True,
                max_inflight=1,
                preset="ultrafast",
            )
            assert server.service.streams.evicted == 1
            sample = server.service.metrics.registry.get_sample_value
            assert sample("hnd_stream_sessions_reclaimed_total", {"reason": "fair_share"}) == 1
        finally:
            holder.release()
            client.close()
        wait_sessions_free(server)
    assert summary.failed == 0 and [r["frame_type"] for r in records] == ["key", "delta", "delta", "delta"]


def test_temporal_needs_a_stream_and_a_server_with_sessions(model):
    head, _ = split_model(model)
    with pytest.raises(ValueError, match="InferStream"):
        make_mode(EdgeOptions(key_interval=5, stream=False), head, "fp")
    with serving(model, limits=ServerLimits(streams=StreamLimits(max_sessions=0))) as server:
        client = client_for(server)
        try:
            mode = make_mode(EdgeOptions(key_interval=5, stream=True), head, fingerprint(model))
            with pytest.raises(EdgeError, match="stream sessions"):
                mode.check_server(client.model_info())
        finally:
            client.close()


@pytest.mark.parametrize("fmt", available_formats())
def test_video_offload_through_the_edge(model, fmt):
    images = video_frames(4)
    with serving(model) as server:
        client = client_for(server)
        try:
            summary, records, dets = run_edge(
                model,
                client,
                images,
                mode="offload",
                image_format=fmt,
                stream=True,
                gop=3,
                preset="ultrafast",
                max_inflight=2,
            )
        finally:
            client.close()
        wait_sessions_free(server)
    assert summary.failed == 0
    assert [r["frame_type"] for r in records] == ["key", "delta", "delta", "key"]
    assert records[1]["bytes"]["payload"] < records[0]["bytes"]["payload"]
    # What the server answered is the model on the frames as decoded: replay the same packets here.
    enc = VideoEncoder(VideoSettings(format=fmt, gop=3, preset="ultrafast"))
    dec = VideoDecoder(fmt)
    for img, got in zip(images, dets):
        decoded = dec.decode(enc.encode(img)[0])
        with torch.inference_mode():
            want = [wire.detections_from_proto(wire.detections_to_proto(d)) for d in model([to_tensor(decoded)])]
        assert_same_detections(got, want)


def test_webp_offload_through_the_edge(model):
    with serving(model) as server:
        client = client_for(server)
        try:
            summary, records, _ = run_edge(model, client, video_frames(2), mode="offload", image_format="webp")
        finally:
            client.close()
    assert summary.failed == 0 and all(r["bytes"]["payload"] > 0 for r in records)


def test_cli_refuses_key_interval_outside_split(capsys, tmp_path):
    rc = cli.main(edge_argv(tmp_path, "--mode", "offload", "--key-interval", "5", server="127.0.0.1:1"))
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--key-interval" in err[0]
