"""Amplification and hostile strings against a live server: a clear status in milliseconds, bounded memory.

The request classes are hnd.bench.hostile's (the benchmark measures them on server subprocesses for the
README table); here they go to an in-process server on loopback, and this process's peak RSS (the
server's) is read from /proc/self/status after resetting it.
"""

from __future__ import annotations

import logging
import sys
import time

import grpc
import pytest
from runtime_support import serving

from hnd.bench.hostile import CASES, INFER, good_request, proc_status_kib, reset_peak_rss
from hnd.proto.v1 import split_inference_pb2 as pb
from hnd.server.service import BatchingOptions

EXPECTED = {
    "mask paste: original 4000x4000": (grpc.StatusCode.INVALID_ARGUMENT, "max_original_pixels"),
    "mask paste: original 8000x8000": (grpc.StatusCode.INVALID_ARGUMENT, "max_original_pixels"),
    "original 100000x100000": (grpc.StatusCode.INVALID_ARGUMENT, "max_original_side 8192"),
    "padded 2048x2048 (zstd zeros)": (grpc.StatusCode.INVALID_ARGUMENT, "short side <= 160, long side <= 256"),
    "image size off the resize rule": (grpc.StatusCode.INVALID_ARGUMENT, "not a resize of original 120x150"),
    "1 MB fingerprint": (grpc.StatusCode.FAILED_PRECONDITION, "fingerprint mismatch"),
    "newline in fingerprint": (grpc.StatusCode.FAILED_PRECONDITION, "fingerprint mismatch"),
    "offload JPEG 4000x4000": (grpc.StatusCode.INVALID_ARGUMENT, "max_original_pixels"),
}
# Generous bounds for a loaded 2-core machine: before the budget these took 17-64 s and 1.5-13 GB.
MAX_SECONDS = 3.0
MAX_RSS_GROWTH_MIB = 150


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("mask_rcnn")


@pytest.fixture(scope="module")
def good(model):
    return good_request(model)


@pytest.fixture(scope="module")
def server(model):
    with serving(model, batching=BatchingOptions(max_batch=1, max_delay_ms=0, max_queue=8)) as s:
        yield s


def call(server, payload: bytes, timeout: float = 60):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        try:
            return channel.unary_unary(INFER)(payload, timeout=timeout)
        except grpc.RpcError as exc:
            return exc


def test_every_class_is_covered():
    assert sorted(EXPECTED) == sorted(c.name for c in CASES)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_request_gets_a_clear_status_fast_and_costs_no_memory(server, good, case, caplog):
    payload = case.make(good)
    assert len(payload) < 1_100_000  # small requests (a 1 MB string at most): the point is what they declare
    code, expect = EXPECTED[case.name]
    assert isinstance(call(server, good.request.SerializeToString()), bytes)  # warm
    base = proc_status_kib("self", "VmRSS")
    peak_known = reset_peak_rss("self")
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="hnd.server"):
        result = call(server, payload)
    seconds = time.perf_counter() - start
    growth_mib = (proc_status_kib("self", "VmHWM" if peak_known else "VmRSS") - base) / 1024
    assert isinstance(result, grpc.RpcError), f"{case.name} was accepted"
    assert result.code() == code, result.details()
    assert expect in result.details()
    assert len(result.details()) < 600 and "\n" not in result.details()
    assert seconds < MAX_SECONDS, f"{case.name}: {seconds:.2f} s"
    assert growth_mib < MAX_RSS_GROWTH_MIB, f"{case.name}: +{growth_mib:.0f} MiB"
    lines = [r.getMessage() for r in caplog.records if r.name == "hnd.server"]
    assert lines and all(len(line) < 1000 and "\n" not in line for line in lines)
    assert not any("forged" in line and "\\n" not in line for line in lines)
    # the server goes on serving good requests, promptly
    assert isinstance(call(server, good.request.SerializeToString()), bytes)


