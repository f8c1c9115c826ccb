"""The hnd.v1.SplitInference service: validate, decode, batch, run the tail, answer.

Every request is validated before any work (fingerprint, payload, shapes, codec
settings, limits); a bad one gets one status code and one server log line, and the
server goes on serving the others. Handlers take the raw request bytes so that even
unparseable bytes get INVALID_ARGUMENT rather than a generic INTERNAL error.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError
from PIL import Image
from torch import nn
from torchvision.models.detection.image_list import ImageList

import hnd
from hnd.common import codec, wire
from hnd.common.channel import REPLICA_KEY, SERVICE_NAME, TAIL_KEY, WEIGHTS_KEY
from hnd.common.checkpoint import fingerprint
from hnd.common.meta import FingerprintMismatch, check_fingerprint
from hnd.common.models import bottleneck_channels_of, bottleneck_type_of, model_kind
from hnd.common.sizes import bottleneck_hw
from hnd.common.split import SplitMeta, concat_meta, split_model
from hnd.common.video import VideoError
from hnd.proto.v1 import split_inference_pb2 as pb
from hnd.proto.v1 import tensor_pb2
from hnd.server.accel import TailOptions, build_tail, tail_info
from hnd.server.batching import Batcher, BatcherEvents, BatcherStopped, DeadlineExpired, QueueFull
from hnd.server.budget import (
    BudgetError,
    MessageBytes,
    check_bottleneck_shape,
    check_originals,
    check_split_meta,
    make_budget,
)
from hnd.server.metrics import STAGES, ServerMetrics
from hnd.server.streams import KeyFrameRequired, StreamLimits, StreamSession, StreamSessions, video_request
from hnd.server.text import RateLimitedLog, client_text

if TYPE_CHECKING:
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

log = logging.getLogger("hnd.server")

IMAGE_FORMATS = {
    pb.EncodedImage.FORMAT_JPEG: "JPEG",
    pb.EncodedImage.FORMAT_PNG: "PNG",
    pb.EncodedImage.FORMAT_WEBP: "WEBP",
}


@dataclass(frozen=True)
class SplitPayload:
    """A decoded bottleneck request: z [B, C, h, w] and its images' sizes; batched with same-shape ones."""

    z: torch.Tensor
    meta: SplitMeta


@dataclass(frozen=True)
class ImagePayload:
    """A full-offload image after the model's transform (normalized, resized: [1, 3, Hp, Wp] float32, at most
    the model's max_size per side whatever the picture's size), its resized and original sizes; the rest of
    the model runs on it (ModelRunner.run_images)."""

    image: torch.Tensor
    image_size: tuple[int, int]
    original_size: tuple[int, int]


Payload = SplitPayload | ImagePayload


class RequestError(Exception):
    """A request refused with a gRPC status code; the message goes to the client.

    reason: a short fixed label for the refusals metric (never client text).
    """

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


def bad_bottleneck(exc: codec.CodecError) -> RequestError:
    """A bottleneck the codec refused, wherever it was decoded (on the loop or the decode thread)."""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"bad bottleneck: {exc}", "codec")


# Serialized request bytes held in flight over all calls: 8 messages of the largest size (max_message_bytes).
MAX_INFLIGHT_MESSAGE_BYTES = 256 * 2**20


@dataclass
class ServerLimits:
    """Bounds enforced on every request (docs/concepts/split.md, invariant 5)."""

    max_message_bytes: int = 32 * 1024 * 1024
    codec: codec.Limits = field(default_factory=lambda: codec.DEFAULT_LIMITS)
    max_images_per_request: int = 8
    max_image_pixels: int = 4096 * 4096
    max_stream_inflight: int = 32
    # Accepted resize (hnd.server.budget): None = the model's own min_size / max_size.
    max_short_side: int | None = None
    max_long_side: int | None = None
    max_original_side: int = 8192
    # Mask R-CNN pastes detections_per_img float32 masks per image at its original size: this bounds them
    # per request (and so the original pixels a request may declare).
    max_mask_bytes: int = 1 << 30
    # Serialized request bytes held from receipt to answer, over all calls (hnd.server.budget.MessageBytes).
    max_inflight_message_bytes: int | None = MAX_INFLIGHT_MESSAGE_BYTES
    streams: StreamLimits = field(default_factory=StreamLimits)  # per-InferStream sessions (server/streams.py)


# Affine bottlenecks of at least this many packed bytes (raw_size) are decoded off the event loop. Below it
# the decode (about 0.6 ms for the 169 kB of a 640x480 frame at 8 bits on the project machine) costs less
# than blocking the loop matters, and a lone request would pay the hop to the decode thread and back
# (~0.05 ms) for nothing. Learned entropy coding, images and H.264 / HEVC frames are always decoded off the
# loop (~120 ms for a 24-channel latent of an 800-px input; 88-178 ms for a 1080p video frame):
# python -m hnd.bench.overhead --profile.
OFFLOAD_DECODE_BYTES = 1 << 20


