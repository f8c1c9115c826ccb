"""The adaptation policy (hnd.edge.adapt): hand-worked cases of choose() and predict(), the profile file, and the
link estimator (hnd.edge.linkest)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np

import pytest

from hnd.edge.adapt import (
    LinkEstimate,
    calibrated,
    Objective,
    OperatingPoint,
    PolicyState,
    ProfileError,
    choose,
    load_profile,
    predict,
    profile_header,
)
from hnd.edge.linkest import EstimatorParams, LinkEstimator


def point(id: str, nbytes: float, agreement: float, edge_ms: float = 10.0, server_ms: float = 20.0) -> OperatingPoint:
    """A point whose p95 bytes are 1.25x its mean."""
    return OperatingPoint(id, "split", {"bits": 8}, nbytes, 1.25 * nbytes, edge_ms, server_ms, agreement)


# Over 10 Mbit/s with a 20 ms round trip, 30 ms of compute each: p95 latency 30 + 20 + 8 * 1.25 * bytes / 1e4 ms
SMALL = point("small", 1_000, 0.80)  # 51 ms
TIE = point("mid-tie", 8_000, 0.95)  # 58 ms
MID = point("mid", 10_000, 0.95)  # 60 ms
BIG = point("big", 100_000, 0.99)  # 150 ms
POINTS = [BIG, MID, SMALL, TIE]
LINK = LinkEstimate(bandwidth_bps=10e6, rtt_ms=20.0, samples=10)


def test_predicted_latency_and_bitrate_by_hand():
    assert predict(SMALL, LINK).latency_ms == pytest.approx(51.0)
    assert predict(BIG, LINK).latency_ms == pytest.approx(150.0)
    # no frame rate: one frame per predicted latency -> 8 * 100,000 bits / 0.150 s = 5,333 kbit/s
    assert predict(BIG, LINK).kbps == pytest.approx(8 * 100_000 / 0.150 / 1e3)
    at10 = LinkEstimate(bandwidth_bps=10e6, rtt_ms=20.0, fps=10.0, samples=10)
    assert predict(MID, at10).kbps == pytest.approx(800.0)  # 8 * 10,000 B * 10 fps
    # 10 fps of 100 kB is 8 Mbit/s: more than 90 % of a 1 Mbit/s link, so the queue grows without bound
    slow = LinkEstimate(bandwidth_bps=1e6, rtt_ms=20.0, fps=10.0, samples=10)
    assert math.isinf(predict(BIG, slow).latency_ms)
    assert predict(MID, slow).latency_ms == pytest.approx(30 + 20 + 8 * 12_500 / 1e3)  # 150 ms
    # the edge's own observations of a point's compute replace the profile's
    seen = LinkEstimate(bandwidth_bps=10e6, rtt_ms=20.0, samples=10, compute_ms={"small": 100.0})
    assert predict(SMALL, seen).latency_ms == pytest.approx(121.0)
    # answers travel back over the link too: 12,500 B of detections are 10 ms more at 10 Mbit/s
    answers = LinkEstimate(bandwidth_bps=10e6, rtt_ms=20.0, samples=10, response_bytes=12_500)
    assert predict(SMALL, answers).latency_ms == pytest.approx(61.0)


def test_highest_agreement_within_target_fewest_bytes_among_ties():
    d = choose(POINTS, LINK, Objective(target_latency_ms=100), PolicyState())
    # small, mid-tie and mid meet 100 ms; mid-tie and mid agree best (0.95): mid-tie has fewer bytes
    assert d.point.id == "mid-tie" and d.feasible and not d.switched and d.note is None
    assert choose(POINTS, LINK, Objective(target_latency_ms=200), PolicyState()).point.id == "big"


def test_bitrate_cap_and_agreement_floor():
    at10 = LinkEstimate(bandwidth_bps=10e6, rtt_ms=20.0, fps=10.0, samples=10)
    # 80 / 640 / 800 / 8,000 kbit/s at 10 fps: 700 leaves small and mid-tie
    assert choose(POINTS, at10, Objective(max_kbps=700), PolicyState()).point.id == "mid-tie"
    assert choose(POINTS, at10, Objective(max_kbps=700, min_agreement=0.9), PolicyState()).point.id == "mid-tie"
    assert choose(POINTS, at10, Objective(min_agreement=0.97), PolicyState()).point.id == "big"


def test_nothing_meets_it_cheapest_and_said_once_per_change():
    objective = Objective(target_latency_ms=40)  # every point needs >= 51 ms
    d1 = choose(POINTS, LINK, objective, PolicyState())
    assert d1.point.id == "small" and not d1.feasible
    assert d1.note is not None and "no operating point meets" in d1.note and "small" in d1.note
    more = LinkEstimate(bandwidth_bps=10e6, rtt_ms=20.0, samples=20)
    d2 = choose(POINTS, more, objective, d1.state)
    assert d2.point.id == "small" and not d2.feasible and d2.note is None  # not said again
    # the round trip drops to 5 ms: small takes 36.1 ms, the objective is met again (said once)
    better = LinkEstimate(bandwidth_bps=10e6, rtt_ms=5.0, samples=30)
    d3 = choose(POINTS, better, objective, d2.state)
    assert d3.feasible and d3.point.id == "small" and d3.note is not None and "met again" in d3.note
    assert choose(POINTS, LinkEstimate(10e6, 5.0, samples=40), objective, d3.state).note is None
    # an agreement floor no point meets within the latency target: the cheapest too
    d = choose(POINTS, LINK, Objective(target_latency_ms=100, min_agreement=0.97), PolicyState())
    assert d.point.id == "small" and not d.feasible


def test_hysteresis_up_margin_and_min_samples():
    objective = Objective(target_latency_ms=180)  # big: 150 ms, within 180 but not within 0.8 x 180 = 144
    from_mid = choose(POINTS, LINK, objective, PolicyState(current="mid-tie", samples_at_switch=0))
    assert from_mid.point.id == "mid-tie" and not from_mid.switched  # an upgrade needs the margin
    on_big = choose(POINTS, LINK, objective, PolicyState(current="big", samples_at_switch=0))
    assert on_big.point.id == "big" and not on_big.switched  # the current one only has to meet the target
    up = choose(POINTS, LINK, Objective(target_latency_ms=200), PolicyState(current="mid-tie", samples_at_switch=0))
    assert up.point.id == "big" and up.switched and up.state.switches == 1 and up.state.samples_at_switch == 10
    # two observations after that switch the link looks a little faster: too early to tell, keep big
    # (mid-tie would be no switch up anyway; the hold keeps the point while it meets the objective)
    kept = choose(POINTS, replace(LINK, samples=12), Objective(target_latency_ms=160), up.state)
    assert kept.point.id == "big" and not kept.switched  # big: 150 ms, within 160
    # the link drops to 1 Mbit/s (big: 1,050 ms, out of 200): leave it at once, hold or not
    slow = LinkEstimate(bandwidth_bps=1e6, rtt_ms=20.0, samples=12)
    down = choose(POINTS, slow, Objective(target_latency_ms=200), up.state)
    assert down.point.id == "mid-tie" and down.switched and down.state.switches == 2  # mid-tie: 130 ms
    # and the hold then applies to it: back up needs min_samples frames on mid-tie
    fast = LinkEstimate(bandwidth_bps=100e6, rtt_ms=20.0, samples=13)
    assert choose(POINTS, fast, Objective(target_latency_ms=200), down.state).point.id == "mid-tie"
    assert choose(POINTS, replace(fast, samples=15), Objective(target_latency_ms=200), down.state).point.id == "big"


def test_nothing_measured_yet_starts_with_the_cheapest():
    d = choose(POINTS, LinkEstimate(), Objective(target_latency_ms=1000), PolicyState())
    assert d.point.id == "small" and d.state.current == "small" and not d.switched


def write_profile(path, fingerprint="ab" * 32, points=None):
    header = profile_header(fingerprint, "test/faster_rcnn-b3ch", "random (seed 0)", {"cpu": "test"})
    pts = points or [
        {
            "id": "split-8b",
            "mode": "split",
            "reproduce": {"bits": 8, "granularity": "tensor", "coding": "intra", "resize": "native"},
            "bytes": {"mean": 100.0, "p95": 120.0},
            "edge_ms": {"mean": 1.0, "p95": 2.0},
            "server_ms": {"mean": 3.0, "p95": 4.0},
            "agreement_f1": 1.0,
        }
    ]
    path.write_text(json.dumps({**header, "points": pts}))
    return path


def test_profile_loads_and_refuses_other_weights_in_one_line(tmp_path):
    profile = load_profile(write_profile(tmp_path / "points.json"))
    assert profile.fingerprint == "ab" * 32 and profile.points[0].edge_ms == 2.0
    profile.check_weights("ab" * 32)
    with pytest.raises(ProfileError) as exc:
        profile.check_weights("cd" * 32)
    message = str(exc.value)
    assert "points.json" in message and "other weights" in message and "\n" not in message


@pytest.mark.parametrize(
    "text, problem",
    [
        (None, "no such"),
        ("{not json", "not an operating-points file"),
        ('{"format": "other"}', "not an operating-points file"),
        ('{"format": "hnd-operating-points", "version": 9}', "version 9"),
        ('{"format": "hnd-operating-points", "version": 1, "model": {}, "points": []}', "malformed"),
    ],
)
def test_bad_profiles_are_one_line_naming_the_file(tmp_path, text, problem):
    path = tmp_path / "points.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ProfileError) as exc:
        load_profile(path)
    assert str(exc.value).startswith(str(path)) and problem in str(exc.value)


# ---------------------------------------------------------------------------------------------------
# The link estimator (hnd.edge.linkest), by hand: 125,000 B is 1 Mbit, 100 ms at 10 Mbit/s


def test_round_trip_is_the_windowed_minimum_of_network_minus_server_time():
    est = LinkEstimator()
    est.observe(0.0, 100, 50, network_ms=150.0, server_ms=100.0)  # 50 ms on the wire
    est.observe(1.0, 100, 50, network_ms=30.0, server_ms=0.0)
    est.observe(2.0, 100, 50, network_ms=60.0, server_ms=20.0)  # 40
    assert est.rtt_ms(2.0) == 30.0
    est.observe(32.0, 100, 50, network_ms=45.0, server_ms=0.0)  # the 30 ms one is 31 s old: aged out
    assert est.rtt_ms(32.0) == 40.0
    assert est.rtt_ms(200.0) == 45.0  # all old: the newest stands


def test_bandwidth_is_the_windowed_maximum_of_delivery_rates():
    est = LinkEstimator()
    est.observe(0.0, 100, 0, network_ms=20.0, server_ms=0.0)  # the round trip, 20 ms; too short to time
    assert est.bandwidth_bps == pytest.approx(8 * 100 / 0.5e-3)  # floored at 0.5 ms: a lower bound
    est.observe(1.0, 125_000, 0, network_ms=130.0, server_ms=10.0)  # 100 ms of transfer
    assert est.bandwidth_bps == pytest.approx(10e6)
    est.observe(2.0, 125_000, 0, network_ms=220.0, server_ms=0.0)  # waited behind another frame: 5 Mbit/s
    assert est.bandwidth_bps == pytest.approx(10e6)  # an understated sample does not lower the maximum
    e = est.estimate(2.0)
    assert (e.bandwidth_bps, e.rtt_ms, e.samples, e.response_bytes) == (pytest.approx(10e6), 20.0, 3, 0.0)
    est.observe(3.0, 100, 1000, network_ms=20.0 + 0.8, server_ms=0.0)
    assert est.estimate(3.0).response_bytes == pytest.approx(np.quantile([0, 0, 0, 1000], 0.9))


def test_a_rate_drop_restarts_the_window_after_two_overusing_frames():
    est = LinkEstimator()
    est.observe(0.0, 100, 0, network_ms=20.0, server_ms=0.0)
    est.observe(1.0, 125_000, 0, network_ms=120.0, server_ms=0.0)  # 10 Mbit/s
    # 4 Mbit/s now: 250 ms of transfer where 10 Mbit/s predicts 100 (over 2 x 100 + 5, under 8 x 100)
    est.observe(2.0, 125_000, 0, network_ms=270.0, server_ms=0.0)
    assert est.bandwidth_bps == pytest.approx(10e6)  # one slow frame may be jitter
    est.observe(3.0, 125_000, 0, network_ms=270.0, server_ms=0.0)
    assert est.bandwidth_bps == pytest.approx(4e6)
    est.observe(4.0, 125_000, 0, network_ms=120.0, server_ms=0.0)  # back to 10 Mbit/s: the max filter rises at once
    assert est.bandwidth_bps == pytest.approx(10e6)
    # 1 Mbit/s: 1,000 ms where 100 are predicted, over 8 x 100 + 10 (half the round trip): one frame is enough
    est.observe(5.0, 125_000, 0, network_ms=1020.0, server_ms=0.0)
    assert est.bandwidth_bps == pytest.approx(1e6)


def test_compute_per_point_replaces_the_profile_after_a_few_frames():
    est = LinkEstimator(EstimatorParams(compute_min=3, compute_quantile=1.0))
    for i, ms in enumerate((10.0, 30.0)):
        est.observe(float(i), 100, 0, 20.0, 0.0, point="a", compute_ms=ms)
    assert est.compute_ms() == {}
    est.observe(2.0, 100, 0, 20.0, 0.0, point="a", compute_ms=20.0)
    assert est.estimate(2.0).compute_ms == {"a": 30.0}


def test_frames_in_flight_wait_behind_each_other_on_the_link():
    two = LinkEstimate(bandwidth_bps=10e6, rtt_ms=20.0, samples=10, inflight=2)
    assert predict(BIG, two).latency_ms == pytest.approx(30 + 20 + 2 * 100)
    assert predict(BIG, two).kbps == pytest.approx(2 * 8 * 100_000 / 0.250 / 1e3)


# ---------------------------------------------------------------------------------------------------
# What an adaptive run shows: Prometheus gauges, the live window and status line, the summary section


def adaptive_record(frame: int, point: str, kbps: float, total_ms: float):
    from hnd.edge.records import ByteCounts, FrameRecord, Timings

    return FrameRecord(
        frame,
        "f",
        0.0,
        "split",
        bytes=ByteCounts(1000, 1100, 50),
        ms=Timings(total=total_ms),
        extra={"operating_point": point, "link": {"kbps": kbps, "rtt_ms": 80.0}},
    )


def test_gauges_live_window_and_summary_show_the_point_and_the_link():
    from hnd.edge.adapt_mode import AdaptStats
    from hnd.edge.live import EdgeMetrics, LiveStats
    from hnd.edge.summary import Summary

    metrics = EdgeMetrics()
    live = LiveStats(lambda: {}, metrics=metrics)
    live.add(adaptive_record(0, "big", 5000.0, 100.0))
    live.add(adaptive_record(1, "small", 900.0, 300.0))
    value = metrics.registry.get_sample_value
    assert value("hnd_edge_operating_point", {"point": "small"}) == 1.0
    assert value("hnd_edge_operating_point", {"point": "big"}) == 0.0
    assert value("hnd_edge_link_bandwidth_bps") == 900e3 and value("hnd_edge_link_rtt_seconds") == 0.08
    w = live.window()
    assert w["operating_point"] == "small" and w["link"] == {"kbps": 900.0, "rtt_ms": 80.0}
    assert "point small (link 900 kbit/s, RTT 80 ms)" in LiveStats.status_line(w)
    # without --adapt none of it: no gauge, no key
    plain = EdgeMetrics()
    LiveStats(lambda: {}, metrics=plain).add(adaptive_record(0, "x", 1.0, 1.0).__class__(0, "f", 0.0, "split"))
    assert plain.registry.get_sample_value("hnd_edge_link_bandwidth_bps") is None
    stats = AdaptStats(Objective(target_latency_ms=200))
    summary = Summary(sections={"adapt": stats})
    for i, (point, ms) in enumerate((("big", 100.0), ("small", 300.0), ("small", 150.0))):
        record = adaptive_record(i, point, 1.0, ms)
        summary.add(record)
        stats.add(record)
    stats.switches = 1
    d = summary.as_dict()["adapt"]
    assert d["switches"] == 1 and d["points"]["small"]["frames"] == 2 and d["points"]["small"]["within_target"] == 1
    assert "adaptive: p95 latency <= 200 ms  switches 1" in summary.format()


def test_each_family_of_point_is_reproduced_as_edge_options_and_local_ones_left_out():
    from hnd.edge.adapt import Profile
    from hnd.edge.adapt_mode import AdaptiveMode, point_options
    from hnd.edge.modes import EdgeOptions

    def of(mode: str, **reproduce) -> OperatingPoint:
        return OperatingPoint("p", mode, reproduce, 1.0, 1.0, 1.0, 1.0, 1.0)

    base = EdgeOptions(max_inflight=2)
    split = point_options(base, of("split", bits=4, granularity="channel", coding="temporal", key_interval=8))
    assert (split.mode, split.codec.bits, split.codec.granularity, split.key_interval) == ("split", 4, "channel", 8)
    assert point_options(base, of("split", bits=2, granularity="tensor", coding="intra")).key_interval == 1
    jpeg = point_options(base, of("offload", image_format="jpeg", quality=75))
    assert (jpeg.mode, jpeg.image_format, jpeg.jpeg_quality, jpeg.max_inflight) == ("offload", "jpeg", 75, 2)
    h264 = point_options(base, of("offload", image_format="h264", crf=28, key_interval=30, preset="ultrafast"))
    assert (h264.image_format, h264.crf, h264.gop, h264.preset) == ("h264", 28.0, 30, "ultrafast")
    with pytest.raises(ValueError):
        point_options(base, of("offload", image_format="gif", quality=1))
    said = []
    points = [
        OperatingPoint("jpeg-q75", "offload", {"image_format": "jpeg", "quality": 75}, 1e4, 1e4, 1.0, 1.0, 0.9),
        OperatingPoint("local-native", "local", {"resize": "native"}, 0.0, 0.0, 1.0, 1.0, 1.0),
        OperatingPoint("split-8b", "split", {"bits": 8, "granularity": "tensor"}, 1e3, 1e3, 1.0, 1.0, 1.0),
    ]
    mode = AdaptiveMode(
        EdgeOptions(), Profile("p.json", "f", {}, points), Objective(max_kbps=100), lambda *a: None, None, "f",
        say=said.append,
    )  # fmt: skip
    assert [p.id for p in mode.points] == ["jpeg-q75"]  # a torch-free, head-less edge: offload only
    assert said == [
        "operating point local-native left out: a local point",
        "operating point split-8b left out: a split point and this edge has no head",
    ]


def test_points_not_observed_yet_get_the_profiles_compute_scaled_like_the_observed_ones():
    # small observed at 120 ms where its profile says 30: the machine is 4x slower; big's 30 ms become 120
    seen = LinkEstimate(bandwidth_bps=10e6, rtt_ms=20.0, samples=10, compute_ms={"small": 120.0})
    assert predict(BIG, calibrated(POINTS, seen)).latency_ms == pytest.approx(120 + 20 + 100)
    assert calibrated(POINTS, LINK).compute_scale == 1.0
    # so big is out of a 200 ms target (240 ms) although the profile's figures alone would take it (150 ms)
    assert choose(POINTS, seen, Objective(target_latency_ms=200), PolicyState()).point.id == "mid-tie"


def test_jitter_within_half_a_round_trip_is_no_overuse():
    est = LinkEstimator()
    est.observe(0.0, 100, 0, network_ms=80.0, server_ms=0.0)  # an 80 ms round trip
    est.observe(1.0, 125_000, 0, network_ms=180.0, server_ms=0.0)  # 10 Mbit/s
    for t in (2.0, 3.0, 4.0):  # 39 ms of jitter on 100 ms of transfer: within 2 x 100 + 40
        est.observe(t, 125_000, 0, network_ms=80.0 + 100.0 + 39.0, server_ms=0.0)
    assert est.bandwidth_bps == pytest.approx(10e6)
    for t in (5.0, 6.0):  # 250 ms: over 2 x 100 + 40, twice
        est.observe(t, 125_000, 0, network_ms=80.0 + 250.0, server_ms=0.0)
    assert est.bandwidth_bps == pytest.approx(4e6)


def test_after_a_restart_one_overusing_frame_restarts_again():
    est = LinkEstimator()
    est.observe(0.0, 100, 0, network_ms=20.0, server_ms=0.0)
    est.observe(1.0, 125_000, 0, network_ms=120.0, server_ms=0.0)  # 10 Mbit/s
    est.observe(2.0, 125_000, 0, network_ms=1020.0, server_ms=0.0)  # gross: restart at 1 Mbit/s
    assert est.bandwidth_bps == pytest.approx(1e6)  # (a frame that straddled the drop: partly at the old rate)
    est.observe(3.0, 125_000, 0, network_ms=3020.0, server_ms=0.0)  # 3,000 ms where 1,000 are predicted
    assert est.bandwidth_bps == pytest.approx(1e6 / 3)  # not gross, not twice: restarted since it follows one


def test_the_estimate_counts_the_frames_the_runners_window_keeps_in_flight_now():
    """An auto-sized window starts at one frame in flight (max_inflight is its cap): predictions over
    max_inflight would queue frames that are not there and leave the richest point out for nothing."""
    from types import SimpleNamespace

    from hnd.edge.adapt import Profile
    from hnd.edge.adapt_mode import AdaptiveMode
    from hnd.edge.modes import EdgeMode, EdgeOptions
    from hnd.edge.pipeline import EdgeRunner

    def jpeg(id: str, nbytes: float, agreement: float) -> OperatingPoint:
        return OperatingPoint(id, "offload", {"image_format": "jpeg", "quality": 75}, nbytes, nbytes, 10, 20, agreement)

    # 10 Mbit/s, 20 ms round trip, 30 ms compute: "big" takes 50 + n x 100 ms with n frames in flight
    estimator = LinkEstimator()
    estimator.observe(0.0, 100, 0, network_ms=20.0, server_ms=0.0)
    estimator.observe(1.0, 125_000, 0, network_ms=120.0, server_ms=0.0)
    options = EdgeOptions(max_inflight=4, auto_window=True)
    points = [jpeg("big", 125_000, 0.99), jpeg("small", 1_000, 0.8)]
    mode = AdaptiveMode(
        options, Profile("p.json", "f", {}, points), Objective(target_latency_ms=200),
        lambda *a: EdgeMode(options), None, "f", estimator=estimator, clock=lambda: 2.0,
    )  # fmt: skip
    runner = EdgeRunner(options, mode, client=SimpleNamespace(settings=SimpleNamespace(timeout_s=30.0)))
    assert runner.sizing.size == 1 and mode.link_estimate().inflight == 1
    assert choose(mode.points, mode.link_estimate(), mode.objective, PolicyState()).point.id == "big"  # 150 ms
    runner.sizing.size = 3  # grown from measured answers
    assert mode.link_estimate().inflight == 3
    assert choose(mode.points, mode.link_estimate(), mode.objective, PolicyState()).point.id == "small"  # 350 ms


# ---------------------------------------------------------------------------------------------------
# A first measurement, calibration by what was achieved, and a frame stuck in flight (#27's rerun)


def test_a_probe_before_the_first_frame_picks_the_best_point_for_a_link_at_least_that_bad():
    # 500 B both ways in 100 ms: RTT <= 100 ms and >= 40 kbit/s, so small takes 30 + 100 + 8 x 1,250 / 40 = 380 ms,
    # mid-tie 30 + 100 + 2,000 = 2,130 ms, mid 2,630 ms, big 25,130 ms
    est = LinkEstimator()
    est.observe_probe(0.0, 500, 100.0)
    e = est.estimate(0.0)
    assert (e.bandwidth_bps, e.rtt_ms, e.samples) == (pytest.approx(40e3), 100.0, 0)  # not a frame
    assert predict(TIE, e).latency_ms == pytest.approx(2_130.0)
    d = choose(POINTS, e, Objective(target_latency_ms=3_000), PolicyState())
    assert d.point.id == "mid-tie" and d.feasible  # not blindly the cheapest (small, without a probe)
    assert choose(POINTS, e, Objective(target_latency_ms=1_000), PolicyState()).point.id == "small"
    # the probe's round trip is an upper bound: the first frame's smaller wire time replaces it
    est.observe(1.0, 100, 0, network_ms=40.0, server_ms=10.0)
    assert est.rtt_ms(1.0) == 30.0


def test_the_adaptive_mode_probes_once_the_server_is_checked():
    from hnd.edge.adapt import Profile
    from hnd.edge.adapt_mode import AdaptiveMode
    from hnd.edge.modes import EdgeMode, EdgeOptions
    from hnd.proto.v1 import split_inference_pb2 as pb

    def jpeg(id: str, nbytes: float, agreement: float) -> OperatingPoint:
        return OperatingPoint(id, "offload", {"image_format": "jpeg", "quality": 75}, nbytes, nbytes, 10, 20, agreement)

    points = [jpeg("big", 8_000, 0.99), jpeg("small", 800, 0.8)]
    calls = []

    def probe() -> tuple[int, float]:
        calls.append(1)
        return 1_000, 100.0  # RTT <= 100 ms, >= 80 kbit/s: big takes 30 + 100 + 800 = 930 ms

    def mode_with(probe) -> AdaptiveMode:
        return AdaptiveMode(
            EdgeOptions(max_inflight=1), Profile("p.json", "f", {}, points), Objective(target_latency_ms=1_000),
            lambda o, *a: EdgeMode(o), None, "f", clock=lambda: 0.0, probe=probe,
        )  # fmt: skip

    mode = mode_with(probe)
    mode.check_server(pb.ModelInfo())
    assert calls == [1] and mode.link_estimate().rtt_ms == 100.0
    assert choose(mode.points, mode.link_estimate(), mode.objective, PolicyState()).point.id == "big"
    failed = mode_with(lambda: None)  # the probe failed: nothing measured, the cheapest first
    failed.check_server(pb.ModelInfo())
    assert choose(failed.points, failed.link_estimate(), failed.objective, PolicyState()).point.id == "small"


def test_calibration_takes_out_what_the_prediction_overstates_and_a_late_frame_counts_at_once():
    est = LinkEstimator(EstimatorParams(calib_window=10, calib_min=3, calib_quantile=0.9))

    def answered(t: float, point: str, predicted: float, achieved: float) -> None:
        est.observe(t, 100, 0, 20.0, 0.0, point=point, predicted_ms=predicted, total_ms=achieved)

    answered(0.0, "a", 2_100.0, 1_800.0)  # -300
    answered(1.0, "a", 2_100.0, 1_900.0)  # -200
    assert est.latency_bias_ms("a") == 0.0  # two errors: too few to trust a negative bias
    answered(2.0, "a", 2_100.0, 1_850.0)  # -250
    # the 90th percentile of (-300, -200, -250): -250 + 0.8 x 50 = -210 (above the last, -250)
    assert est.latency_bias_ms("a") == pytest.approx(-210.0)
    assert est.estimate(2.0, point="a").latency_bias_ms == pytest.approx(-210.0)
    assert est.estimate(2.0).latency_bias_ms == 0.0 and est.latency_bias_ms("b") == 0.0  # other points: none
    # calibrated, a point the raw prediction puts at 2,100 ms fits a 2,000 ms target
    cal = replace(LINK, latency_bias_ms=-210.0)
    slow_big = replace(BIG, edge_ms=1_000.0, server_ms=950.0)  # raw 1,950 + 20 + 125 = 2,095 ms
    assert choose([slow_big, SMALL], LINK, Objective(target_latency_ms=2_000), PolicyState()).point.id == "small"
    assert choose([slow_big, SMALL], cal, Objective(target_latency_ms=2_000), PolicyState()).point.id == "big"
    # one late frame (+400 ms): the bias is that at once, not its 90th percentile
    answered(3.0, "a", 2_100.0, 2_500.0)
    assert est.latency_bias_ms("a") == 400.0
    # a switch starts afresh: b's first answers, a negative error, count for nothing yet
    answered(4.0, "b", 500.0, 300.0)
    assert est.latency_bias_ms("b") == 0.0
    answered(5.0, "b", 500.0, 650.0)  # but a positive one does
    assert est.latency_bias_ms("b") == 150.0


def test_a_frame_that_overused_the_link_restarts_the_estimate_not_the_calibration_too():
    est = LinkEstimator()
    est.observe(0.0, 100, 0, network_ms=20.0, server_ms=0.0, point="a", predicted_ms=50.0, total_ms=40.0)
    est.observe(1.0, 125_000, 0, network_ms=120.0, server_ms=0.0, point="a", predicted_ms=150.0, total_ms=130.0)
    # the link falls to 1 Mbit/s: 1,000 ms where 100 were predicted, 870 ms late
    est.observe(2.0, 125_000, 0, network_ms=1020.0, server_ms=0.0, point="a", predicted_ms=150.0, total_ms=1020.0)
    assert est.bandwidth_bps == pytest.approx(1e6)  # the estimate took it in
    assert est.latency_bias_ms("a") == 0.0  # and the late frame is not counted a second time


def test_a_positive_bias_moves_the_policy_down():
    # target 100 ms: small 51, mid-tie 58 raw; 45 ms late on average: small 96, mid-tie 103
    late = replace(LINK, latency_bias_ms=45.0)
    assert choose(POINTS, LINK, Objective(target_latency_ms=100), PolicyState()).point.id == "mid-tie"
    d = choose(POINTS, late, Objective(target_latency_ms=100), PolicyState(current="mid-tie", samples_at_switch=0))
    assert d.point.id == "small" and d.switched
    assert predict(SMALL, replace(LINK, latency_bias_ms=-1e6)).latency_ms == 0.0  # never below zero


def test_a_frame_stuck_in_flight_bounds_the_rate_before_its_answer_comes():
    est = LinkEstimator()
    est.observe(0.0, 100, 0, network_ms=20.0, server_ms=0.0)  # RTT 20 ms
    est.observe(1.0, 125_000, 0, network_ms=120.0, server_ms=0.0)  # 10 Mbit/s
    est.observe(1.5, 125_000, 0, network_ms=120.0, server_ms=0.0)
    stuck = (2.0, 125_000, 30.0)  # sent at 2 s, 30 ms of compute expected: 100 ms on the link predicted
    # 200 ms out: 200 - 20 - 30 = 150 ms on the link, within 2 x 100 + 10 (half the RTT): no evidence yet
    assert est.estimate(2.2, outstanding=stuck).bandwidth_bps == pytest.approx(10e6)
    # 500 ms out: 450 ms on the link and not through, so the link carries under 8 x 125,000 / 0.45 s
    assert est.estimate(2.5, outstanding=stuck).bandwidth_bps == pytest.approx(8 * 125_000 / 0.45)
    assert est.bandwidth_bps == pytest.approx(10e6)  # a bound for now, not a sample: the answer will tell
    # the policy already prices the next frame at that rate: big 30 + 20 + 450 = 500 ms, out of the 200 ms
    # target it fitted at 10 Mbit/s (150 ms); mid-tie (10,000 B p95) 30 + 20 + 36 = 86 ms
    objective, state = Objective(target_latency_ms=200), PolicyState(current="big", samples_at_switch=0)
    assert choose(POINTS, est.estimate(2.2, outstanding=stuck), objective, state).point.id == "big"
    assert choose(POINTS, est.estimate(2.5, outstanding=stuck), objective, state).point.id == "mid-tie"


def test_the_adaptive_mode_prices_the_next_frame_with_the_one_still_out():
    from hnd.edge.adapt import Profile
    from hnd.edge.adapt_mode import AdaptiveMode
    from hnd.edge.capture import Frame
    from hnd.edge.modes import EdgeMode, EdgeOptions, Prepared
    from hnd.edge.records import Timings

    class Sent(EdgeMode):
        def prepare(self, frame):
            return Prepared(frame, Timings(), message_bytes=125_000)

    est = LinkEstimator()
    est.observe(0.0, 100, 0, network_ms=20.0, server_ms=0.0)
    est.observe(1.0, 125_000, 0, network_ms=120.0, server_ms=0.0)  # 10 Mbit/s, RTT 20 ms
    now = [2.0]
    points = [OperatingPoint("big", "offload", {"image_format": "jpeg", "quality": 75}, 1e5, 1e5, 10, 20, 0.99)]
    mode = AdaptiveMode(
        EdgeOptions(max_inflight=2), Profile("p.json", "f", {}, points), Objective(target_latency_ms=1e4),
        lambda o, *a: Sent(o), None, "f", estimator=est, clock=lambda: now[0],
    )  # fmt: skip
    mode.prepare(Frame(0, "f", np.zeros((2, 2, 3), np.uint8), 0, 0.0, 0.0))  # sent at 2 s, 30 ms of compute
    now[0] = 2.5  # 450 ms on the link and not through
    assert mode.link_estimate().bandwidth_bps == pytest.approx(8 * 125_000 / 0.45)


def test_a_faster_frame_than_the_round_trip_so_far_is_timed_against_none():
    """On a slow link every frame carries transfer, so the windowed minimum is no bare round trip; when the
    link speeds up, a frame below it would look instant (a rate of 8 bytes / 0.5 ms) and send the edge to
    its richest point on a link of a few kbit/s. Frames of one size give no fit of the round trip (below)."""
    est = LinkEstimator()
    est.observe_probe(0.0, 992, 3_530.0)  # 992 B at 2.3 kbit/s, 80 ms round trip
    assert est.rtt_ms(1.0) == 3_530.0
    est.observe(2.0, 992, 0, network_ms=874.0, server_ms=0.0)  # the link sped up to 10 kbit/s: below the minimum
    assert est.rtt_ms(2.0) == 874.0 and not est._fits
    assert est._rates[-1] == pytest.approx(8 * 992 / 0.874)  # ~9 kbit/s, a lower bound; not 15.9 Mbit/s
    assert est.bandwidth_bps < 20e3


def test_a_larger_frame_is_timed_as_a_pair_with_a_recent_smaller_one_so_a_slow_links_rate_is_not_over_read():
    """Rerun of #27, rise trace, 9.1 kbit/s with a 80 ms round trip: the minimum is a 2-bit frame (1,007 B both
    ways, 885 ms of it transfer). A 4-bit frame (1,763 B) timed against that minimum as if it were the round
    trip read 8 x 1,763 / 665 ms = 21 kbit/s, and the edge tried 8-bit (4.3-4.5 s, late). As a pair, its
    756 extra bytes took its 665 extra ms: 9.1 kbit/s."""
    est = LinkEstimator()
    two_bit, four_bit = 1_007, 1_763
    on_wire = lambda nbytes: 80.0 + 8 * nbytes / 9.1  # noqa: E731 - ms at 9.1 kbit/s
    est.observe(0.0, two_bit, 0, network_ms=on_wire(two_bit) + 30.0, server_ms=30.0)
    est.observe(3.0, two_bit, 0, network_ms=on_wire(two_bit) + 40.0, server_ms=30.0)  # 10 ms of jitter
    est.observe(6.0, four_bit, 0, network_ms=on_wire(four_bit) + 30.0, server_ms=30.0)
    assert est._rates[-1] == pytest.approx(9.1e3)  # not 8 x 1,763 / 0.665 = 21.2 kbit/s
    # the frames of one size are timed no higher than the pair: 4-bit again, 50 ms late, against the 965 ms
    # minimum reads 8 x 1,763 / 715 ms = 19.7 kbit/s; its own lower bound is 8 x 1,763 / 1,680 ms = 8.4 kbit/s
    est.observe(9.0, four_bit, 0, network_ms=on_wire(four_bit) + 50.0, server_ms=0.0)
    assert est._rates[-1] == pytest.approx(9.1e3)
    assert est.bandwidth_bps == pytest.approx(9.1e3, rel=0.01)
    # so 8-bit (4,760 B: 4.2 s on the link) does not fit a 3 s target, and 4-bit, the point running, does
    eight = OperatingPoint("8b", "split", {}, 4_175, 4_175, 10.0, 10.0, 0.98)
    four = OperatingPoint("4b", "split", {}, 1_178, 1_178, 10.0, 10.0, 0.89)
    e = replace(est.estimate(9.0), response_bytes=585.0)
    assert predict(eight, e).latency_ms > 3_000 > predict(four, e).latency_ms


def test_a_pair_across_a_rate_change_is_not_fitted():
    """A small frame sent before the link slowed and a larger one after it: the extra bytes did not cross
    one rate, so the fit would be a negative round trip; the frame is timed against the minimum instead."""
    est = LinkEstimator()
    est.observe_probe(0.0, 266, 80.0)  # 80 ms round trip on a fast link
    est.observe(1.0, 4_760, 0, network_ms=80.0 + 8 * 4_760 / 8.8, server_ms=0.0)  # 8.8 kbit/s now
    assert est.rtt_ms(1.0) == 80.0 and not est._fits
    assert est._rates[-1] == pytest.approx(8.8e3)


def test_frames_of_one_size_on_a_slow_link_are_timed_against_the_fast_links_round_trip():
    """Steps trace, 50 Mbit/s then 4.1 kbit/s with a 80 ms round trip: once the fast frames leave the 30 s
    minimum, the minimum is a slow 2-bit frame of ~2 s, most of it transfer. Timed against it, the next 2-bit
    frame, 20 ms slower by jitter, read 8 x 1,007 / 20 ms = 400 kbit/s and sent the edge up to a late 4-bit.
    The fast link's minimum was a round trip (its bytes took well under a tenth of it): kept as one."""
    est = LinkEstimator()
    est.observe_probe(0.0, 266, 82.0)
    for t in range(1, 6):
        est.observe(float(t), 4_760, 0, network_ms=82.0 + (t % 3) * 0.8 + 8 * 4_760 / 50e3, server_ms=0.0)
    est.observe(20.0, 4_760, 0, network_ms=80.0 + 8 * 4_760 / 4.1, server_ms=0.0)  # the drop: 9.4 s
    assert est.bandwidth_bps == pytest.approx(4.1e3, rel=0.02)
    for i, t in enumerate(range(30, 75, 3)):
        jitter = (i % 3) * 20.0
        est.observe(float(t), 1_007, 0, network_ms=80.0 + 8 * 1_007 / 4.1 + jitter, server_ms=0.0)
        assert est.bandwidth_bps < 4.2e3, t
    assert est._minimum(72.0)[2] > 2_000 and est.rtt_ms(72.0) == pytest.approx(82.0, abs=1.0)