def test_the_model_info_advertises_the_budget(server, model):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        info = pb.ModelInfo.FromString(channel.unary_unary("/hnd.v1.SplitInference/GetModelInfo")(b"", timeout=30))
    lim = info.limits
    assert (lim.max_short_side, lim.max_long_side, lim.size_divisible) == (160, 256, 32)
    assert (lim.max_padded_side, lim.max_padded_pixels) == (256, 256 * 256)
    assert lim.max_original_side == 8192
    dets = model.roi_heads.detections_per_img
    assert lim.max_original_pixels == (1 << 30) // (4 * dets) and 0 < lim.max_mask_bytes <= 1 << 30
    assert lim.max_stream_inflight == 32


def test_refusals_are_counted_by_reason_and_timed(server, good):
    m = server.service.metrics
    sample = m.registry.get_sample_value
    labels = {"method": "Infer", "code": "INVALID_ARGUMENT", "reason": "original_pixels"}
    before = sample("hnd_refusals_total", labels) or 0
    timed = sample("hnd_request_seconds_count", {"method": "Infer", "code": "INVALID_ARGUMENT"}) or 0
    call(server, CASES[0].make(good))
    assert sample("hnd_refusals_total", labels) == before + 1
    assert sample("hnd_request_seconds_count", {"method": "Infer", "code": "INVALID_ARGUMENT"}) == timed + 1
    ok = sample("hnd_request_seconds_count", {"method": "Infer", "code": "OK"}) or 0
    call(server, good.request.SerializeToString())
    assert sample("hnd_request_seconds_count", {"method": "Infer", "code": "OK"}) == ok + 1


def test_a_retry_storm_is_logged_at_a_bounded_rate(server, good, caplog):
    limited = server.service.refusal_log
    suppressed = server.service.metrics.registry.get_sample_value("hnd_log_suppressed_total") or 0
    bad = CASES[5].make(good)  # 1 MB fingerprint
    with (
        caplog.at_level(logging.WARNING, logger="hnd.server"),
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        method = channel.unary_unary(INFER)
        for _ in range(limited.burst + 30):
            with pytest.raises(grpc.RpcError):
                method(bad, timeout=30)
    written = [r for r in caplog.records if r.name == "hnd.server" and "FAILED_PRECONDITION" in r.getMessage()]
    assert len(written) <= limited.burst
    assert server.service.metrics.registry.get_sample_value("hnd_log_suppressed_total") >= suppressed + 30


def test_a_refused_stream_message_drops_the_queued_ones_behind_it(model, good):
    """5 good + 1 bad + 20 good on one InferStream: 5 answered, the 20 behind the refusal never computed."""
    with serving(model, batching=BatchingOptions(max_batch=1, max_delay_ms=0, max_queue=64)) as server:
        runner = server.service.runner
        bad = pb.InferRequest()
        bad.CopyFrom(good.request)
        bad.weights_fingerprint = "ab" * 32
        messages = (
            [good.request.SerializeToString()] * 5 + [bad.SerializeToString()] + [good.request.SerializeToString()] * 20
        )
        before = runner.images_computed
        answered = 0
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stream = channel.stream_stream("/hnd.v1.SplitInference/InferStream")(iter(messages), timeout=120)
            with pytest.raises(grpc.RpcError) as info:
                for _ in stream:
                    answered += 1
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert answered == 5
        time.sleep(0.5)  # let a batch already handed to the compute thread finish
        computed = runner.images_computed - before
        assert computed <= 5 + 1, computed  # at most the one batch in the compute thread when it was refused
        sample = server.service.metrics.registry.get_sample_value
        assert sample("hnd_stream_messages_total", {"outcome": "answered"}) == 5
        assert sample("hnd_stream_messages_total", {"outcome": "refused"}) == 1
        # those behind it were cancelled once read (outcome "dropped") or never read at all
        assert (sample("hnd_stream_messages_total", {"outcome": "dropped"}) or 0) <= 20
        assert (
            sample(
                "hnd_refusals_total", {"method": "InferStream", "code": "FAILED_PRECONDITION", "reason": "fingerprint"}
            )
            == 1
        )
