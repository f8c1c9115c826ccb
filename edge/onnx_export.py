"""Export a student's head to ONNX (fp32, or static int8 calibrated on real frames), with hnd metadata.

Runs where torch is (a workstation or the server); the edge then needs only onnxruntime
(``hnd.edge.onnx_head``). The graph is stem + bottleneck encoder (+ the neural filter's probability):
input ``images`` [B, 3, Hp, Wp], the normalized and padded batch, with dynamic batch, height and
width; or, exported with ``pixels="uint8"`` (the int8 file's default), the frame's uint8 pixels with the
normalization folded into conv1 (:class:`PixelStem`). For an Entropic Student the graph is its encoder (conv, GDN, conv, GDN, conv; GDN as Abs, Conv
and Div) followed by the rounding against the prior's medians, and it outputs the int32 ``symbols``;
the range coding stays outside the graph (``hnd.common.entropy_coder``), with the prior's integer tables
carried in the file's metadata (``hnd.prior``, see :class:`EntropicHeadGraph`). Normalize / resize / pad stay outside the graph, in ``hnd.common.preprocess``: measured on the
sample photos, OpenCV's resize and ONNX Runtime's Resize op both differ from torch's interpolate only
by float32 rounding of the sample positions, and outside the graph a frame at its split size skips
the resize entirely, the batch layout stays the runtime's choice, and the int8 graph quantizes only
convolutions (a quantized Resize / Pad would add error where there is none).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

import hnd
from hnd.common.checkpoint import CheckpointError, fingerprint, read_student_state_dict
from hnd.common.files import atomic_write
from hnd.common.sizes import SIZE_DIVISIBLE
from hnd.common.entropic import GDN1
from hnd.common.split import EntropicHead, Head
from hnd.edge.onnx_head import (
    INPUT,
    OUTPUT_BOTTLENECK,
    OUTPUT_FILTER,
    OUTPUT_SYMBOLS,
    HeadMetadata,
    head_batch,
    prior_to_json,
)

__all__ = [
    "OPSET",
    "PIXELS",
    "PixelStem",
    "EntropicHeadGraph",
    "HeadGraph",
    "STEMS",
    "SpaceToDepthStem",
    "export_onnx",
    "head_metadata",
    "quantize_int8",
    "student_head",
]

OPSET = 18


class AdaptiveAvgPoolAsMatmul(nn.Module):
    """nn.AdaptiveAvgPool2d for ONNX: ``P_h @ x @ P_w^T`` with averaging matrices built from the input's size.

    ONNX has no adaptive pooling for sizes that are not multiples of the output; the windows here are
    torch's (start ``floor(i * n / out)``, end ``ceil((i + 1) * n / out)``) and the matrices are built
    in the graph, so height and width stay dynamic. Equal to the module up to float32 summation order.
    """

    def __init__(self, output_size: tuple[int, int]) -> None:
        super().__init__()
        self.output_size = output_size

    @staticmethod
    def _matrix(n: int, out: int, like: torch.Tensor) -> torch.Tensor:
        i = torch.arange(out, device=like.device).unsqueeze(1)
        j = torch.arange(n, device=like.device).unsqueeze(0)  # n traces as the input's dynamic size
        start = torch.div(i * n, out, rounding_mode="floor")
        end = torch.div((i + 1) * n + out - 1, out, rounding_mode="floor")
        window = ((j >= start) & (j < end)).to(like.dtype)
        return window / window.sum(dim=1, keepdim=True)  # [out, n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph = self._matrix(x.shape[-2], self.output_size[0], x)
        pw = self._matrix(x.shape[-1], self.output_size[1], x)
        return torch.matmul(torch.matmul(ph, x), pw.transpose(0, 1))


def _space_to_depth(x: torch.Tensor) -> torch.Tensor:
    """ONNX SpaceToDepth (blocksize 2): [B, C, H, W] -> [B, 4C, H/2, W/2], channel (2a + b) * C + c holding
    pixel (2i + a, 2j + b) of channel c."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


