"""hnd-bench --rate-accuracy on a tiny model and a short synthetic annotated video."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hnd.bench import cli
from hnd.bench.rate import model_at, rate_settings, run_sweep
from hnd.common.video import available_formats
from hnd.train.synthetic_video import make_synthetic_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_synthetic_video(tmp_path_factory.mktemp("clip"), frames=4, size=(96, 64), noise=1.0, seed=2)


def test_sweep_rows_bytes_and_agreement(tiny_model, clip):
    from PIL import Image

    model = tiny_model("faster_rcnn")
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(clip["images"].iterdir())]
    settings = rate_settings([4], ["tensor"], ["intra", "temporal"], ["native"], [75], [80], [23], [])
    rows = {r.name: r for r in run_sweep(model, frames, settings, key_interval=30, max_clamped=1.0, score=0.0)}
    assert rows["local, native"].f1 == 1.0 and rows["local, native"].bytes_per_frame == 0
    intra, temporal = rows["4-bit tensor, intra, native"], rows["4-bit tensor, temporal, native"]
    assert temporal.bytes_first == intra.bytes_first  # the key frame is an intra frame
    assert temporal.bytes_rest_mean < intra.bytes_rest_mean  # deltas are smaller
    assert temporal.key_frames == 1 and temporal.clamp_keys == 0
    h264 = rows["H.264 crf 23"]
    assert h264.key_frames == 1 and h264.bytes_rest_mean < h264.bytes_first
    assert {"JPEG q75", "WebP q80"} <= set(rows)
    for r in rows.values():
        assert 0.0 <= r.f1 <= 1.0


def test_native_size_model_shares_weights(tiny_model):
    model = tiny_model("faster_rcnn")
    native = model_at(model, "native", (64, 96))
    assert native.transform.min_size == (64,) and native.transform.max_size == 96
    assert model.transform.min_size == (160,)  # the original is untouched
    assert native.backbone is model.backbone
    x = torch.rand(3, 64, 96)
    with torch.inference_mode():
        images, _ = native.transform([x])
    assert tuple(images.tensors.shape[-2:]) == (64, 96)  # no upscaling (96 is a multiple of 32)


def test_cli_writes_outputs_with_map(clip, tmp_path, capsys):
    out = tmp_path / "ra"
    rc = cli.main(
        [
            "--rate-accuracy",
            "--config",
            "test/faster_rcnn-b3ch",
            "--video",
            str(clip["video"]),
            "--annotations",
            str(clip["annotations"]),
            "--frames",
            "3",
            "--bits",
            "8",
            "--coding",
            "temporal",
            "--jpeg-quality",
            "75",
            "--webp-quality",
            "",
            "--crf",
            "28",
            "--hevc-crf",
            "",
            "--preset",
            "ultrafast",
            "--out",
            str(out),
            "--profile-out",
            str(tmp_path / "points.json"),
        ]
    )
    assert rc == 0
    data = json.loads((out / "rate_accuracy.json").read_text())
    names = [r["name"] for r in data["rows"]]
    assert names == ["local, native", "8-bit tensor, temporal, native", "JPEG q75"] + (
        ["H.264 crf 28"] if "h264" in available_formats() else []
    )
    assert all(r["map50_95"] is not None for r in data["rows"])
    assert (out / "rate_accuracy.png").stat().st_size > 0
    assert "| setting | bytes/frame |" in (out / "rate_accuracy.md").read_text()
    check_profile(tmp_path / "points.json", data)


def check_profile(path, data):
    """The operating points of the run above: one per row, tied to the weights, times and bytes measured."""
    from hnd.common.checkpoint import fingerprint
    from hnd.common.build import build_model_from_config
    from hnd.common.config import load_config
    from hnd.edge.adapt import ProfileError, load_profile

    cfg = load_config("test/faster_rcnn-b3ch")
    fp = fingerprint(build_model_from_config(cfg.model, cfg.path))
    raw = json.loads(path.read_text())
    assert raw["model"]["fingerprint"] == fp and raw["machine"]["cores"] and raw["measured"]["frames"] == 3
    points = {p["id"]: p for p in raw["points"]}
    assert len(points) == len(data["rows"])
    temporal = points["split-8b-tensor-temporal-k30-native"]
    assert temporal["reproduce"] == {
        "bits": 8,
        "granularity": "tensor",
        "compression": "zstd",
        "coding": "temporal",
        "key_interval": 30,
        "max_clamped": 0.001,
        "resize": "native",
    }
    row = next(r for r in data["rows"] if r["name"] == "8-bit tensor, temporal, native")
    b = temporal["bytes"]
    assert b["key_frames"] == row["key_frames"] >= 1 and b["key_frames"] + b["delta_frames"] == 3
    assert b["key"]["mean"] > b["delta"]["mean"]  # (a clamp key may come besides the first frame)
    assert b["mean"] == pytest.approx(row["bytes_per_frame"]) and b["p95"] >= b["mean"]
    assert temporal["edge_ms"]["mean"] > 0 and temporal["server_ms"]["p95"] > 0
    assert temporal["agreement_f1"] == row["f1"] and temporal["map50_95"] == row["map50_95"]
    assert points["jpeg-q75"]["reproduce"] == {"image_format": "jpeg", "quality": 75}
    assert points["local-native"]["mode"] == "local" and points["local-native"]["agreement_f1"] == 1.0
    profile = load_profile(path)
    profile.check_weights(fp)
    with pytest.raises(ProfileError, match="other weights"):
        profile.check_weights("0" * 64)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["--rate-accuracy", "--video", str(tmp_path / "missing.mp4"), "--out", str(tmp_path)]) == 2
    assert cli.main(["--rate-accuracy", "--video", "x.mp4", "--sizes", "huge"]) == 2
    assert cli.main(["--rate-accuracy", "--video", "x.mp4", "--no-accuracy", "--profile-out", "p.json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("hnd-bench --rate-accuracy: error:") for line in err)


def test_bytes_only_sweep_skips_the_model(tiny_model, clip, monkeypatch):
    from PIL import Image

    import hnd.bench.rate as rate

    model = tiny_model("faster_rcnn")
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(clip["images"].iterdir())]
    settings = rate_settings([4], ["tensor"], ["temporal"], ["native"], [75], [], [], [])
    calls = []
    real_split = rate.split_model

    def counting_split(m):
        head, tail = real_split(m)
        return head, lambda *a: calls.append(1) or tail(*a)

    monkeypatch.setattr(rate, "split_model", counting_split)
    rows = run_sweep(model, frames, settings, max_clamped=1.0, accuracy=False)
    assert [r.f1 for r in rows] == [None, None, None] and not calls
    assert rows[1].bytes_per_frame > 0 and rows[1].key_frames == 1


def test_hnd_eval_temporal_stream_is_the_runtime_stream(tiny_model, clip, tmp_path):
    from PIL import Image

    from hnd.common.split import split_model
    from hnd.common.stream_codec import StreamEncoder
    from hnd.edge.torch_modes import to_tensor
    from hnd.train.eval_cli import main as eval_main
    from hnd.train.evaluate import make_predictor
    from hnd.train.synthetic import write_config

    model = tiny_model("faster_rcnn")
    images = [to_tensor(np.asarray(Image.open(p).convert("RGB"))) for p in sorted(clip["images"].iterdir())]
    predict = make_predictor(model, bits=4, key_interval=3)
    mirror = StreamEncoder(4, key_interval=3, max_clamped=0.001)  # what hnd-edge --key-interval 3 sends
    head, tail = split_model(model)
    with torch.inference_mode():
        for img in images:
            got = predict([img])[0]
            z, meta = head([img])
            want = tail(torch.as_tensor(mirror.quantize(z).dequantize()), meta)[0]
            assert all(torch.equal(got[k], want[k]) for k in want)
    cfg = write_config("test/faster_rcnn-b3ch", clip["images"].parent, tmp_path / "c.yaml")
    out = tmp_path / "m.json"
    assert (
        eval_main(
            ["--config", str(cfg), "--bits", "4", "--key-interval", "3", "--max-images", "2", "--output", str(out)]
        )
        == 0
    )
    metrics = json.loads(out.read_text())
    assert metrics["key_interval"] == 3 and metrics["images"] == 2 and "bbox" in metrics
    assert eval_main(["--config", str(cfg), "--key-interval", "3"]) == 2  # needs --bits


def test_server_profile_replaces_server_compute_in_the_link_model():
    from types import SimpleNamespace

    from hnd.bench.linkmodel import Link
    from hnd.bench.measure import Sample, apply_server_profile, parse_server_profile

    assert parse_server_profile("split=23.3,offload=21.2") == {"split": 23.3, "offload": 21.2}
    for bad in ("split=x", "gpu=3", "split=-1", "split=1,split=2"):
        with pytest.raises(ValueError, match="--server-profile"):
            parse_server_profile(bad)

    def sample(**kw):
        return Sample(
            frame=0,
            source="f",
            raw_bytes=1,
            request_bytes=1000,
            payload_bytes=900,
            response_bytes=100,
            edge_ms_raw=10.0,
            edge_model_ms_raw=8.0,
            server_ms_raw=900.0,
            server_compute_ms_raw=880.0,
            loopback_ms=1.0,
            measured_total_ms=1000.0,
            **kw,
        )

    settings = [
        SimpleNamespace(mode="split", key="split: 4"),
        SimpleNamespace(mode="offload", key="offload: j"),
        SimpleNamespace(mode="local", key="local"),
    ]
    samples = {"split: 4": [sample(), sample(filtered=True)], "offload: j": [sample()], "local": [sample()]}
    apply_server_profile(settings, samples, {"split": 23.3})
    assert samples["split: 4"][0].server_ms == pytest.approx(900.0 - 880.0 + 23.3)
    assert samples["split: 4"][1].server_ms == 900.0  # a filtered frame never reached the server
    assert samples["offload: j"][0].server_ms == 900.0  # not in the profile: as measured
    link = Link("lte", 8.0, 40.0)  # 1 ms per 1000 B
    assert samples["split: 4"][0].latency_ms(link, local=False) == pytest.approx(10 + 1.1 + 40 + 1 + 43.3)
    assert samples["split: 4"][0].latency_ms(link, local=False, raw=True) == pytest.approx(10 + 1.1 + 40 + 1 + 900)
