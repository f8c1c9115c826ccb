"""Helpers for the runtime tests: servers on loopback, edges, frames, certificates."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import torch

from hnd.common import torch_codec, wire
from hnd.common.checkpoint import fingerprint, save_checkpoint
from hnd.common.codec import CodecSettings
from hnd.common.split import split_model
from hnd.edge.api import make_mode
from hnd.edge.capture import ArrayFrames
from hnd.edge.client import ClientSettings, SplitClient
from hnd.edge.pipeline import EdgeOptions, EdgeRunner, to_tensor
from hnd.server.local import background_server
from hnd.server.service import BatchingOptions


def frames(count: int = 3, seed: int = 0, sizes=((120, 150), (200, 100), (90, 90))) -> list[np.ndarray]:
    """Seeded RGB uint8 frames of different sizes (smooth blobs, so JPEG/PNG behave like photos)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
        out.append(np.ascontiguousarray(np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]))
    return out


def write_frames(folder: Path, count: int, name: str = "{i:03d}.png") -> Path:
    """``frames(count)`` as image files named ``name.format(i=...)`` in ``folder`` (made here); returns it."""
    return write_images(folder, frames(count), name)


def write_images(folder: Path, images: list[np.ndarray], name: str = "{i:03d}.png") -> Path:
    """RGB ``images`` as image files named ``name.format(i=...)`` in ``folder`` (made here); returns it."""
    folder.mkdir()
    for i, img in enumerate(images):
        cv2.imwrite(str(folder / name.format(i=i)), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return folder


def export_onnx_files(folder: Path, model: torch.nn.Module, config: str, head_name: str) -> dict[str, Path]:
    """``model``'s checkpoint, its ONNX head (hnd-export-head) and two frames in ``folder``:
    {"folder", "ckpt", "head", "images"}."""
    from hnd.edge import export_head as export_cli

    ckpt = folder / "student.pt"
    save_checkpoint(ckpt, model)
    head = folder / head_name
    assert export_cli.main([str(ckpt), str(head), "--config", config]) == 0
    return {"folder": folder, "ckpt": ckpt, "head": head, "images": write_frames(folder / "frames", 2)}


def edge_argv(
    images, *extra: str, server=None, config: str = "test/faster_rcnn-b3ch", seed: int | None = 0
) -> list[str]:
    """hnd-edge's arguments for a run on ``images`` with ``config`` and seeded random weights (``seed``
    None: none), against ``server`` (a running server, reached on loopback, or an address) when given,
    then ``extra``."""
    argv = [] if server is None else ["--server", server if isinstance(server, str) else f"127.0.0.1:{server.port}"]
    argv += ["--images", str(images), "--config", config]
    if seed is not None:
        argv += ["--random-weights", str(seed)]
    return [*argv, *extra]


@contextmanager
def serving(model: torch.nn.Module, **settings):
    """``hnd.server.local.background_server`` with ``batching`` defaulting to one image per batch."""
    settings.setdefault("batching", BatchingOptions(max_batch=1, max_delay_ms=0, max_queue=64))
    with background_server(model, **settings) as server:
        yield server


@contextmanager
def slow_tail(server, seconds: float):
    """While inside, each batch of ``server`` (from :func:`serving`) takes ``seconds`` longer: a CPU server, a
    busy GPU. The tail is restored on leaving."""
    runner = server.service.runner
    hold = runner.run_split

    def slow(items):
        time.sleep(seconds)
        return hold(items)

    runner.run_split = slow
    try:
        yield
    finally:
        runner.run_split = hold


def client_for(server, **kw) -> SplitClient:
    return SplitClient(ClientSettings(f"127.0.0.1:{server.port}", **kw))


def run_edge(model, client, images, **options):
    """Run an EdgeRunner over in-memory frames; returns (summary, records as JSON dicts, detections per frame).

    options: EdgeOptions fields, plus bits / granularity / compression / level for its CodecSettings."""
    head, _ = split_model(model)
    settings = CodecSettings(
        **{k: options.pop(k) for k in ("bits", "granularity", "compression", "level") if k in options}
    )
    edge_options = EdgeOptions(codec=settings, **options)
    runner = EdgeRunner(edge_options, make_mode(edge_options, head, fingerprint(model), model), client)
    records, dets = [], []

    def on_record(record, frame):
        records.append(record.to_dict())  # the JSON form hnd-edge writes
        dets.append(runner.last_detections if record.ok else None)

    summary = runner.run(ArrayFrames(images), on_record)
    return summary, records, dets


@torch.inference_mode()
def expected_split(model, image: np.ndarray, **codec_args) -> list[dict[str, torch.Tensor]]:
    """tail(torch_codec.roundtrip(head(x))) in process, through the wire's detection format (masks as RLE)."""
    head, tail = split_model(model)
    z, meta = head([to_tensor(image)])
    out = tail(torch_codec.roundtrip(z, **codec_args), meta)
    return [wire.detections_from_proto(wire.detections_to_proto(d)) for d in out]


def assert_same_detections(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            a, b = np.asarray(x[k]), np.asarray(y[k])
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), k


def make_certs(folder: Path) -> dict[str, str]:
    """A CA, a server certificate for localhost / 127.0.0.1 and a client certificate (openssl CLI)."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=hnd-test-ca",
    )
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={'localhost' if name == 'server' else 'hnd-edge'}",
        )
        (folder / f"{name}.ext").write_text(
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n" if name == "server" else "extendedKeyUsage=clientAuth\n"
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )
    return {
        k: str(folder / v)
        for k, v in {
            "ca": "ca.pem",
            "server_cert": "server.pem",
            "server_key": "server.key",
            "client_cert": "client.pem",
            "client_key": "client.key",
        }.items()
    }


# An edge process where torch (and torchvision) are made unimportable before hnd is, then hnd-edge's main().
NO_TORCH = (
    "import sys\n"
    "sys.modules['torch'] = None\n"
    "sys.modules['torchvision'] = None\n"
    "from hnd.edge.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "assert sys.modules['torch'] is None\n"
    "sys.exit(code)\n"
)


def torch_free_edge(server, config: str, head, images, *extra: str) -> subprocess.CompletedProcess:
    """hnd-edge with an ONNX ``head`` on a folder of ``images`` against ``server``, in a process without torch."""
    argv = edge_argv(
        images, "--head", str(head), "--no-progress", "--threads", "1", *extra, server=server, config=config, seed=None
    )
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, *argv], check=False, capture_output=True, text=True, timeout=300
    )


def torch_free_records(server, config: str, head, images, out: Path, *extra: str) -> list[dict]:
    """:func:`torch_free_edge` with ``--output out``: it must exit 0; returns the records it wrote."""
    run = torch_free_edge(server, config, head, images, *extra, "--output", str(out))
    assert run.returncode == 0, run.stderr
    return [json.loads(line) for line in out.read_text().splitlines()]


def one_line_error(run: subprocess.CompletedProcess) -> str:
    """The edge's usage error: exit code 2 and one ``hnd-edge: error:`` line on stderr, no traceback."""
    assert run.returncode == 2
    err = run.stderr.strip()
    assert err.startswith("hnd-edge: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def v1_detections(response) -> dict[str, np.ndarray]:
    """boxes float32 [N, 4], labels int64 [N], scores float32 [N] of an hnd.v1 InferResponse's first image (the
    arrays a KServe v2 answer must equal byte for byte)."""
    d = response.detections[0]
    n = len(d.labels)
    return {
        "boxes": np.asarray(d.boxes, np.float32).reshape(n, 4),
        "labels": np.asarray(d.labels, np.int64),
        "scores": np.asarray(d.scores, np.float32),
    }
