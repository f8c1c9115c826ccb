"""hnd-bench: the link model by hand, agreement and crossovers on toy data, and one --quick run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hnd.bench.agreement import match_f1
from hnd.bench.cli import main
from hnd.bench.frames import scale_boxes
from hnd.bench.plan import BenchOptions, split_settings
from hnd.bench.run import run_bench
from hnd.bench.linkmodel import Link, crossovers, link_latency_ms, parse_links, transfer_ms
from hnd.common.codec import CodecSettings
from hnd.edge.pipeline import EdgeOptions
from hnd.edge.records import FrameRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- link model ------------------------------------------------------------------------------------


def test_link_model_matches_a_hand_computed_case():
    lte = Link("lte", mbit=10.0, rtt_ms=40.0)
    # 126,250 B * 8 = 1,010,000 bits at 10,000 bits/ms = 101 ms on the wire.
    assert transfer_ms(125_000 + 1_250, 10.0) == pytest.approx(101.0)
    # 10 edge + 101 transfer + 40 RTT + 1 loopback + 100 server.
    assert link_latency_ms(10.0, 125_000, 1_250, server_ms=100.0, loopback_ms=1.0, link=lte) == pytest.approx(252.0)
    assert transfer_ms(1_000_000, 8.0) == pytest.approx(1000.0)  # 1 MB at 8 Mbit/s: one second


def test_parse_links_units_and_errors():
    links = parse_links("wifi=50mbit/5ms, 3g=800kbit/0.1s,lan=1gbit/200us")
    assert links == [Link("wifi", 50.0, 5.0), Link("3g", 0.8, 100.0), Link("lan", 1000.0, 0.2)]
    for bad in ("wifi", "wifi=50/5ms", "wifi=50mbit", "a=1mbit/1ms,a=2mbit/1ms", "z=0mbit/1ms"):
        with pytest.raises(ValueError):
            parse_links(bad)


def test_crossover_of_two_lines_is_where_they_meet():
    # a = 100 + 800/b, b = 300 + 80/b (ms, b in Mbit/s): equal at b = 720 / 200 = 3.6 Mbit/s.
    mbits = np.geomspace(0.1, 100, 4000)
    found = crossovers({"a": 100 + 800 / mbits, "b": 300 + 80 / mbits}, mbits)
    assert len(found) == 1
    assert found[0]["mbit"] == pytest.approx(3.6, rel=1e-3)
    assert found[0]["faster_above"] == "a"


# --- agreement and settings ------------------------------------------------------------------------


def _dets(boxes, labels, scores):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "scores": torch.tensor(scores),
    }


def test_match_f1():
    ref = _dets([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 2], [0.9, 0.8])
    assert match_f1(ref, ref) == 1.0
    one = _dets([[0, 0, 10, 11]], [1], [0.9])  # IoU 10/11 with the first box
    assert match_f1(ref, one) == pytest.approx(2 * 1 / 3)
    wrong_label = _dets([[0, 0, 10, 10]], [5], [0.9])
    assert match_f1(ref, wrong_label) == 0.0
    low = _dets([[0, 0, 10, 10]], [1], [0.3])  # below the 0.5 score cut: nothing predicted
    assert match_f1(ref, low) == 0.0
    assert match_f1(_dets([], [], []), low) == 1.0  # nothing on either side above the cut
    scaled = scale_boxes(_dets([[0, 0, 20, 40]], [1], [0.9]), from_hw=(40, 20), to_hw=(20, 10))
    assert scaled["boxes"].tolist() == [[0, 0, 10, 20]]


def test_default_split_settings_are_tensor_everywhere_plus_channel_at_8():
    names = [s.name for s in split_settings([2, 4, 8, 16], None, EdgeOptions())]
    assert names == ["2-bit tensor", "4-bit tensor", "8-bit tensor", "8-bit channel", "float16"]
    crossed = [s.name for s in split_settings([4, 16], ["tensor", "channel"], EdgeOptions())]
    assert crossed == ["4-bit tensor", "4-bit channel", "float16"]


def test_cli_refuses_a_bad_link_before_building_anything(tmp_path, capsys):
    assert main(["--quick", "--links", "wifi=fast", "--out", str(tmp_path)]) == 2
    assert "bad link" in capsys.readouterr().err
    # --bits is read like --rate-accuracy's lists: a value that is not a number is one line, not a traceback.
    assert main(["--quick", "--bits", "x,4", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "hnd-bench: error: --bits: expected comma-separated ints, got 'x,4'"


# --- one --quick run -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    returned = run_bench(BenchOptions(quick=True, out=str(out), progress=False))
    return out, returned, json.loads((out / "results.json").read_text())


def test_quick_writes_every_mode_and_link(quick):
    out, returned, data = quick
    assert data["run"]["settings"] == returned["run"]["settings"]
    modes = {r["mode"] for r in data["results"]}
    assert modes == {"split", "offload", "local"}
    settings = [(r["mode"], r["setting"]) for r in data["results"]]
    assert ("split", "8-bit tensor") in settings and ("split", "4-bit tensor") in settings
    for fmt in ("jpeg q75", "jpeg q95", "png"):
        for size in ("original", "resized"):
            assert ("offload", f"{fmt} {size}") in settings
    links = [link["name"] for link in data["run"]["links"]]
    assert links == ["wifi"]  # --quick keeps the first link
    for r in data["results"]:
        assert set(r["latency_ms"]) == set(links)
        assert len(r["frames"]) == 2
    assert data["run"]["random_weights"] is True
    md = (out / "results.md").read_text()
    assert "Random weights" in md and "not meaningful" in md and "seeded random weights" in md
    assert data["machine"]["cores"] >= 1 and data["machine"]["torch"] == torch.__version__


def test_quick_split_bytes_are_the_edge_records(quick):
    _, _, data = quick
    for r in data["results"]:
        if r["mode"] == "local":
            continue
        records = data["records"][f"{r['mode']}: {r['setting']}"]
        assert [rec["status"] for rec in records] == ["OK", "OK"]
        sent = [rec["bytes"]["message"] for rec in records]
        assert [f["request_bytes"] for f in r["frames"]] == sent
        assert [f["payload_bytes"] for f in r["frames"]] == [rec["bytes"]["payload"] for rec in records]
        assert [f["response_bytes"] for f in r["frames"]] == [rec["bytes"]["response"] for rec in records]
        assert r["request_bytes"]["mean"] == pytest.approx(np.mean(sent))
        assert r["request_bytes"]["p50"] == pytest.approx(np.median(sent))
        raw = sum(f["raw_bytes"] for f in r["frames"])
        assert r["compression_ratio"] == pytest.approx(raw / sum(sent))
    by = {(r["mode"], r["setting"]): r for r in data["results"]}
    # Fewer bits, fewer bytes; the bottleneck message is more than its payload (shape, meta, parameters).
    assert by["split", "4-bit tensor"]["request_bytes"]["mean"] < by["split", "8-bit tensor"]["request_bytes"]["mean"]
    for f in by["split", "8-bit tensor"]["frames"]:
        assert f["request_bytes"] > f["payload_bytes"] > 0


def test_quick_split_payload_is_what_the_codec_gives_for_the_head(quick):
    """Recompute one split payload outside the runtime: head + codec.encode give the byte count the edge sent."""
    from hnd.common import codec
    from hnd.common.config import load_config
    from hnd.common.build import build_model_from_config
    from hnd.common.split import split_model
    from hnd.edge.capture import sample_images
    from hnd.edge.pipeline import to_tensor

    out, _, data = quick
    cfg = load_config(out / "bench-config.yaml")
    head, _ = split_model(build_model_from_config(cfg.model, cfg.path))
    image = sample_images()[0][0]
    previous = torch.get_num_threads()
    torch.set_num_threads(data["run"]["threads"])  # same thread count as the edge: same float rounding
    try:
        with torch.inference_mode():
            batch, _ = head.preprocess([to_tensor(image)])
            encoded = codec.encode(head.encode(batch), 8, "tensor", cfg.runtime.compression, cfg.runtime.level)
    finally:
        torch.set_num_threads(previous)
    assert data["records"]["split: 8-bit tensor"][0]["bytes"]["payload"] == len(encoded.payload)


def test_quick_latency_is_the_link_model_of_the_samples(quick):
    _, _, data = quick
    link = Link(**data["run"]["links"][0])
    for r in data["results"]:
        per_frame = [
            f["edge_ms"]
            if r["mode"] == "local"
            else link_latency_ms(
                f["edge_ms"], f["request_bytes"], f["response_bytes"], f["server_ms"], f["loopback_ms"], link
            )
            for f in r["frames"]
        ]
        assert r["latency_ms"][link.name]["p50"] == pytest.approx(np.median(per_frame))
        if r["mode"] != "local":
            for f in r["frames"]:  # the measured loopback run: edge, then the wire and the server
                assert f["server_ms_raw"] >= f["server_compute_ms_raw"] > 0 and f["loopback_ms"] >= 0


def test_quick_pooled_compute_keeps_per_setting_costs(quick):
    """Pooling swaps only the network's compute for the mode's per-frame median; codec costs stay per setting."""
    _, _, data = quick
    for mode in ("split", "offload"):
        rows = [r for r in data["results"] if r["mode"] == mode]
        for i in range(2):
            frames = [r["frames"][i] for r in rows]
            tail = np.median([f["server_compute_ms_raw"] for f in frames])
            head = np.median([f["edge_model_ms_raw"] for f in frames])
            for f in frames:
                assert f["server_ms"] == pytest.approx(f["server_ms_raw"] - f["server_compute_ms_raw"] + tail)
                assert f["edge_ms"] == pytest.approx(f["edge_ms_raw"] - f["edge_model_ms_raw"] + head)


def test_quick_agreement_reference_and_lossless_offload(quick):
    _, _, data = quick
    by = {(r["mode"], r["setting"]): r for r in data["results"]}
    assert min(data["run"]["reference_detections"]) > 0  # F1 over no boxes would prove nothing
    assert by["local", "whole model on the edge"]["agreement_f1"] == 1.0  # the reference against itself
    # PNG is lossless and the server runs the same model on the same pixels: the same detections.
    assert by["offload", "png original"]["agreement_f1"] == 1.0
    for r in data["results"]:
        assert 0.0 <= r["agreement_f1"] <= 1.0


def test_quick_plots_exist(quick):
    out, _, _ = quick
    for name in ("bytes_per_frame.png", "latency_vs_bandwidth.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and 5_000 < len(data) < 200_000


# --- the neural filter: records, pooling, and one --quick run on mixed frames ----------------------


def _filtered_record(**ms):
    """A record of a frame the edge's filter dropped, as hnd.edge.pipeline writes it."""
    return {
        "frame": 0,
        "source": "f.jpg",
        "status": "OK",
        "mode": "split",
        "filtered": True,
        "filter_probability": 0.002,
        "bytes": {"payload": 0, "message": 0},
        "detections": [{"count": 0}],
        "ms": {"capture": 0.0, "preprocess": 2.0, "head": 5.0, "filter": 1.5, "total": 9.0, **ms},
    }


