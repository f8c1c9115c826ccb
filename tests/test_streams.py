"""Stream sessions on a live server: temporal bottleneck frames and H.264 / HEVC offload on InferStream.

Exactness (a temporal stream gives, bit for bit, the in-process result of the same quantization
parameters without the delta step), in-band refusals for deltas without a valid reference, bounded
sessions freed when streams end, and hostile delta / video payloads.
"""

from __future__ import annotations

import queue
import time

import grpc
import numpy as np
import pytest
import torch
import zstandard
from runtime_support import assert_same_detections, serving

from hnd.common import wire
from hnd.common.checkpoint import fingerprint
from hnd.common.split import split_model
from hnd.common.stream_codec import StreamEncoder
from hnd.common.video import VideoDecoder, VideoEncoder, VideoSettings, available_formats
from hnd.edge.torch_modes import to_tensor
from hnd.proto.v1 import split_inference_pb2 as pb
from hnd.server.service import BatchingOptions, ServerLimits
from hnd.server.streams import StreamLimits

INFER = "/hnd.v1.SplitInference/Infer"
STREAM = "/hnd.v1.SplitInference/InferStream"
INFO = "/hnd.v1.SplitInference/GetModelInfo"


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("faster_rcnn")


def video_frames(n: int = 5, size=(96, 128), seed: int = 0) -> list[np.ndarray]:
    """A static scene with a square moving right, and sensor noise: what temporal coding is for."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    bg = np.stack([(xx * 2) % 256, (yy * 3) % 256, 128 + 0 * xx], -1).astype(np.float32)
    out = []
    for i in range(n):
        img = bg.copy()
        img[20:50, 8 + 6 * i : 38 + 6 * i] = (240, 20, 20)
        out.append(np.clip(img + rng.normal(0, 1.5, img.shape), 0, 255).astype(np.uint8))
    return out


def stream_call(port: int, requests: list[pb.InferRequest], timeout: float = 120):
    """Send all requests on one InferStream at once; returns (responses, RpcError or None)."""
    out = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(STREAM)((r.SerializeToString() for r in requests), timeout=timeout)
        try:
            for raw in call:
                out.append(pb.InferResponse.FromString(raw))
        except grpc.RpcError as exc:
            return out, exc
    return out, None


def bottleneck_requests(model, images, encoder: StreamEncoder, fp: str | None = None):
    """Stream requests for images through head + encoder, and the in-process reconstruction of each."""
    head, _ = split_model(model)
    mirror = StreamEncoder(
        encoder.bits, encoder.granularity, key_interval=encoder.key_interval, max_clamped=encoder.max_clamped
    )
    requests, expected_z, metas = [], [], []
    for i, img in enumerate(images):
        with torch.inference_mode():
            z, meta = head([to_tensor(img)])
        frame = encoder.encode(z)
        expected_z.append(mirror.quantize(z).dequantize())  # the in-process path: no delta step
        metas.append(meta)
        r = pb.InferRequest(request_id=f"f{i}", weights_fingerprint=fp or fingerprint(model))
        r.bottleneck.CopyFrom(wire.bottleneck_to_proto(frame.tensor, meta))
        r.stream_frame.CopyFrom(wire.stream_frame_to_proto(frame.kind, frame.key_sequence, frame.sequence))
        requests.append(r)
    return requests, expected_z, metas


def in_process(model, z, meta):
    _, tail = split_model(model)
    with torch.inference_mode():
        out = tail(torch.as_tensor(np.asarray(z)), meta)
    return [wire.detections_from_proto(wire.detections_to_proto(d)) for d in out]


def wait_sessions_free(server, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while server.service.streams.active and time.monotonic() < end:
        time.sleep(0.05)
    assert server.service.streams.active == 0


# --- temporal bottleneck ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,granularity", [(4, "tensor"), (8, "channel")])
def test_temporal_stream_equals_in_process_quantization_bit_for_bit(model, bits, granularity):
    images = video_frames(5)
    encoder = StreamEncoder(bits, granularity, key_interval=3, max_clamped=1.0)
    requests, expected_z, metas = bottleneck_requests(model, images, encoder)
    assert [r.stream_frame.type for r in requests] == [1, 2, 2, 1, 2]
    # One image per batch: a batched tail is not bit-identical to a single one (other conv algorithms).
    with serving(model, batching=BatchingOptions(max_batch=1, max_delay_ms=0, max_queue=64)) as server:
        responses, error = stream_call(server.port, requests)  # all in flight at once: decoded in order
        assert error is None
        assert [r.request_id for r in responses] == [f"f{i}" for i in range(5)]
        for response, z, meta in zip(responses, expected_z, metas):
            assert not response.key_frame_required and not response.refusal
            got = [wire.detections_from_proto(d) for d in response.detections]
            assert_same_detections(got, in_process(model, z, meta))
        wait_sessions_free(server)
    # Deltas are what make it pay.
    sizes = [len(r.bottleneck.tensor.data) for r in requests]
    assert max(sizes[1], sizes[2], sizes[4]) < min(sizes[0], sizes[3])


def test_delta_without_reference_is_refused_in_band_and_the_stream_goes_on(model):
    images = video_frames(4)
    encoder = StreamEncoder(4, key_interval=100, max_clamped=1.0)
    requests, expected_z, metas = bottleneck_requests(model, images, encoder)
    key, d1, d2, d3 = requests
    with serving(model) as server:
        # A delta first, then the key, then a delta that skips one: refused, answered, refused (the
        # reference is dropped), and d3 after the gap is refused too. The stream never ends.
        responses, error = stream_call(server.port, [d1, key, d2, d3])
        assert error is None and len(responses) == 4
        flags = [(r.key_frame_required, bool(r.refusal), len(r.detections)) for r in responses]
        assert flags == [(True, True, 0), (False, False, 1), (True, True, 0), (True, True, 0)]
        assert "no reference" in responses[0].refusal and "does not follow" in responses[2].refusal
        assert_same_detections(
            [wire.detections_from_proto(d) for d in responses[1].detections], in_process(model, expected_z[0], metas[0])
        )
        # A delta on a new stream has no reference either: state never leaks across streams.
        responses, _ = stream_call(server.port, [d1])
        assert responses[0].key_frame_required and responses[0].refusal
        # Stream frames on unary Infer are refused.
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(INFER)(key.SerializeToString(), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "InferStream" in info.value.details()
        wait_sessions_free(server)


def test_hostile_deltas_get_invalid_argument_and_free_the_session(model):
    images = video_frames(2)
    requests, _, _ = bottleneck_requests(model, images, StreamEncoder(8, key_interval=100, max_clamped=1.0))
    key, delta = requests
    bomb = pb.InferRequest()
    bomb.CopyFrom(delta)
    raw = bomb.bottleneck.tensor.raw_size
    bomb.bottleneck.tensor.data = zstandard.ZstdCompressor().compress(bytes(raw * 2))
    junk = pb.InferRequest()
    junk.CopyFrom(delta)
    junk.bottleneck.tensor.data = b"\x28\xb5\x2f\xfd" + b"junk" * 10
    badtype = pb.InferRequest()
    badtype.CopyFrom(delta)
    badtype.stream_frame.type = 0
    selfkey = pb.InferRequest()
    selfkey.CopyFrom(delta)
    selfkey.stream_frame.key_sequence = selfkey.stream_frame.sequence
    with serving(model) as server:
        for bad in (bomb, junk, badtype, selfkey):
            responses, error = stream_call(server.port, [key, bad])
            assert len(responses) == 1 and error is not None
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            wait_sessions_free(server)
        responses, error = stream_call(server.port, [key, delta])  # still serving, and exact again
        assert error is None and [r.refusal for r in responses] == ["", ""]


def test_sessions_are_bounded_and_advertised(model):
    images = video_frames(2)
    limits = ServerLimits(streams=StreamLimits(max_sessions=1, max_reference_bytes=1 << 20))
    with serving(model, limits=limits) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            info = pb.ModelInfo.FromString(channel.unary_unary(INFO)(b"", timeout=30))
        s = info.stream_sessions
        assert (s.max_sessions, s.max_reference_bytes) == (1, 1 << 20)
        assert pb.EncodedImage.FORMAT_H264 in s.video_formats
        assert pb.EncodedImage.FORMAT_H264 in info.accepted_image_formats
        assert pb.EncodedImage.FORMAT_WEBP in info.accepted_image_formats
        # Stream A holds the only session (its key frame) and stays open...
        a_requests, _, _ = bottleneck_requests(model, images, StreamEncoder(4, max_clamped=1.0))
        b_requests, _, _ = bottleneck_requests(model, images, StreamEncoder(4, max_clamped=1.0))
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            outbox: queue.Queue = queue.Queue()
            call_a = channel.stream_stream(STREAM)(iter(outbox.get, None), timeout=60)
            outbox.put(a_requests[0].SerializeToString())
            first = pb.InferResponse.FromString(next(call_a))
            assert not first.key_frame_required and server.service.streams.active == 1
            # ...so stream B's key frame is answered but not kept, and its delta is refused.
            responses, error = stream_call(server.port, b_requests)
            assert error is None
            assert (responses[0].key_frame_required, responses[0].refusal, len(responses[0].detections)) == (
                True,
                "",
                1,
            )
            assert responses[1].key_frame_required and responses[1].refusal
            outbox.put(a_requests[1].SerializeToString())
            second = pb.InferResponse.FromString(next(call_a))
            assert not second.key_frame_required and len(second.detections) == 1
            outbox.put(None)
            assert list(call_a) == []
        wait_sessions_free(server)  # A's session was freed when its stream ended
        m = server.service.metrics
        assert m.key_frames_required.labels("not_kept")._value.get() == 1
        assert m.key_frames_required.labels("refused")._value.get() == 1
        assert m.stream_sessions.labels("bottleneck")._value.get() == 0
        responses, _ = stream_call(server.port, b_requests)
        assert [r.key_frame_required for r in responses] == [False, False]
        wait_sessions_free(server)


def test_cancelled_stream_frees_its_session(model):
    requests, _, _ = bottleneck_requests(model, video_frames(1), StreamEncoder(4))
    with serving(model) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            outbox: queue.Queue = queue.Queue()
            call = channel.stream_stream(STREAM)(iter(outbox.get, None), timeout=60)
            outbox.put(requests[0].SerializeToString())
            next(call)
            assert server.service.streams.active == 1
            call.cancel()
        wait_sessions_free(server)


# --- H.264 / HEVC offload -----------------------------------------------------------------------------


def video_requests(images, fmt: str = "h264", gop: int = 30) -> list[pb.InferRequest]:
    enc = VideoEncoder(VideoSettings(format=fmt, crf=23, gop=gop, preset="ultrafast"))
    fmt_enum = {"h264": pb.EncodedImage.FORMAT_H264, "hevc": pb.EncodedImage.FORMAT_HEVC}[fmt]
    out, key_seq = [], 0
    for i, img in enumerate(images):
        data, key = enc.encode(img)
        key_seq = i if key else key_seq
        r = pb.InferRequest(request_id=f"v{i}")
        r.image.format = fmt_enum
        r.image.data = data
        r.stream_frame.CopyFrom(wire.stream_frame_to_proto("key" if key else "delta", key_seq, i))
        out.append(r)
    return out


@pytest.mark.parametrize("fmt", available_formats())
def test_video_offload_equals_the_model_on_the_decoded_frames(model, fmt):
    images = video_frames(3, size=(96, 128))
    requests = video_requests(images, fmt)
    decoder = VideoDecoder(fmt)
    with serving(model) as server:
        responses, error = stream_call(server.port, requests)
        assert error is None and len(responses) == 3
        for request, response in zip(requests, responses):
            rgb = decoder.decode(request.image.data)
            with torch.inference_mode():
                expected = [wire.detections_from_proto(wire.detections_to_proto(d)) for d in model([to_tensor(rgb)])]
            assert_same_detections([wire.detections_from_proto(d) for d in response.detections], expected)
        wait_sessions_free(server)


def test_hostile_video_frames(model):
    images = video_frames(3, size=(96, 128))
    requests = video_requests(images)
    key, p1, p2 = requests
    rng = np.random.default_rng(0)

    def variant(base, **change):
        r = pb.InferRequest()
        r.CopyFrom(base)
        if "data" in change:
            r.image.data = change["data"]
        if "type" in change:
            r.stream_frame.type = change["type"]
        return r

    big = video_requests(video_frames(1, size=(240, 320)))[0]
    limits = ServerLimits(streams=StreamLimits(max_video_pixels=96 * 128))
    with serving(model, limits=limits) as server:
        # A P-frame first: refused in-band (no reference), the stream goes on to decode the key.
        responses, error = stream_call(server.port, [p1, key, p1])
        assert error is None
        assert [(r.key_frame_required, bool(r.refusal)) for r in responses] == [
            (True, True),
            (False, False),
            (False, False),
        ]
        # Garbage, a fake start code, a truncated key frame, a key frame declared as a delta, a picture
        # over max_video_pixels, and a stream switching to that size: INVALID_ARGUMENT, server serving.
        cases = [
            [variant(key, data=rng.bytes(3000))],
            [variant(key, data=b"\x00\x00\x00\x01\x65" + rng.bytes(800))],
            [variant(key, data=key.image.data[: len(key.image.data) // 2])],
            [key, variant(p1, data=p1.image.data[:10])],
            [big],
            [key, p1, variant(big, type=pb.StreamFrame.TYPE_KEY)],
        ]
        for case in cases:
            responses, error = stream_call(server.port, case)
            assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, (len(case), error)
            assert len(responses) == len(case) - 1
            wait_sessions_free(server)
        # Unary Infer cannot carry video.
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                unary = pb.InferRequest(request_id="u")
                unary.image.CopyFrom(key.image)
                channel.unary_unary(INFER)(unary.SerializeToString(), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "InferStream" in info.value.details()
        responses, error = stream_call(server.port, [key, p1, p2])
        assert error is None and all(len(r.detections) == 1 for r in responses)


def test_webp_frames_on_unary_infer(model):
    import cv2

    img = video_frames(1)[0]
    ok, buf = cv2.imencode(".webp", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_WEBP_QUALITY, 80])
    assert ok
    request = pb.InferRequest(request_id="w")
    request.image.format = pb.EncodedImage.FORMAT_WEBP
    request.image.data = buf.tobytes()
    with serving(model) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            response = pb.InferResponse.FromString(channel.unary_unary(INFER)(request.SerializeToString(), timeout=60))
    decoded = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    with torch.inference_mode():
        expected = [wire.detections_from_proto(wire.detections_to_proto(d)) for d in model([to_tensor(decoded)])]
    # PIL (server) and OpenCV (here) both decode WebP with libwebp: same pixels, same detections.
    assert_same_detections([wire.detections_from_proto(d) for d in response.detections], expected)


def test_server_cli_stream_limits():
    from hnd.common.config import ConfigError, load_config
    from hnd.server import cli as server_cli

    runtime = load_config("test/faster_rcnn-b3ch").runtime
    args = server_cli.build_parser().parse_args(
        [
            "--config",
            "test/faster_rcnn-b3ch",
            "--max-stream-sessions",
            "3",
            "--max-reference-mib",
            "2",
            "--max-video-sessions",
            "1",
            "--max-video-pixels",
            "100000",
            "--session-idle-timeout",
            "7.5",
            "--max-client-sessions",
            "2",
            "--max-client-video-sessions",
            "1",
            "--max-session-mib",
            "64",
        ]
    )
    s = server_cli.settings_from_args(args, runtime).limits.streams
    assert (s.max_sessions, s.max_reference_bytes, s.max_video_sessions, s.max_video_pixels) == (3, 2 << 20, 1, 100000)
    assert (s.idle_timeout_s, s.max_client_sessions, s.max_client_video_sessions, s.max_session_bytes) == (
        7.5,
        2,
        1,
        64 << 20,
    )
    bad = server_cli.build_parser().parse_args(["--config", "test/faster_rcnn-b3ch", "--max-video-pixels", "10"])
    with pytest.raises(ConfigError, match="max-video-pixels"):
        server_cli.settings_from_args(bad, runtime)
    bad = server_cli.build_parser().parse_args(["--config", "test/faster_rcnn-b3ch", "--session-idle-timeout", "0"])
    with pytest.raises(ConfigError, match="session-idle-timeout"):
        server_cli.settings_from_args(bad, runtime)
