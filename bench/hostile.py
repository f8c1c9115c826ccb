"""Hostile requests against a live hnd-server: what each costs the server in time and memory.

    python -m hnd.bench.hostile [--part cases|attacks|all] [--server-python .venv/bin/python]
        [--server-pythonpath OLD_CHECKOUT_PKG] [--repeat 3] [--only NAME ...] [--json out.json]

``--part attacks`` (round 3, ``ATTACKS``): each attack class is sent ``count`` times from one connection to a
fresh server, alone (server CPU ms and peak RSS per bad request, RSS kept after), then again while a victim on
its own connection calls GetModelInfo or a good Infer (its p50 / p99 and failures): docs/benchmarks/hostile.md.

Each request class (small requests that declare huge sizes, oversized client strings, ...) is sent to a
fresh ``hnd-server --config test/mask_rcnn-b3ch --random-weights 0`` subprocess on loopback; the table
gives the status code, the worst answer time, and the server's peak RSS growth over its warmed-up
RSS (``VmHWM`` after resetting it through ``/proc/PID/clear_refs``; Linux only). ``--server-python``
picks the interpreter whose ``hnd`` serves, so an older checkout can be measured the same way.
tests/test_hostile.py sends the same classes to an in-process server.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np
import torch
from PIL import Image

from hnd.bench.hostile_server import CONFIG, start_server
from hnd.common.files import atomic_write_json
from hnd.common import codec, wire
from hnd.common.checkpoint import fingerprint
from hnd.common.config import load_config
from hnd.common.build import build_model_from_config
from hnd.common.split import SplitMeta, split_model
from hnd.proto.v1 import split_inference_pb2 as pb
from hnd.server.local import free_port, stop_server_process

INFER = "/hnd.v1.SplitInference/Infer"


@dataclass(frozen=True)
class Case:
    """One hostile request class: ``make(good)`` -> serialized request bytes."""

    name: str
    make: Callable[[Good], bytes]
    issue: str  # what it used to cost, in words


@dataclass
class Good:
    """A valid request of a square frame (90x90 -> resized to 160x160) and its parts."""

    request: pb.InferRequest
    z: torch.Tensor
    fingerprint: str


def good_request(model: torch.nn.Module) -> Good:
    head, _ = split_model(model)
    frame = torch.rand(3, 90, 90, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        z, meta = head([frame])
    fp = fingerprint(model)
    request = pb.InferRequest(request_id="good", weights_fingerprint=fp)
    request.bottleneck.CopyFrom(wire.bottleneck_to_proto(codec.encode(z), meta))
    return Good(request, z, fp)


def _with(good: Good, change: Callable[[pb.InferRequest], None]) -> bytes:
    r = pb.InferRequest()
    r.CopyFrom(good.request)
    change(r)
    return r.SerializeToString()


def _original(h: int, w: int) -> Callable[[Good], bytes]:
    def make(good: Good) -> bytes:
        def change(r: pb.InferRequest) -> None:
            r.bottleneck.meta.original_sizes[0].height = h
            r.bottleneck.meta.original_sizes[0].width = w

        return _with(good, change)

    return make


def _padded(side: int) -> Callable[[Good], bytes]:
    """A zero bottleneck for a side x side padded input, zstd-compressed to a few hundred bytes."""

    def make(good: Good) -> bytes:
        z = torch.zeros(1, good.z.shape[1], side // 4 + 4, side // 4 + 4)
        meta = SplitMeta(((side, side),), ((side, side),), (side, side))
        r = pb.InferRequest(request_id="padded", weights_fingerprint=good.fingerprint)
        r.bottleneck.CopyFrom(wire.bottleneck_to_proto(codec.encode(z, 8, "tensor", "zstd", 19), meta))
        return r.SerializeToString()

    return make


def _off_rule(good: Good) -> bytes:
    def change(r: pb.InferRequest) -> None:  # 160x160 claimed for a 120x150 frame: boxes would be mis-scaled
        r.bottleneck.meta.original_sizes[0].height = 120
        r.bottleneck.meta.original_sizes[0].width = 150

    return _with(good, change)


def _fingerprint(text: str) -> Callable[[Good], bytes]:
    return lambda good: _with(good, lambda r: setattr(r, "weights_fingerprint", text))


def _offload_jpeg(side: int) -> Callable[[Good], bytes]:
    def make(good: Good) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((side, side, 3), 128, np.uint8)).save(buf, "JPEG", quality=50)
        r = pb.InferRequest(request_id="offload")
        r.image.format = pb.EncodedImage.FORMAT_JPEG
        r.image.data = buf.getvalue()
        return r.SerializeToString()

    return make


# --- round 3 classes (#25): built here for tests/test_hostile.py and the scenarios below -----------------

LEARNED = dict(bits=codec.LEARNED_BITS, granularity="channel", compression=codec.LEARNED)


def entropic_request(model: torch.nn.Module, batch: int = 1, size: tuple[int, int] = (160, 256)) -> pb.InferRequest:
    """A valid learned-coded request of ``batch`` seeded frames of ``size`` (an Entropic Student ``model``)."""
    head, _ = split_model(model)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        y, meta = head([torch.rand(3, *size, generator=g) for _ in range(batch)])
    request = pb.InferRequest(request_id="entropic", weights_fingerprint=fingerprint(model))
    request.bottleneck.CopyFrom(wire.bottleneck_to_proto(codec.encode(y, **LEARNED, prior=head.prior_tables()), meta))
    return request


def entropic_tiny_payload(good: pb.InferRequest, batch: int, image: tuple[int, int], padded: tuple[int, int]) -> bytes:
    """#25 row 1: ``good``'s header declaring ``batch`` images of ``image`` padded to ``padded`` (the largest
    shape a server accepts), with an 8-byte payload (4 zero bytes + a CRC)."""
    r = pb.InferRequest()
    r.CopyFrom(good)
    t, m = r.bottleneck.tensor, r.bottleneck.meta
    channels = t.shape[1]
    shape = [batch, channels, padded[0] // 4 - 1, padded[1] // 4 - 1]
    del t.shape[:]
    t.shape.extend(shape)
    t.raw_size = 4 * math.prod(shape)
    t.data = b"\0" * 8
    for sizes in (m.original_sizes, m.image_sizes):
        del sizes[:]
        for _ in range(batch):
            sizes.add(height=image[0], width=image[1])
    m.padded_size.height, m.padded_size.width = padded
    return r.SerializeToString()


def corrupt_crc(good: pb.InferRequest) -> bytes:
    """``good`` with its learned payload's CRC flipped: decoded in full, then refused."""
    r = pb.InferRequest()
    r.CopyFrom(good)
    data = r.bottleneck.tensor.data
    r.bottleneck.tensor.data = data[:-4] + bytes([data[-4] ^ 1]) + data[-3:]
    return r.SerializeToString()