# Decoded bytes all waiting requests may hold: 512 MiB is 40 full-size 800x1333 float32 frames, or about 600
# 3-channel bottlenecks of them (about 0.8 MB each, decoded to float32).
MAX_QUEUE_BYTES = 512 * 2**20


@dataclass
class BatchingOptions:
    max_batch: int = 8
    max_delay_ms: float = 0.0
    max_queue: int = 64
    # Bytes the queued requests' decoded payloads may hold in all (hnd.server.batching; None: no byte bound).
    max_queue_bytes: int | None = MAX_QUEUE_BYTES
    # Decode bottlenecks of at least this many packed bytes, every learned-coded one, images and video frames
    # on a decode thread instead of the event loop (None: always on the loop).
    offload_decode_bytes: int | None = OFFLOAD_DECODE_BYTES
    # Requests waiting for the decode thread or on it; beyond it RESOURCE_EXHAUSTED.
    max_decode_queue: int = 16


@dataclass(frozen=True)
class DeferredDecode:
    """A validated request whose decode runs on the service's decode thread (``SplitInferenceService.infer``):
    ``run()`` -> (payload, stream note). Large and learned-coded bottlenecks, images and video frames."""

    run: Callable[[], tuple[Payload, str]]


class ModelRunner:
    """The model on its device: tail batches for split requests, the whole model for images."""

    def __init__(self, model: nn.Module, device: torch.device, tail_options: TailOptions | None = None) -> None:
        self.kind = model_kind(model)
        self.channels = bottleneck_channels_of(model)
        self.fingerprint = fingerprint(model)
        # Typed parts (attribute access types every part "Tensor | Module"; torchvision has no type hints).
        transform: GeneralizedRCNNTransform = model.get_submodule("transform")
        roi_heads: RoIHeads = model.get_submodule("roi_heads")
        self.min_size = int(transform.min_size[-1])
        self.max_size = int(transform.max_size)
        self.size_divisible = int(transform.size_divisible)
        # Masks pasted per image at its original size (0: the model predicts no masks).
        self.mask_detections = int(roi_heads.detections_per_img) if roi_heads.has_mask() else 0
        predictor = getattr(model.roi_heads, "keypoint_predictor", None)
        self.num_keypoints = int(predictor.kps_score_lowres.out_channels) if predictor is not None else 0
        self.device = device
        self.model = model.to(device).eval()
        self.head, self.tail = split_model(self.model)
        # Reduced precision / channels_last / torch.compile of the dense part (hnd.server.accel); fp32
        # defaults keep the plain Tail: bit for bit the in-process tail.
        self.tail_options = tail_options or TailOptions()
        self.tail = build_tail(self.tail, self.tail_options, device)
        self.tail_info = tail_info(self.tail_options, device)
        # Entropic Students code against their prior's integer tables (from the weights, so the
        # fingerprint covers them); HND students take the affine modes.
        self.bottleneck_type = bottleneck_type_of(self.model)
        self.prior = self.head.prior_tables() if self.bottleneck_type == "entropic" else None
        self.images_computed = 0  # bottleneck images run through the tail (tests check dropped work)

    @torch.inference_mode()
    def run_split(self, items: list[SplitPayload]) -> list[list[dict[str, torch.Tensor]]]:
        """Batch same-shape bottlenecks [B_i, C, h, w] -> per request, its images' detections (on CPU)."""
        # One request: its tensor as it is (no copy); several: one concatenation, then one transfer.
        z = items[0].z if len(items) == 1 else torch.cat([item.z for item in items])
        z = z.to(self.device)
        self.images_computed += z.shape[0]
        out = self.tail(z, items[0].meta if len(items) == 1 else concat_meta([item.meta for item in items]))
        if self.device.type != "cpu":
            out = [{k: v.cpu() for k, v in d.items()} for d in out]
        results, i = [], 0
        for item in items:
            results.append(out[i : i + item.z.shape[0]])
            i += item.z.shape[0]
        return results

    @torch.inference_mode()
    def transform_image(self, rgb: torch.Tensor) -> ImagePayload:
        """An offload picture [3, H, W] uint8 -> the model's transform of it as float 0..1 (on the decode thread,
        so a queued picture holds the model's size, not its own), on CPU."""
        images, _ = self.model.transform([rgb.float().div_(255)])
        return ImagePayload(images.tensors, tuple(images.image_sizes[0]), (int(rgb.shape[1]), int(rgb.shape[2])))

    @torch.inference_mode()
    def run_images(self, items: list[ImagePayload]) -> list[list[dict[str, torch.Tensor]]]:
        """The rest of the full model on one transformed image per request: the offload comparison.

        GeneralizedRCNN.forward after its transform, step for step, so that on CPU the detections are the
        model's on the decoded picture bit for bit."""
        m = self.model
        out = []
        for item in items:
            images = ImageList(item.image.to(self.device), [item.image_size])
            features = m.backbone(images.tensors)
            if isinstance(features, torch.Tensor):
                features = OrderedDict([("0", features)])
            proposals, _ = m.rpn(images, features)
            detections, _ = m.roi_heads(features, proposals, images.image_sizes)
            detections = m.transform.postprocess(detections, images.image_sizes, [item.original_size])
            out.append([{k: v.cpu() for k, v in d.items()} for d in detections])
        return out

    def compute(self, payloads: list[Payload]) -> list[list[dict[str, torch.Tensor]]]:
        """One batch (the batcher groups same-key payloads, so all of one kind)."""
        if isinstance(payloads[0], SplitPayload):
            return self.run_split(cast(list[SplitPayload], payloads))
        return self.run_images(cast(list[ImagePayload], payloads))

    def latent_size(self, padded_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the bottleneck for a padded input: Hp/4 + 4 (HND) or Hp/4 - 1 (Entropic Student)."""
        return bottleneck_hw(padded_size, self.bottleneck_type or "hnd")

    def codec_refusal(self, tensor: Any) -> str | None:
        """One line when a bottleneck's codec mode (hnd.v1.Tensor) is not this model's, else None."""
        learned = tensor.compression == tensor_pb2.COMPRESSION_LEARNED
        if self.prior is not None and not learned:
            name = (
                tensor_pb2.Compression.Name(tensor.compression)
                if tensor.compression in tensor_pb2.Compression.values()
                else str(tensor.compression)
            )
            return (
                f"this server runs an Entropic Student ({self.kind}): it takes only learned entropy coding "
                f"(compression learned, bits 0), not {tensor.bits}-bit {name}"
            )
        if self.prior is None and learned:
            return (
                f"this server runs an HND student ({self.kind}): learned entropy coding is for Entropic "
                f"Student models; send affine bits ({', '.join(map(str, codec.BITS))})"
            )
        return None

    def warm_up(self) -> None:
        """One tail pass on a zero bottleneck so the first request does not pay for lazy init."""
        size = (self.min_size // 32 * 32 or 32, self.min_size // 32 * 32 or 32)
        z = torch.zeros(1, self.channels, *self.latent_size(size))
        self.run_split([SplitPayload(z, SplitMeta(((size[0], size[1]),), ((size[0], size[1]),), size))])


def _images(payload: Payload) -> int:
    """Images a decoded payload carries: B of a split bottleneck [B, C, h, w], 1 for an image."""
    return int(payload.z.shape[0]) if isinstance(payload, SplitPayload) else 1


def _nbytes(payload: Payload) -> int:
    """Bytes a decoded payload holds while it waits (counted against max_queue_bytes)."""
    tensor = payload.z if isinstance(payload, SplitPayload) else payload.image
    return tensor.nelement() * tensor.element_size()


def gone_code(context: grpc.aio.ServicerContext) -> str:
    """The final code of a call whose handler was cancelled: its deadline passed, or the caller cancelled."""
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


def filter_detections(dets: dict[str, torch.Tensor], request: pb.InferRequest) -> dict[str, torch.Tensor]:
    if not request.HasField("score_threshold") and not request.HasField("max_detections"):
        return dets
    keep = torch.ones(dets["scores"].shape[0], dtype=torch.bool)
    if request.HasField("score_threshold"):
        keep &= dets["scores"] >= request.score_threshold
    idx = keep.nonzero().flatten()
    if request.HasField("max_detections"):
        idx = idx[: request.max_detections]
    return {k: v[idx] for k, v in dets.items()} if idx.numel() != keep.numel() else dets


def draining_error() -> RequestError:
    """What a draining server answers an InferStream (at its start, or after what it read is answered)."""
    return RequestError(
        grpc.StatusCode.UNAVAILABLE, "server is draining: reopen the stream on another replica", "draining"
    )


class StreamInflight:
    """An InferStream's requests read but not yet answered.

    ``pending``: (task, start ns, request id) in request order for the answering loop (at most
    ``max_inflight``), None after the last; ``tasks``: the same tasks, so that a refusal cancels the ones
    behind it; ``ended``: set by a refusal, so that no more are read.
    """

    def __init__(self, max_inflight: int) -> None:
        self.pending: asyncio.Queue[tuple[asyncio.Future, int, str] | None] = asyncio.Queue(maxsize=max_inflight)
        self.tasks: deque[asyncio.Future] = deque()
        self.ended = asyncio.Event()

    def add(self, task: asyncio.Future) -> None:
        self.tasks.append(task)
        task.add_done_callback(self.end_after)

    def end_after(self, failed: asyncio.Future) -> None:
        """A task's done callback: when it failed, stop reading and cancel the tasks behind it."""
        if failed.cancelled() or failed.exception() is None:
            return
        self.ended.set()
        behind = False
        for task in self.tasks:
            if behind and not task.done():
                task.cancel()
            behind = behind or task is failed

    def answered(self, task: asyncio.Future) -> None:
        if self.tasks and self.tasks[0] is task:
            self.tasks.popleft()

    def cancel_unanswered(self) -> int:
        """Cancels the tasks not done yet; returns how many were dropped (cancelled now or before)."""
        dropped = 0
        for task in self.tasks:
            if not task.done():
                task.cancel()
                dropped += 1
            elif task.cancelled():
                dropped += 1
        return dropped


class SplitInferenceService:
    """Request handling, independent of the transport setup in hnd.server.app."""

    def __init__(
        self,
        runner: ModelRunner,
        limits: ServerLimits,
        batching: BatchingOptions,
        metrics: ServerMetrics | None = None,
        offload: bool = True,
    ) -> None:
        self.runner = runner
        self.limits = limits
        self.metrics = metrics or ServerMetrics()
        self.offload = offload
        m = self.metrics
        self.batcher = Batcher(
            runner.compute,
            max_batch=batching.max_batch,
            max_delay_ms=batching.max_delay_ms,
            max_queue=batching.max_queue,
            max_queue_bytes=batching.max_queue_bytes,
            events=BatcherEvents(
                batch=m.batch_size.observe,
                depth=lambda n, nbytes: (m.queue_depth.set(n), m.queue_bytes.set(nbytes)),
                dropped=lambda reason, n: m.dropped.labels(reason).inc(n),
                late=m.late_images.inc,
            ),
        )
        self.batching = batching
        # One decode thread: large and learned-coded bottlenecks (BatchingOptions.offload_decode_bytes).
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hnd-decode")
        self._decoding = 0  # requests waiting for the decode thread or on it (at most max_decode_queue)
        self.messages = MessageBytes(limits.max_inflight_message_bytes, self.metrics.inflight_message_bytes.set)
        gauge = self.metrics.stream_sessions
        self.streams = StreamSessions(
            limits.streams,
            limits.codec,
            on_change=lambda bottleneck, video: (
                gauge.labels("bottleneck").set(bottleneck),
                gauge.labels("video").set(video),
            ),
            on_reclaim=lambda reason: self.metrics.stream_sessions_reclaimed.labels(reason).inc(),
        )
        self.draining = False
        self._stream_readers: set[asyncio.Task] = set()
        self.budget = make_budget(
            max_images=limits.max_images_per_request,
            model_min_size=runner.min_size,
            model_max_size=runner.max_size,
            size_divisible=runner.size_divisible,
            mask_detections=runner.mask_detections,
            max_short_side=limits.max_short_side,
            max_long_side=limits.max_long_side,
            max_original_side=limits.max_original_side,
            max_mask_bytes=limits.max_mask_bytes,
        )
        self.refusal_log = RateLimitedLog(log, on_suppressed=self.metrics.log_suppressed.inc)
        # Metric children looked up once (a labels() call takes a lock and hashes the label values).
        self._stage = {k: self.metrics.stage_seconds.labels(k) for k in STAGES}
        self._stream_messages = {k: self.metrics.stream_messages.labels(k) for k in ("answered", "refused", "dropped")}
        self._answered: dict[tuple[str, str], tuple[Any, Any]] = {}
        # Metadata every SplitInference call carries back (hnd.common.channel): weights and tail now,
        # the replica's name once the port is known (``name_replica``).
        self.call_metadata: tuple[tuple[str, str], ...] = (
            (WEIGHTS_KEY, runner.fingerprint),
            (TAIL_KEY, runner.tail_info["summary"]),
        )

    def name_replica(self, replica: str) -> None:
        """The name calls report in REPLICA_KEY (``<hostname>:<port>`` or --replica)."""
        self.call_metadata = ((REPLICA_KEY, replica), *((k, v) for k, v in self.call_metadata if k != REPLICA_KEY))

    def close(self) -> None:
        """Stop the decode thread (after the decode it is running, if any)."""
        self._decoder.shutdown(wait=False, cancel_futures=True)

    def _close_session(self, session: StreamSession) -> None:
        """Close a stream's session on the decode thread, after the decodes queued there (they use its video
        decoders), or here once that thread is shut down."""
        try:
            self._decoder.submit(session.close)
        except RuntimeError:
            session.close()

    def begin_drain(self) -> None:
        """Open InferStreams stop reading, answer what they read, then end UNAVAILABLE (clients
        resend the rest elsewhere); new streams are refused UNAVAILABLE."""
        self.draining = True
        self.refusal_log.flush()
        for reader in list(self._stream_readers):
            reader.cancel()

    # --- model info -------------------------------------------------------------------------

    def model_info(self) -> pb.ModelInfo:
        r = self.runner
        lim = self.limits
        b = self.budget
        entropic = r.prior is not None
        return pb.ModelInfo(
            model_kind=r.kind,
            bottleneck_channels=r.channels,
            weights_fingerprint=r.fingerprint,
            bottleneck_type=r.bottleneck_type or "",
            accepted_bits=[codec.LEARNED_BITS] if entropic else list(codec.BITS),
            accepted_granularities=[tensor_pb2.GRANULARITY_CHANNEL]
            if entropic
            else [tensor_pb2.GRANULARITY_TENSOR, tensor_pb2.GRANULARITY_CHANNEL, tensor_pb2.GRANULARITY_ORIGINAL],
            accepted_compressions=[tensor_pb2.COMPRESSION_LEARNED]
            if entropic
            else [tensor_pb2.COMPRESSION_NONE, tensor_pb2.COMPRESSION_ZSTD],
            accepted_image_formats=(list(IMAGE_FORMATS) + self.streams.video_format_enums()) if self.offload else [],
            limits=pb.ServerLimits(
                max_message_bytes=lim.max_message_bytes,
                max_elements=lim.codec.max_elements,
                max_decompressed_bytes=lim.codec.max_decompressed_bytes,
                max_dims=lim.codec.max_dims,
                max_batch=lim.max_images_per_request,
                max_queue=self.batching.max_queue,
                max_image_pixels=lim.max_image_pixels,
                max_short_side=b.max_short_side,
                max_long_side=b.max_long_side,
                size_divisible=b.size_divisible,
                max_padded_side=b.max_padded_side,
                max_padded_pixels=b.max_padded_pixels,
                max_original_side=b.max_original_side,
                max_original_pixels=b.max_original_pixels,
                max_mask_bytes=b.max_mask_bytes,
                max_stream_inflight=lim.max_stream_inflight,
                max_queue_bytes=self.batching.max_queue_bytes or 0,
                max_decode_queue=self.batching.max_decode_queue,
                max_inflight_message_bytes=lim.max_inflight_message_bytes or 0,
            ),
            server_version=hnd.__version__,
            min_size=r.min_size,
            max_size=r.max_size,
            num_keypoints=r.num_keypoints,
            stream_sessions=self.streams.info(offload=self.offload),
            tail=pb.TailInfo(**r.tail_info),
        )

    # --- validation and decoding --------------------------------------------------------------

    def _check_fingerprint(self, given: str, required: bool = True) -> None:
        """The one-checkpoint rule (hnd.common.meta.check_fingerprint) as this service's FAILED_PRECONDITION."""
        try:
            check_fingerprint(self.runner.fingerprint, given, given_is="request", required=required, shown=client_text)
        except FingerprintMismatch as exc:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, str(exc), "fingerprint") from None

    def _decode_bottleneck(
        self, request: pb.InferRequest, session: StreamSession | None = None
    ) -> tuple[tuple, Payload | DeferredDecode]:
        self._check_fingerprint(request.weights_fingerprint)
        refusal = self.runner.codec_refusal(request.bottleneck.tensor)  # the codec mode first: the clearest line
        if refusal is not None:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, refusal, "codec_mode")
        # Sizes first (budget.py): nothing is decompressed or allocated for a request beyond the limits.
        encoded, meta = wire.bottleneck_from_proto(request.bottleneck, self.limits.codec)
        try:
            check_split_meta(meta, self.budget)
            check_bottleneck_shape(encoded.shape, meta, self.runner.channels, self.runner.bottleneck_type or "hnd")
        except BudgetError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.reason) from None
        shape = encoded.shape
        _, c, h, w = shape
        key = ("split", (c, h, w), meta.padded_size)
        if request.HasField("stream_frame"):  # temporal coding: the session holds the reference
            if self.runner.prior is not None:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "temporal stream coding is for affine "
                    "bottlenecks; an Entropic Student's frames are each entropy-coded",
                )
            decoded = session.decode_bottleneck(*wire.stream_frame_from_proto(request.stream_frame), encoded)
            self._stream_note = decoded.note
            value = decoded.value
            # The session's float32 array as it is (no copy), or a tensor.
            z = (torch.from_numpy(value) if isinstance(value, np.ndarray) else torch.as_tensor(value)).reshape(shape)
            return key, SplitPayload(z, meta)
        threshold = self.batching.offload_decode_bytes
        if threshold is not None and (encoded.compression == codec.LEARNED or encoded.raw_size >= threshold):
            return key, DeferredDecode(lambda: (self._decode_split(encoded, meta), ""))
        return key, self._decode_split(encoded, meta)

    def _decode_split(self, encoded: codec.EncodedTensor, meta: SplitMeta) -> SplitPayload:
        """The validated bottleneck decoded (codec.decode) into the tail's input; on the loop or the decode thread."""
        value = codec.decode(encoded, self.limits.codec, prior=self.runner.prior)
        return SplitPayload(torch.from_numpy(value).reshape(encoded.shape), meta)  # no copy

    def _run_deferred(self, deferred: DeferredDecode) -> tuple[Payload, str] | Exception:
        """On the decode thread: the decode's result, or the error it raised, returned with no traceback (a
        traceback's frames would keep the refused request's arrays alive, through reference cycles, until a
        full garbage collection)."""
        try:
            return deferred.run()
        except (codec.CodecError, VideoError, KeyFrameRequired, RequestError, BudgetError) as exc:
            error = exc
        error.__traceback__ = None
        error.__context__ = None
        return error

    async def _decode_off_loop(self, deferred: DeferredDecode) -> tuple[Payload, str]:
        """Run a deferred decode on the decode thread; at most ``max_decode_queue`` wait for it or run there."""
        if self._decoding >= self.batching.max_decode_queue:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server decode queue is full ({self.batching.max_decode_queue} requests decoding or waiting)",
                "decode_queue_full",
            )
        self._decoding += 1
        self.metrics.decode_queue_depth.set(self._decoding)
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._decoder, self._run_deferred, deferred)
        finally:
            self._decoding -= 1
            self.metrics.decode_queue_depth.set(self._decoding)
        if isinstance(result, Exception):
            raise self._request_error(result)
        return result

    @staticmethod
    def _request_error(exc: Exception) -> Exception:
        """A decode error as the refusal it is (KeyFrameRequired stays: it is answered in-band)."""
        if isinstance(exc, codec.CodecError):
            return bad_bottleneck(exc)
        if isinstance(exc, VideoError):
            return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"bad video frame: {exc}", "video")
        if isinstance(exc, BudgetError):
            return RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.reason)
        return exc

    def _decode_image(
        self, request: pb.InferRequest, session: StreamSession | None = None
    ) -> tuple[tuple, Payload | DeferredDecode]:
        """An offload image or video frame: checked here (format, header sizes), decoded on the decode thread."""
        if not self.offload:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, "this server does not accept images (offload off)", "offload_off"
            )
        # An image does not depend on the edge's weights: its fingerprint is optional, checked when given.
        self._check_fingerprint(request.weights_fingerprint, required=False)
        key = ("image", id(request))
        if request.image.format in (pb.EncodedImage.FORMAT_H264, pb.EncodedImage.FORMAT_HEVC):
            return key, self._deferred(lambda: self._video_payload(session, request))
        fmt = IMAGE_FORMATS.get(request.image.format)
        if fmt is None:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unsupported image format {request.image.format} (expected one of "
                f"{', '.join(pb.EncodedImage.Format.Name(f) for f in IMAGE_FORMATS)})",
                "image",
            )
        try:
            img = Image.open(io.BytesIO(request.image.data), formats=[fmt])
            w, h = img.size  # header only: check before decoding pixels
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot decode {fmt} image: {exc}", "image") from None
        if w * h > self.limits.max_image_pixels:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"image {w}x{h} exceeds max_image_pixels {self.limits.max_image_pixels}",
                "image_size",
            )
        try:
            check_originals([(h, w)], self.budget)  # the full model pastes masks at this size too
        except BudgetError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.reason) from None
        return key, self._deferred(lambda: (self._image_payload(img, fmt), ""))

    def _deferred(self, run: Callable[[], tuple[Payload, str]]) -> Payload | DeferredDecode:
        """A decode for the decode thread (or, with offload_decode_bytes None, done here at once)."""
        if self.batching.offload_decode_bytes is not None:
            return DeferredDecode(run)
        payload, self._stream_note = run()
        return payload

    def _image_payload(self, img: Image.Image, fmt: str) -> ImagePayload:
        """Decode the pixels and apply the model's transform (ImagePayload)."""
        try:
            rgb = np.array(img.convert("RGB"))
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data
            message = f"cannot decode {fmt} image: {exc}"
        else:
            return self.runner.transform_image(torch.from_numpy(rgb).permute(2, 0, 1))
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, message, "image")

    def _video_payload(self, session: StreamSession | None, request: pb.InferRequest) -> tuple[ImagePayload, str]:
        """An H.264 / HEVC access unit decoded in its stream's session (uint8 [3, H, W]) and the session's note."""
        decoded = video_request(session, request, self.limits.max_image_pixels)
        check_originals([tuple(decoded.value.shape[:2])], self.budget)  # the full model pastes masks at this size
        return self.runner.transform_image(torch.from_numpy(decoded.value).permute(2, 0, 1)), decoded.note

    def _decode(
        self, request: pb.InferRequest, session: StreamSession | None = None
    ) -> tuple[tuple, Payload | DeferredDecode]:
        """Validate and decode a request (its bottleneck's decode may be left to the decode thread: DeferredDecode)."""
        which = request.WhichOneof("payload")
        # Set by the stream decoders when a key frame was answered but not kept; read by infer right
        # after this synchronous call, before any await, so requests cannot mix their notes.
        self._stream_note = ""
        if request.HasField("stream_frame") and session is None:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "stream frames (key / delta, H.264 / HEVC) need InferStream, not Infer",
                "stream_frame",
            )
        try:
            if which == "bottleneck":
                return self._decode_bottleneck(request, session)
            if which == "image":
                return self._decode_image(request, session)
        except codec.CodecError as exc:
            raise bad_bottleneck(exc) from None
        except VideoError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"bad video frame: {exc}", "video") from None
        except BudgetError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.reason) from None
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "request carries neither a bottleneck nor an image (set payload)",
            "no_payload",
        )

    # --- one request ----------------------------------------------------------------------------

    async def infer(
        self,
        request: pb.InferRequest,
        time_remaining: float | None,
        session: StreamSession | None = None,
        method: str = "Infer",
        client: Hashable = None,
    ) -> pb.InferResponse:
        """Validate, decode, batch, compute and encode one request; raises RequestError.

        session: the InferStream's stream session. Decoding happens before the first await, so a stream's
        frames meet its session in the order they were read. client: whose request (the peer), for the
        batcher's round robin.
        """
        t0 = time.perf_counter_ns()
        try:
            key, payload = self._decode(request, session)
        except KeyFrameRequired as exc:  # no valid reference: refuse this frame in-band, compute nothing
            self.metrics.key_frames_required.labels("refused").inc()
            return pb.InferResponse(request_id=request.request_id, key_frame_required=True, refusal=str(exc))
        stream_note = self._stream_note
        if isinstance(payload, DeferredDecode):  # validated above; the loop serves others meanwhile
            try:
                payload, stream_note = await self._decode_off_loop(payload)
            except KeyFrameRequired as exc:
                self.metrics.key_frames_required.labels("refused").inc()
                return pb.InferResponse(request_id=request.request_id, key_frame_required=True, refusal=str(exc))
        if stream_note:
            self.metrics.key_frames_required.labels("not_kept").inc()
        decode_ns = time.perf_counter_ns() - t0
        deadline = time.monotonic() + time_remaining if time_remaining is not None else None
        try:
            item, result = await self.batcher.submit(
                key, payload, deadline, images=_images(payload), client=client, nbytes=_nbytes(payload)
            )
        except BatcherStopped as exc:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc), "stopping") from None
        except QueueFull as exc:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), "queue_full") from None
        except DeadlineExpired as exc:
            self.metrics.deadline_drops.labels(method).inc()
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc), "deadline") from None
        t1 = time.perf_counter_ns()
        response = pb.InferResponse(
            request_id=request.request_id,
            detections=[wire.detections_to_proto(filter_detections(d, request)) for d in result],
            key_frame_required=bool(stream_note),  # answered, but not kept as a reference
        )
        encode_ns = time.perf_counter_ns() - t1
        queue_ns = item.started_ns - item.enqueued_ns
        timings = response.timings  # set in place: no message built and copied per answer
        timings.decode_us = decode_ns // 1000
        timings.queue_us = queue_ns // 1000
        timings.compute_us = item.compute_ns // 1000
        timings.encode_us = encode_ns // 1000
        timings.batch_size = item.batch_size
        m = self._stage
        m["decode"].observe(decode_ns / 1e9)
        m["queue"].observe(queue_ns / 1e9)
        m["compute"].observe(item.compute_ns / 1e9)
        m["encode"].observe(encode_ns / 1e9)
        return response

    def _hold(self, raw: bytes) -> int:
        """Count a received message against max_inflight_message_bytes (give it back with ``messages.give``)."""
        if not self.messages.take(len(raw)):
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server holds {self.messages.held} bytes of requests in flight; a {len(raw)}-byte message would "
                f"pass max_inflight_message_bytes {self.messages.limit}",
                "inflight_bytes",
            )
        return len(raw)

    def _give_back(self, held: int, _task: asyncio.Future) -> None:
        self.messages.give(held)

    def _parse(self, raw: bytes) -> pb.InferRequest:
        self.metrics.request_bytes.inc(len(raw))
        try:
            return pb.InferRequest.FromString(raw)
        except DecodeError as exc:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"not an hnd.v1.InferRequest ({len(raw)} bytes): {exc}", "parse"
            ) from None

    def _done(self, method: str, code: str, start_ns: int) -> None:
        children = self._answered.get((method, code))
        if children is None:  # method and code are fixed labels: a handful of pairs
            children = self._answered[method, code] = (
                self.metrics.requests.labels(method, code),
                self.metrics.request_seconds.labels(method, code),
            )
        children[0].inc()
        children[1].observe((time.perf_counter_ns() - start_ns) / 1e9)

    async def _fail(
        self, context: grpc.aio.ServicerContext, method: str, exc: RequestError, start_ns: int, request_id: str = ""
    ) -> None:
        self._done(method, exc.code.name, start_ns)
        self.metrics.refusals.labels(method, exc.code.name, exc.reason).inc()
        # str(exc) holds client text only through client_text(); the request id is clipped here.
        self.refusal_log.warning(
            "%s %s (%s) request %s: %s (peer %s)",
            method,
            exc.code.name,
            exc.reason,
            client_text(request_id) or "-",
            exc,
            client_text(context.peer()),
        )
        # Nothing of the refused request may outlive it: its traceback and the error it replaced reach the
        # frames that held the message, and gRPC's abort keeps them in reference cycles until a full collection.
        exc.__traceback__ = exc.__context__ = exc.__cause__ = None
        await context.abort(exc.code, str(exc))

    # --- gRPC handlers (raw bytes in, messages out) ---------------------------------------------

    async def Infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.InferResponse:
        start = time.perf_counter_ns()
        # Trailing only: headers sent early would commit the call and stop the client's retry policy
        # from moving it to another replica.
        context.set_trailing_metadata(self.call_metadata)
        request_id = ""
        held = 0
        try:
            held = self._hold(raw)
            request = self._parse(raw)
            request_id = request.request_id
            response = await self.infer(request, context.time_remaining(), method="Infer", client=context.peer())
        except asyncio.CancelledError:  # the caller went away (cancelled, or its deadline passed) first
            self._done("Infer", gone_code(context), start)
            raise
        except RequestError as exc:
            raw = request = None  # type: ignore[assignment]  # the abort's traceback keeps this frame
            await self._fail(context, "Infer", exc, start, request_id)
        except Exception:  # noqa: BLE001 - never a traceback to the client; one to the log
            log.exception("Infer failed")
            raw = request = None  # type: ignore[assignment]
            await self._fail(
                context,
                "Infer",
                RequestError(grpc.StatusCode.INTERNAL, "internal server error", "internal"),
                start,
                request_id,
            )
        finally:
            self.messages.give(held)
        self._done("Infer", "OK", start)
        return response

    async def InferStream(self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
        """Requests are processed concurrently (so they can batch) and answered in order.

        A bad request ends the stream with its status code; the client reopens a stream. As soon as
        one message is refused, the messages queued behind it are cancelled (never computed) and no
        more are read.
        """
        method = "InferStream"
        # A stream names replica and weights first (the edge checks them before its first answer) and at the end.
        await context.send_initial_metadata(self.call_metadata)
        context.set_trailing_metadata(self.call_metadata)
        session = self.streams.open(context.peer())  # this stream's temporal state; freed in the finally below
        if self.draining:
            session.close()
            await self._fail(context, method, draining_error(), time.perf_counter_ns())
        inflight = StreamInflight(self.limits.max_stream_inflight)
        reader = asyncio.ensure_future(self._read_stream(request_iterator, context, session, inflight, method))
        self._stream_readers.add(reader)
        reader.add_done_callback(self._stream_readers.discard)
        try:
            while (entry := await inflight.pending.get()) is not None:
                task, start, request_id = entry
                try:
                    response = await task
                except RequestError as exc:
                    self._stream_messages["refused"].inc()
                    await self._fail(context, method, exc, start, request_id)
                except Exception:  # noqa: BLE001
                    log.exception("InferStream failed")
                    self._stream_messages["refused"].inc()
                    await self._fail(
                        context,
                        method,
                        RequestError(grpc.StatusCode.INTERNAL, "internal server error", "internal"),
                        start,
                        request_id,
                    )
                inflight.answered(task)
                self._stream_messages["answered"].inc()
                self._done(method, "OK", start)
                yield response
            if self.draining:
                await self._fail(context, method, draining_error(), time.perf_counter_ns())
        finally:
            self._close_session(session)
            reader.cancel()
            dropped = inflight.cancel_unanswered()
            inflight.tasks.clear()  # tasks and their done callbacks (inflight.end_after) form a cycle
            if dropped:  # read, never answered: their final code is the stream's end (caller gone, or a refusal)
                self._stream_messages["dropped"].inc(dropped)
                self.metrics.requests.labels(method, gone_code(context)).inc(dropped)

    async def _read_stream(
        self,
        request_iterator: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
        session: StreamSession,
        inflight: StreamInflight,
        method: str,
    ) -> None:
        """InferStream's reader: each message parsed and started as an ``infer`` task, queued on ``inflight`` in
        order; a message that does not parse is queued as a failed future (its refusal comes in order), and None
        last. Stops reading once a request was refused (``inflight.ended``) or when cancelled (drain)."""
        peer = context.peer()  # a stream's messages all come from its one connection
        try:
            async for raw in request_iterator:
                if inflight.ended.is_set():
                    break
                start = time.perf_counter_ns()
                held = self._hold(raw)  # refusals (budget, parse) surface in order, below
                try:
                    request = self._parse(raw)
                except RequestError:
                    self.messages.give(held)
                    raise
                task = asyncio.ensure_future(
                    self.infer(request, context.time_remaining(), session, method=method, client=peer)
                )
                task.add_done_callback(functools.partial(self._give_back, held))
                inflight.add(task)
                try:
                    await inflight.pending.put((task, start, request.request_id))
                except asyncio.CancelledError:  # drain: this one was read but will not be answered
                    task.cancel()
                    raise
        except RequestError as exc:
            failed: asyncio.Future = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            await inflight.pending.put((failed, time.perf_counter_ns(), ""))
        finally:
            await inflight.pending.put(None)

    async def GetModelInfo(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        start = time.perf_counter_ns()
        context.set_trailing_metadata(self.call_metadata)
        info = self.model_info()
        self._done("GetModelInfo", "OK", start)
        return info

    def generic_handler(self) -> grpc.GenericRpcHandler:
        identity = None  # request_deserializer None: handlers get raw bytes
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Infer": grpc.unary_unary_rpc_method_handler(
                    self.Infer, request_deserializer=identity, response_serializer=pb.InferResponse.SerializeToString
                ),
                "InferStream": grpc.stream_stream_rpc_method_handler(
                    self.InferStream,
                    request_deserializer=identity,
                    response_serializer=pb.InferResponse.SerializeToString,
                ),
                "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                    self.GetModelInfo, request_deserializer=identity, response_serializer=pb.ModelInfo.SerializeToString
                ),
            },
        )