def test_sample_from_a_filtered_record_costs_its_edge_time_and_nothing_on_the_link():
    from hnd.bench.measure import sample_from_record

    s = sample_from_record(FrameRecord.from_dict(_filtered_record()), frame=0, raw_bytes=300, extra_edge_ms=0.0)
    assert (s.request_bytes, s.payload_bytes, s.response_bytes) == (0, 0, 0)
    assert (s.server_ms, s.server_compute_ms_raw, s.loopback_ms) == (0.0, 0.0, 0.0)
    assert s.filtered is True and s.filter_probability == 0.002
    assert s.edge_ms_raw == pytest.approx(2.0 + 5.0 + 1.5)  # preprocess + stem + filter
    for link in (Link("3g", 1.0, 100.0), Link("wifi", 50.0, 5.0)):
        assert s.latency_ms(link, local=False) == pytest.approx(8.5)  # no RTT, no transfer
    sent = dict(
        _filtered_record(encode=0.5, network_server=40.0),
        filtered=False,
        bytes={"payload": 900, "message": 1000, "response": 200},
        server_ms={"decode": 1.0, "queue": 0.0, "compute": 30.0, "encode": 1.0},
    )
    sent["ms"]["head"] = 9.0
    s = sample_from_record(FrameRecord.from_dict(sent), frame=0, raw_bytes=300, extra_edge_ms=0.0)
    assert s.edge_ms_raw == pytest.approx(2.0 + 9.0 + 1.5 + 0.5) and s.loopback_ms == pytest.approx(8.0)
    lte = Link("lte", 10.0, 40.0)
    assert s.latency_ms(lte, local=False) == pytest.approx(13.0 + 0.96 + 40.0 + 8.0 + 32.0)


