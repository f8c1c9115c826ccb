"""The head on ONNX Runtime: an ``hnd-export-head`` .onnx file, checked, run on numpy arrays; no torch.

The graph (see ``hnd.edge.onnx_export``) takes the normalized, padded batch ``images`` [B, 3, Hp, Wp]
float32 (or, a file whose metadata says input_type uint8, the raw pixels [B, 3, b0 + Hp + b1, b0 + Wp + b1]
padded with the mean pixel: the normalization is folded into its first convolution) and gives, for an
HND / GHND student, ``bottleneck`` [B, C, Hp/4 + 4, Wp/4 + 4] float32 (and ``filter_probability`` [B] when the student carries a neural filter); for an Entropic Student,
``symbols`` [B, C, Hp/4 - 1, Wp/4 - 1] int32, the latent already rounded against the prior's medians,
which the edge range-codes outside the graph with the prior's integer tables from the file's metadata
(``hnd.prior``; :meth:`OnnxHead.prior`). Normalize, resize and pad run before it in numpy / OpenCV
(``hnd.common.preprocess``), with torchvision's geometry. The file's ``metadata_props`` say which
model it is; :func:`read_metadata` refuses a file without them.

Every problem with the file or the provider is an :class:`OnnxHeadError` whose message is one line
naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hnd.common.errors import HndError
from hnd.common.meta import SplitMeta
from hnd.common.preprocess import preprocess, preprocess_uint8

if TYPE_CHECKING:
    from hnd.common.entropy_coder import PriorTables

__all__ = [
    "FORMAT",
    "INPUT",
    "OUTPUT_BOTTLENECK",
    "OUTPUT_FILTER",
    "OUTPUT_SYMBOLS",
    "HeadMetadata",
    "HeadOutput",
    "OnnxHead",
    "OnnxHeadError",
    "head_batch",
    "is_onnx_path",
    "prior_from_json",
    "prior_to_json",
    "read_metadata",
]

FORMAT = "hnd-head-onnx/1"
INPUT = "images"
OUTPUT_BOTTLENECK = "bottleneck"
OUTPUT_FILTER = "filter_probability"
OUTPUT_SYMBOLS = "symbols"  # an Entropic Student's rounded latent, int32
_PREFIX = "hnd."
DEFAULT_PROVIDER = "CPUExecutionProvider"
INPUT_TYPES = ("float32", "uint8")
_ORT_TYPES = {"float32": "tensor(float)", "uint8": "tensor(uint8)"}


class OnnxHeadError(HndError):
    """An ONNX head that cannot be used: unreadable, not an hnd head, or a provider that is not installed."""


def is_onnx_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".onnx"


@dataclass(frozen=True)
class HeadMetadata:
    """What an exported head says about itself (ONNX metadata_props, keys prefixed ``hnd.``).

    fingerprint: weights fingerprint of the full model the head was cut from (the server checks it).
    min_size / max_size: the transform's resize at export; the edge may override them.
    image_mean / image_std: normalization per RGB channel. precision: "fp32" or "int8".
    filter_threshold: the neural filter's default threshold, None without a filter.
    bottleneck_type: "hnd" (HND / GHND, a float bottleneck) or "entropic" (int32 symbols).
    prior: Entropic only, the factorized prior's coding tables as JSON (:func:`prior_to_json`), empty otherwise.
    input_type: "float32" (the normalized, zero-padded batch) or "uint8" (raw pixels, the normalization folded
    into the first convolution; the batch padded with the mean pixel, ``hnd.common.preprocess.preprocess_uint8``).
    input_border: uint8 only, the first convolution's padding (before, after) the edge supplies around the batch.
    """

    fingerprint: str
    model_kind: str
    bottleneck_channels: int
    min_size: int
    max_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    size_divisible: int
    num_keypoints: int
    precision: str
    hnd_version: str
    filter_threshold: float | None = None
    calibration: str = ""  # int8: what the quantization was calibrated on
    bottleneck_type: str = "hnd"  # files written before Entropic heads existed are HND heads
    prior: str = ""
    input_type: str = "float32"  # files written before uint8 heads existed take the normalized batch
    input_border: tuple[int, int] = (0, 0)

    def to_props(self) -> dict[str, str]:
        """metadata_props entries (all strings; lists and None as JSON)."""
        props = {"format": FORMAT}
        for key, value in self.__dict__.items():
            props[key] = value if isinstance(value, str) else json.dumps(value)
        return {_PREFIX + k: v for k, v in props.items()}

    @classmethod
    def from_props(cls, props: dict[str, str], where: str) -> HeadMetadata:
        ours = {k[len(_PREFIX) :]: v for k, v in props.items() if k.startswith(_PREFIX)}
        if not ours:
            raise OnnxHeadError(f"{where}: ONNX file without hnd metadata (not written by hnd-export-head)")
        if ours.get("format") != FORMAT:
            raise OnnxHeadError(f"{where}: hnd metadata format {ours.get('format')!r}, expected {FORMAT!r}")
        fields: dict[str, Any] = {}
        too_long = [k for k, v in ours.items() if len(v) > MAX_METADATA_CHARS]
        if too_long:
            raise OnnxHeadError(f"{where}: hnd metadata {_PREFIX}{too_long[0]} is over {MAX_METADATA_CHARS} characters")
        try:
            for name, f in cls.__dataclass_fields__.items():
                if name not in ours:
                    if f.default is not dataclasses.MISSING:
                        continue
                    raise KeyError(name)
                raw = ours[name]
                fields[name] = raw if f.type in ("str",) else json.loads(raw)
            fields["image_mean"] = tuple(float(v) for v in fields["image_mean"])
            fields["image_std"] = tuple(float(v) for v in fields["image_std"])
            if "input_border" in fields:
                fields["input_border"] = tuple(int(v) for v in fields["input_border"])
            meta = cls(**fields)
        except KeyError as exc:
            raise OnnxHeadError(f"{where}: hnd metadata lacks {_PREFIX}{exc.args[0]}") from None
        except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            raise OnnxHeadError(f"{where}: malformed hnd metadata ({str(exc)[:200]})") from None
        if len(meta.image_mean) != 3 or len(meta.image_std) != 3 or meta.bottleneck_channels < 1:
            raise OnnxHeadError(f"{where}: malformed hnd metadata (normalization or channels)")
        if meta.bottleneck_type not in ("hnd", "entropic"):
            raise OnnxHeadError(f"{where}: hnd metadata bottleneck_type {meta.bottleneck_type!r} (hnd or entropic)")
        if meta.input_type not in INPUT_TYPES or len(meta.input_border) != 2:
            raise OnnxHeadError(f"{where}: hnd metadata input_type {meta.input_type!r} ({' or '.join(INPUT_TYPES)})")
        if not all(0 <= b <= 16 for b in meta.input_border) or (
            meta.input_type == "float32" and any(meta.input_border)
        ):
            raise OnnxHeadError(f"{where}: hnd metadata input_border {list(meta.input_border)} for {meta.input_type}")
        if (meta.bottleneck_type == "entropic") != bool(meta.prior):
            raise OnnxHeadError(f"{where}: hnd metadata: an Entropic head carries {_PREFIX}prior, an HND head none")
        return meta

    def output_names(self) -> list[str]:
        """The graph outputs a head of this kind has, in order."""
        if self.bottleneck_type == "entropic":
            return [OUTPUT_SYMBOLS]
        return [OUTPUT_BOTTLENECK] + ([OUTPUT_FILTER] if self.filter_threshold is not None else [])


_PRIOR_FORMAT = "hnd-prior/1"
# Bounds on what a head file's metadata may make the edge parse and allocate (a real prior: 24 channels of
# tens of CDF entries, ~20 kB of JSON). A 16-bit CDF that rises strictly from 0 to 2^16 has at most 2^16 + 1
# entries; the dense [C, W] table is refused above MAX_PRIOR_CELLS before it is allocated.
MAX_METADATA_CHARS = 16 << 20
MAX_PRIOR_CHANNELS = 4096
MAX_PRIOR_CELLS = 1 << 22  # 32 MB as int64


def prior_to_json(tables: PriorTables) -> str:
    """The prior's coding tables as one JSON string (integers as lists, medians as float32-exact decimals).

    Carries the tables' sha256 (``PriorTables.digest``) so a file whose tables were altered is refused.
    """
    a = tables.arrays()
    doc = {
        "format": _PRIOR_FORMAT,
        "digest": tables.digest(),
        "quantized_cdf": [row[: int(n)].tolist() for row, n in zip(a["quantized_cdf"], a["cdf_length"])],
        "offset": a["offset"].tolist(),
        "medians": [float(m) for m in a["medians"]],  # a float32 as a double: repr round-trips exactly
    }
    return json.dumps(doc, separators=(",", ":"))


def prior_from_json(text: str, where: str, channels: int | None = None) -> PriorTables:
    """PriorTables from :func:`prior_to_json`'s string; OnnxHeadError (one line) when malformed or altered.

    channels: the head's bottleneck channels, when known (the table must have one row per channel). Parsing is
    bounded: text over MAX_METADATA_CHARS, JSON nested too deep and tables over MAX_PRIOR_CELLS are refused
    before anything their size implies is allocated.
    """
    from hnd.common.entropy_coder import CDF_PRECISION, EntropyCodingError, PriorTables

    try:
        if len(text) > MAX_METADATA_CHARS:
            raise ValueError(f"over {MAX_METADATA_CHARS} characters")
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != _PRIOR_FORMAT:
            raise ValueError(
                f"format {doc.get('format') if isinstance(doc, dict) else None!r}, expected {_PRIOR_FORMAT!r}"
            )
        raw_rows = doc["quantized_cdf"]
        if not isinstance(raw_rows, list) or not raw_rows or not all(isinstance(r, list) for r in raw_rows):
            raise ValueError("quantized_cdf must be a non-empty list of rows")
        if len(raw_rows) != (channels or len(raw_rows)) or len(raw_rows) > MAX_PRIOR_CHANNELS:
            raise ValueError(f"{len(raw_rows)} table rows for a {channels or MAX_PRIOR_CHANNELS}-channel head")
        width = max(len(r) for r in raw_rows)
        if width > (1 << CDF_PRECISION) + 1 or len(raw_rows) * width > MAX_PRIOR_CELLS:
            raise ValueError(f"a {len(raw_rows)}x{width} table is over {MAX_PRIOR_CELLS} entries")
        rows = [np.asarray(r, dtype=np.int64) for r in raw_rows]
        if any(r.ndim != 1 for r in rows):
            raise ValueError("quantized_cdf must be a non-empty list of rows")
        cdf = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            cdf[i, : len(r)] = r
        if np.abs(cdf).max() > 1 << 31:
            raise ValueError("table entries beyond int32")
        tables = PriorTables(
            cdf,
            np.array([len(r) for r in rows], dtype=np.int64),
            np.asarray(doc["offset"], dtype=np.int64),
            np.asarray(doc["medians"], dtype=np.float64).astype(np.float32),
        )
    except (KeyError, TypeError, ValueError, OverflowError, RecursionError, EntropyCodingError) as exc:
        what = f"lacks {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
        raise OnnxHeadError(f"{where}: malformed {_PREFIX}prior ({what})"[:300]) from None
    if tables.digest() != doc.get("digest"):
        raise OnnxHeadError(
            f"{where}: {_PREFIX}prior tables do not match their digest (the file was altered; export it again)"
        )
    return tables


@dataclass
class HeadOutput:
    """bottleneck: [B, C, h, w], float32 for an HND head, the int32 symbols of an Entropic head.
    filter_probability: [B] float32, None without a filter."""

    bottleneck: np.ndarray
    filter_probability: np.ndarray | None


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise OnnxHeadError("onnxruntime is not installed (pip install 'hnd[edge]')") from None
    return onnxruntime


def _load_session(path: str, providers: Sequence[str], threads: int | None):
    ort = _ort()
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise OnnxHeadError(
            f"{path}: ONNX Runtime provider {', '.join(missing)} is not available here "
            f"(installed: {', '.join(available)})"
        )
    if not os.path.isfile(path):
        raise OnnxHeadError(f"{path}: no such file")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads sleep instead of spinning: the edge's capture, encode and gRPC threads share the
    # cores (hnd.bench.head's levers: 2-thread int8 head 46 vs 108 ms best on a loaded 2-core machine).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path, sess_options=options, providers=list(providers))
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types (Fail, InvalidProtobuf, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxHeadError(f"{path}: not a loadable ONNX model ({first[:200]})") from None


def read_metadata(session, path: str) -> HeadMetadata:
    """The hnd metadata of a loaded session, checked against the graph's inputs and outputs."""
    meta = HeadMetadata.from_props(dict(session.get_modelmeta().custom_metadata_map), path)
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    want = meta.output_names()
    if inputs != [INPUT] or outputs != want:
        raise OnnxHeadError(
            f"{path}: graph has inputs {inputs} and outputs {outputs}; an hnd head has [{INPUT!r}] and {want}"
        )
    graph_type = session.get_inputs()[0].type
    if graph_type != _ORT_TYPES[meta.input_type]:
        raise OnnxHeadError(f"{path}: graph input is {graph_type}, its hnd metadata says {meta.input_type}")
    return meta