def test_a_pair_is_made_with_a_recent_frame_not_one_sent_before_the_link_sped_up():
    """Rise trace, 4 kbit/s then 8.6 kbit/s (80 ms round trip): the probe, sent at 4 kbit/s, stayed the 30 s
    minimum; paired with it, the first 2-bit frame at 8.6 kbit/s read 16 kbit/s, and the edge tried 8-bit
    (4.6 s, late). Paired with the last few frames (the same size: no pair), it is timed against the minimum
    no higher than its own lower bound."""
    est = LinkEstimator()
    on_wire = lambda nbytes, kbps: 80.0 + 8 * nbytes / kbps  # noqa: E731
    est.observe_probe(0.0, 266, on_wire(266, 3.96))
    for t in range(2, 20, 3):
        est.observe(float(t), 1_085, 0, network_ms=on_wire(1_085, 3.96), server_ms=0.0)
    assert est._slopes[-1][1] == pytest.approx(3.96e3)  # the first frame and the probe: a pair at one rate
    assert est.bandwidth_bps == pytest.approx(3.96e3)  # the others, timed against the probe's 617 ms, no higher
    est.observe(22.0, 1_085, 0, network_ms=on_wire(1_085, 8.6), server_ms=0.0)
    # not 8 x (1,085 - 266) / (1,089 - 617) ms = 13.9 kbit/s: its own lower bound, 8 x 1,085 / 1,089 ms
    assert est._rates[-1] == pytest.approx(8 * 1_085 / on_wire(1_085, 8.6) * 1e3)
    assert 7.9e3 < est.bandwidth_bps < 8.6e3


