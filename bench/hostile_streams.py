"""Stream attacks on a live hnd-server, each with an honest ``hnd-edge`` beside it (issue #25 rows 2-4).

    python -m hnd.bench.hostile --streams [--server-python PY] [--json out.json]

Server and edge are subprocesses of ``--server-python`` (so an older checkout is measured the same way, its
own edge included); the attackers are gRPC clients in this process, on loopback.

* **session hold** (row 2): 16 streams of one client each send one 64x64 H.264 key frame and go idle, holding
  every video session of a default server; an honest ``hnd-edge --mode offload --image-format h264 --stream``
  camera then sends its frames. Figures: its frames answered OK, its exit status. **session hold, clients**:
  16 streams from 16 clients (one connection each), on a server with a 600 s idle timeout (standing for
  holders that each send a frame within the timeout): no per-client share and no expiry frees a session.
* **bottleneck hold** (row 3): 64 clients (one connection each) each hold one bottleneck session (the whole
  table; a 600 s idle timeout on servers that have one) for ``HOLD_S`` seconds while a temporal edge
  (``--key-interval 30 --stream``) runs; then they let go.
  Figures: the edge's payload bytes per frame after the release, and the share of delta frames there.
* **stalled stream** (row 4): the server is SIGSTOPped under ``hnd-edge --stream --timeout 3 --give-up-after 6``.
  Figures: seconds from the stop to the edge's exit (the server is resumed after ``STALL_CAP_S``), its exit
  status, its records by status after the stop, and whether it warned.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch
from PIL import Image

from hnd.bench.hostile_server import CONFIG, start_server
from hnd.common import wire
from hnd.common.build import build_model_from_config
from hnd.common.checkpoint import fingerprint
from hnd.common.config import load_config
from hnd.common.split import split_model
from hnd.common.stream_codec import StreamEncoder
from hnd.common.video import VideoEncoder, VideoSettings
from hnd.proto.v1 import split_inference_pb2 as pb
from hnd.server.local import free_port, stop_server_process

STREAM = "/hnd.v1.SplitInference/InferStream"
HOLD_S = 15.0  # how long the bottleneck holders keep the table after the edge's first answer
STALL_CAP_S = 45.0  # how long the server stays stopped at most


@dataclass
class ScenarioRow:
    scenario: str
    figures: dict = field(default_factory=dict)


def _frames(n: int, size=(96, 128)) -> list[np.ndarray]:
    """A static scene with a square moving right, and sensor noise (seeded)."""
    rng = np.random.default_rng(0)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    bg = np.stack([(xx * 2) % 256, (yy * 3) % 256, 128 + 0 * xx], -1).astype(np.float32)
    out = []
    for i in range(n):
        img = bg.copy()
        x = (8 + 3 * i) % (w - 30)
        img[20:50, x : x + 30] = (240, 20, 20)
        out.append(np.clip(img + rng.normal(0, 1.5, img.shape), 0, 255).astype(np.uint8))
    return out


def _write_frames(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(_frames(n)):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return folder


def _edge(python: str, port: int, images: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [python, "-m", "hnd.edge.cli", "--server", f"127.0.0.1:{port}", "--images", str(images)]
    cmd += ["--config", CONFIG, "--random-weights", "0", "--output", str(out), "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _Holder:
    """Streams that each send one request and stay open (``channels`` connections, streams spread over them)."""

    def __init__(self, port: int, request: bytes, streams: int, channels: int) -> None:
        opts = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) for _ in range(channels)]
        self.calls = []
        for i in range(streams):
            outbox: queue.Queue = queue.Queue()
            call = self.channels[i % channels].stream_stream(STREAM)(iter(outbox.get, None), timeout=600)
            outbox.put(request)
            self.calls.append((outbox, call))
        self.kept = sum(not pb.InferResponse.FromString(next(call)).key_frame_required for _, call in self.calls)

    def release(self) -> None:
        for outbox, call in self.calls:
            outbox.put(None)
            call.cancel()
        for ch in self.channels:
            ch.close()


def _server(python: str, idle_timeout_s: float | None = None) -> tuple[subprocess.Popen, int]:
    """A server subprocess; ``idle_timeout_s`` where its hnd-server has --session-idle-timeout (older ones keep
    idle sessions for ever anyway)."""
    extra: tuple[str, ...] = ()
    if idle_timeout_s is not None:
        usage = subprocess.run([python, "-m", "hnd.server.cli", "--help"], capture_output=True, text=True).stdout
        if "--session-idle-timeout" in usage:
            extra = ("--session-idle-timeout", f"{idle_timeout_s:g}")
    port = free_port()
    return start_server(python, port, flags=extra), port


def _stop(proc: subprocess.Popen) -> None:
    """Resume it (the stalled-stream scenario stops it), then the usual SIGTERM-wait-kill."""
    proc.send_signal(signal.SIGCONT)
    stop_server_process(proc)
    proc.wait()


def session_hold(
    python: str, work: Path, frames: int = 30, clients: int = 1, idle_timeout_s: float | None = None
) -> ScenarioRow:
    images = _write_frames(work / "session-hold", frames)
    data, _ = VideoEncoder(VideoSettings(preset="ultrafast")).encode(_frames(1, (64, 64))[0])
    key = pb.InferRequest(request_id="hold")
    key.image.format = pb.EncodedImage.FORMAT_H264
    key.image.data = data
    key.stream_frame.CopyFrom(wire.stream_frame_to_proto("key", 0, 0))
    server, port = _server(python, idle_timeout_s)
    try:
        holder = _Holder(port, key.SerializeToString(), streams=16, channels=clients)
        out = work / f"session-hold-{clients}.jsonl"
        edge = _edge(python, port, images, out, "--mode", "offload", "--image-format", "h264", "--stream")
        _, err = edge.communicate(timeout=600)
        holder.release()
    finally:
        _stop(server)
    records = _records(out)
    statuses = Counter(r["status"] for r in records)
    kinds = Counter(r.get("frame_type", "-") for r in records)
    return ScenarioRow(
        f"session hold: 16 idle H.264 streams of {'one client' if clients == 1 else f'{clients} clients'}"
        f"{'' if idle_timeout_s is None else f' (server idle timeout {idle_timeout_s:g} s)'}, then an offload camera",
        {
            "holder_sessions_kept": holder.kept,
            "camera_frames": frames,
            "camera_ok": statuses.get("OK", 0),
            "camera_statuses": dict(statuses),
            "camera_frame_types": dict(kinds),
            "camera_exit": edge.returncode,
        },
    )


def bottleneck_hold(python: str, work: Path, frames: int = 90) -> ScenarioRow:
    images = _write_frames(work / "bottleneck-hold", frames)
    cfg = load_config(CONFIG)
    model = build_model_from_config(cfg.model, cfg.path)
    head, _ = split_model(model)
    with torch.inference_mode():
        z, meta = head([torch.from_numpy(_frames(1)[0]).permute(2, 0, 1).float().div(255)])
    frame = StreamEncoder(8).encode(z)
    key = pb.InferRequest(request_id="hold", weights_fingerprint=fingerprint(model))
    key.bottleneck.CopyFrom(wire.bottleneck_to_proto(frame.tensor, meta))
    key.stream_frame.CopyFrom(wire.stream_frame_to_proto("key", 0, 0))
    server, port = _server(python, idle_timeout_s=600.0)  # holders that stay within the idle timeout
    try:
        holder = _Holder(port, key.SerializeToString(), streams=64, channels=64)
        out = work / "bottleneck-hold.jsonl"
        edge = _edge(python, port, images, out, "--key-interval", "30", "--stream", "--max-inflight", "1")
        deadline = time.monotonic() + 300
        while not _records(out) and edge.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # the hold counts from the edge's first answer (its start-up takes a while)
        time.sleep(HOLD_S)
        released = time.time()
        holder.release()
        _, err = edge.communicate(timeout=900)
    finally:
        _stop(server)
    records = [r for r in _records(out) if r["status"] == "OK"]
    during = [r for r in records if r["wall_time"] < released]
    after = [r for r in records if r["wall_time"] >= released + 2.0]  # a frame or two in flight at the release

    def per_frame(rs: list[dict]) -> int | None:
        return round(float(np.mean([r["bytes"]["payload"] for r in rs]))) if rs else None

    return ScenarioRow(
        f"bottleneck hold: 64 clients hold every session for {HOLD_S:g} s, a temporal edge (--key-interval 30)",
        {
            "holder_sessions_kept": holder.kept,
            "frames_during_hold": len(during),
            "bytes_per_frame_during_hold": per_frame(during),
            "frames_after_release": len(after),
            "bytes_per_frame_after_release": per_frame(after),
            "delta_share_after_release": round(
                sum(r.get("frame_type") == "delta" for r in after) / max(len(after), 1), 3
            ),
            "edge_exit": edge.returncode,
        },
    )


def stalled_stream(python: str, work: Path, frames: int = 40) -> ScenarioRow:
    images = _write_frames(work / "stalled", frames)
    server, port = _server(python)
    out = work / "stalled.jsonl"
    try:
        edge = _edge(python, port, images, out, "--stream", "--timeout", "3", "--give-up-after", "6")
        deadline = time.monotonic() + 300
        while len(_records(out)) < 2 and edge.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        answered = len(_records(out))
        server.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            edge.wait(STALL_CAP_S)
            ended_s = time.monotonic() - stopped
        except subprocess.TimeoutExpired:
            ended_s = None
        server.send_signal(signal.SIGCONT)
        _, err = edge.communicate(timeout=600)
        total_s = time.monotonic() - stopped
    finally:
        _stop(server)
    after = _records(out)[answered:]
    return ScenarioRow(
        "stalled stream: server SIGSTOPped under hnd-edge --stream --timeout 3 --give-up-after 6",
        {
            "edge_ended_while_stopped_s": None if ended_s is None else round(ended_s, 1),
            "server_resumed_after_s": STALL_CAP_S if ended_s is None else None,
            "edge_ended_after_s": round(total_s, 1),
            "edge_exit": edge.returncode,
            "records_after_stop": dict(Counter(r["status"] for r in after)),
            "warned": "no answer within" in err or "unreachable" in err or "answered nothing" in err,
            "last_line": err.strip().splitlines()[-1][:160] if err.strip() else "",
        },
    )


def session_hold_clients(python: str, work: Path) -> ScenarioRow:
    """The same from 16 clients, on a server whose idle timeout (600 s) stands for holders that send a frame
    within it: no share is exceeded and no session expires, so the camera gets none and falls back to key frames."""
    return session_hold(python, work, clients=16, idle_timeout_s=600.0)


SCENARIOS = {
    "session-hold": session_hold,
    "session-hold-clients": session_hold_clients,
    "bottleneck-hold": bottleneck_hold,
    "stalled-stream": stalled_stream,
}


def measure(python: str, names: list[str] | None = None) -> list[ScenarioRow]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="hnd-hostile-streams-") as tmp:
        for name, run in SCENARIOS.items():
            if names and name not in names:
                continue
            rows.append(run(python, Path(tmp)))
            print(f"{rows[-1].scenario}: {rows[-1].figures}", file=sys.stderr)
    return rows


def markdown(rows: list[ScenarioRow]) -> str:
    lines = ["| scenario | figures |", "|---|---|"]
    for r in rows:
        lines.append(f"| {r.scenario} | {', '.join(f'{k} {v}' for k, v in r.figures.items())} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - python -m hnd.bench.hostile --streams is the entry point
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    print(markdown(measure(sys.executable, sys.argv[1:] or None)))
