"""The edge loop: capture -> preprocess -> head -> encode -> send, with up to K requests in flight.

While frame i is on the wire or on the server, the head already runs on frame i+1;
results are reported in frame order. Every frame ends as one record: answered (with
detections and per-stage durations) or failed (with its gRPC status code).

Modes: ``split`` (head on the edge, bottleneck on the wire), ``offload`` (the JPEG/PNG
frame on the wire, the whole model on the server) and ``local`` (the whole model here).

Neural filter (``EdgeOptions.filter_threshold``, split and local modes; the student must carry
an Ext4ResNet): preprocess -> stem -> filter; a frame whose probability is below the threshold
is not encoded nor sent. Its record says ``filtered: true`` with ``filter_probability`` and
``ms.filter``, and its detections are the model kind's normal empty result.
"""
from __future__ import annotations

import concurrent.futures
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import grpc
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hnd.common import codec, wire
from hnd.common.neural_filter import empty_detections, get_filter
from hnd.common.split import Head, split_model
from hnd.common.timing import ms_since, now_ns, percentiles
from hnd.edge.capture import Frame, FrameSource
from hnd.edge.client import EdgeError, SplitClient, next_request_id
from hnd.proto.v1 import split_inference_pb2 as pb

log = logging.getLogger("hnd.edge")

STAGES = ("capture", "preprocess", "head", "filter", "encode", "network_server", "total")
SERVER_STAGES = ("decode", "queue", "compute", "encode")


@dataclass
class EdgeOptions:
    mode: str = "split"  # split | offload | local
    bits: int = 8
    granularity: str = "tensor"
    compression: str = "zstd"
    level: int = 3
    image_format: str = "jpeg"  # offload: jpeg | png
    jpeg_quality: int = 90
    max_inflight: int = 2
    stream: bool = False
    score_threshold: float | None = None
    retry_unavailable: bool = True  # after a reconnect, resend a frame that failed with UNAVAILABLE
    keep_detections: bool = True  # put boxes / labels / scores in the records
    # Neural filter: frames whose probability of holding anything to detect is below this are not
    # sent (split) or not run (local). None: off. Needs a student with a filter (model.filter).
    filter_threshold: float | None = None


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 RGB -> [3, H, W] float32 in 0..1 (as torchvision's to_tensor)."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(255)


@dataclass
class Prepared:
    """A frame made ready to send (or already computed, in local mode)."""

    frame: Frame
    ms: dict[str, float]
    request: pb.InferRequest | None = None
    payload_bytes: int = 0
    message_bytes: int = 0
    local_result: list[dict[str, torch.Tensor]] | None = None
    done_ns: int = 0
    filtered: bool | None = None  # None: no filter ran
    filter_probability: float | None = None


@dataclass
class Summary:
    frames: int = 0
    answered: int = 0
    failed: int = 0
    dropped: int = 0
    wall_s: float = 0.0
    payload_bytes: list[int] = field(default_factory=list)
    message_bytes: list[int] = field(default_factory=list)
    ms: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    server_ms: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SERVER_STAGES})
    overhead_ms: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    filter_threshold: float | None = None  # set when the neural filter ran
    filtered: int = 0  # answered frames the filter dropped (nothing sent; counted in answered)
    filter_probability: list[float] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.answered / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def sent(self) -> int:
        """Answered frames that went through the model past the filter (sent to the server in split mode)."""
        return self.answered - self.filtered

    def filter_stats(self) -> dict[str, Any] | None:
        """Frames sent / filtered and the bytes the filter saved, None when no filter ran.

        Saved bytes are an estimate: the mean payload (and message) size of the frames that were
        sent, times the number of filtered frames (a filtered frame's bottleneck is never encoded).
        """
        if self.filter_threshold is None:
            return None
        mean_payload = float(np.mean(self.payload_bytes)) if self.payload_bytes else 0.0
        mean_message = float(np.mean(self.message_bytes)) if self.message_bytes else 0.0
        return {
            "threshold": self.filter_threshold, "sent": self.sent, "filtered": self.filtered,
            "filtered_share": self.filtered / self.answered if self.answered else 0.0,
            "payload_bytes_saved_est": mean_payload * self.filtered,
            "message_bytes_saved_est": mean_message * self.filtered,
            "probability": percentiles(self.filter_probability, (50,)),
        }

    def add(self, record: dict[str, Any]) -> None:
        self.frames += 1
        self.statuses[record["status"]] = self.statuses.get(record["status"], 0) + 1
        if record["status"] != "OK":
            self.failed += 1
            return
        self.answered += 1
        if "filter_probability" in record:
            self.filter_probability.append(record["filter_probability"])
        if record.get("filtered"):
            self.filtered += 1  # nothing went on the wire: keep it out of the bytes/frame figures
        else:
            self.payload_bytes.append(record["bytes"]["payload"])
            self.message_bytes.append(record["bytes"]["message"])
        for s in STAGES:
            if s in record["ms"]:
                self.ms[s].append(record["ms"][s])
        for s in SERVER_STAGES:
            if s in record.get("server_ms", {}):
                self.server_ms[s].append(record["server_ms"][s])
        if "overhead" in record["ms"]:
            self.overhead_ms.append(record["ms"]["overhead"])

    def as_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames, "answered": self.answered, "failed": self.failed, "dropped": self.dropped,
            "statuses": self.statuses, "wall_s": self.wall_s, "fps": self.fps,
            "payload_bytes": percentiles(self.payload_bytes, (50,)),
            "message_bytes": percentiles(self.message_bytes, (50,)),
            "ms": {s: percentiles(v) for s, v in self.ms.items() if v},
            "server_ms": {s: percentiles(v) for s, v in self.server_ms.items() if v},
            "overhead_ms": percentiles(self.overhead_ms),
            **({"filter": self.filter_stats()} if self.filter_threshold is not None else {}),
        }

    def format(self) -> str:
        d = self.as_dict()
        lines = [
            f"frames {d['frames']}  answered {d['answered']}  failed {d['failed']}  dropped {d['dropped']}  "
            f"fps {d['fps']:.2f}  wall {d['wall_s']:.1f} s",
        ]
        if self.filter_threshold is not None:
            f = d["filter"]
            lines.append(f"filter threshold {f['threshold']:g}  sent {f['sent']}  filtered {f['filtered']} "
                         f"({100 * f['filtered_share']:.0f}%)  bytes saved ~{f['payload_bytes_saved_est']:,.0f} payload"
                         f" / ~{f['message_bytes_saved_est']:,.0f} message (mean of sent frames x filtered)")
        if self.answered:
            if self.payload_bytes:  # none when the filter dropped every frame
                lines.append(f"bytes/frame  payload mean {d['payload_bytes']['mean']:,.0f} "
                             f"p50 {d['payload_bytes']['p50']:,.0f}  message mean {d['message_bytes']['mean']:,.0f} "
                             f"p50 {d['message_bytes']['p50']:,.0f}")
            lines.append(f"{'stage (ms)':<22}{'p50':>10}{'p95':>10}{'p99':>10}")
            for name, stats in [(s, d["ms"][s]) for s in STAGES if s in d["ms"]] + \
                    [(f"server.{s}", d["server_ms"][s]) for s in SERVER_STAGES if s in d["server_ms"]] + \
                    ([("overhead", d["overhead_ms"])] if self.overhead_ms else []):
                lines.append(f"{name:<22}{stats['p50']:>10.2f}{stats['p95']:>10.2f}{stats['p99']:>10.2f}")
        if self.failed:
            lines.append("statuses " + ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items())))
        return "\n".join(lines)


