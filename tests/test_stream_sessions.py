"""The server's stream-session table without a server: idle expiry, per-client shares and fair eviction,
the session byte budget, and what GetModelInfo advertises of them (#25 row 2)."""

from __future__ import annotations

import numpy as np
import pytest

from hnd.common.stream_codec import KeyFrameRequired, StreamEncoder
from hnd.common.video import VideoDecoder, VideoEncoder, VideoSettings, available_formats
from hnd.server.streams import VIDEO_PICTURES, StreamLimits, StreamSessions


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.reclaimed: list[str] = []

    def __call__(self) -> float:
        return self.now


def frames(n: int = 2, seed: int = 0):
    """(kind, key_sequence, sequence, encoded) of n temporally coded [1, 3, 8, 8] bottlenecks."""
    rng = np.random.default_rng(seed)
    enc = StreamEncoder(4, key_interval=100, max_clamped=1.0)
    z = rng.random((1, 3, 8, 8), dtype=np.float32)
    out = []
    for _ in range(n):
        f = enc.encode(z)
        out.append((f.kind, f.key_sequence, f.sequence, f.tensor))
    return out


def table(**limits) -> tuple[StreamSessions, Clock]:
    """A session table on a fake clock; ``clock.reclaimed`` collects its on_reclaim reasons."""
    clock = Clock()
    return StreamSessions(
        StreamLimits(**limits), video_formats=("h264",), clock=clock, on_reclaim=clock.reclaimed.append
    ), clock


def test_an_idle_session_gives_its_slot_back():
    sessions, clock = table(max_sessions=1, idle_timeout_s=30)
    key, delta = frames(2)
    idle = sessions.open("attacker")
    assert idle.decode_bottleneck(*key).kept
    clock.now = 29
    assert not sessions.open("camera").decode_bottleneck(*key).kept  # still within its idle time
    clock.now = 31
    camera = sessions.open("camera")
    assert camera.decode_bottleneck(*key).kept and sessions.active == 1 and sessions.expired == 1
    assert clock.reclaimed == ["idle"]  # what hnd_stream_sessions_reclaimed_total counts
    with pytest.raises(KeyFrameRequired, match=r"expired after 30 s idle"):
        idle.decode_bottleneck(*delta)


def test_sessions_are_shared_fairly_per_client():
    sessions, clock = table(max_sessions=4, max_client_sessions=3)
    key, delta = frames(2)
    hog = [sessions.open("hog") for _ in range(4)]
    kept = []
    for s in hog:
        clock.now += 1
        kept.append(s.decode_bottleneck(*key).kept)
    assert kept == [True, True, True, False]  # max_client_sessions
    assert "max_client_sessions 3" in hog[3].decode_bottleneck(*key).note
    cameras = [sessions.open(f"camera{i}") for i in range(3)]
    assert cameras[0].decode_bottleneck(*key).kept  # a free slot
    clock.now += 1
    assert cameras[1].decode_bottleneck(*key).kept  # the hog's least recently used one (3 > 0 + 1)
    assert sessions.evicted == 1 and clock.reclaimed == ["fair_share"]
    with pytest.raises(KeyFrameRequired, match="fair share"):
        hog[0].decode_bottleneck(*delta)
    assert hog[1].decode_bottleneck(*delta).kept  # the others keep theirs
    # The hog holds 2, camera0 and camera1 1 each: camera2 (0) still takes one from the hog...
    assert cameras[2].decode_bottleneck(*key).kept
    # ...and then nobody holds more than another client plus one: a newcomer is answered, not kept.
    late = sessions.open("late")
    decoded = late.decode_bottleneck(*key)
    assert not decoded.kept and "no stream session free" in decoded.note
    assert sessions.active == 4


def test_session_bytes_are_bounded():
    key = frames(1)[0]
    held = key[3].raw_size  # a 4-bit reference of one scale is held packed: half a byte per symbol
    sessions, _ = table(max_session_bytes=held * 2)
    assert [sessions.open(i).decode_bottleneck(*key).kept for i in range(3)] == [True, True, False]
    assert sessions.held_bytes == held * 2 and sessions.active == 2


@pytest.mark.skipif("h264" not in available_formats(), reason="this PyAV build has no libx264")
def test_video_sessions_count_their_picture_pool():
    image = np.zeros((64, 96, 3), np.uint8)
    data, key = VideoEncoder(VideoSettings(preset="ultrafast")).encode(image)
    probe = VideoDecoder("h264")
    probe.decode(data)
    assert probe.picture_bytes >= 64 * 96 * 3 // 2  # 4:2:0 (planes padded to FFmpeg's line alignment)
    one = VIDEO_PICTURES * probe.picture_bytes + image.nbytes  # the picture pool and the RGB frame
    sessions, _ = table(max_session_bytes=one + 1)
    assert sessions.open("a").decode_video("h264", "key", 0, 0, data).kept
    assert sessions.held_bytes == one
    refused = sessions.open("b").decode_video("h264", "key", 0, 0, data)
    assert not refused.kept and "max_session_bytes" in refused.note and sessions.active == 1


def test_the_budgets_are_advertised():
    sessions, _ = table(idle_timeout_s=12.5, max_client_sessions=5, max_client_video_sessions=2, max_session_bytes=99)
    info = sessions.info()
    assert (info.idle_timeout_ms, info.max_client_sessions, info.max_client_video_sessions) == (12500, 5, 2)
    assert info.max_session_bytes == 99


def test_the_edge_resumes_temporal_coding_with_backoff():
    """Key frames only while the server keeps none; back to deltas at the first kept key frame, and after 2,
    then 4 kept in a row when sessions come and go (each a fall-back soon after resuming)."""
    from hnd.edge.streaming import SessionFallback
    from hnd.proto.v1 import split_inference_pb2 as pb

    key = pb.InferRequest(stream_frame=pb.StreamFrame(type=pb.StreamFrame.TYPE_KEY))
    delta = pb.InferRequest(stream_frame=pb.StreamFrame(type=pb.StreamFrame.TYPE_DELTA, sequence=1))
    not_kept, kept = pb.InferResponse(key_frame_required=True), pb.InferResponse()
    fallback = SessionFallback("stream")

    def keys_until_resumed() -> int:
        fallback.observe(key, not_kept)
        assert fallback.intra_only
        n = 0
        while fallback.intra_only:
            fallback.observe(key, kept)
            n += 1
        fallback.observe(delta, kept)
        return n

    assert [keys_until_resumed() for _ in range(3)] == [1, 2, 4]
    for _ in range(SessionFallback.STABLE_FRAMES):  # a long stable run: the next fall-back starts over
        fallback.observe(delta, kept)
    assert keys_until_resumed() == 1
    fallback.observe(delta, pb.InferResponse(key_frame_required=True, refusal="no reference"))
    assert not fallback.intra_only  # a refusal is the resend's business