def head_batch(
    images: Sequence[np.ndarray], meta: HeadMetadata, min_size: int, max_size: int
) -> tuple[np.ndarray, SplitMeta]:
    """RGB uint8 frames [H, W, 3] -> (the graph's input batch, SplitMeta), as the file's input_type says:
    the normalized batch [B, 3, Hp, Wp] float32, or the raw one [B, 3, b0 + Hp + b1, b0 + Wp + b1] uint8."""
    if meta.input_type == "uint8":
        return preprocess_uint8(images, min_size, max_size, meta.image_mean, meta.size_divisible, meta.input_border)
    return preprocess(images, min_size, max_size, meta.image_mean, meta.image_std, meta.size_divisible)


class OnnxHead:
    """An exported head on an ONNX Runtime session.

    ``min_size`` / ``max_size`` override the file's resize (a native-resolution split: a 640x480
    camera at min_size 480 is not upsampled). ``threads`` sets ONNX Runtime's intra-op threads.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        providers: Sequence[str] = (DEFAULT_PROVIDER,),
        threads: int | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
    ) -> None:
        self.path = str(path)
        self.session = _load_session(self.path, providers, threads)
        self.metadata = read_metadata(self.session, self.path)
        self.min_size = int(min_size or self.metadata.min_size)
        self.max_size = int(max_size or self.metadata.max_size)
        if self.min_size < 1 or self.max_size < self.min_size:
            raise OnnxHeadError(f"{self.path}: need 1 <= min_size <= max_size, got {self.min_size}/{self.max_size}")
        self.providers = self.session.get_providers()
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._dtype = np.uint8 if self.metadata.input_type == "uint8" else np.float32
        # An Entropic head's coding tables, parsed and checked once (the file's digest must match).
        self.prior: PriorTables | None = (
            prior_from_json(self.metadata.prior, self.path, self.metadata.bottleneck_channels)
            if self.metadata.bottleneck_type == "entropic"
            else None
        )
        if self.prior is not None and self.prior.channels != self.metadata.bottleneck_channels:
            raise OnnxHeadError(
                f"{self.path}: prior has {self.prior.channels} channels, the head {self.metadata.bottleneck_channels}"
            )

    # The attributes the edge reads from a torch Head too.
    @property
    def kind(self) -> str:
        return self.metadata.model_kind

    @property
    def bottleneck_channels(self) -> int:
        return self.metadata.bottleneck_channels

    @property
    def fingerprint(self) -> str:
        return self.metadata.fingerprint

    @property
    def filter_threshold(self) -> float | None:
        return self.metadata.filter_threshold

    @property
    def num_keypoints(self) -> int:
        return self.metadata.num_keypoints

    @property
    def bottleneck_type(self) -> str:
        return self.metadata.bottleneck_type

    @property
    def is_entropic(self) -> bool:
        return self.metadata.bottleneck_type == "entropic"

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, SplitMeta]:
        """RGB uint8 frames [H, W, 3] -> (the graph's batch: :func:`head_batch`, SplitMeta)."""
        return head_batch(images, self.metadata, self.min_size, self.max_size)

    def run(self, batch: np.ndarray) -> HeadOutput:
        """``preprocess``'s batch -> bottleneck and filter probability. Safe to call from several threads at
        once (ONNX Runtime sessions are; each call runs on its caller's thread plus the intra-op pool)."""
        out = self.session.run(self._outputs, {INPUT: np.ascontiguousarray(batch, dtype=self._dtype)})
        return HeadOutput(out[0], out[1] if len(out) > 1 else None)

    def __call__(self, images: Sequence[np.ndarray]) -> tuple[HeadOutput, SplitMeta]:
        batch, meta = self.preprocess(images)
        return self.run(batch), meta
