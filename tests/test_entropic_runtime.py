"""Entropic Student served over gRPC: negotiation, runtime == in-process round trip, hostile entropy payloads."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from hnd.common import codec, entropy_coder, wire
from hnd.common.checkpoint import fingerprint
from hnd.common.entropic import EntropyBottleneck
from hnd.common.split import prior_tables_of, split_model
from hnd.edge.client import EdgeError
from hnd.edge.modes import check_split_server
from hnd.edge.pipeline import to_tensor
from hnd.proto.v1 import split_inference_pb2 as pb
from hnd.proto.v1 import tensor_pb2
from hnd.server.service import BatchingOptions
from runtime_support import (
    assert_same_detections,
    client_for,
    expected_split,
    frames,
    run_edge,
    serving,
    write_images,
)

INFER = "/hnd.v1.SplitInference/Infer"
LEARNED = dict(bits=0, granularity="channel", compression="learned")


@pytest.fixture(scope="module")
def model(entropic_model):
    return entropic_model("faster_rcnn")


@pytest.fixture(scope="module")
def prior(model):
    return split_model(model)[0].prior_tables()


@pytest.fixture(scope="module")
def latent(model):
    head, _ = split_model(model)
    with torch.inference_mode():
        return head([to_tensor(frames(1)[0])])


@pytest.fixture(scope="module")
def good_request(model, prior, latent):
    y, meta = latent
    request = pb.InferRequest(request_id="good", weights_fingerprint=fingerprint(model))
    request.bottleneck.CopyFrom(wire.bottleneck_to_proto(codec.encode(y, **LEARNED, prior=prior), meta))
    return request


@pytest.fixture(scope="module")
def server(model):
    with serving(model, batching=BatchingOptions(max_batch=1, max_delay_ms=0, max_queue=4)) as s:
        yield s


def call_raw(server, payload: bytes, timeout: float = 60) -> grpc.RpcError | bytes:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        try:
            return channel.unary_unary(INFER)(payload, timeout=timeout)
        except grpc.RpcError as exc:
            return exc


def mutate(request: pb.InferRequest, change) -> bytes:
    bad = pb.InferRequest()
    bad.CopyFrom(request)
    change(bad)
    return bad.SerializeToString()


def test_model_info_offers_only_learned_coding(server, model):
    client = client_for(server)
    info = client.model_info()
    client.close()
    assert info.bottleneck_type == "entropic" and info.bottleneck_channels == 24
    assert list(info.accepted_bits) == [0]
    assert list(info.accepted_compressions) == [tensor_pb2.COMPRESSION_LEARNED]
    assert list(info.accepted_granularities) == [tensor_pb2.GRANULARITY_CHANNEL]
    assert info.weights_fingerprint == fingerprint(model)


def test_runtime_detections_equal_the_in_process_round_trip(server, model, prior):
    images = frames(3)
    client = client_for(server)
    summary, records, dets = run_edge(model, client, images, max_inflight=1, **LEARNED)
    client.close()
    assert summary.answered == 3 and summary.failed == 0
    for image, got in zip(images, dets):
        assert_same_detections(got, expected_split(model, image, **LEARNED, prior=prior))
    # The coded latent is what the model itself computes internally: round trip == model(x).
    with torch.inference_mode():
        direct = model([to_tensor(images[0])])
    assert_same_detections(
        expected_split(model, images[0], **LEARNED, prior=prior),
        [wire.detections_from_proto(wire.detections_to_proto(d)) for d in direct],
    )
    for r in records:
        assert 0 < r["bytes"]["payload"] < r["bytes"]["message"]


def _other_prior_stream(latent, seed: int = 7) -> bytes:
    torch.manual_seed(seed)
    eb = EntropyBottleneck(24)
    with torch.no_grad():
        eb.quantiles[:, 0, :] = torch.tensor([-4.0, 0.7, 6.0])
    eb.update()
    other = prior_tables_of(eb)
    return codec.encode(latent[0], **LEARNED, prior=other).payload


def _shape_lie(r: pb.InferRequest, dim: int, value: int) -> None:
    r.bottleneck.tensor.shape[dim] = value


CASES = {
    "garbage payload": lambda req, lat, prior: mutate(
        req,
        lambda r: setattr(
            r.bottleneck.tensor, "data", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
        ),
    ),
    "truncated payload": lambda req, lat, prior: mutate(
        req,
        lambda r: setattr(
            r.bottleneck.tensor,
            "data",
            r.bottleneck.tensor.data[: len(r.bottleneck.tensor.data) // 2 // 4 * 4] + r.bottleneck.tensor.data[-4:],
        ),
    ),
    "empty payload": lambda req, lat, prior: mutate(req, lambda r: setattr(r.bottleneck.tensor, "data", b"")),
    "trailing data": lambda req, lat, prior: mutate(
        req,
        lambda r: setattr(
            r.bottleneck.tensor,
            "data",
            r.bottleneck.tensor.data[:-4] + b"\x01\x02\x03\x04" * 4 + r.bottleneck.tensor.data[-4:],
        ),
    ),
    "stream of another shape": lambda req, lat, prior: mutate(
        req,
        lambda r: setattr(r.bottleneck.tensor, "data", codec.encode(lat[0][..., :-1], **LEARNED, prior=prior).payload),
    ),
    "stream of another model's prior": lambda req, lat, prior: mutate(
        req, lambda r: setattr(r.bottleneck.tensor, "data", _other_prior_stream(lat))
    ),
    "shape lies (width)": lambda req, lat, prior: mutate(
        req, lambda r: _shape_lie(r, 3, r.bottleneck.tensor.shape[3] + 8)
    ),
    "shape lies (huge)": lambda req, lat, prior: mutate(
        req, lambda r: (_shape_lie(r, 2, 1 << 30), setattr(r.bottleneck.tensor, "raw_size", 1 << 40))
    ),
    "raw_size lies": lambda req, lat, prior: mutate(req, lambda r: setattr(r.bottleneck.tensor, "raw_size", 12)),
    "bits with learned": lambda req, lat, prior: mutate(req, lambda r: setattr(r.bottleneck.tensor, "bits", 8)),
    "8-bit affine to an Entropic Student": lambda req, lat, prior: mutate(
        req, lambda r: r.bottleneck.tensor.CopyFrom(wire.tensor_to_proto(codec.encode(lat[0], 8)))
    ),
    "scale smuggled in": lambda req, lat, prior: mutate(req, lambda r: r.bottleneck.tensor.scale.append(1.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_entropy_payloads_get_invalid_argument_and_the_next_request_succeeds(
    server, good_request, latent, prior, case
):
    result = call_raw(server, CASES[case](good_request, latent, prior))
    assert isinstance(result, grpc.RpcError), f"{case} was accepted"
    assert result.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, result.details())
    assert "Traceback" not in (result.details() or "")
    if case == "8-bit affine to an Entropic Student":
        assert "takes only learned entropy coding" in result.details()
    reply = call_raw(server, good_request.SerializeToString())
    assert isinstance(reply, bytes), reply
    assert pb.InferResponse.FromString(reply).request_id == "good"


def test_hnd_server_refuses_learned_coding_with_one_line(tiny_model, latent, prior):
    hnd = tiny_model("faster_rcnn")
    y, y_meta = latent
    request = pb.InferRequest(request_id="x", weights_fingerprint=fingerprint(hnd))
    request.bottleneck.CopyFrom(wire.bottleneck_to_proto(codec.encode(y, **LEARNED, prior=prior), y_meta))
    with serving(hnd) as s:
        result = call_raw(s, request.SerializeToString())
        assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "HND student" in result.details() and "learned entropy coding" in result.details()
        client = client_for(s)
        info = client.model_info()
        client.close()
    assert info.bottleneck_type == "hnd" and 0 not in info.accepted_bits
    assert tensor_pb2.COMPRESSION_LEARNED not in info.accepted_compressions


def test_edge_negotiation_gives_one_line(server, model):
    client = client_for(server)
    info = client.model_info()
    client.close()
    fp = fingerprint(model)
    check_split_server(info, fp, codec.CodecSettings.learned_coding(), None)
    with pytest.raises(EdgeError, match="is an Entropic Student: it takes only learned entropy coding"):
        check_split_server(info, fp, codec.CodecSettings(8, "tensor", "zstd"), None)
    hnd_info = pb.ModelInfo()
    hnd_info.CopyFrom(info)
    hnd_info.ClearField("accepted_compressions")
    hnd_info.accepted_compressions.append(tensor_pb2.COMPRESSION_ZSTD)
    with pytest.raises(EdgeError, match="is an HND student: it takes no learned entropy coding"):
        check_split_server(hnd_info, fp, codec.CodecSettings.learned_coding(), None)


def test_codec_mode_errors_are_clear(prior, latent):
    y = latent[0]
    with pytest.raises(codec.CodecError, match="needs the Entropic Student's prior"):
        codec.encode(y, **LEARNED)
    with pytest.raises(codec.CodecError, match="bits=0"):
        codec.encode(y, bits=8, granularity="channel", compression="learned", prior=prior)
    encoded = codec.encode(y, **LEARNED, prior=prior)
    with pytest.raises(codec.CodecError, match="not an Entropic Student"):
        codec.decode(encoded)
    back = codec.decode(encoded, prior=prior)
    assert np.array_equal(back, codec.roundtrip(y, **LEARNED, prior=prior)) and isinstance(back, np.ndarray)
    assert encoded.raw_size == 4 * y.numel() and len(encoded.payload) < y.numel()
    assert isinstance(prior, entropy_coder.PriorTables)


def test_rate_bench_codes_entropic_students_with_their_prior(model, tmp_path):
    """hnd-bench --rate-accuracy: an Entropic Student's one split setting is its learned coding, which
    changes nothing the model would not do itself (agreement with local exactly 1)."""
    from hnd.bench import cli
    from hnd.bench.rate import rate_settings, run_sweep

    images = frames(3, sizes=((96, 128),))
    settings = rate_settings([0], ["tensor"], ["intra", "temporal"], ["native"], [75], [], [], [])
    assert [s.name for s in settings] == ["local, native", "learned entropy coding, native", "JPEG q75"]
    rows = {r.name: r for r in run_sweep(model, images, settings, score=0.0)}
    learned = rows["learned entropy coding, native"]
    assert learned.f1 == 1.0 and learned.bytes_per_frame > 0
    folder = write_images(tmp_path / "frames", images, "{i}.png")
    rate = ["--rate-accuracy", "--config", "test/faster_rcnn-entropic-b24ch", "--images", str(folder)]
    out = tmp_path / "ra"
    assert (
        cli.main(
            [
                *rate,
                "--frames",
                "2",
                "--jpeg-quality",
                "75",
                "--webp-quality",
                "",
                "--crf",
                "",
                "--hevc-crf",
                "",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    import json

    names = [r["name"] for r in json.loads((out / "rate_accuracy.json").read_text())["rows"]]
    assert names[:2] == ["local, native", "learned entropy coding, native"]
    assert cli.main([*rate, "--bits", "8", "--out", str(out)]) == 2