def test_split_points_at_the_frames_size_are_left_out_at_the_first_frame_before_any_choice():
    """A walk-through: 320x240 frames, a server taking at most 256 px, a slow link at first. The edge ran the
    cheapest point (H.264), and when the link allowed a native split point it said "the objective is met
    again: running split-8b..." and only then left it out; one such pair of lines per native point. Now
    every native point is checked at the first frame, before the policy runs."""
    import types

    from hnd.edge.adapt import Profile
    from hnd.edge.adapt_mode import AdaptiveMode
    from hnd.edge.capture import Frame
    from hnd.edge.modes import EdgeMode, EdgeOptions, Prepared
    from hnd.edge.records import Timings
    from hnd.proto.v1 import split_inference_pb2 as pb

    class Fake(EdgeMode):
        def check_server(self, info: pb.ModelInfo) -> None:
            if self.options.mode == "split":
                raise ValueError("resize 240/320 is beyond what the server accepts")

        def prepare(self, frame: Frame) -> Prepared:
            return Prepared(frame, Timings(), pb.InferRequest(), 10, 20)

    def split(id: str, nbytes: float, agreement: float) -> OperatingPoint:
        r = {"bits": 8, "granularity": "tensor", "coding": "intra", "resize": "native"}
        return OperatingPoint(id, "split", r, nbytes, nbytes, 10, 20, agreement)

    jpeg = OperatingPoint("jpeg", "offload", {"image_format": "jpeg", "quality": 75}, 500, 500, 10, 20, 0.9)
    said: list[str] = []
    mode = AdaptiveMode(
        EdgeOptions(max_inflight=1), Profile("p.json", "f", {}, [split("8b", 4_000, 0.98), split("4b", 1_000, 0.95), jpeg]),
        Objective(target_latency_ms=1_000), lambda o, *a: Fake(o), types.SimpleNamespace(), "f",
        say=said.append, clock=lambda: 0.0, probe=lambda: (1_000, 2_000.0),  # >= 4 kbit/s: nothing fits 1 s
    )  # fmt: skip
    mode.check_server(pb.ModelInfo())
    assert said == [] and len(mode.points) == 3  # native points wait for a frame's size
    prepared = mode.prepare(Frame(0, "f", np.zeros((240, 320, 3), np.uint8), 0, 0.0, 0.0))
    assert prepared.extra["operating_point"] == "jpeg" and [p.id for p in mode.points] == ["jpeg"]
    assert said[:2] == [
        "operating point 8b left out: resize 240/320 is beyond what the server accepts",
        "operating point 4b left out: resize 240/320 is beyond what the server accepts",
    ]
    assert len(said) == 3 and said[2].startswith("no operating point meets the objective") and "jpeg" in said[2]