def _detections_json(dets: list[dict[str, torch.Tensor]], keep: bool) -> list[dict[str, Any]]:
    out = []
    for d in dets:
        item: dict[str, Any] = {"count": int(d["scores"].shape[0])}
        if keep:
            item["boxes"] = [[round(float(v), 2) for v in box] for box in d["boxes"].tolist()]
            item["labels"] = d["labels"].tolist()
            item["scores"] = [round(float(s), 4) for s in d["scores"].tolist()]
            if "keypoints" in d:
                item["keypoints"] = [[[round(float(v), 1) for v in p] for p in kp] for kp in d["keypoints"].tolist()]
        out.append(item)
    return out


class EdgeRunner:
    """Runs frames through one mode and yields records in frame order.

    head / fingerprint: for split mode; model: for local mode; client: for split and offload.
    """

    def __init__(
        self,
        options: EdgeOptions,
        head: Head | None = None,
        fingerprint: str = "",
        model: nn.Module | None = None,
        client: SplitClient | None = None,
    ) -> None:
        if options.mode == "split" and (head is None or client is None):
            raise ValueError("split mode needs a head and a client")
        if options.mode == "offload" and client is None:
            raise ValueError("offload mode needs a client")
        if options.mode == "local" and model is None:
            raise ValueError("local mode needs the full model")
        if options.max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        self.options = options
        self.head = head
        self.fingerprint = fingerprint
        self.model = model
        self.client = client
        self.last_detections: list[dict[str, torch.Tensor]] | None = None
        self._local_split: tuple[Head, nn.Module] | None = None
        if options.filter_threshold is not None:
            if not 0.0 <= options.filter_threshold <= 1.0:
                raise ValueError(f"filter_threshold must be in [0, 1], got {options.filter_threshold}")
            if options.mode == "offload":
                raise ValueError("the neural filter runs on the edge's head: split or local mode, not offload")
            if get_filter(head if options.mode == "split" else model) is None:
                raise ValueError("filter_threshold needs a student with a neural filter (config model.filter)")
            if options.mode == "local":
                # head + tail share the model's modules; tail(head(x)) == model(x) bit for bit.
                self._local_split = split_model(model)

    # --- per frame ------------------------------------------------------------------------------

    @torch.inference_mode()
    def prepare(self, frame: Frame) -> Prepared:
        """Everything the edge computes for a frame before it goes on the wire."""
        o = self.options
        ms = {"capture": frame.capture_ms}
        start = now_ns()
        if o.mode == "local" and self._local_split is not None:
            return self._prepare_local_filtered(frame, ms, start)
        if o.mode == "local":
            img = to_tensor(frame.image)
            ms["preprocess"] = ms_since(start)
            t = now_ns()
            result = self.model([img])
            ms["head"] = ms_since(t)  # the whole model: it all runs on the edge
            return Prepared(frame, ms, local_result=result, done_ns=now_ns())
        request = pb.InferRequest(request_id=next_request_id(frame.index), weights_fingerprint=self.fingerprint)
        if o.score_threshold is not None:
            request.score_threshold = o.score_threshold
        filtered: bool | None = None
        probability: float | None = None
        if o.mode == "split":
            batch, meta = self.head.preprocess([to_tensor(frame.image)])
            ms["preprocess"] = ms_since(start)
            t = now_ns()
            if o.filter_threshold is None:
                z = self.head.encode(batch)
                ms["head"] = ms_since(t)
            else:
                features = self.head.stem(batch)
                stem_ms = ms_since(t)
                probability, filtered = self._run_filter(features, ms)
                if filtered:
                    ms["head"] = stem_ms  # the encoder never ran
                    return self._filtered(frame, ms, probability, torch.uint8)  # masks as the wire gives them
                t = now_ns()
                z = self.head.encode_features(features)
                ms["head"] = stem_ms + ms_since(t)
            t = now_ns()
            encoded = codec.encode(z, o.bits, o.granularity, o.compression, o.level)
            request.bottleneck.CopyFrom(wire.bottleneck_to_proto(encoded, meta))
            payload = len(encoded.payload)
        else:  # offload: the frame itself, compressed as an image
            ms["preprocess"] = 0.0
            ms["head"] = 0.0
            t = now_ns()
            bgr = cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR)
            if o.image_format == "png":
                ok, buf = cv2.imencode(".png", bgr)
                request.image.format = pb.EncodedImage.FORMAT_PNG
            else:
                ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, o.jpeg_quality])
                request.image.format = pb.EncodedImage.FORMAT_JPEG
            if not ok:
                raise EdgeError(f"{frame.source}: cannot encode frame as {o.image_format}")
            request.image.data = buf.tobytes()
            payload = len(request.image.data)
        ms["encode"] = ms_since(t)
        return Prepared(frame, ms, request=request, payload_bytes=payload, message_bytes=request.ByteSize(),
                        filtered=filtered, filter_probability=probability)

    def _run_filter(self, features: torch.Tensor, ms: dict[str, float]) -> tuple[float, bool]:
        """(probability, filtered) of one frame's stem output [1, 64, h, w]; times ms["filter"]."""
        t = now_ns()
        probability = float(self.head_for_filter.filter_probability(features)[0])
        ms["filter"] = ms_since(t)
        return probability, probability < self.options.filter_threshold

    @property
    def head_for_filter(self) -> Head:
        return self.head if self._local_split is None else self._local_split[0]

    def _filtered(self, frame: Frame, ms: dict[str, float], probability: float, mask_dtype: torch.dtype) -> Prepared:
        """A frame the filter dropped: no request, the kind's normal empty result."""
        head = self.head_for_filter
        h, w = frame.image.shape[:2]
        empty = empty_detections(head.kind, (h, w), head.num_keypoints or 17, mask_dtype)
        return Prepared(frame, ms, local_result=[empty], done_ns=now_ns(), filtered=True,
                        filter_probability=probability)

    def _prepare_local_filtered(self, frame: Frame, ms: dict[str, float], start: int) -> Prepared:
        """Local mode with the filter: preprocess -> stem -> filter -> (encoder -> tail) on the edge."""
        head, tail = self._local_split
        batch, meta = head.preprocess([to_tensor(frame.image)])
        ms["preprocess"] = ms_since(start)
        t = now_ns()
        features = head.stem(batch)
        stem_ms = ms_since(t)
        probability, filtered = self._run_filter(features, ms)
        if filtered:
            ms["head"] = stem_ms
            return self._filtered(frame, ms, probability, torch.float32)  # masks as torchvision gives them
        t = now_ns()
        result = tail(head.encode_features(features), meta)
        ms["head"] = stem_ms + ms_since(t)  # the whole model but the filter: it all runs on the edge
        return Prepared(frame, ms, local_result=result, done_ns=now_ns(), filtered=False,
                        filter_probability=probability)

    def _record(self, p: Prepared, status: str = "OK", error: str | None = None,
                reply=None) -> dict[str, Any]:
        f = p.frame
        record: dict[str, Any] = {
            "frame": f.index, "source": f.source, "wall_time": round(f.wall_time, 6), "mode": self.options.mode,
            "status": status, "bytes": {"payload": p.payload_bytes, "message": p.message_bytes},
            "ms": {k: round(v, 3) for k, v in p.ms.items()},
        }
        if p.filtered is not None:
            record["filtered"] = p.filtered
            record["filter_probability"] = round(p.filter_probability, 6)
        if error:
            record["error"] = error
            return record
        if reply is not None:
            t = reply.response.timings
            server = {"decode": t.decode_us / 1e3, "queue": t.queue_us / 1e3, "compute": t.compute_us / 1e3,
                      "encode": t.encode_us / 1e3}
            record["server_ms"] = server
            record["bytes"]["response"] = reply.response.ByteSize()  # the link model needs both directions
            record["batch_size"] = t.batch_size
            record["ms"]["network_server"] = round((reply.done_ns - p.done_ns) / 1e6, 3)
            done = reply.done_ns
            dets = [wire.detections_from_proto(d) for d in reply.response.detections]
            compute = server["compute"]
        else:
            done = p.done_ns
            dets = p.local_result
            compute = 0.0
        total = (done - f.captured_ns) / 1e6
        record["ms"]["total"] = round(total, 3)
        edge = p.ms.get("preprocess", 0) + p.ms.get("head", 0) + p.ms.get("filter", 0) + p.ms.get("encode", 0)
        record["ms"]["overhead"] = round(total - edge - compute, 3)
        record["detections"] = _detections_json(dets, self.options.keep_detections)
        self.last_detections = dets
        return record

    def _send(self, p: Prepared) -> concurrent.futures.Future:
        p.done_ns = now_ns()
        return self.client.submit(p.request, stream=self.options.stream)

    def _finish(self, p: Prepared, future: concurrent.futures.Future) -> dict[str, Any]:
        try:
            return self._record(p, reply=future.result())
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE and self.options.retry_unavailable:
                log.warning("frame %d: server unavailable, reconnecting", p.frame.index)
                if self.client.reconnect():
                    p.request.request_id = next_request_id(p.frame.index)
                    try:
                        record = self._record(p, reply=self._send(p).result())
                    except grpc.RpcError as again:
                        record = self._record(p, status=again.code().name, error=again.details())
                    record["attempts"] = 2
                    return record
            return self._record(p, status=code.name, error=exc.details())
        except EdgeError as exc:
            return self._record(p, status="UNAVAILABLE", error=str(exc))

    # --- the loop -------------------------------------------------------------------------------

    def run(
        self,
        source: FrameSource,
        on_record: Callable[[dict[str, Any], Frame], None] | None = None,
        progress: bool = False,
    ) -> Summary:
        """Process every frame the source yields; returns the summary (records go to ``on_record``)."""
        summary = Summary(filter_threshold=self.options.filter_threshold)
        inflight: deque[tuple[Prepared, concurrent.futures.Future | None]] = deque()
        start = time.perf_counter()
        bar = tqdm(desc=f"hnd-edge {self.options.mode}", unit="frame", disable=not progress, leave=False)

        def emit(p: Prepared, fut: concurrent.futures.Future | None) -> None:
            if p.frame.error is not None:
                record = self._record(p, status="INVALID_ARGUMENT", error=p.frame.error)
            elif fut is None:
                record = self._record(p)
            else:
                record = self._finish(p, fut)
            summary.add(record)
            bar.update(1)
            if on_record is not None:
                on_record(record, p.frame)

        try:
            for frame in source:
                if frame.error is not None:
                    p, fut = Prepared(frame, {"capture": frame.capture_ms}), None
                else:
                    p = self.prepare(frame)
                    fut = self._send(p) if p.request is not None else None
                inflight.append((p, fut))
                while len(inflight) >= self.options.max_inflight or (inflight and inflight[0][1] is None):
                    emit(*inflight.popleft())
            while inflight:
                emit(*inflight.popleft())
        finally:
            bar.close()
            source.close()
        summary.wall_s = time.perf_counter() - start
        summary.dropped = source.dropped
        return summary
