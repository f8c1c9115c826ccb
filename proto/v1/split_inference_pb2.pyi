from hnd.proto.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Size(_message.Message):
    __slots__ = ("height", "width")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class SplitMeta(_message.Message):
    __slots__ = ("original_sizes", "image_sizes", "padded_size")
    ORIGINAL_SIZES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZES_FIELD_NUMBER: _ClassVar[int]
    PADDED_SIZE_FIELD_NUMBER: _ClassVar[int]
    original_sizes: _containers.RepeatedCompositeFieldContainer[Size]
    image_sizes: _containers.RepeatedCompositeFieldContainer[Size]
    padded_size: Size
    def __init__(self, original_sizes: _Optional[_Iterable[_Union[Size, _Mapping]]] = ..., image_sizes: _Optional[_Iterable[_Union[Size, _Mapping]]] = ..., padded_size: _Optional[_Union[Size, _Mapping]] = ...) -> None: ...

class Bottleneck(_message.Message):
    __slots__ = ("tensor", "meta")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    tensor: _tensor_pb2.Tensor
    meta: SplitMeta
    def __init__(self, tensor: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., meta: _Optional[_Union[SplitMeta, _Mapping]] = ...) -> None: ...

class EncodedImage(_message.Message):
    __slots__ = ("format", "data")
    class Format(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        FORMAT_UNSPECIFIED: _ClassVar[EncodedImage.Format]
        FORMAT_JPEG: _ClassVar[EncodedImage.Format]
        FORMAT_PNG: _ClassVar[EncodedImage.Format]
        FORMAT_WEBP: _ClassVar[EncodedImage.Format]
        FORMAT_H264: _ClassVar[EncodedImage.Format]
        FORMAT_HEVC: _ClassVar[EncodedImage.Format]
    FORMAT_UNSPECIFIED: EncodedImage.Format
    FORMAT_JPEG: EncodedImage.Format
    FORMAT_PNG: EncodedImage.Format
    FORMAT_WEBP: EncodedImage.Format
    FORMAT_H264: EncodedImage.Format
    FORMAT_HEVC: EncodedImage.Format
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    format: EncodedImage.Format
    data: bytes
    def __init__(self, format: _Optional[_Union[EncodedImage.Format, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class StreamFrame(_message.Message):
    __slots__ = ("type", "key_sequence", "sequence")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[StreamFrame.Type]
        TYPE_KEY: _ClassVar[StreamFrame.Type]
        TYPE_DELTA: _ClassVar[StreamFrame.Type]
    TYPE_UNSPECIFIED: StreamFrame.Type
    TYPE_KEY: StreamFrame.Type
    TYPE_DELTA: StreamFrame.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    KEY_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    type: StreamFrame.Type
    key_sequence: int
    sequence: int
    def __init__(self, type: _Optional[_Union[StreamFrame.Type, str]] = ..., key_sequence: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("request_id", "weights_fingerprint", "bottleneck", "image", "score_threshold", "max_detections", "stream_frame")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BOTTLENECK_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    STREAM_FRAME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    weights_fingerprint: str
    bottleneck: Bottleneck
    image: EncodedImage
    score_threshold: float
    max_detections: int
    stream_frame: StreamFrame
    def __init__(self, request_id: _Optional[str] = ..., weights_fingerprint: _Optional[str] = ..., bottleneck: _Optional[_Union[Bottleneck, _Mapping]] = ..., image: _Optional[_Union[EncodedImage, _Mapping]] = ..., score_threshold: _Optional[float] = ..., max_detections: _Optional[int] = ..., stream_frame: _Optional[_Union[StreamFrame, _Mapping]] = ...) -> None: ...

class Masks(_message.Message):
    __slots__ = ("height", "width", "counts")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    counts: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., counts: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Keypoints(_message.Message):
    __slots__ = ("num_keypoints", "points", "scores")
    NUM_KEYPOINTS_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    num_keypoints: int
    points: _containers.RepeatedScalarFieldContainer[float]
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, num_keypoints: _Optional[int] = ..., points: _Optional[_Iterable[float]] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class Detections(_message.Message):
    __slots__ = ("boxes", "labels", "scores", "masks", "keypoints")
    BOXES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    KEYPOINTS_FIELD_NUMBER: _ClassVar[int]
    boxes: _containers.RepeatedScalarFieldContainer[float]
    labels: _containers.RepeatedScalarFieldContainer[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    masks: Masks
    keypoints: Keypoints
    def __init__(self, boxes: _Optional[_Iterable[float]] = ..., labels: _Optional[_Iterable[int]] = ..., scores: _Optional[_Iterable[float]] = ..., masks: _Optional[_Union[Masks, _Mapping]] = ..., keypoints: _Optional[_Union[Keypoints, _Mapping]] = ...) -> None: ...

class ServerTimings(_message.Message):
    __slots__ = ("decode_us", "queue_us", "compute_us", "encode_us", "batch_size")
    DECODE_US_FIELD_NUMBER: _ClassVar[int]
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    ENCODE_US_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    decode_us: int
    queue_us: int
    compute_us: int
    encode_us: int
    batch_size: int
    def __init__(self, decode_us: _Optional[int] = ..., queue_us: _Optional[int] = ..., compute_us: _Optional[int] = ..., encode_us: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("request_id", "detections", "timings", "key_frame_required", "refusal")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    KEY_FRAME_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    detections: _containers.RepeatedCompositeFieldContainer[Detections]
    timings: ServerTimings
    key_frame_required: bool
    refusal: str
    def __init__(self, request_id: _Optional[str] = ..., detections: _Optional[_Iterable[_Union[Detections, _Mapping]]] = ..., timings: _Optional[_Union[ServerTimings, _Mapping]] = ..., key_frame_required: _Optional[bool] = ..., refusal: _Optional[str] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_message_bytes", "max_elements", "max_decompressed_bytes", "max_dims", "max_batch", "max_queue", "max_image_pixels", "max_short_side", "max_long_side", "size_divisible", "max_padded_side", "max_padded_pixels", "max_original_side", "max_original_pixels", "max_mask_bytes", "max_stream_inflight", "max_queue_bytes", "max_decode_queue", "max_inflight_message_bytes")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_DECOMPRESSED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_DIMS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_SHORT_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_LONG_SIDE_FIELD_NUMBER: _ClassVar[int]
    SIZE_DIVISIBLE_FIELD_NUMBER: _ClassVar[int]
    MAX_PADDED_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_PADDED_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_ORIGINAL_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_ORIGINAL_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MASK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_DECODE_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_elements: int
    max_decompressed_bytes: int
    max_dims: int
    max_batch: int
    max_queue: int
    max_image_pixels: int
    max_short_side: int
    max_long_side: int
    size_divisible: int
    max_padded_side: int
    max_padded_pixels: int
    max_original_side: int
    max_original_pixels: int
    max_mask_bytes: int
    max_stream_inflight: int
    max_queue_bytes: int
    max_decode_queue: int
    max_inflight_message_bytes: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_elements: _Optional[int] = ..., max_decompressed_bytes: _Optional[int] = ..., max_dims: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_queue: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_short_side: _Optional[int] = ..., max_long_side: _Optional[int] = ..., size_divisible: _Optional[int] = ..., max_padded_side: _Optional[int] = ..., max_padded_pixels: _Optional[int] = ..., max_original_side: _Optional[int] = ..., max_original_pixels: _Optional[int] = ..., max_mask_bytes: _Optional[int] = ..., max_stream_inflight: _Optional[int] = ..., max_queue_bytes: _Optional[int] = ..., max_decode_queue: _Optional[int] = ..., max_inflight_message_bytes: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_kind", "bottleneck_channels", "weights_fingerprint", "accepted_bits", "accepted_granularities", "accepted_compressions", "accepted_image_formats", "limits", "server_version", "min_size", "max_size", "num_keypoints", "stream_sessions", "bottleneck_type", "tail")
    MODEL_KIND_FIELD_NUMBER: _ClassVar[int]
    BOTTLENECK_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_BITS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_GRANULARITIES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_COMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_IMAGE_FORMATS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_KEYPOINTS_FIELD_NUMBER: _ClassVar[int]
    STREAM_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    BOTTLENECK_TYPE_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    model_kind: str
    bottleneck_channels: int
    weights_fingerprint: str
    accepted_bits: _containers.RepeatedScalarFieldContainer[int]
    accepted_granularities: _containers.RepeatedScalarFieldContainer[_tensor_pb2.Granularity]
    accepted_compressions: _containers.RepeatedScalarFieldContainer[_tensor_pb2.Compression]
    accepted_image_formats: _containers.RepeatedScalarFieldContainer[EncodedImage.Format]
    limits: ServerLimits
    server_version: str
    min_size: int
    max_size: int
    num_keypoints: int
    stream_sessions: StreamSessions
    bottleneck_type: str
    tail: TailInfo
    def __init__(self, model_kind: _Optional[str] = ..., bottleneck_channels: _Optional[int] = ..., weights_fingerprint: _Optional[str] = ..., accepted_bits: _Optional[_Iterable[int]] = ..., accepted_granularities: _Optional[_Iterable[_Union[_tensor_pb2.Granularity, str]]] = ..., accepted_compressions: _Optional[_Iterable[_Union[_tensor_pb2.Compression, str]]] = ..., accepted_image_formats: _Optional[_Iterable[_Union[EncodedImage.Format, str]]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., server_version: _Optional[str] = ..., min_size: _Optional[int] = ..., max_size: _Optional[int] = ..., num_keypoints: _Optional[int] = ..., stream_sessions: _Optional[_Union[StreamSessions, _Mapping]] = ..., bottleneck_type: _Optional[str] = ..., tail: _Optional[_Union[TailInfo, _Mapping]] = ...) -> None: ...

class TailInfo(_message.Message):
    __slots__ = ("precision", "channels_last", "compile", "device", "summary", "reduced_precision_part", "fp32_part")
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_LAST_FIELD_NUMBER: _ClassVar[int]
    COMPILE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    REDUCED_PRECISION_PART_FIELD_NUMBER: _ClassVar[int]
    FP32_PART_FIELD_NUMBER: _ClassVar[int]
    precision: str
    channels_last: bool
    compile: str
    device: str
    summary: str
    reduced_precision_part: str
    fp32_part: str
    def __init__(self, precision: _Optional[str] = ..., channels_last: _Optional[bool] = ..., compile: _Optional[str] = ..., device: _Optional[str] = ..., summary: _Optional[str] = ..., reduced_precision_part: _Optional[str] = ..., fp32_part: _Optional[str] = ...) -> None: ...

class StreamSessions(_message.Message):
    __slots__ = ("max_sessions", "max_reference_bytes", "video_formats", "max_video_pixels", "max_video_sessions", "idle_timeout_ms", "max_client_sessions", "max_client_video_sessions", "max_session_bytes")
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_REFERENCE_BYTES_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FORMATS_FIELD_NUMBER: _ClassVar[int]
    MAX_VIDEO_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_VIDEO_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_CLIENT_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_CLIENT_VIDEO_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSION_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_sessions: int
    max_reference_bytes: int
    video_formats: _containers.RepeatedScalarFieldContainer[EncodedImage.Format]
    max_video_pixels: int
    max_video_sessions: int
    idle_timeout_ms: int
    max_client_sessions: int
    max_client_video_sessions: int
    max_session_bytes: int
    def __init__(self, max_sessions: _Optional[int] = ..., max_reference_bytes: _Optional[int] = ..., video_formats: _Optional[_Iterable[_Union[EncodedImage.Format, str]]] = ..., max_video_pixels: _Optional[int] = ..., max_video_sessions: _Optional[int] = ..., idle_timeout_ms: _Optional[int] = ..., max_client_sessions: _Optional[int] = ..., max_client_video_sessions: _Optional[int] = ..., max_session_bytes: _Optional[int] = ...) -> None: ...