def test_a_frame_is_priced_at_the_compute_scale_the_policy_chose_it_with():
    """A profile from a machine 10x slower: the edge has seen point a at a tenth of its profile's compute, so
    the policy prices point b, not seen yet, at a tenth too. The frame's expected compute (the in-flight bound)
    and its raw prediction (what the calibration measures achieved latency against) were priced at the
    profile's own figures, 10x what the policy chose with."""
    import types

    from hnd.edge.adapt import Profile
    from hnd.edge.adapt_mode import AdaptiveMode
    from hnd.edge.capture import Frame
    from hnd.edge.modes import EdgeMode, EdgeOptions, Prepared
    from hnd.edge.records import Timings
    from hnd.proto.v1 import split_inference_pb2 as pb

    class Fake(EdgeMode):
        def prepare(self, frame: Frame) -> Prepared:
            return Prepared(frame, Timings(), pb.InferRequest(), 10, 20)

    def jpeg(id: str, edge_ms: float, server_ms: float, agreement: float) -> OperatingPoint:
        r = {"image_format": "jpeg", "quality": 75}
        return OperatingPoint(id, "offload", r, 1_000, 1_000, edge_ms, server_ms, agreement)

    a, b = jpeg("a", 10.0, 90.0, 0.8), jpeg("b", 100.0, 900.0, 0.9)
    est = LinkEstimator(EstimatorParams(compute_min=3, compute_quantile=1.0))
    for t in range(3):  # 1 kB in 20 ms: the link is no bottleneck; a's compute 10 ms, its profile's 100
        est.observe(float(t), 1_000, 0, network_ms=20.0, server_ms=0.0, point="a", compute_ms=10.0)
    mode = AdaptiveMode(
        EdgeOptions(max_inflight=1), Profile("p.json", "f", {}, [a, b]), Objective(target_latency_ms=1_000),
        lambda o, *x: Fake(o), types.SimpleNamespace(), "f", estimator=est, clock=lambda: 3.0,
    )  # fmt: skip
    mode.check_server(pb.ModelInfo())
    prepared = mode.prepare(Frame(0, "f", np.zeros((8, 8, 3), np.uint8), 0, 0.0, 0.0))
    assert prepared.extra["operating_point"] == "b"
    _, _, compute, predicted = mode._sent[0]
    assert compute == pytest.approx(100.0)  # b's 1,000 profiled ms at a's scale, 0.1
    assert predicted == pytest.approx(
        predict(b, replace(calibrated([a, b], mode.link_estimate()), latency_bias_ms=0.0)).latency_ms
    )
    assert predicted < 1_000  # priced as chosen: b fits the target
