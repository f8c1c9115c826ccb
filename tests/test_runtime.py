"""hnd-server + hnd-edge on loopback: exactness, streaming, pipelining, batching, offload, local."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import generate_latest
from runtime_support import assert_same_detections, client_for, expected_split, frames, run_edge, serving

from hnd.common import wire
from hnd.edge.pipeline import to_tensor
from hnd.server.service import BatchingOptions

KINDS = ("faster_rcnn", "mask_rcnn", "keypoint_rcnn")


@pytest.mark.parametrize("kind", KINDS)
def test_edge_receives_exactly_the_in_process_round_trip(tiny_model, kind):
    model = tiny_model(kind)
    images = frames(3)
    with serving(model) as server:
        client = client_for(server)
        summary, records, dets = run_edge(model, client, images, max_inflight=1)
        client.close()
    assert summary.answered == 3 and summary.failed == 0
    for image, got in zip(images, dets):
        want = expected_split(model, image, bits=8, granularity="tensor")
        assert want[0]["scores"].size > 0  # a comparison of empty results would prove nothing
        assert_same_detections(want, got)
    for r in records:
        assert r["bytes"]["payload"] > 0 and r["bytes"]["message"] > r["bytes"]["payload"]
        assert set(r["ms"]) >= {"capture", "preprocess", "head", "encode", "network_server", "total"}
        assert r["ms"]["network_server"] >= r["server_ms"]["compute"]


@pytest.mark.parametrize("bits,granularity", [(4, "channel"), (2, "tensor"), (8, "original"), (32, "tensor")])
def test_every_codec_setting_matches_its_round_trip(tiny_model, bits, granularity):
    model = tiny_model("faster_rcnn")
    images = frames(1)
    with serving(model) as server:
        client = client_for(server)
        _, _, dets = run_edge(model, client, images, bits=bits, granularity=granularity, compression="zstd")
        client.close()
    assert_same_detections(expected_split(model, images[0], bits=bits, granularity=granularity), dets[0])


def test_stream_and_unary_give_the_same_results_in_frame_order(tiny_model):
    model = tiny_model("faster_rcnn")
    images = frames(6)
    with serving(model) as server:
        client = client_for(server)
        _, unary_records, unary = run_edge(model, client, images, max_inflight=3)
        _, stream_records, stream = run_edge(model, client, images, max_inflight=3, stream=True)
        client.close()
    assert [r["frame"] for r in unary_records] == list(range(6))
    assert [r["frame"] for r in stream_records] == list(range(6))
    for a, b in zip(unary, stream):
        assert_same_detections(a, b)


def test_same_shape_requests_are_batched(tiny_model):
    model = tiny_model("faster_rcnn")
    images = frames(4, sizes=((120, 150),))  # one shape: all may share a batch
    with serving(model, batching=BatchingOptions(max_batch=4, max_delay_ms=300, max_queue=16)) as server:
        client = client_for(server)
        _, records, dets = run_edge(model, client, images, max_inflight=4)
        client.close()
        text = generate_latest(server.service.metrics.registry).decode()
    assert max(r["batch_size"] for r in records) > 1
    assert "hnd_batch_size_count" in text
    for image, got in zip(images, dets):  # batched convolutions may round differently; values agree closely
        want = expected_split(model, image)
        torch.testing.assert_close(got[0]["boxes"], want[0]["boxes"], rtol=1e-3, atol=1e-2)


def test_offload_png_equals_the_full_model(tiny_model):
    model = tiny_model("mask_rcnn")
    images = frames(2)
    with serving(model) as server:
        client = client_for(server)
        summary, records, dets = run_edge(model, client, images, mode="offload", image_format="png")
        client.close()
    assert summary.answered == 2
    for image, got, record in zip(images, dets, records):
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        assert record["bytes"]["payload"] > 0
        with torch.inference_mode():
            want = model([to_tensor(image)])
        assert_same_detections([wire.detections_from_proto(wire.detections_to_proto(d)) for d in want], got)


def test_local_mode_runs_the_whole_model_without_a_server(tiny_model):
    model = tiny_model("faster_rcnn")
    images = frames(2)
    summary, records, dets = run_edge(model, None, images, mode="local")
    assert summary.answered == 2
    with torch.inference_mode():
        want = model([to_tensor(images[0])])
    assert np.array_equal(want[0]["boxes"].numpy(), dets[0][0]["boxes"])
    assert records[0]["bytes"]["payload"] == 0


def test_metrics_count_requests_and_bytes(tiny_model):
    model = tiny_model("faster_rcnn")
    with serving(model) as server:
        client = client_for(server)
        _, records, _ = run_edge(model, client, frames(2))
        client.close()
        text = generate_latest(server.service.metrics.registry).decode()
    assert 'hnd_requests_total{code="OK",method="Infer"} 2.0' in text
    sent = sum(r["bytes"]["message"] for r in records)
    assert f"hnd_request_bytes_total {float(sent)}" in text
    assert 'hnd_stage_seconds_count{stage="compute"} 2.0' in text


def test_pipelining_overlaps_head_and_server(tiny_model):
    """With K=2 the edge prepares frame i+1 while frame i is on the server: requests overlap in time."""
    model = tiny_model("faster_rcnn")
    images = frames(4, sizes=((200, 200),))
    with serving(model) as server:
        client = client_for(server)
        _, records, _ = run_edge(model, client, images, max_inflight=2)
        client.close()
    assert max(r["server_ms"]["queue"] for r in records[1:]) > 0 or any(
        r["ms"]["network_server"] > r["server_ms"]["compute"] for r in records
    )
    assert np.all(np.diff([r["frame"] for r in records]) == 1)