def test_pooling_keeps_dropped_frames_free_of_server_time():
    from hnd.bench.measure import Sample, pool_compute
    from hnd.bench.plan import Setting

    def sample(head, filt, compute, filtered):
        return Sample(
            frame=0,
            source="f",
            raw_bytes=1,
            request_bytes=0 if filtered else 10,
            payload_bytes=0,
            response_bytes=0,
            edge_ms_raw=1.0 + head + filt,
            edge_model_ms_raw=head,
            server_ms_raw=0.0 if filtered else compute + 2.0,
            server_compute_ms_raw=compute,
            loopback_ms=0.0,
            measured_total_ms=0.0,
            filtered=filtered,
            filter_ms_raw=filt,
        )

    plain = [Setting("split", f"{b}-bit tensor", EdgeOptions(codec=CodecSettings(bits=b))) for b in (8, 4)]
    settings = plain + [
        Setting("split", s.name + ", with filter", EdgeOptions(codec=s.options.codec, filter_threshold=0.5))
        for s in plain
    ]
    samples = {
        settings[0].key: [sample(10.0, 0.0, 100.0, None)],
        settings[1].key: [sample(14.0, 0.0, 120.0, None)],
        settings[2].key: [sample(3.0, 1.0, 0.0, True)],
        settings[3].key: [sample(5.0, 3.0, 0.0, True)],
    }
    pool_compute(settings, samples)
    assert [samples[s.key][0].edge_ms for s in plain] == [1.0 + 12.0, 1.0 + 12.0]  # median head of the sent runs
    assert [samples[s.key][0].server_ms for s in plain] == [112.0, 112.0]
    for s in settings[2:]:  # median stem + median filter of the dropped runs, and no server
        assert samples[s.key][0].edge_ms == 1.0 + 4.0 + 2.0 and samples[s.key][0].server_ms == 0.0