def video_key_frame(size: tuple[int, int], fmt: str = "h264", lossless: bool = False, seed: int = 0) -> pb.InferRequest:
    """An InferStream request carrying one H.264 / HEVC key frame of seeded noise (``lossless``: crf 0, the
    largest packet a frame of that size makes)."""
    from hnd.common.video import VideoEncoder, VideoSettings

    rgb = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    enc = VideoEncoder(VideoSettings(format=fmt, crf=0 if lossless else 23, gop=1, preset="ultrafast"))
    data, _ = enc.encode(rgb)
    r = pb.InferRequest(request_id="video")
    r.image.format = {"h264": pb.EncodedImage.FORMAT_H264, "hevc": pb.EncodedImage.FORMAT_HEVC}[fmt]
    r.image.data = data
    r.stream_frame.CopyFrom(wire.stream_frame_to_proto("key", 0, 0))
    return r


def jpeg_request(side: int, garbage_bytes: int = 0, seed: int = 0) -> bytes:
    """An offload JPEG request: a seeded noise picture side x side, or (``garbage_bytes``) a JPEG header
    followed by that many random bytes, refused once decoding starts."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    if garbage_bytes:
        data = data[:600] + rng.integers(0, 256, garbage_bytes, dtype=np.uint8).tobytes()
    r = pb.InferRequest(request_id="jpeg")
    r.image.format = pb.EncodedImage.FORMAT_JPEG
    r.image.data = data
    return r.SerializeToString()


CASES = (
    Case("mask paste: original 4000x4000", _original(4000, 4000), "3.5 GB peak"),
    Case("mask paste: original 8000x8000", _original(8000, 8000), "22.9 s, 12.9 GB peak"),
    Case("original 100000x100000", _original(100_000, 100_000), "INTERNAL after 8.4 s"),
    Case("padded 2048x2048 (zstd zeros)", _padded(2048), "17.1 s tail compute, +1.46 GB"),
    Case("image size off the resize rule", _off_rule, "OK with mis-scaled boxes"),
    Case("1 MB fingerprint", _fingerprint("f" * (1 << 20)), "metadata RESOURCE_EXHAUSTED, 1 MB log line"),
    Case("newline in fingerprint", _fingerprint("ab\n2026-01-01 00:00:00 hnd.server INFO forged"), "forged log line"),
    Case("offload JPEG 4000x4000", _offload_jpeg(4000), "full model + mask paste at 4000x4000"),
)


def call(port: int, payload: bytes, timeout: float = 120.0) -> tuple[str, str, float]:
    """One raw Infer call -> (status code name, details, seconds)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        start = time.perf_counter()
        try:
            ch.unary_unary(INFER)(payload, timeout=timeout)
            code, details = "OK", ""
        except grpc.RpcError as exc:
            code, details = exc.code().name, exc.details() or ""
        return code, details, time.perf_counter() - start


