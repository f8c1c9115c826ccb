"""The Open Inference Protocol (KServe v2 gRPC, ``inference.GRPCInferenceService``) on hnd-server's port.

An adapter over the hnd.v1 service core: each ModelInfer becomes the hnd.v1 ``InferRequest`` it stands for
and goes through :meth:`SplitInferenceService.infer` (the same validation, budgets, batching, metrics and
errors, with ``method="ModelInfer"`` in the metrics), and its detections come back as v2 output tensors,
the same float32 / int64 bytes hnd.v1's answer carries. Unary only: the temporal stream (key / delta
frames, H.264 / HEVC) stays hnd.v1's InferStream.

Two models per server (``RepositoryIndex`` lists them; ``ModelMetadata`` / ``ModelConfig`` describe them):

* ``hnd_offload``: input ``IMAGE`` BYTES [1], one encoded image (JPEG, PNG or WebP, told by its magic
  bytes); the whole model runs here.
* ``hnd_tail``: input ``BOTTLENECK`` UINT8 [1, C, h, w] (8-bit symbols of the head's output, per-tensor
  affine: value = (symbol - zero_point) * scale), ``IMAGE_SIZE`` INT64 [2] (the resized image's h, w) and
  ``ORIGINAL_SIZE`` INT64 [2] (the frame's h, w); request parameters ``scale`` (double), ``zero_point``
  (int64) and ``weights_fingerprint`` (string, required: the one-checkpoint rule).

Outputs of both: ``boxes`` FP32 [N, 4] (x1, y1, x2, y2 in the original frame), ``labels`` INT64 [N],
``scores`` FP32 [N]; Mask R-CNN adds ``masks`` UINT8 [N, H, W], Keypoint R-CNN ``keypoints`` FP32 [N, K, 3]
and ``keypoint_scores`` FP32 [N, K]. Request parameter ``score_threshold`` (double) drops detections below
it, as hnd.v1's. Outputs are sent as ``raw_output_contents`` (what tritonclient reads).

Status codes are hnd.v1's (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, DEADLINE_EXCEEDED,
UNAVAILABLE while draining); an unknown model or version is NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from hnd import __version__
from hnd.common import wire
from hnd.proto.inference import grpc_service_pb2 as v2
from hnd.proto.inference import model_config_pb2 as mc
from hnd.proto.v1 import split_inference_pb2 as pb
from hnd.proto.v1 import tensor_pb2
from hnd.server.service import RequestError, SplitInferenceService, gone_code

log = logging.getLogger("hnd.server")

V2_SERVICE = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # inference.GRPCInferenceService
OFFLOAD_MODEL = "hnd_offload"
TAIL_MODEL = "hnd_tail"
VERSION = "1"
PLATFORM = "hnd"
# Magic bytes -> hnd.v1 image format (what ``hnd_offload`` accepts).
IMAGE_MAGIC = (
    (b"\xff\xd8\xff", pb.EncodedImage.FORMAT_JPEG),
    (b"\x89PNG\r\n\x1a\n", pb.EncodedImage.FORMAT_PNG),
)
DTYPES = {"FP32": np.float32, "INT64": np.int64, "UINT8": np.uint8}
CONFIG_TYPES = {"FP32": mc.TYPE_FP32, "INT64": mc.TYPE_INT64, "UINT8": mc.TYPE_UINT8, "BYTES": mc.TYPE_STRING}


def image_format(data: bytes) -> int:
    """The hnd.v1 EncodedImage format of ``data`` from its magic bytes; RequestError when none fits."""
    for magic, fmt in IMAGE_MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return pb.EncodedImage.FORMAT_WEBP
    raise _invalid(f"IMAGE: {len(data)} bytes that are not a JPEG, PNG or WebP image", "image")


def _invalid(message: str, reason: str = "v2") -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message, reason)


def _param(params: Any, name: str, kind: str, default: Any = None) -> Any:
    """A request parameter of the given oneof kind (double_param also accepts int64_param)."""
    if name not in params:
        return default
    p = params[name]
    which = p.WhichOneof("parameter_choice")
    if kind == "double_param" and which in ("double_param", "int64_param"):
        return float(getattr(p, which))
    if kind == "int64_param" and which in ("int64_param", "uint64_param"):
        return int(getattr(p, which))
    if which != kind:
        raise _invalid(f"parameter {name}: expected {kind.removesuffix('_param')}, got {which}", "parameter")
    return getattr(p, which)


class InferenceV2:
    """The v2 handlers over one hnd.v1 service (its runner, budgets, batcher and metrics)."""

    def __init__(self, service: SplitInferenceService) -> None:
        self.service = service
        self.ready = False  # set once the runner is warm (hnd.server.app.start_server); drain ends it
        r = service.runner
        outputs = [("boxes", "FP32", [-1, 4]), ("labels", "INT64", [-1]), ("scores", "FP32", [-1])]
        if r.mask_detections:
            outputs.append(("masks", "UINT8", [-1, -1, -1]))
        if r.num_keypoints:
            outputs += [("keypoints", "FP32", [-1, r.num_keypoints, 3]), ("keypoint_scores", "FP32", [-1, -1])]
        self.outputs = outputs
        self.models: dict[str, list[tuple[str, str, list[int]]]] = {
            TAIL_MODEL: [
                ("BOTTLENECK", "UINT8", [1, r.channels, -1, -1]),
                ("IMAGE_SIZE", "INT64", [2]),
                ("ORIGINAL_SIZE", "INT64", [2]),
            ]
        }
        if service.offload:
            self.models[OFFLOAD_MODEL] = [("IMAGE", "BYTES", [1])]

    def is_ready(self) -> bool:
        return self.ready and not self.service.draining

    def _model(self, name: str, version: str) -> list[tuple[str, str, list[int]]]:
        if name not in self.models or version not in ("", VERSION):
            known = ", ".join(f"{m} (version {VERSION})" for m in sorted(self.models))
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r} version {version!r}; {known}")
        return self.models[name]

    # --- ModelInfer: v2 request -> hnd.v1 request -> hnd.v1 response -> v2 response ------------------------

    def _inputs(self, request: v2.ModelInferRequest) -> tuple[dict[str, bytes | list[bytes]], dict[str, list[int]]]:
        """Input name -> its raw bytes (raw_input_contents), or for BYTES given as contents, the elements;
        and input name -> its shape. Names, datatypes and shapes checked against the model's."""
        spec = {name: (dtype, shape) for name, dtype, shape in self._model(request.model_name, request.model_version)}
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise _invalid(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents")
        out: dict[str, bytes | list[bytes]] = {}
        shapes: dict[str, list[int]] = {}
        for i, t in enumerate(request.inputs):
            if t.name not in spec:
                raise _invalid(f"model {request.model_name} has no input {t.name!r} (inputs: {', '.join(spec)})")
            dtype, shape = spec[t.name]
            if t.datatype != dtype:
                raise _invalid(f"input {t.name}: datatype {t.datatype}, expected {dtype}")
            if len(t.shape) != len(shape) or any(s not in (-1, g) for s, g in zip(shape, t.shape)):
                raise _invalid(f"input {t.name}: shape {list(t.shape)}, expected {shape} (-1: any)")
            if any(g < 1 for g in t.shape):
                raise _invalid(f"input {t.name}: shape {list(t.shape)} has an empty dimension")
            if raw:
                out[t.name] = raw[i]
            elif dtype == "BYTES":
                out[t.name] = list(t.contents.bytes_contents)
            elif dtype == "INT64":
                out[t.name] = np.asarray(t.contents.int64_contents, np.int64).tobytes()
            elif dtype == "UINT8":
                out[t.name] = np.asarray(t.contents.uint_contents, np.uint32).astype(np.uint8).tobytes()
            shapes[t.name] = list(t.shape)
        missing = [name for name in spec if name not in out]
        if missing:
            raise _invalid(f"model {request.model_name} needs input {', '.join(missing)}")
        return out, shapes

    def to_v1(self, request: v2.ModelInferRequest) -> pb.InferRequest:
        """The hnd.v1 InferRequest this ModelInfer stands for; RequestError (INVALID_ARGUMENT / NOT_FOUND)."""
        inputs, shapes = self._inputs(request)
        params = request.parameters
        out = pb.InferRequest(request_id=request.id)
        threshold = _param(params, "score_threshold", "double_param")
        if threshold is not None:
            out.score_threshold = threshold
        if request.model_name == OFFLOAD_MODEL:
            data = inputs["IMAGE"]
            out.image.data = _one_bytes_element(data)
            out.image.format = image_format(out.image.data)
            return out
        shape = shapes["BOTTLENECK"]
        symbols = inputs["BOTTLENECK"]
        assert isinstance(symbols, bytes)
        if len(symbols) != math.prod(shape):
            raise _invalid(f"BOTTLENECK: {len(symbols)} bytes for shape {shape} (one uint8 per value)")
        scale = _param(params, "scale", "double_param")
        zero_point = _param(params, "zero_point", "int64_param")
        fingerprint = _param(params, "weights_fingerprint", "string_param", "")
        if scale is None or zero_point is None:
            raise _invalid("hnd_tail needs the request parameters scale (double) and zero_point (int64)")
        image_size = _size(inputs["IMAGE_SIZE"], "IMAGE_SIZE")
        original = _size(inputs["ORIGINAL_SIZE"], "ORIGINAL_SIZE")
        d = self.service.runner.size_divisible
        padded = tuple(int(math.ceil(s / d) * d) for s in image_size)  # torchvision's batch padding of one image
        out.weights_fingerprint = fingerprint
        out.bottleneck.tensor.CopyFrom(
            tensor_pb2.Tensor(
                shape=shape,
                dtype=tensor_pb2.DTYPE_FLOAT32,
                bits=8,
                granularity=tensor_pb2.GRANULARITY_TENSOR,
                scale=[scale],
                zero_point=[zero_point],
                compression=tensor_pb2.COMPRESSION_NONE,
                raw_size=len(symbols),
                data=symbols,
            )
        )
        out.bottleneck.meta.CopyFrom(
            pb.SplitMeta(
                original_sizes=[pb.Size(height=original[0], width=original[1])],
                image_sizes=[pb.Size(height=image_size[0], width=image_size[1])],
                padded_size=pb.Size(height=padded[0], width=padded[1]),
            )
        )
        return out

    def to_v2(self, request: v2.ModelInferRequest, response: pb.InferResponse) -> v2.ModelInferResponse:
        """hnd.v1's answer as v2 output tensors (raw little-endian bytes; only the requested outputs, if named)."""
        det = wire.detections_from_proto(response.detections[0], max_mask_bytes=self.service.limits.max_mask_bytes)
        if "masks" in det:
            masks = np.asarray(det["masks"])
            det["masks"] = masks.reshape(masks.shape[0], *masks.shape[-2:])  # [N, 1, H, W] -> [N, H, W]
        if "keypoints_scores" in det:
            det["keypoint_scores"] = det.pop("keypoints_scores")
        names = [o.name for o in request.outputs] or [name for name, _, _ in self.outputs]
        known = {name: dtype for name, dtype, _ in self.outputs}
        out = v2.ModelInferResponse(model_name=request.model_name, model_version=VERSION, id=request.id)
        for name in names:
            if name not in known:
                raise _invalid(f"model {request.model_name} has no output {name!r} (outputs: {', '.join(known)})")
            value = np.ascontiguousarray(det[name], DTYPES[known[name]])
            out.outputs.add(name=name, datatype=known[name], shape=list(value.shape))
            out.raw_output_contents.append(value.tobytes())
        t = response.timings
        for key, value in (
            ("decode_us", t.decode_us),
            ("queue_us", t.queue_us),
            ("compute_us", t.compute_us),
            ("encode_us", t.encode_us),
            ("batch_size", t.batch_size),
        ):
            out.parameters[key].int64_param = value
        return out

    # --- handlers -----------------------------------------------------------------------------------------

    async def ModelInfer(self, raw: bytes, context: grpc.aio.ServicerContext) -> v2.ModelInferResponse:
        service, method = self.service, "ModelInfer"
        start = time.perf_counter_ns()
        context.set_trailing_metadata(service.call_metadata)
        request_id = ""
        held = 0
        try:
            held = service._hold(raw)  # the same in-flight byte budget as hnd.v1's messages
            request = _parse(v2.ModelInferRequest, raw, service)
            request_id = request.id
            v1 = self.to_v1(request)
            if v1.HasField("bottleneck") and not v1.weights_fingerprint:
                raise RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "hnd_tail needs the request parameter weights_fingerprint (the head's weights)",
                    "fingerprint",
                )
            response = await service.infer(v1, context.time_remaining(), method=method, client=context.peer())
            if response.refusal:  # stream-only refusals cannot happen on unary calls; kept as an error
                raise _invalid(response.refusal)
            answer = self.to_v2(request, response)
        except asyncio.CancelledError:
            service._done(method, gone_code(context), start)
            raise
        except RequestError as exc:
            raw = request = v1 = None  # type: ignore[assignment]  # the abort's traceback keeps this frame
            await service._fail(context, method, exc, start, request_id)
        except Exception:  # noqa: BLE001 - never a traceback to the client; one to the log
            log.exception("ModelInfer failed")
            raw = request = v1 = None  # type: ignore[assignment]
            internal = RequestError(grpc.StatusCode.INTERNAL, "internal server error", "internal")
            await service._fail(context, method, internal, start, request_id)
        finally:
            service.messages.give(held)
        service._done(method, "OK", start)
        return answer

    def _unary(self, method: str, request_type: type[Message], answer: Callable[[Any], Message]):
        service = self.service

        async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
            start = time.perf_counter_ns()
            try:
                response = answer(_parse(request_type, raw, service))
            except RequestError as exc:
                await service._fail(context, method, exc, start)
            service._done(method, "OK", start)
            return response

        return grpc.unary_unary_rpc_method_handler(
            handler, request_deserializer=None, response_serializer=lambda m: m.SerializeToString()
        )

    def _metadata(self, request: v2.ModelMetadataRequest) -> v2.ModelMetadataResponse:
        inputs = self._model(request.name, request.version)
        tensor = v2.ModelMetadataResponse.TensorMetadata
        return v2.ModelMetadataResponse(
            name=request.name,
            versions=[VERSION],
            platform=PLATFORM,
            inputs=[tensor(name=n, datatype=d, shape=s) for n, d, s in inputs],
            outputs=[tensor(name=n, datatype=d, shape=s) for n, d, s in self.outputs],
        )

    def _config(self, request: v2.ModelConfigRequest) -> v2.ModelConfigResponse:
        inputs = self._model(request.name, request.version)
        return v2.ModelConfigResponse(
            config=mc.ModelConfig(
                name=request.name,
                platform=PLATFORM,
                max_batch_size=0,  # shapes are as listed (the server batches requests itself)
                input=[mc.ModelInput(name=n, data_type=CONFIG_TYPES[d], dims=s) for n, d, s in inputs],
                output=[mc.ModelOutput(name=n, data_type=CONFIG_TYPES[d], dims=s) for n, d, s in self.outputs],
            )
        )

    def _index(self, request: v2.RepositoryIndexRequest) -> v2.RepositoryIndexResponse:
        state = "READY" if self.is_ready() else "UNAVAILABLE"
        index = v2.RepositoryIndexResponse.ModelIndex
        return v2.RepositoryIndexResponse(
            models=[index(name=name, version=VERSION, state=state) for name in sorted(self.models)]
        )

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """The v2 methods hnd serves (others answer UNIMPLEMENTED, as gRPC does for unknown methods)."""
        ready = lambda r: self.is_ready()  # noqa: E731
        model_ready = lambda r: self.is_ready() and r.name in self.models and r.version in ("", VERSION)  # noqa: E731
        return grpc.method_handlers_generic_handler(
            V2_SERVICE,
            {
                "ServerLive": self._unary(
                    "ServerLive", v2.ServerLiveRequest, lambda r: v2.ServerLiveResponse(live=True)
                ),
                "ServerReady": self._unary(
                    "ServerReady", v2.ServerReadyRequest, lambda r: v2.ServerReadyResponse(ready=ready(r))
                ),
                "ModelReady": self._unary(
                    "ModelReady", v2.ModelReadyRequest, lambda r: v2.ModelReadyResponse(ready=model_ready(r))
                ),
                "ServerMetadata": self._unary(
                    "ServerMetadata",
                    v2.ServerMetadataRequest,
                    lambda r: v2.ServerMetadataResponse(name="hnd", version=__version__),
                ),
                "ModelMetadata": self._unary("ModelMetadata", v2.ModelMetadataRequest, self._metadata),
                "ModelConfig": self._unary("ModelConfig", v2.ModelConfigRequest, self._config),
                "RepositoryIndex": self._unary("RepositoryIndex", v2.RepositoryIndexRequest, self._index),
                "ModelInfer": grpc.unary_unary_rpc_method_handler(
                    self.ModelInfer,
                    request_deserializer=None,
                    response_serializer=v2.ModelInferResponse.SerializeToString,
                ),
            },
        )