MIXED = 2  # one frame with objects, one empty scene: the filter drops one of them
HALF = MIXED // 2


@pytest.fixture(scope="module")
def quick_filter(tmp_path_factory):
    """--quick on the tiny keypoint student with its (random) filter, MIXED mixed frames, threshold at their median."""
    from hnd.bench.frames import mixed_frames
    from hnd.common.config import load_config
    from hnd.common.build import build_model_from_config
    from hnd.common.split import split_model
    from hnd.edge.pipeline import to_tensor

    from hnd.train.synthetic import write_config

    # test/keypoint_rcnn-b3ch-filter with 4 detections per image, as test/keypoint_rcnn-b3ch: the keypoint
    # head (8 convs of 512 channels per detection) is most of each of the bench's forwards.
    folder = tmp_path_factory.mktemp("config")
    config = str(
        write_config(
            "test/keypoint_rcnn-b3ch-filter",
            folder,
            folder / "filter.yaml",
            model={"params": {"box_detections_per_img": 4}},
        )
    )
    cfg = load_config(config)
    assert cfg.model.params["box_detections_per_img"] == 4 and cfg.model.filter is not None
    head, _ = split_model(build_model_from_config(cfg.model, cfg.path))
    frames, _, labels = mixed_frames(MIXED, cfg.model.kind, tmp_path_factory.mktemp("frames"))
    assert sorted(labels) == [False] * HALF + [True] * HALF  # half of them empty scenes
    with torch.inference_mode():
        probs = [float(head.filter_probability(head.stem(head.preprocess([to_tensor(f)])[0]))[0]) for f in frames]
    ordered = sorted(probs)
    threshold = (ordered[HALF - 1] + ordered[HALF]) / 2  # half of the frames below it, half above
    assert ordered[HALF - 1] < threshold < ordered[HALF]
    out = tmp_path_factory.mktemp("bench-filter")
    run_bench(
        BenchOptions(quick=True, config=config, mixed=MIXED, filter_threshold=threshold, out=str(out), progress=False)
    )
    return out, json.loads((out / "results.json").read_text()), probs, threshold


def test_quick_filter_rows_sit_next_to_the_plain_split_rows(quick_filter):
    out, data, probs, threshold = quick_filter
    by = {(r["mode"], r["setting"]): r for r in data["results"]}
    plain = [r for r in data["results"] if r["mode"] == "split" and r["filter"] is None]
    filtered = [r for r in data["results"] if r["filter"] is not None]
    assert [r["setting"] for r in filtered] == [r["setting"] + ", with filter" for r in plain]
    assert {"8-bit tensor, with filter", "4-bit tensor, with filter"} <= {r["setting"] for r in filtered}
    assert data["run"]["filter"]["threshold"] == threshold and data["run"]["filter"]["trained"] is False
    assert [f["objects"] for f in data["run"]["frames"]].count(True) == HALF
    dropped = [p < threshold for p in probs]
    for r in filtered:
        assert r["filter"]["probability"] == pytest.approx(probs, abs=1e-4)
        assert [f["filtered"] for f in r["frames"]] == dropped
        assert (r["frames_sent"], r["frames_filtered"], r["filter"]["sent"], r["filter"]["filtered"]) == (
            HALF,
            HALF,
            HALF,
            HALF,
        )
        assert r["filter"]["with_objects"]["filtered"] + r["filter"]["empty"]["filtered"] == HALF
    for r in plain:  # without the filter every frame went to the server
        assert (r["frames_sent"], r["frames_filtered"]) == (MIXED, 0)
        assert all(f["filtered"] is None for f in r["frames"])
        assert by["split", r["setting"] + ", with filter"]["frames_total"] == r["frames_total"] == MIXED
    md = (out / "results.md").read_text()
    assert "## With the neural filter" in md and "8-bit tensor, with filter" in md
    assert "random weights: which frames it drops says nothing" in md


