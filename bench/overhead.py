"""python -m hnd.bench.overhead: hnd's runtime overhead next to the plain gRPC floor, in one run.

    python -m hnd.bench.overhead                         # HND Faster R-CNN 3ch, a 640x480 frame, 8-bit + zstd
    python -m hnd.bench.overhead --requests 300 --json overhead.json

Two servers run as their own processes on loopback, side by side, and are measured in alternating rounds
so machine load hits both alike:

* **floor**: a grpc.aio server (the transport hnd-server uses) whose handlers take the request bytes and
  answer with a reply of the same size as hnd's response: what any Python gRPC service pays.
* **hnd**: ``hnd-server``'s own service (validation, codec.decode, batching queue, compute thread,
  response encoding) on the real model's fingerprint, shapes and limits, with the tail replaced by a
  trivial one that returns a fixed set of detections (``--tail trivial``, the default), so the model's
  compute does not drown the runtime's cost; ``--tail real`` runs the real tail.

The client side is the edge's own ``SplitClient`` (unary ``Infer`` and ``InferStream``, one request in
flight) against a plain gRPC stub sending the same bytes (unary call and a bidi stream, ping-pong).

``overhead = end-to-end - server compute`` per request: the request's serialization, transport, server
parse / validation / decode, batch queue, compute-thread hand-offs, response encoding and the client's
reply handling. The target is overhead p50 <= 2x the floor's p50 at the same message size.
``--profile`` adds an in-process breakdown of the CPU steps on both sides (no transport).

The servers are ``speed_servers``, the request and the timing clients ``speed_clients``, the ``--profile``
breakdown ``decode_profile``; this module runs them and reports.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from hnd.bench.decode_profile import profile_steps
from hnd.bench.speed_clients import (
    FloorClient,
    Sample,
    make_request,
    make_small_requests,
    time_floor,
    time_hnd,
    time_hnd_deltas,
)
from hnd.bench.speed_servers import LADDER, build_runner, child_server, spawn_child, start_child, stop_child, wait_ready
from hnd.common.files import atomic_write_json
from hnd.common.timing import percentiles
from hnd.proto.v1 import tensor_pb2

LEARNED = tensor_pb2.COMPRESSION_LEARNED  # an Entropic Student's request
TARGET_RATIO = 2.0
DEFAULT_CONFIG = "hnd/faster_rcnn-b3ch"


# ---------------------------------------------------------------------------------------------------
# Run


def run(
    config: str = DEFAULT_CONFIG,
    seed: int = 0,
    bits: int = 8,
    size: tuple[int, int] = (480, 640),
    requests: int = 200,
    rounds: int = 5,
    warmup: int = 20,
    tail: str = "trivial",
    detections: int = 100,
    profile: bool = False,
    compare_python: str | None = None,
    ladder: bool = False,
    small: bool = False,
) -> dict[str, Any]:
    """Measure the floor and hnd side by side; returns the result dict (see ``format_table``).

    ``compare_python``: also run the hnd server of another build (that interpreter's installed ``hnd``, which
    must have this module) in the same alternating rounds, e.g. the code before a change.
    ``ladder``: also run the rungs of ``LADDER`` (``speed_servers``) in the same rounds, so the cost of
    each part of hnd's request path is measured end to end: floor -> proto -> decode -> hnd.
    ``small``: also the recommended camera setting's small messages in the same rounds (``result["small"]``):
    4 bits at the frame's own size, per frame on unary calls and as a stream session's delta frames on the
    stream, each against the floor at its own message size.
    """
    from hnd.server.local import free_port

    request, encode_ms = make_request(config, seed, bits, size)
    message = request.SerializeToString()  # its size before the timed calls renumber the request
    servers = _spawn_servers(config, seed, tail, detections, compare_python, ladder)
    try:
        clients = _connect(servers)
        reply_bytes = clients["hnd"].submit(request).result().response.ByteSize()
        floor_port = free_port()
        servers.floor = start_child(["--serve", "floor", "--port", str(floor_port), "--reply-bytes", str(reply_bytes)])
        fc = FloorClient(floor_port)
        per_round = max(1, requests // rounds)
        small_ports: dict[str, int] = {n: servers.ports[n] for n in ("hnd", "compare") if n in servers.ports}
        rungs = {step: clients[step] for step in LADDER if step in clients}
        small_case = _SmallCase(config, seed, size, small_ports, rungs) if small else None
        samples = _alternate_rounds(fc, clients, request, message, warmup, rounds, per_round, small_case)
        fc.close()
        if small_case is not None:
            small_case.close()
        for c in clients.values():
            c.close()
    finally:
        servers.stop()

    result = _describe_run(config, tail, bits, size, request, message, reply_bytes, encode_ms, per_round * rounds)
    _add_figures(result, samples, compare_python, ladder)
    if small_case is not None:
        result["small"] = small_case.describe(samples)
    if profile:
        runner = build_runner(config, seed, tail, detections)
        result["profile_ms"] = profile_steps(request, runner)
        if small_case is not None:  # the 4-bit intra message (a delta frame decodes only on its stream's session)
            result["small"]["profile_ms"] = profile_steps(small_case.intra, runner)
    return result


@dataclass
class _Servers:
    """The benchmark's hnd server processes by name ("hnd", "compare", the ``LADDER`` rungs), their ports,
    and the floor server once it is started."""

    ports: dict[str, int]
    children: dict[str, subprocess.Popen]
    floor: subprocess.Popen | None = None

    def stop(self) -> None:
        for child in (self.floor, *self.children.values()):
            if child is not None:
                stop_child(child)


def _spawn_servers(
    config: str, seed: int, tail: str, detections: int, compare_python: str | None, ladder: bool
) -> _Servers:
    """Starts hnd's server (and the compare build's, and the ladder rungs) without waiting for them."""
    from hnd.server.local import free_port

    common = ["--config", config, "--seed", str(seed), "--detections", str(detections)]
    # The servers start side by side (each imports torch and builds the model), then answer one by one.
    ports = {"hnd": free_port()}
    children = {"hnd": spawn_child(["--serve", "hnd", "--port", str(ports["hnd"]), "--tail", tail, *common])}
    if compare_python:
        ports["compare"] = free_port()
        children["compare"] = spawn_child(
            ["--serve", "hnd", "--port", str(ports["compare"]), "--tail", tail, *common], python=compare_python
        )
    for step in LADDER if ladder else ():
        ports[step] = free_port()
        children[step] = spawn_child([f"--serve=ladder-{step}", "--port", str(ports[step]), *common])
    return _Servers(ports, children)


def _connect(servers: _Servers) -> dict[str, Any]:
    """An edge ``SplitClient`` per server, by the same name, once that server is ready (model info fetched)."""
    from hnd.edge.client import ClientSettings, SplitClient

    clients = {}
    for name, proc in servers.children.items():
        wait_ready(proc)
        clients[name] = SplitClient(ClientSettings(f"127.0.0.1:{servers.ports[name]}"))
        clients[name].model_info()
    return clients


class _SmallCase:
    """The small messages (``make_small_requests``) and their own edge client on each named server ("hnd", and
    "compare" with ``--compare-python``); samples "small floor CALL" and "small NAME CALL". With ``rungs`` (the
    ``LADDER`` servers' clients), the intra message also goes both ways through the floor, each rung and hnd:
    samples "small intra NAME CALL"."""

    def __init__(
        self, config: str, seed: int, size: tuple[int, int], ports: dict[str, int], rungs: dict[str, Any] | None = None
    ) -> None:
        from hnd.edge.client import ClientSettings, SplitClient

        self.intra, self.key, self.delta = make_small_requests(config, seed, size)
        self.intra_message = self.intra.SerializeToString()
        self.delta_message = self.delta.SerializeToString()
        self.clients = {name: SplitClient(ClientSettings(f"127.0.0.1:{port}")) for name, port in ports.items()}
        for client in self.clients.values():
            client.model_info()
        self.sequence = dict.fromkeys(ports, 1)  # each server's stream session numbers its own deltas
        self.rungs = rungs or {}

    def names(self) -> tuple[str, ...]:
        ladder = ("floor", *self.rungs, "hnd") if self.rungs else ()
        return ("small floor", *(f"small {name}" for name in self.clients), *(f"small intra {n}" for n in ladder))

    def measure(self, fc: FloorClient, samples: dict[str, list[Sample]], n: int) -> None:
        samples["small floor unary"] += time_floor(fc.call, self.intra_message, n)
        for name, client in self.clients.items():
            samples[f"small {name} unary"] += time_hnd(client, self.intra, n, False)
        samples["small floor stream"] += time_floor(fc.stream_call, self.delta_message, n)
        for name, client in self.clients.items():
            timed, self.sequence[name] = time_hnd_deltas(client, self.key, self.delta, n, self.sequence[name])
            samples[f"small {name} stream"] += timed
        if self.rungs:  # an intra message between deltas leaves the stream's session as it is
            samples["small intra floor unary"] += time_floor(fc.call, self.intra_message, n)
            samples["small intra floor stream"] += time_floor(fc.stream_call, self.intra_message, n)
            for name, client in (*self.rungs.items(), ("hnd", self.clients["hnd"])):
                for call in CALLS:
                    samples[f"small intra {name} {call}"] += time_hnd(client, self.intra, n, call == "stream")

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def describe(self, samples: dict[str, list[Sample]]) -> dict[str, Any]:
        compare = (
            {
                "compare_modes": {
                    call: _figures(samples[f"small floor {call}"], samples[f"small compare {call}"]) for call in CALLS
                }
            }
            if "compare" in self.clients
            else {}
        )
        return {
            "unary": "4-bit intra, native size",
            "stream": "4-bit temporal delta frames, native size",
            "message_bytes": {"unary": len(self.intra_message), "stream": len(self.delta_message)},
            "payload_bytes": {
                "unary": len(self.intra.bottleneck.tensor.data),
                "stream": len(self.delta.bottleneck.tensor.data),
            },
            "modes": {call: _figures(samples[f"small floor {call}"], samples[f"small hnd {call}"]) for call in CALLS},
            **compare,
            **(
                {
                    "ladder_p50_ms": {
                        name: {
                            call: float(np.median([x.total_ms for x in samples[f"small intra {name} {call}"]]))
                            for call in CALLS
                        }
                        for name in ("floor", *self.rungs, "hnd")
                    }
                }
                if self.rungs
                else {}
            ),
        }


CALLS = ("unary", "stream")


def _alternate_rounds(
    fc: FloorClient,
    clients: dict[str, Any],
    request,
    message: bytes,
    warmup: int,
    rounds: int,
    per_round: int,
    small: _SmallCase | None = None,
) -> dict[str, list[Sample]]:
    """Samples keyed "NAME unary" / "NAME stream" (NAME: floor, then each client's name; ``small.names()`` with
    ``small``), measured in ``rounds`` alternating rounds of ``per_round`` requests each after
    ``warmup`` untimed ones."""
    # Warm both (connections, stream set-up, allocator), then alternate short rounds of each.
    time_floor(fc.call, message, warmup)
    time_floor(fc.stream_call, message, warmup)
    for c in clients.values():
        time_hnd(c, request, warmup, False)
        time_hnd(c, request, warmup, True)
    names = ("floor", *clients) + (small.names() if small else ())
    samples: dict[str, list[Sample]] = {f"{k} {call}": [] for k in names for call in CALLS}
    if small is not None:
        small.measure(fc, {k: [] for k in samples}, warmup)
    for _ in range(rounds):
        samples["floor unary"] += time_floor(fc.call, message, per_round)
        for name, c in clients.items():
            samples[f"{name} unary"] += time_hnd(c, request, per_round, False)
        samples["floor stream"] += time_floor(fc.stream_call, message, per_round)
        for name, c in clients.items():
            samples[f"{name} stream"] += time_hnd(c, request, per_round, True)
        if small is not None:
            small.measure(fc, samples, per_round)
    return samples


def _describe_run(
    config: str,
    tail: str,
    bits: int,
    size: tuple[int, int],
    request,
    message: bytes,
    reply_bytes: int,
    encode_ms: float,
    requests_per_mode: int,
) -> dict[str, Any]:
    """The result's header: what was sent and on what machine; ``modes`` is filled by ``_add_figures``."""
    return {
        "config": config,
        "tail": tail,
        "message_bytes": len(message),
        "reply_bytes": reply_bytes,
        "payload_bytes": len(request.bottleneck.tensor.data),
        "bits": bits,
        "codec": "learned entropy coding" if request.bottleneck.tensor.compression == LEARNED else f"{bits}-bit + zstd",
        "frame": list(size),
        "edge_codec_encode_ms": encode_ms,
        "requests_per_mode": requests_per_mode,
        "modes": {},
        "load_average": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }


def _add_figures(
    result: dict[str, Any], samples: dict[str, list[Sample]], compare_python: str | None, ladder: bool
) -> None:
    """Fills ``result`` with the ``_figures`` of hnd (and the compare build, and each ladder rung) vs the floor."""
    if compare_python:
        result["compare"] = {"python": compare_python, "modes": {}}
    for call in ("unary", "stream"):
        result["modes"][call] = _figures(samples[f"floor {call}"], samples[f"hnd {call}"])
        if compare_python:
            result["compare"]["modes"][call] = _figures(samples[f"floor {call}"], samples[f"compare {call}"])
    if ladder:
        result["ladder"] = {
            step: {call: _figures(samples[f"floor {call}"], samples[f"{step} {call}"]) for call in ("unary", "stream")}
            for step in LADDER
        }


def loop_probe(
    config: str = DEFAULT_CONFIG,
    seed: int = 0,
    bits: int = 8,
    size: tuple[int, int] = (480, 640),
    seconds: float = 5.0,
    probe_interval_ms: float = 5.0,
    policies: tuple[str, ...] = ("server default", "always on the loop", "always off the loop"),
) -> dict[str, Any]:
    """Does decoding off the event loop pay? For the server's default policy, and for decoding always on and
    always off the loop (each its own server process, one after the other): one edge sends the request back to back
    (unary) for ``seconds`` while a second client calls GetModelInfo every ``probe_interval_ms``; a decode on
    the loop makes that call wait. Returns Infer p50 and the probe's p50 / p99 / max (ms) per policy."""
    from hnd.edge.client import ClientSettings, SplitClient
    from hnd.server.local import free_port
    from hnd.server.service import OFFLOAD_DECODE_BYTES

    request, _ = make_request(config, seed, bits, size)
    tensor = request.bottleneck.tensor
    out: dict[str, Any] = {
        "config": config,
        "payload_bytes": len(tensor.data),
        "raw_bytes": tensor.raw_size,
        "learned": tensor.compression == LEARNED,
        "offload_decode_bytes": OFFLOAD_DECODE_BYTES,
        "policies": {},
    }
    settings = {"server default": "-1", "always on the loop": "none", "always off the loop": "0"}
    for name in policies:
        offload = settings[name]
        port = free_port()
        proc = start_child(
            ["--serve", "hnd", "--port", str(port), "--config", config, "--seed", str(seed)]
            + ["--offload-decode-bytes", offload]
        )
        try:
            edge, probe = (SplitClient(ClientSettings(f"127.0.0.1:{port}")) for _ in range(2))
            edge.model_info()
            probe.model_info()
            edge.submit(request).result()  # warm
            stop_at = time.monotonic() + seconds
            infer_ms: list[float] = []
            sender = threading.Thread(target=_send_until, args=(edge, request, stop_at, infer_ms), daemon=True)
            sender.start()
            waits = []
            while time.monotonic() < stop_at:
                t = time.perf_counter_ns()
                probe.model_info()
                waits.append((time.perf_counter_ns() - t) / 1e6)
                time.sleep(probe_interval_ms / 1e3)
            sender.join()
            edge.close()
            probe.close()
        finally:
            stop_child(proc)
        out["policies"][name] = {
            "infer_ms_p50": float(np.median(infer_ms)),
            "infers": len(infer_ms),
            "probe_ms": {**percentiles(waits, (50, 99)), "max": max(waits)},
            "probes": len(waits),
        }
    return out


def _send_until(client, request, stop_at: float, out: list[float]) -> None:
    """Unary requests back to back until ``stop_at`` (monotonic); appends each one's ms to ``out``."""
    while time.monotonic() < stop_at:
        t = time.perf_counter_ns()
        reply = client.submit(request).result()
        out.append((reply.done_ns - t) / 1e6)


def format_probe(r: dict[str, Any]) -> str:
    kind = "learned entropy coding" if r["learned"] else f"affine, {r['raw_bytes']:,} B packed"
    lines = [
        f"{r['config']}: payload {r['payload_bytes']:,} B ({kind}); server default: off the loop from "
        f"{r['offload_decode_bytes']:,} B packed and for learned coding"
    ]
    for name, p in r["policies"].items():
        q = p["probe_ms"]
        lines.append(
            f"  decode {name:<20} Infer p50 {p['infer_ms_p50']:8.2f} ms ({p['infers']} calls)   GetModelInfo meanwhile "
            f"p50 {q['p50']:.2f} / p99 {q['p99']:.2f} / max {q['max']:.2f} ms ({p['probes']} calls)"
        )
    return "\n".join(lines)


def _figures(f: list[Sample], h: list[Sample]) -> dict[str, Any]:
    """Floor and hnd figures of one call type: percentiles, server stages, ratio of the p50s, target."""
    floor_p = percentiles([s.total_ms for s in f])
    over_p = percentiles([s.overhead_ms for s in h])
    return {
        "floor_ms": floor_p,
        "hnd_total_ms": percentiles([s.total_ms for s in h]),
        "hnd_overhead_ms": over_p,
        "server_ms": {
            k: percentiles([getattr(s, f"{k}_ms") for s in h], (50,))["p50"]
            for k in ("decode", "queue", "compute", "encode")
        },
        "ratio_p50": over_p["p50"] / floor_p["p50"],
        "target_met": over_p["p50"] <= TARGET_RATIO * floor_p["p50"],
    }


def format_table(r: dict[str, Any]) -> str:
    lines = [
        f"{r['config']} ({r['tail']} tail), frame {r['frame'][1]}x{r['frame'][0]}, {r.get('codec', 'zstd')}: "
        f"request {r['message_bytes']:,} B (payload {r['payload_bytes']:,} B), reply {r['reply_bytes']:,} B, "
        f"{r['requests_per_mode']} requests per mode, one in flight; load average {r['load_average']:.1f} on "
        f"{r['cpus']} CPUs",
        f"{'call':<8}{'floor p50/p95 ms':>20}{'hnd total p50/p95':>20}{'hnd overhead p50/p95':>23}"
        f"{'server dec/queue/comp/enc p50':>32}{'overhead/floor':>16}  target <= {TARGET_RATIO:g}x",
    ]
    rows = [(call, m) for call, m in r["modes"].items()]
    rows += [(f"{call}*", m) for call, m in r.get("compare", {}).get("modes", {}).items()]
    for call, m in rows:
        lines.append(_row(call, m))
    if "compare" in r:
        lines.append(f"* the same against the hnd server of {r['compare']['python']}")
    if "small" in r:
        sm = r["small"]
        lines.append(
            f"small messages, same rounds: unary {sm['unary']} ({sm['message_bytes']['unary']:,} B), "
            f"stream {sm['stream']} ({sm['message_bytes']['stream']:,} B):"
        )
        for call, m in sm["modes"].items():
            lines.append(_row(call, m))
        for call, m in sm.get("compare_modes", {}).items():
            lines.append(_row(f"{call}*", m))
    if "ladder" in r:
        lines.append("end to end p50 ms, measured in the same rounds (each rung adds a part of hnd's request path):")
        lines.append(
            f"  {'call':<8}{'floor':>8}{'+ proto in/out':>16}{'+ validate/decode':>19}{'+ batch queue':>15}{'hnd':>8}"
        )
        for call in ("unary", "stream"):
            m = r["modes"][call]
            p = [r["ladder"][step][call]["hnd_total_ms"]["p50"] for step in LADDER]
            lines.append(
                f"  {call:<8}{m['floor_ms']['p50']:>8.2f}{p[0]:>16.2f}{p[1]:>19.2f}{p[2]:>15.2f}"
                f"{m['hnd_total_ms']['p50']:>8.2f}"
            )
        small_ladder = r.get("small", {}).get("ladder_p50_ms")
        for call in ("unary", "stream") if small_ladder else ():
            p = [small_ladder[name][call] for name in ("floor", *LADDER, "hnd")]
            lines.append(f"  {call + '*':<8}{p[0]:>8.2f}{p[1]:>16.2f}{p[2]:>19.2f}{p[3]:>15.2f}{p[4]:>8.2f}")
        if small_ladder:
            lines.append("  * the 4-bit intra message (small messages, unary and on a stream)")
    if "profile_ms" in r:
        small = r.get("small", {}).get("profile_ms")
        lines.append(
            "in-process CPU steps (median ms)" + (": the 107 kB message, the 4-bit intra one" if small else ":")
        )
        big = r["profile_ms"]
        for k in _merged_steps(list(big), list(small or ())):
            cells = [f"{d[k]:>8.3f}" if k in d else " " * 8 for d in (big, *([small] if small else []))]
            lines.append((f"  {k:<46}" + "".join(cells)).rstrip())
    return "\n".join(lines)


def _merged_steps(first: list[str], second: list[str]) -> list[str]:
    """The step names of two profiles in path order: ``first``'s, with each of ``second``'s own steps after the
    step it follows there (the decode's steps differ with the bit width)."""
    out = list(first)
    for i, k in enumerate(second):
        if k not in out:
            out.insert(out.index(second[i - 1]) + 1 if i else 0, k)
    return out


def _row(call: str, m: dict[str, Any]) -> str:
    f, t, o, s = m["floor_ms"], m["hnd_total_ms"], m["hnd_overhead_ms"], m["server_ms"]
    server = f"{s['decode']:.2f}/{s['queue']:.2f}/{s['compute']:.2f}/{s['encode']:.2f}"
    return (
        f"{call:<8}{f['p50']:>11.2f} / {f['p95']:<6.2f}{t['p50']:>11.2f} / {t['p95']:<6.2f}"
        f"{o['p50']:>14.2f} / {o['p95']:<6.2f}{server:>32}{m['ratio_p50']:>15.2f}x  "
        f"{'met' if m['target_met'] else 'NOT met'}"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hnd.bench.overhead", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--seed", type=int, default=0, help="seeded random weights (both sides)")
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--frame", default="480x640", help="HxW the sample photo is resized to (default 480x640)")
    p.add_argument("--requests", type=int, default=200, help="timed requests per mode")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds the requests are split into")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--tail", default="trivial", help="trivial (default) | real | sleep[:BASE_MS,PER_IMAGE_MS]")
    p.add_argument("--detections", type=int, default=100, help="detections the trivial tail returns per image")
    p.add_argument("--profile", action="store_true", help="add an in-process breakdown of the CPU steps")
    p.add_argument(
        "--small",
        action="store_true",
        help="also the small messages in the same rounds: 4-bit native size, intra on unary, temporal deltas on the stream",
    )
    p.add_argument(
        "--compare-python",
        metavar="PYTHON",
        help="also measure the hnd server of another build (its venv's python) in the same rounds",
    )
    p.add_argument(
        "--ladder",
        action="store_true",
        help="also time servers that do only part of hnd's path (proto in/out; + validate/decode) in the same rounds",
    )
    p.add_argument(
        "--loop-probe",
        action="store_true",
        help="instead: does decoding off the event loop pay? GetModelInfo latency while the request decodes, "
        "server default vs always on / always off the loop",
    )
    p.add_argument("--seconds", type=float, default=5.0, help="--loop-probe: seconds per policy")
    p.add_argument("--json", help="write the result as JSON")
    # Child-process entry points (used by run()).
    p.add_argument("--serve", choices=("floor", "hnd", *(f"ladder-{s}" for s in LADDER)), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--reply-bytes", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--max-batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--max-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--offload-decode-bytes", default="-1", help=argparse.SUPPRESS)  # -1 default, none: never
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.serve:  # a child process: serve until terminated
        asyncio.run(child_server(args))
        return 0
    try:
        h, w = (int(v) for v in args.frame.lower().split("x"))
    except ValueError:
        p.error(f"--frame must be HxW, got {args.frame!r}")
    if args.loop_probe:
        probe = loop_probe(args.config, args.seed, args.bits, (h, w), args.seconds)
        print(format_probe(probe))
        if args.json:
            atomic_write_json(args.json, probe)
        return 0
    result = run(
        args.config,
        args.seed,
        args.bits,
        (h, w),
        args.requests,
        args.rounds,
        args.warmup,
        args.tail,
        args.detections,
        args.profile,
        args.compare_python,
        args.ladder,
        args.small,
    )
    print(format_table(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