def _parse(request_type: type[Message], raw: bytes, service: SplitInferenceService) -> Any:
    service.metrics.request_bytes.inc(len(raw))
    try:
        return request_type.FromString(raw)
    except DecodeError as exc:
        name = request_type.DESCRIPTOR.full_name
        raise _invalid(f"not an {name} ({len(raw)} bytes): {exc}", "parse") from None


def _one_bytes_element(data: bytes | list[bytes]) -> bytes:
    """The one element of a BYTES tensor: raw contents are 4-byte little-endian length + bytes per element."""
    if isinstance(data, list):
        if len(data) != 1:
            raise _invalid(f"IMAGE: {len(data)} elements, expected one encoded image")
        return data[0]
    if len(data) < 4:
        raise _invalid("IMAGE: raw contents shorter than a BYTES element's 4-byte length")
    (n,) = struct.unpack_from("<I", data)
    if n != len(data) - 4:
        raise _invalid(f"IMAGE: one element of {n} bytes declared, {len(data) - 4} bytes given")
    return data[4:]


def _size(data: bytes | list[bytes], name: str) -> tuple[int, int]:
    assert isinstance(data, bytes)
    if len(data) != 16:
        raise _invalid(f"{name}: expected 2 INT64 values (height, width)")
    h, w = np.frombuffer(data, np.int64).tolist()
    if not (0 < h < 2**31 and 0 < w < 2**31):
        raise _invalid(f"{name}: sizes must be positive 32-bit values, got {h}x{w}")
    return int(h), int(w)