def test_quick_filter_bytes_are_zero_for_dropped_frames_and_averaged_over_all(quick_filter):
    _, data, _, _ = quick_filter
    for r in data["results"]:
        if r["mode"] == "local":
            continue
        records = data["records"][f"{r['mode']}: {r['setting']}"]
        sent = [rec for rec in records if not rec.get("filtered")]
        for rec, f in zip(records, r["frames"]):
            if rec.get("filtered"):
                assert rec["bytes"] == {"payload": 0, "message": 0} and "server_ms" not in rec
                assert (f["request_bytes"], f["payload_bytes"], f["response_bytes"]) == (0, 0, 0)
                assert f["server_ms"] == f["server_ms_raw"] == 0.0
        # Over ALL frames: what the link carries on average. Over sent frames only: what one request costs.
        assert r["payload_bytes"]["mean"] == pytest.approx(sum(rec["bytes"]["payload"] for rec in sent) / MIXED)
        assert r["request_bytes"]["mean"] == pytest.approx(sum(rec["bytes"]["message"] for rec in sent) / MIXED)
        assert r["sent_only"]["frames"] == len(sent)
        assert r["sent_only"]["payload_bytes"]["mean"] == pytest.approx(np.mean([x["bytes"]["payload"] for x in sent]))
    by = {(r["mode"], r["setting"]): r for r in data["results"]}
    for bits in ("8-bit tensor", "4-bit tensor"):
        plain, filtered = by["split", bits], by["split", bits + ", with filter"]
        # The frames that are sent are encoded the same way with or without the filter.
        kept = [not f["filtered"] for f in filtered["frames"]]
        assert [f["payload_bytes"] for f in filtered["frames"] if not f["filtered"]] == [
            f["payload_bytes"] for f, k in zip(plain["frames"], kept) if k
        ]
        assert filtered["payload_bytes"]["mean"] < plain["payload_bytes"]["mean"]


def test_quick_filter_server_answered_only_the_sent_frames(quick_filter):
    _, data, _, _ = quick_filter
    for r in data["results"]:
        if r["mode"] == "local":
            assert r["server_requests"] == 0
        else:  # the server's own count (hnd_requests_total), read around each run
            assert r["server_requests"] == r["frames_sent"]
    assert sum(r["server_requests"] for r in data["results"] if r["filter"]) == HALF * sum(
        1 for r in data["results"] if r["filter"]
    )


def test_quick_filter_latency_of_a_dropped_frame_is_its_edge_time(quick_filter):
    _, data, _, _ = quick_filter
    link = Link(**data["run"]["links"][0])
    for r in (r for r in data["results"] if r["filter"]):
        per_frame, per_sent = [], []
        records = data["records"][f"split: {r['setting']}"]
        for f, rec in zip(r["frames"], records):
            if f["filtered"]:
                ms = rec["ms"]
                assert "encode" not in ms and "network_server" not in ms and ms["filter"] > 0
                assert f["edge_ms_raw"] == pytest.approx(ms["preprocess"] + ms["head"] + ms["filter"])
                per_frame.append(f["edge_ms"])
            else:
                lat = link_latency_ms(
                    f["edge_ms"], f["request_bytes"], f["response_bytes"], f["server_ms"], f["loopback_ms"], link
                )
                per_frame.append(lat)
                per_sent.append(lat)
        assert r["latency_ms"][link.name]["p50"] == pytest.approx(np.median(per_frame))
        assert r["latency_ms"][link.name]["p95"] == pytest.approx(np.percentile(per_frame, 95))
        assert r["sent_only"]["latency_ms"][link.name]["p50"] == pytest.approx(np.median(per_sent))
        assert r["filter"]["filtered_edge_ms"]["p50"] < r["sent_only"]["latency_ms"][link.name]["p50"]


def test_bench_filter_options_are_checked(tmp_path, capsys):
    assert main(["--quick", "--filter-threshold", "0.5", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "no neural filter" in capsys.readouterr().err  # test/faster_rcnn-b3ch has none
    assert main(["--quick", "--mixed", "4", "--frames", "2", "--out", str(tmp_path)]) == 2
    assert (
        main(
            [
                "--quick",
                "--config",
                "test/keypoint_rcnn-b3ch-filter",
                "--filter-threshold",
                "1.5",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    with pytest.raises(SystemExit):
        main(["--quick", "--filter-threshold", "0.5", "--no-filter"])