class _SpaceToDepthConv(torch.autograd.Function):
    """SpaceToDepth, then a 4x4 convolution padded by 2 before and 1 after; exported as exactly those two ONNX
    ops (the exporter would spell the space-to-depth as Reshape, Transpose, Reshape and the asymmetric padding
    as a separate Pad with shape arithmetic, which ONNX Runtime then runs as extra float passes)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.nn.functional.conv2d(torch.nn.functional.pad(_space_to_depth(x), (2, 1, 2, 1)), weight)

    @staticmethod
    def symbolic(g, x, weight):  # type: ignore[no-untyped-def]
        s2d = g.op("SpaceToDepth", x, blocksize_i=2)
        return g.op("Conv", s2d, weight, kernel_shape_i=[4, 4], pads_i=[2, 2, 1, 1], strides_i=[1, 1])


class SpaceToDepthStem(nn.Module):
    """conv1 (7x7, stride 2, padding 3, 3 -> 64 channels) as SpaceToDepth + a 4x4 stride-1 convolution on 12
    channels: the same sums (up to float32 summation order), in a shape CPU kernels run well.

    A stride-2 convolution on 3 channels is a poor matrix multiply (ONNX Runtime's int8 QLinearConv reached
    ~40 GMAC/s on it, a fifth of what it reaches on the encoder's convolutions). With the kernel padded to
    8x8 by a zero leading row and column, ``y[i] = sum_u w8[u] x[2i + u - 4]``, i.e. after space-to-depth a
    4x4 stride-1 convolution padded by 2 before and 1 after (31 % more multiply-accumulates, all of them
    in a dense 12-channel layout). Needs even H and W (the edge's batch is padded to a multiple of 32).
    """

    def __init__(self, conv1: nn.Conv2d) -> None:
        super().__init__()
        _check_resnet_conv1(conv1, "SpaceToDepthStem")
        self.register_buffer("weight", _s2d_weight(conv1.weight.detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SpaceToDepthConv.apply(x, self.weight)


def _check_resnet_conv1(conv1: nn.Conv2d, who: str) -> None:
    """ValueError naming ``who`` unless ``conv1`` is torchvision's ResNet conv1 (the stems rewrite exactly that)."""
    if (
        tuple(conv1.weight.shape[1:]) != (3, 7, 7)
        or conv1.stride != (2, 2)
        or conv1.padding != (3, 3)
        or conv1.bias is not None
        or conv1.groups != 1
    ):
        raise ValueError(f"{who} needs torchvision's ResNet conv1 (3 -> n, 7x7, stride 2, padding 3)")


def _s2d_weight(w: torch.Tensor) -> torch.Tensor:
    """conv1's weight [O, 3, 7, 7] as the 4x4 weight on SpaceToDepth's 12 channels [O, 12, 4, 4]."""
    w8 = torch.zeros(w.shape[0], 3, 8, 8, dtype=w.dtype)
    w8[:, :, 1:, 1:] = w
    # w8[o, c, 2U + a, 2V + b] -> weight[o, (2a + b) * 3 + c, U, V], SpaceToDepth's channel order
    return w8.reshape(w.shape[0], 3, 4, 2, 4, 2).permute(0, 3, 5, 1, 2, 4).reshape(w.shape[0], 12, 4, 4).contiguous()


STEMS = ("s2d", "direct")
PIXELS = ("float32", "uint8")
# The first convolution's padding (before, after) in pixels: conv1's 3 on each side, or, for the space-to-depth
# stem, 2 before and 1 after in its half-resolution grid.
STEM_BORDER = {"direct": (3, 3), "s2d": (4, 2)}


class _PixelSpaceToDepthConv(torch.autograd.Function):
    """uint8 pixels -> SpaceToDepth (still uint8) -> float -> 4x4 convolution with bias, no padding; exported as
    those three ONNX ops (the rearrangement moves bytes, and the int8 graph quantizes nothing before the conv)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.nn.functional.conv2d(_space_to_depth(x).float(), weight, bias)

    @staticmethod
    def symbolic(g, x, weight, bias):  # type: ignore[no-untyped-def]
        s2d = g.op("SpaceToDepth", x, blocksize_i=2)
        as_float = g.op("Cast", s2d, to_i=1)  # TensorProto.FLOAT
        return g.op("Conv", as_float, weight, bias, kernel_shape_i=[4, 4], pads_i=[0, 0, 0, 0], strides_i=[1, 1])


class PixelStem(nn.Module):
    """conv1 on raw uint8 pixels: the normalization ``(x / 255 - mean_c) / std_c`` folded into its weights and a
    bias, ``w' = w / (255 std_c)``, ``b' = -sum w mean_c / std_c``; [B, 3, b0 + H + b1, b0 + W + b1] uint8 ->
    conv1's output [B, 64, H/2, W/2].

    The convolution does not pad: a zero of the normalized image is the mean pixel of the raw one, a value per
    channel no ONNX convolution pads with, so the edge supplies the border (b0, b1) = ``STEM_BORDER[stem]`` filled
    with the mean pixel rounded to uint8 (``hnd.common.preprocess.preprocess_uint8``). Inside the image this is
    conv1 up to float32 summation order; in the border the normalized value is ``(round(255 m) - 255 m) / (255 s)``
    instead of 0 (at most 0.0082 with the ImageNet normalization, under half a uint8 level).
    """

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, conv1: nn.Conv2d, mean: Sequence[float], std: Sequence[float], stem: str = "direct") -> None:
        super().__init__()
        _check_resnet_conv1(conv1, "PixelStem")
        w = conv1.weight.detach().double()
        m = torch.tensor([float(v) for v in mean], dtype=torch.float64).reshape(1, 3, 1, 1)
        s = torch.tensor([float(v) for v in std], dtype=torch.float64).reshape(1, 3, 1, 1)
        folded = (w / (255.0 * s)).float()
        self.stem = stem
        self.register_buffer("weight", _s2d_weight(folded) if stem == "s2d" else folded.contiguous())
        self.register_buffer("bias", (-(w * (m / s)).sum(dim=(1, 2, 3))).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem == "s2d":
            return _PixelSpaceToDepthConv.apply(x, self.weight, self.bias)
        return torch.nn.functional.conv2d(x.float(), self.weight, self.bias, stride=2)


class HeadGraph(nn.Module):
    """What the ONNX file computes: [B, 3, Hp, Wp] -> bottleneck [B, C, Hp/4 + 4, Wp/4 + 4] (and filter
    probability [B]).

    pixels: "float32", the input is the normalized batch; "uint8", the raw pixels with the first convolution's
    border, [B, 3, b0 + Hp + b1, b0 + Wp + b1], conv1 as :class:`PixelStem` (the normalization folded into it).

    stem: "direct" computes conv1 as the model's own convolution, "s2d" as :class:`SpaceToDepthStem` (equal
    up to float32 summation order; the int8 graph's source: measured side by side by ``hnd.bench.head``,
    it makes the int8 head ~1.4x faster and the fp32 head ~10 % slower).
    """

    def __init__(self, head: Head, stem: str = "direct", pixels: str = "float32") -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if pixels not in PIXELS:
            raise ValueError(f"pixels must be one of {PIXELS}, got {pixels!r}")
        self.head = head
        self.conv1: nn.Module = SpaceToDepthStem(head.conv1) if stem == "s2d" else head.conv1
        if pixels == "uint8":
            t = head.transform
            self.conv1 = PixelStem(head.conv1, t.image_mean, t.image_std, stem)
        self.filter: nn.Module | None = None
        if head.filter is not None:
            flt = copy.deepcopy(head.filter)  # the head's own filter keeps its torch pooling
            for name, module in list(flt.extractor.named_children()):
                if isinstance(module, nn.AdaptiveAvgPool2d):
                    size = module.output_size
                    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))  # type: ignore[index,arg-type]
                    flt.extractor[int(name)] = AdaptiveAvgPoolAsMatmul(hw)
            self.filter = flt

    @property
    def with_filter(self) -> bool:
        return self.filter is not None

    def forward(self, images: torch.Tensor):
        h = self.head
        features = h.maxpool(h.relu(h.bn1(self.conv1(images))))
        z = h.encode_features(features)
        if self.filter is not None:
            return z, self.filter.probability(features)
        return z


class _FoldedGDN(nn.Module):
    """GDN1 with its reparametrized beta / gamma computed once: [B, C, H, W] -> x / (beta + gamma * |x|).

    The same float32 values GDN1's forward computes on every call (max(p, bound)^2 - pedestal), so the
    output is the same; the graph gets plain Abs, Conv and Div instead of the parametrizer's custom
    autograd function.
    """

    beta: torch.Tensor
    gamma: torch.Tensor

    def __init__(self, gdn: GDN1) -> None:
        super().__init__()
        with torch.no_grad():
            c = gdn.beta.shape[0]
            self.register_buffer("beta", gdn.beta_reparam(gdn.beta).detach().clone())
            self.register_buffer("gamma", gdn.gamma_reparam(gdn.gamma).detach().reshape(c, c, 1, 1).clone())
        self.inverse = gdn.inverse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.nn.functional.conv2d(torch.abs(x), self.gamma, self.beta)
        return x * norm if self.inverse else x / norm


# Symbols beyond the coder's +-2^24 are refused by the coder; clipping a little beyond keeps the
# float -> int32 cast defined while still letting the coder see (and refuse) an out-of-range latent.
_SYMBOL_CLIP = float((1 << 24) + 1)


class EntropicHeadGraph(nn.Module):
    """What an Entropic Student's ONNX file computes: images [B, 3, Hp, Wp] -> symbols [B, C, Hp/4 - 1, Wp/4 - 1]
    int32, ``round(encoder(x) - median_c)`` (ONNX Round is half to even, as torch.round and numpy.rint).

    The rounding is in the graph so the edge only calls the coder, and so it uses the medians stored
    next to the weights; the range coder itself (constriction) stays outside, as ONNX has no such op.
    """

    def __init__(self, head: EntropicHead) -> None:
        super().__init__()
        layers = [_FoldedGDN(m) if isinstance(m, GDN1) else copy.deepcopy(m) for m in head.encoder]
        self.encoder = nn.Sequential(*layers)
        self.register_buffer("medians", head.entropy_bottleneck.medians().detach().clone().reshape(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        s = torch.round(self.encoder(images) - self.medians)
        return torch.clamp(s, -_SYMBOL_CLIP, _SYMBOL_CLIP).to(torch.int32)


def head_metadata(
    head: Head | EntropicHead,
    full_fingerprint: str,
    precision: str = "fp32",
    calibration: str = "",
    min_size: int | None = None,
    max_size: int | None = None,
) -> HeadMetadata:
    t = head.transform
    entropic = isinstance(head, EntropicHead)
    return HeadMetadata(
        fingerprint=full_fingerprint,
        model_kind=head.kind,
        bottleneck_channels=int(head.bottleneck_channels),
        min_size=int(min_size or t.min_size[-1]),
        max_size=int(max_size or t.max_size),
        image_mean=tuple(float(v) for v in t.image_mean),
        image_std=tuple(float(v) for v in t.image_std),
        size_divisible=int(getattr(t, "size_divisible", SIZE_DIVISIBLE)),
        num_keypoints=int(head.num_keypoints),
        precision=precision,
        hnd_version=hnd.__version__,
        filter_threshold=head.filter_threshold,
        calibration=calibration,
        bottleneck_type="entropic" if entropic else "hnd",
        prior=prior_to_json(head.prior_tables()) if entropic else "",
    )


def _set_metadata(model, meta: HeadMetadata) -> None:
    del model.metadata_props[:]
    for key, value in meta.to_props().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def file_metadata(path: str | os.PathLike) -> HeadMetadata:
    """The hnd metadata an exported .onnx file carries (OnnxHeadError when it has none or it is malformed)."""
    import onnx

    return HeadMetadata.from_props({p.key: p.value for p in onnx.load(str(path)).metadata_props}, str(path))


def _save(model, path: str | os.PathLike) -> None:
    data = model.SerializeToString()
    atomic_write(path, lambda f: f.write(data))


def export_onnx(
    head: Head | EntropicHead,
    meta: HeadMetadata,
    path: str | os.PathLike,
    sample_hw: tuple[int, int] = (256, 320),
    stem: str = "direct",
    pixels: str = "float32",
) -> None:
    """Trace the head (legacy exporter, opset 18, dynamic B / H / W) and write it with ``meta`` atomically.

    stem: how an HND head's conv1 is computed (:class:`HeadGraph`): "direct" for an fp32 file, "s2d" for
    the fp32 graph that :func:`quantize_int8` quantizes. An Entropic head has no stem.
    pixels: "uint8" for a graph on raw pixels (:class:`PixelStem`; the metadata's input_type and input_border
    say so), "float32" for one on the normalized batch. HND heads only."""
    import onnx

    head = head.eval()
    graph: nn.Module
    border = (0, 0)
    if isinstance(head, EntropicHead):
        if pixels != "float32":
            raise ValueError("an Entropic Student's head takes the normalized batch (pixels float32)")
        graph = EntropicHeadGraph(head).eval()
        outputs = [OUTPUT_SYMBOLS]
    else:
        graph = HeadGraph(head, stem, pixels).eval()
        outputs = [OUTPUT_BOTTLENECK] + ([OUTPUT_FILTER] if graph.with_filter else [])
        border = STEM_BORDER[stem] if pixels == "uint8" else (0, 0)
    meta = dataclasses.replace(meta, input_type=pixels, input_border=border)
    axes = {INPUT: {0: "batch", 2: "height", 3: "width"}, outputs[0]: {0: "batch", 2: "h", 3: "w"}}
    if OUTPUT_FILTER in outputs:
        axes[OUTPUT_FILTER] = {0: "batch"}
    dtype = torch.uint8 if pixels == "uint8" else torch.float32
    dummy = torch.zeros(1, 3, sample_hw[0] + sum(border), sample_hw[1] + sum(border), dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "head.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # The legacy (TorchScript) exporter is deprecated but is the one that exports this head
            # with dynamic sizes; its tracer warnings are about shape arithmetic we mean.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                graph,
                (dummy,),
                str(raw),
                input_names=[INPUT],
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
            )
        model = onnx.load(str(raw))
    onnx.checker.check_model(model)
    _set_metadata(model, meta)
    _save(model, path)


class _Frames:
    """onnxruntime CalibrationDataReader over preprocessed frames, one batch of one at a time."""

    def __init__(self, batches: Iterator[np.ndarray]) -> None:
        self.batches = batches

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {INPUT: batch}

    def rewind(self) -> None:  # called by some onnxruntime versions; one pass is all we give
        pass


def quantize_int8(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    frames: Sequence[np.ndarray],
    meta: HeadMetadata,
    calibration: str,
    method: str = "minmax",
    per_channel: bool = True,
    fp32_last: bool = True,
) -> None:
    """Static int8 (QDQ: int8 weights per channel, or per tensor, uint8 activations) calibrated on ``frames``.

    fp32_path: best exported with ``stem="s2d"`` (:func:`export_onnx`): ONNX Runtime's int8 convolution runs
    the space-to-depth stem far faster than the 3-channel stride-2 one.

    frames: RGB uint8 [H, W, 3], real frames like the ones the edge will see; each goes through the
    edge's own preprocessing at the metadata's min / max size. ``method``: minmax | entropy | percentile.
    fp32_last: the convolution that writes an HND head's bottleneck stays float32 (see the comment below).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise ValueError(f"calibration method must be one of {sorted(methods)}, got {method!r}")
    if not frames:
        raise ValueError("int8 calibration needs at least one frame")
    # The input the fp32 file takes (normalized float32, or uint8 pixels with a border) is the int8 file's too.
    written = file_metadata(fp32_path)
    meta = dataclasses.replace(meta, input_type=written.input_type, input_border=written.input_border)

    def batches() -> Iterator[np.ndarray]:
        for f in frames:
            yield head_batch([f], meta, meta.min_size, meta.max_size)[0]

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        q = Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        # The convolution writing the bottleneck stays float32 (its input is still int8): with its output
        # quantized to 256 levels too, the int8 graph's noise flipped 4-bit symbols between still frames
        # and cost temporal coding ~10 % more bytes; the convolution is 0.4 % of the head's MACs.
        last = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv" and OUTPUT_BOTTLENECK in n.output]
        quantize_static(
            str(pre),
            str(q),
            _Frames(batches()),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            calibrate_method=methods[method],
            nodes_to_exclude=last if fp32_last else [],
        )
        model = onnx.load(str(q))
    _quantize_before_space_to_depth(model)
    _pixels_as_quantized(model)
    int8_meta = HeadMetadata(**{**meta.__dict__, "precision": "int8", "calibration": calibration})
    _set_metadata(model, int8_meta)
    _save(model, out_path)


def _quantize_before_space_to_depth(model) -> None:
    """images -> SpaceToDepth -> QuantizeLinear  becomes  images -> QuantizeLinear -> SpaceToDepth (in place).

    The quantizer leaves SpaceToDepth in float32 and quantizes its output; quantizing is elementwise with one
    scale and zero point, so moving it before the rearrangement gives the same uint8 values, and the
    rearrangement then moves a quarter of the bytes. A graph without that pattern is left as it is.
    """
    nodes = list(model.graph.node)
    s2d = next((n for n in nodes if n.op_type == "SpaceToDepth" and list(n.input) == [INPUT]), None)
    if s2d is None:
        return
    consumers = [n for n in nodes if s2d.output[0] in n.input]
    if len(consumers) != 1 or consumers[0].op_type != "QuantizeLinear":
        return
    q = consumers[0]
    quantized_input = INPUT + "_quantized"
    q.input[0] = INPUT
    q_out = q.output[0]
    q.output[0] = quantized_input
    s2d.input[0] = quantized_input
    s2d.output[0] = q_out
    # Topological order: the quantization first, then the rearrangement.
    model.graph.node.remove(q)
    model.graph.node.insert(list(model.graph.node).index(s2d), q)


def _pixels_as_quantized(model) -> None:
    """images (uint8) [-> SpaceToDepth] -> Cast -> QuantizeLinear(s, z) -> DequantizeLinear  becomes
    images [-> SpaceToDepth] -> DequantizeLinear(1, 0)  (in place).

    A uint8 graph's pixels are already the quantized values of themselves at scale 1, zero point 0: the first
    convolution reads them as they are, exactly, instead of through a calibrated 256-level grid of their range.
    A graph without that pattern (a float32 input) is left as it is.
    """
    from onnx import TensorProto, helper

    nodes = list(model.graph.node)
    cast = next((n for n in nodes if n.op_type == "Cast" and _from_images(nodes, n.input[0])), None)
    if cast is None:
        return
    q = [n for n in nodes if cast.output[0] in n.input]
    if len(q) != 1 or q[0].op_type != "QuantizeLinear":
        return
    dq = [n for n in nodes if q[0].output[0] in n.input]
    if not dq or any(n.op_type != "DequantizeLinear" for n in dq):
        return
    one = helper.make_tensor("pixels_scale", TensorProto.FLOAT, [], [1.0])
    zero = helper.make_tensor("pixels_zero_point", TensorProto.UINT8, [], [0])
    model.graph.initializer.extend([one, zero])
    old = set(q[0].input[1:])
    for n in dq:
        n.input[:] = [cast.input[0], one.name, zero.name]
    model.graph.node.remove(cast)
    model.graph.node.remove(q[0])
    used = {i for n in model.graph.node for i in n.input}
    for init in [i for i in model.graph.initializer if i.name in old and i.name not in used]:
        model.graph.initializer.remove(init)


def _from_images(nodes, name: str) -> bool:
    """Whether tensor ``name`` is the graph input or a SpaceToDepth of it."""
    return name == INPUT or any(
        n.op_type == "SpaceToDepth" and n.output[0] == name and n.input[0] == INPUT for n in nodes
    )


def student_head(
    checkpoint: str | None, config: str | None = None, random_weights: int | None = None
) -> tuple[Head, str]:
    """(Head in eval mode, full-model fingerprint) to export; the model as :func:`student_model` builds it."""
    from hnd.common.split import split_model

    model = student_model(checkpoint, config, random_weights)
    head, _ = split_model(model)
    if isinstance(head, EntropicHead) and not head.entropy_bottleneck.updated:
        raise CheckpointError(
            f"{checkpoint or config}: the Entropic Student's prior has no CDF tables (stage 1 never ran update()); "
            "the edge cannot code without them"
        )
    return head.eval(), fingerprint(model)


def student_model(checkpoint: str | None, config: str | None = None, random_weights: int | None = None) -> nn.Module:
    """The full student a head is exported from, in eval mode.

    With ``config`` the model is built from it (weights from ``checkpoint`` or ``random_weights``);
    without, the architecture is read off the checkpoint's keys (kind, bottleneck channels, classes,
    keypoints, neural filter) and its transform off the checkpoint's ``model_info`` (hnd-train records
    it); a file that names none (the original releases) gets torchvision's default transform, which
    ``--min-size / --max-size`` can then override in the metadata.
    """
    if config is not None:
        from hnd.common.build import build_model_from_config
        from hnd.common.config import load_config, with_weights

        cfg = load_config(config)
        if cfg.model.bottleneck_channels is None:
            raise CheckpointError(f"{cfg.path}: model is a teacher (no bottleneck); only a student has a head")
        model = build_model_from_config(with_weights(cfg.model, checkpoint, random_weights), cfg.path)
    else:
        if checkpoint is None:
            raise CheckpointError("give a checkpoint (or --config with --random-weights)")
        model = _model_from_keys(checkpoint)
    return model.eval()


def _model_from_keys(path: str) -> nn.Module:
    from hnd.common.checkpoint import load_checkpoint
    from hnd.common.models import build_model
    from hnd.common.neural_filter import FILTER_PREFIX, attach_filter

    sd, kind, channels = read_student_state_dict(
        path,
        "a head-only export; the ONNX export needs the full student checkpoint",
        "holds a teacher (no bottleneck); only a student has a head to export",
    )
    kwargs = {}
    cls = sd.get("roi_heads.box_predictor.cls_score.weight")
    if cls is not None:
        kwargs["num_classes"] = int(cls.shape[0])
    kps = sd.get("roi_heads.keypoint_predictor.kps_score_lowres.weight")
    if kps is not None:
        kwargs["num_keypoints"] = int(kps.shape[1])  # ConvTranspose2d weight: [in, out, k, k]
    from hnd.common.checkpoint import bottleneck_type_of_state_dict, checkpoint_transform

    transform = checkpoint_transform(path) or {}
    for key in ("min_size", "max_size", "image_mean", "image_std"):
        if key in transform:
            kwargs[key] = transform[key]
    model = build_model(kind, channels, bottleneck_type=bottleneck_type_of_state_dict(sd) or "hnd", **kwargs)
    if "size_divisible" in transform:
        model.transform.size_divisible = int(transform["size_divisible"])
    if any(k.startswith(FILTER_PREFIX) for k in sd):
        attach_filter(model)
    load_checkpoint(path, model)
    return model