def proc_status_kib(pid: int | str, field: str) -> int:
    """A ``/proc/PID/status`` field in KiB (``VmRSS``, ``VmHWM``); pid ``"self"`` for this process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss(pid: int | str) -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > clear_refs``); False where the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class Row:
    case: str
    request_bytes: int
    code: str
    worst_s: float
    peak_rss_growth_mib: float
    details: str
    before: str


def measure(python: str, repeat: int = 1, cases: tuple[Case, ...] = CASES) -> list[Row]:
    """Each case on a fresh server subprocess: worst time over ``repeat`` sends and peak RSS growth."""
    cfg = load_config(CONFIG)
    good = good_request(build_model_from_config(cfg.model, cfg.path))
    rows = []
    for case in cases:
        payload = case.make(good)
        port = free_port()
        proc = start_server(python, port)
        try:
            call(port, good.request.SerializeToString())  # warm: the first real request allocates buffers
            base = proc_status_kib(proc.pid, "VmRSS")
            reset_peak_rss(proc.pid)
            worst, code, details = 0.0, "", ""
            for _ in range(repeat):
                code, details, seconds = call(port, payload)
                worst = max(worst, seconds)
            peak = proc_status_kib(proc.pid, "VmHWM")
            rows.append(
                Row(case.name, len(payload), code, worst, max(peak - base, 0) / 1024, details[:160], case.issue)
            )
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:  # still computing a hostile request
                proc.kill()
                proc.wait()
        print(f"{case.name}: {code} {worst:.3f} s +{rows[-1].peak_rss_growth_mib:.0f} MiB", file=sys.stderr)
    return rows


# --- round 3: attacks with a victim (#25) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    """A class of bad requests sent ``count`` times (``concurrency`` at once, one gRPC channel: one client) to a
    fresh server, first alone (its CPU and memory), then again while a victim on its own channel calls
    ``victim`` ("info": GetModelInfo, the event loop's responsiveness; "infer": a good request, 10 s deadline).

    make(model) -> (method path, one request's bytes); InferStream requests are sent one per stream.
    """

    name: str
    config: str
    flags: tuple[str, ...]
    make: Callable[[torch.nn.Module], tuple[str, bytes]]
    count: int
    concurrency: int
    victim: str
    issue: str


VICTIM_SECONDS = 8.0  # the victim's window: an attack refused in milliseconds is repeated meanwhile
STREAM = "/hnd.v1.SplitInference/InferStream"
MODEL_INFO = "/hnd.v1.SplitInference/GetModelInfo"
ENTROPIC_CONFIG = "test/faster_rcnn-entropic-b24ch"
# The production resize (min_size 800, max_size 1333) on the tiny test models: the largest bottleneck a server
# of the real models accepts, 8 x 24 x 199 x 335 for an Entropic Student.
FULL_SIZE = ("--max-short-side", "800", "--max-long-side", "1333", "--max-batch", "8")


def _video_format() -> str:
    from hnd.common.video import available_formats

    formats = available_formats()
    return "hevc" if "hevc" in formats else "h264"


ATTACKS = (
    Attack(
        "Entropic tiny payload, max shape 8x24x199x335",
        ENTROPIC_CONFIG,
        FULL_SIZE,
        lambda m: (INFER, entropic_tiny_payload(entropic_request(m), 8, (800, 1333), (800, 1344))),
        12,
        4,
        "infer",
        "867 ms CPU per 242-byte request; victim DEADLINE_EXCEEDED; RSS 1.08 -> 17 GB with 60 in flight",
    ),
    Attack(
        "30 MB garbage JPEG, one at a time",
        CONFIG,
        (),
        lambda m: (INFER, jpeg_request(64, garbage_bytes=30 << 20)),
        10,
        1,
        "info",
        "RSS 0.92 -> 5.1 GB peak, 2.96 GB kept",
    ),
    Attack(
        "1080p lossless video key frame",
        CONFIG,
        (),
        lambda m: (STREAM, video_key_frame((1080, 1920), _video_format(), lossless=True).SerializeToString()),
        4,
        1,
        "info",
        "178 ms CPU on the event loop; GetModelInfo p50 1.7 -> 168 ms",
    ),
    Attack(
        "12 concurrent 4096x4096 JPEGs",
        "test/faster_rcnn-b3ch",
        (),
        lambda m: (INFER, jpeg_request(4096)),
        12,
        12,
        "info",
        "RSS +2.7 GB (queued as full-resolution float32)",
    ),
    Attack(
        "one client, 32 requests in flight",
        "test/faster_rcnn-b3ch",
        ("--max-batch", "1"),
        lambda m: (INFER, good_request(m).request.SerializeToString()),
        32,
        32,
        "infer",
        "a victim's 10 s-deadline requests failed 6 of 8",
    ),
)


@dataclass
class AttackRow:
    attack: str
    request_bytes: int
    codes: dict[str, int]
    cpu_ms_per_request: float
    peak_rss_mib_per_request: float
    kept_rss_mib: float
    victim: str
    victim_p50_ms: float
    victim_p99_ms: float
    victim_failed: int
    victim_calls: int
    victim_failures: str
    before: str


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _send(channel: grpc.Channel, method: str, payload: bytes, timeout: float = 120) -> str:
    try:
        if method == STREAM:
            list(channel.stream_stream(STREAM)(iter([payload]), timeout=timeout))
        else:
            channel.unary_unary(method)(payload, timeout=timeout)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def _attack(port: int, method: str, payload: bytes, count: int, concurrency: int) -> dict[str, int]:
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        with ThreadPoolExecutor(concurrency) as pool:
            codes = list(pool.map(lambda _: _send(channel, method, payload), range(count)))
    return dict(Counter(codes))


def run_attack(attack: Attack, python: str, pythonpath: str | None = None) -> AttackRow:
    """One attack on a fresh server subprocess: alone (CPU, peak and kept RSS), then with its victim."""
    import threading

    cfg = load_config(attack.config)
    model = build_model_from_config(cfg.model, cfg.path).eval()
    if attack.victim == "infer":
        good = entropic_request(model) if cfg.model.bottleneck_type == "entropic" else good_request(model).request
        victim_method, victim_payload, victim_timeout = INFER, good.SerializeToString(), 10.0
    else:
        victim_method, victim_payload, victim_timeout = MODEL_INFO, b"", 10.0
    method, payload = attack.make(model)
    port = free_port()
    proc = start_server(python, port, attack.config, attack.flags, pythonpath)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            _send(ch, victim_method, victim_payload)  # warm
        base = proc_status_kib(proc.pid, "VmRSS")
        reset_peak_rss(proc.pid)
        cpu0 = _cpu_s(proc.pid)
        codes = _attack(port, method, payload, attack.count, attack.concurrency)
        cpu_ms = (_cpu_s(proc.pid) - cpu0) * 1000 / attack.count
        peak = proc_status_kib(proc.pid, "VmHWM")
        time.sleep(3)  # what stays after the attack
        kept = proc_status_kib(proc.pid, "VmRSS")
        latencies: list[float] = []
        failures: list[str] = []
        stop = threading.Event()

        def victim() -> None:
            # A connection of its own: channels of one process share one by default (one "client").
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                while not stop.is_set():
                    t = time.perf_counter()
                    code = _send(ch, victim_method, victim_payload, victim_timeout)
                    if code == "OK":
                        latencies.append(time.perf_counter() - t)
                    else:
                        failures.append(code)
                    time.sleep(0.05)

        thread = threading.Thread(target=victim, daemon=True)
        thread.start()
        until = time.monotonic() + VICTIM_SECONDS
        while True:  # the attack again (repeated for at least VICTIM_SECONDS) while the victim calls
            _attack(port, method, payload, attack.count, attack.concurrency)
            if time.monotonic() >= until:
                break
        stop.set()
        thread.join(60)
    finally:
        stop_server_process(proc)
        proc.wait()
    lat = np.array(latencies or [float("nan")]) * 1000
    row = AttackRow(
        attack.name,
        len(payload),
        codes,
        cpu_ms,
        max(peak - base, 0) / 1024 / attack.count,
        (kept - base) / 1024,
        "GetModelInfo" if attack.victim == "info" else "Infer (10 s deadline)",
        float(np.percentile(lat, 50)),
        float(np.percentile(lat, 99)),
        len(failures),
        len(latencies) + len(failures),
        ", ".join(sorted(set(failures))),
        attack.issue,
    )
    print(f"{attack.name}: {row}", file=sys.stderr)
    return row


def attack_markdown(rows: list[AttackRow]) -> str:
    lines = [
        "| attack (request bytes) | status | server CPU / request | peak RSS / request | RSS kept after | "
        "victim | victim p50 / p99 | victim failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        codes = ", ".join(f"{n} {c}" for c, n in sorted(r.codes.items()))
        lines.append(
            f"| {r.attack} ({r.request_bytes:,}) | {codes} | {r.cpu_ms_per_request:,.0f} ms | "
            f"{r.peak_rss_mib_per_request:,.1f} MiB | {r.kept_rss_mib:+,.0f} MiB | {r.victim} | "
            f"{r.victim_p50_ms:,.0f} / {r.victim_p99_ms:,.0f} ms | {r.victim_failed} of {r.victim_calls} {r.victim_failures} |"
        )
    return "\n".join(lines)


def markdown(rows: list[Row]) -> str:
    lines = ["| class | request bytes | status | worst server time | peak RSS growth |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.request_bytes:,} | {r.code} | {r.worst_s * 1000:,.0f} ms | "
            f"{r.peak_rss_growth_mib:,.0f} MiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hnd.bench.hostile", description=__doc__.split("\n")[0])
    p.add_argument("--server-python", default=sys.executable, help="interpreter whose hnd runs the server")
    p.add_argument("--repeat", type=int, default=1, help="sends per class (the worst time is kept)")
    p.add_argument("--only", nargs="*", help="case or attack names to run (default: all)")
    p.add_argument("--json", help="write the rows as JSON")
    p.add_argument(
        "--server-pythonpath", help="PYTHONPATH of the server subprocess (an older checkout's hnd, for 'before')"
    )
    p.add_argument(
        "--part",
        choices=("cases", "attacks", "all"),
        default="all",
        help="single hostile requests (round 2), attacks with a victim (round 3), or both",
    )
    p.add_argument(
        "--streams",
        nargs="*",
        metavar="SCENARIO",
        help="run the stream scenarios instead (session-hold, session-hold-clients, bottleneck-hold, "
        "stalled-stream; none named: all), each with an honest hnd-edge beside the attack (hnd.bench.hostile_streams)",
    )
    args = p.parse_args(argv)
    if args.streams is not None:
        from hnd.bench import hostile_streams

        scenario_rows = hostile_streams.measure(args.server_python, args.streams or None)
        print(hostile_streams.markdown(scenario_rows))
        if args.json:
            atomic_write_json(args.json, [asdict(r) for r in scenario_rows])
        return 0
    out: dict[str, list] = {}
    if args.part in ("cases", "all"):
        cases = tuple(c for c in CASES if not args.only or c.name in args.only)
        rows = measure(args.server_python, args.repeat, cases) if cases else []
        print(markdown(rows))
        out["cases"] = [asdict(r) for r in rows]
    if args.part in ("attacks", "all"):
        attacks = [a for a in ATTACKS if not args.only or a.name in args.only]
        attack_rows = [run_attack(a, args.server_python, args.server_pythonpath) for a in attacks]
        print(attack_markdown(attack_rows))
        out["attacks"] = [asdict(r) for r in attack_rows]
    if args.json:
        atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
