"""Entropic Student: sc2bench's learned, entropy-coded bottleneck for torchvision R-CNNs.

The student keeps the teacher's ResNet-50 layer2..4, FPN, RPN and ROI heads, and replaces the
stem *and* layer1 (conv1, bn1, relu, maxpool, layer1) by ``backbone.body.bottleneck_layer``, an
:class:`FPBottleneck` (sc2bench's ``FPBasedResNetBottleneck``):

* ``encoder`` (edge): [B, 3, H, W] normalized, padded image -> latent y [B, C, H/4 - 1, W/4 - 1]
  (conv 5x5 s2 -> GDN -> conv 5x5 s2 -> GDN -> conv 2x2; C = 24 in sc2bench's configs);
* ``entropy_bottleneck``: a factorized prior (CompressAI's ``EntropyBottleneck``): one learned
  cumulative density per channel, and after :meth:`EntropyBottleneck.update` the integer CDF tables
  (``_quantized_cdf``, ``_cdf_length``, ``_offset``) the coder uses. The tables are registered
  buffers, so they are in the state dict and the weights fingerprint covers them: edge and server
  code with the very same integers, whatever hardware computed them;
* ``decoder`` (server): y_hat [B, C, H/4 - 1, W/4 - 1] -> [B, 256, H/4, W/4], layer1's output shape
  (conv 2x2 -> inverse GDN -> conv 2x2 -> inverse GDN -> conv 2x2).

Key names and layer order are sc2bench's (CompressAI <= 1.2.6 names for the entropy bottleneck;
the >= 1.2.7 names ``matrices.i`` / ``biases.i`` / ``factors.i`` are renamed on load by
hnd.common.checkpoint), so its
released checkpoints load. docs/ENTROPIC.md describes the model, the keys and the coding.

The feature maps keep sc2bench's names: the body returns ``{'1', '2', '3', '4'}`` (for
bottleneck_layer, layer2, layer3, layer4) and the FPN adds ``'pool'``. torchvision's default
``MultiScaleRoIAlign(['0', '1', '2', '3'])`` therefore pools boxes from '1', '2', '3' only; we keep
that, because sc2bench's checkpoints were trained (and are scored) with it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

ENTROPIC_PREFIX = "backbone.body.bottleneck_layer."
DEFAULT_CHANNELS = 24  # sc2bench's COCO configs
CDF_PRECISION = 16  # bits of the integer CDF tables (CompressAI's entropy_coder_precision)
RETURN_LAYERS = {"bottleneck_layer": "1", "layer2": "2", "layer3": "3", "layer4": "4"}


# ---------------------------------------------------------------------------------------------------
# CompressAI's parametrizations (same buffers, same arithmetic)


class _LowerBoundFunction(torch.autograd.Function):
    """max(x, bound), passing gradients where x >= bound or where they push x up (CompressAI's LowerBound)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, bound)
        return torch.max(x, bound)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, bound = ctx.saved_tensors
        passes = (x >= bound) | (grad < 0)
        return passes.type(grad.dtype) * grad, None


class LowerBound(nn.Module):
    """Key ``bound`` [1]."""

    bound: torch.Tensor

    def __init__(self, bound: float) -> None:
        super().__init__()
        self.register_buffer("bound", torch.tensor([float(bound)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LowerBoundFunction.apply(x, self.bound)


class NonNegativeParametrizer(nn.Module):
    """Stores sqrt(value + pedestal); gives max(p, bound)^2 - pedestal. Keys ``pedestal``, ``lower_bound.bound``."""

    pedestal: torch.Tensor

    def __init__(self, minimum: float = 0.0, reparam_offset: float = 2.0**-18) -> None:
        super().__init__()
        self.register_buffer("pedestal", torch.tensor([float(reparam_offset) ** 2]))
        self.lower_bound = LowerBound((float(minimum) + float(reparam_offset) ** 2) ** 0.5)

    def init(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.max(x + self.pedestal, self.pedestal))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lower_bound(x) ** 2 - self.pedestal


class GDN1(nn.Module):
    """Simplified GDN (CompressAI's GDN1): y_i = x_i / (beta_i + sum_j gamma_ij |x_j|), or x_i * (...) inverse.

    [B, C, H, W] -> [B, C, H, W]. Keys ``beta`` [C], ``gamma`` [C, C] and the two parametrizers' buffers.
    """

    def __init__(self, channels: int, inverse: bool = False, beta_min: float = 1e-6, gamma_init: float = 0.1) -> None:
        super().__init__()
        self.inverse = bool(inverse)
        self.beta_reparam = NonNegativeParametrizer(minimum=beta_min)
        self.beta = nn.Parameter(self.beta_reparam.init(torch.ones(channels)))
        self.gamma_reparam = NonNegativeParametrizer()
        self.gamma = nn.Parameter(self.gamma_reparam.init(gamma_init * torch.eye(channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        beta = self.beta_reparam(self.beta)
        gamma = self.gamma_reparam(self.gamma).reshape(c, c, 1, 1)
        norm = F.conv2d(torch.abs(x), gamma, beta)
        return x * norm if self.inverse else x / norm


# ---------------------------------------------------------------------------------------------------
# Factorized prior


def pmf_to_quantized_cdf(pmf: np.ndarray, precision: int = CDF_PRECISION) -> np.ndarray:
    """CompressAI's ``pmf_to_quantized_cdf`` (cpp_exts/ops/ops.cpp) in numpy: [L] pmf -> [L + 1] int32 CDF.

    Rounds p * 2^precision, rescales the integers to sum to 2^precision, takes the cumulative sum
    (last entry exactly 2^precision), then gives every empty bin one unit stolen from the smallest
    bin holding more than one, so every symbol stays codable. Only update() runs it; coding always
    reads the stored tables.
    """
    pmf = np.asarray(pmf, dtype=np.float32)
    if pmf.ndim != 1 or not np.isfinite(pmf).all() or (pmf < 0).any():
        raise ValueError("pmf must be a finite, non-negative vector")
    total_scale = 1 << precision
    # std::round(p * 2^precision) on floats: exact products, halves rounded away from zero.
    freq = np.floor(pmf.astype(np.float64) * total_scale + 0.5).astype(np.uint64)
    total = int(freq.sum())
    if total == 0:
        raise ValueError("pmf sums to zero")
    freq = (np.uint64(total_scale) * freq) // np.uint64(total)
    cdf = np.zeros(len(pmf) + 1, dtype=np.int64)
    cdf[1:] = np.cumsum(freq.astype(np.int64))
    cdf[-1] = total_scale
    n = len(cdf)
    for i in range(n - 1):
        if cdf[i] == cdf[i + 1]:
            widths = np.diff(cdf)
            candidates = np.where(widths > 1, widths, np.iinfo(np.int64).max)
            best = int(np.argmin(candidates))  # the first smallest bin with freq > 1
            if widths[best] <= 1:
                raise ValueError("cannot give every symbol a nonzero frequency")
            if best < i:
                cdf[best + 1 : i + 1] -= 1
            else:
                cdf[i + 1 : best + 1] += 1
    return cdf.astype(np.int32)


class EntropyBottleneck(nn.Module):
    """Factorized prior of Balle et al. 2018 (CompressAI's ``EntropyBottleneck``, its <= 1.2.6 key names).

    forward: y [B, C, ...] -> (y_hat, likelihoods), both [B, C, ...]: y + U(-1/2, 1/2) noise in training,
    round(y - median) + median in eval. The medians are ``quantiles[:, 0, 1]``.
    update(): fills the integer CDF tables from the learned densities (``_offset`` [C],
    ``_quantized_cdf`` [C, Lmax + 2], ``_cdf_length`` [C]); empty ([0]) until then.
    """

    _offset: torch.Tensor
    _quantized_cdf: torch.Tensor
    _cdf_length: torch.Tensor
    target: torch.Tensor

    def __init__(
        self,
        channels: int,
        tail_mass: float = 1e-9,
        init_scale: float = 10.0,
        filters: tuple[int, ...] = (3, 3, 3, 3),
        likelihood_bound: float = 1e-9,
    ) -> None:
        super().__init__()
        self.channels = int(channels)
        self.tail_mass = float(tail_mass)
        self.init_scale = float(init_scale)
        self.filters: tuple[int, ...] = ()
        self.set_filters(filters)
        self.quantiles = nn.Parameter(torch.tensor([-init_scale, 0.0, init_scale]).repeat(channels, 1, 1))
        self.register_buffer("_offset", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("_quantized_cdf", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("_cdf_length", torch.zeros(0, dtype=torch.int32))
        t = float(np.log(2 / self.tail_mass - 1))
        self.register_buffer("target", torch.tensor([-t, 0.0, t]))
        self.likelihood_lower_bound = LowerBound(likelihood_bound)

    def set_filters(self, filters: tuple[int, ...]) -> None:
        """(Re)create the density network for ``filters`` (hidden widths), freshly initialized as CompressAI does.

        Loading calls it with the file's widths (:func:`filters_in_state_dict`), so a prior saved with
        other filters than CompressAI's default (3, 3, 3, 3) loads as saved instead of being refused.
        """
        for i in range(len(self.filters) + 1):
            for name in (f"_matrix{i}", f"_bias{i}", f"_factor{i}"):
                if name in self._parameters:
                    del self._parameters[name]
        self.filters = tuple(int(f) for f in filters)
        c = self.channels
        dims = (1,) + self.filters + (1,)
        scale = self.init_scale ** (1 / (len(self.filters) + 1))
        device = self.quantiles.device if "quantiles" in self._parameters else None
        for i in range(len(self.filters) + 1):
            init = float(np.log(np.expm1(1 / scale / dims[i + 1])))
            self.register_parameter(
                f"_matrix{i}", nn.Parameter(torch.full((c, dims[i + 1], dims[i]), init, device=device))
            )
            self.register_parameter(
                f"_bias{i}", nn.Parameter(torch.empty(c, dims[i + 1], 1, device=device).uniform_(-0.5, 0.5))
            )
            if i < len(self.filters):
                self.register_parameter(f"_factor{i}", nn.Parameter(torch.zeros(c, dims[i + 1], 1, device=device)))

    @property
    def updated(self) -> bool:
        return self._offset.numel() > 0

    def medians(self) -> torch.Tensor:
        """[C] the prior's medians (symbols are round(y - median))."""
        return self.quantiles[:, 0, 1].detach()

    def _logits_cumulative(self, v: torch.Tensor, stop_gradient: bool) -> torch.Tensor:
        """[C, 1, N] -> [C, 1, N] logits of the cumulative density."""
        for i in range(len(self.filters) + 1):
            matrix = getattr(self, f"_matrix{i}")
            bias = getattr(self, f"_bias{i}")
            if stop_gradient:
                matrix, bias = matrix.detach(), bias.detach()
            v = torch.matmul(F.softplus(matrix), v) + bias
            if i < len(self.filters):
                factor = getattr(self, f"_factor{i}")
                if stop_gradient:
                    factor = factor.detach()
                v = v + torch.tanh(factor) * torch.tanh(v)
        return v

    def _likelihood(self, v: torch.Tensor, stop_gradient: bool = False) -> tuple[torch.Tensor, ...]:
        lower = self._logits_cumulative(v - 0.5, stop_gradient)
        upper = self._logits_cumulative(v + 0.5, stop_gradient)
        return torch.sigmoid(upper) - torch.sigmoid(lower), lower, upper

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        perm = [1, 0] + list(range(2, y.dim()))
        x = y.permute(*perm).contiguous()
        shape = x.shape
        values = x.reshape(shape[0], 1, -1)
        medians = self.quantiles[:, :, 1:2]
        if self.training:
            out = values + torch.empty_like(values).uniform_(-0.5, 0.5)
        else:
            out = torch.round(values - medians) + medians
        likelihood, _, _ = self._likelihood(out)
        likelihood = self.likelihood_lower_bound(likelihood)
        out = out.reshape(shape).permute(*perm).contiguous()
        likelihood = likelihood.reshape(shape).permute(*perm).contiguous()
        return out, likelihood

    def loss(self) -> torch.Tensor:
        """Auxiliary loss that moves only the quantiles to the tail_mass / 2 points of each density."""
        logits = self._logits_cumulative(self.quantiles, stop_gradient=True)
        return torch.abs(logits - self.target).sum()

    @torch.no_grad()
    def solve_quantiles(self, iterations: int = 64, max_doublings: int = 40) -> None:
        """Set ``quantiles`` [C, 1, 3] to where :meth:`loss` converges: per channel the v with
        ``logits_cumulative(v) = target`` (the tail_mass / 2 points and the median of each density).

        The aux loss moves the quantiles by at most the learning rate per step (Adam), so a short
        training leaves them far from the density's tails (CompressAI's init is +-10) and ``update()``
        then builds tables for the wrong range: too wide, or too narrow, so that many symbols go to the
        costly overflow bin. The cumulative logit is strictly increasing in v (softplus weights > 0,
        |tanh(factor)| < 1), so bisection finds the exact points; deterministic, and cheap ([C, 1, 3]).
        Raises ValueError when a density does not reach its tails within +-2^max_doublings.
        """
        target = self.target.to(self.quantiles).reshape(1, 1, 3).expand_as(self.quantiles)
        lo = torch.full_like(self.quantiles, -1.0)
        hi = torch.full_like(self.quantiles, 1.0)
        for _ in range(max_doublings):
            low_bad = self._logits_cumulative(lo, stop_gradient=True) > target
            high_bad = self._logits_cumulative(hi, stop_gradient=True) < target
            if not bool(low_bad.any()) and not bool(high_bad.any()):
                break
            lo = torch.where(low_bad, lo * 2, lo)
            hi = torch.where(high_bad, hi * 2, hi)
        else:
            raise ValueError(f"the prior's density does not reach its tails within +-2^{max_doublings}")
        for _ in range(iterations):
            mid = (lo + hi) / 2
            above = self._logits_cumulative(mid, stop_gradient=True) > target
            hi = torch.where(above, mid, hi)
            lo = torch.where(above, lo, mid)
        self.quantiles.copy_((lo + hi) / 2)

    @torch.no_grad()
    def update(self, force: bool = False) -> bool:
        """Compute the CDF tables from the densities (a no-op when they exist, unless ``force``)."""
        if self.updated and not force:
            return False
        medians = self.quantiles[:, 0, 1]
        minima = torch.clamp(torch.ceil(medians - self.quantiles[:, 0, 0]).int(), min=0)
        maxima = torch.clamp(torch.ceil(self.quantiles[:, 0, 2] - medians).int(), min=0)
        pmf_start = medians - minima
        pmf_length = maxima + minima + 1
        max_length = int(pmf_length.max())
        samples = torch.arange(max_length, device=medians.device)[None, :] + pmf_start[:, None, None]
        pmf, lower, upper = self._likelihood(samples, stop_gradient=True)
        pmf = pmf[:, 0, :]
        tail = torch.sigmoid(lower[:, 0, :1]) + torch.sigmoid(-upper[:, 0, -1:])
        cdf = torch.zeros((self.channels, max_length + 2), dtype=torch.int32)
        for c in range(self.channels):
            n = int(pmf_length[c])
            probs = torch.cat((pmf[c, :n], tail[c]), dim=0).cpu().numpy()
            row = pmf_to_quantized_cdf(probs, CDF_PRECISION)
            cdf[c, : len(row)] = torch.from_numpy(row)
        dev = self.quantiles.device
        self._offset = (-minima).to(torch.int32).to(dev)
        self._quantized_cdf = cdf.to(dev)
        self._cdf_length = (pmf_length + 2).to(torch.int32).to(dev)
        return True

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The tables' shapes depend on training (empty before update()): take the file's shapes,
        # as CompressAI's update_registered_buffers does.
        for name in ("_offset", "_quantized_cdf", "_cdf_length"):
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, torch.zeros_like(value, dtype=torch.int32, device=self.quantiles.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------
# The bottleneck


def make_encoder(channels: int = DEFAULT_CHANNELS) -> nn.Sequential:
    """[B, 3, H, W] -> [B, C, H/4 - 1, W/4 - 1] (H, W multiples of 4); all convs without bias."""
    return nn.Sequential(
        nn.Conv2d(3, 4 * channels, kernel_size=5, stride=2, padding=2, bias=False),
        GDN1(4 * channels),
        nn.Conv2d(4 * channels, 2 * channels, kernel_size=5, stride=2, padding=2, bias=False),
        GDN1(2 * channels),
        nn.Conv2d(2 * channels, channels, kernel_size=2, stride=1, padding=0, bias=False),
    )


def make_decoder(channels: int = DEFAULT_CHANNELS, target_channels: int = 256) -> nn.Sequential:
    """[B, C, H/4 - 1, W/4 - 1] -> [B, 256, H/4, W/4] (layer1's output shape)."""
    t = target_channels
    return nn.Sequential(
        nn.Conv2d(channels, 2 * t, kernel_size=2, stride=1, padding=1, bias=False),
        GDN1(2 * t, inverse=True),
        nn.Conv2d(2 * t, t, kernel_size=2, stride=1, padding=0, bias=False),
        GDN1(t, inverse=True),
        nn.Conv2d(t, t, kernel_size=2, stride=1, padding=1, bias=False),
    )


class FPBottleneck(nn.Module):
    """sc2bench's FPBasedResNetBottleneck: [B, 3, H, W] -> [B, 256, H/4, W/4].

    Children in sc2bench's order: ``entropy_bottleneck``, ``encoder``, ``decoder``.
    forward: before update() the entropy bottleneck's noisy / rounded y_hat (and ``last_likelihoods``
    is kept for the rate term); after update() y_hat = round(y - median) + median, detached in
    training (no gradient reaches the encoder), exactly what the codec's decoder produces.
    """

    def __init__(self, channels: int = DEFAULT_CHANNELS, target_channels: int = 256) -> None:
        super().__init__()
        self.bottleneck_channels = int(channels)
        self.entropy_bottleneck = EntropyBottleneck(channels)
        self.encoder = make_encoder(channels)
        self.decoder = make_decoder(channels, target_channels)
        self.last_likelihoods: torch.Tensor | None = None

    @property
    def updated(self) -> bool:
        return self.entropy_bottleneck.updated

    def quantize(self, y: torch.Tensor) -> torch.Tensor:
        """round(y - median) + median per channel: the y_hat the codec's decoder returns for y [B, C, h, w]."""
        m = self.entropy_bottleneck.medians().reshape(1, -1, *([1] * (y.dim() - 2)))
        return torch.round(y - m) + m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.encoder(x)
        if not self.updated:
            y_hat, self.last_likelihoods = self.entropy_bottleneck(y)
        elif self.training:
            y_hat, self.last_likelihoods = self.quantize(y).detach(), None
        else:
            y_hat = self.quantize(y)
        return self.decoder(y_hat)


# ---------------------------------------------------------------------------------------------------
# Building the detector's backbone


def build_entropic_backbone(channels: int = DEFAULT_CHANNELS) -> BackboneWithFPN:
    """bottleneck_layer + ResNet-50 layer2..4 (FrozenBatchNorm2d, eps 0) + FPN (256, LastLevelMaxPool)."""
    body = resnet50(weights=None, norm_layer=partial(FrozenBatchNorm2d, eps=0.0))
    trunk = nn.Sequential(
        OrderedDict(bottleneck_layer=FPBottleneck(channels), layer2=body.layer2, layer3=body.layer3, layer4=body.layer4)
    )
    return BackboneWithFPN(trunk, dict(RETURN_LAYERS), [256, 512, 1024, 2048], 256, extra_blocks=LastLevelMaxPool())


def is_entropic(model: nn.Module) -> bool:
    """True when the detector's body holds an Entropic Student bottleneck."""
    body = getattr(getattr(model, "backbone", None), "body", None)
    return isinstance(getattr(body, "bottleneck_layer", None), FPBottleneck)


def entropic_bottleneck_of(model: nn.Module) -> FPBottleneck:
    bottleneck = getattr(getattr(getattr(model, "backbone", None), "body", None), "bottleneck_layer", None)
    if not isinstance(bottleneck, FPBottleneck):  # the test of is_entropic
        raise TypeError("not an Entropic Student (no backbone.body.bottleneck_layer)")
    return bottleneck


def update_entropy_tables(model: nn.Module, force: bool = False) -> bool:
    """Compute the integer CDF tables of an Entropic Student (sc2bench's model.update())."""
    return entropic_bottleneck_of(model).entropy_bottleneck.update(force=force)


def filters_in_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str) -> tuple[int, ...] | None:
    """The hidden widths of a saved EntropyBottleneck (``prefix`` ends with '.'), read off ``_matrix0..N``.

    None when the state dict holds no ``_matrix0`` under ``prefix`` or the matrices do not chain
    ([C, f1, 1], [C, f2, f1], ..., [C, 1, fN]); the normal key / shape checks then report the file.
    """
    shapes: list[tuple[int, ...]] = []
    while isinstance(state_dict.get(f"{prefix}_matrix{len(shapes)}"), torch.Tensor):
        shapes.append(tuple(state_dict[f"{prefix}_matrix{len(shapes)}"].shape))
    if not shapes or any(len(sh) != 3 for sh in shapes):
        return None
    widths = [sh[1] for sh in shapes]
    ins = [sh[2] for sh in shapes]
    if ins[0] != 1 or widths[-1] != 1 or ins[1:] != widths[:-1] or min(widths) < 1:
        return None
    return tuple(int(w) for w in widths[:-1])


def match_prior_layout(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = ENTROPIC_PREFIX
) -> Callable[[], None]:
    """Give ``model``'s entropy bottleneck (if any) the density-network widths ``state_dict`` was saved with.

    CompressAI's default is filters (3, 3, 3, 3) (``_matrix0..4``), which sc2bench's Entropic Students use;
    a prior saved with other filters (e.g. (3, 3, 3): ``_matrix0..3``) loads as saved rather than being
    refused. ``model``: a detector, or a module with an ``entropy_bottleneck`` (the edge's EntropicHead);
    ``prefix``: the file's key prefix of that bottleneck's parent. Returns a function that puts the old
    layout and values back (for a file refused afterwards); a no-op when nothing changed.
    """
    eb = getattr(model, "entropy_bottleneck", None)
    if eb is None and is_entropic(model):
        eb = entropic_bottleneck_of(model).entropy_bottleneck
    if not isinstance(eb, EntropyBottleneck):
        return lambda: None
    filters = filters_in_state_dict(state_dict, prefix + "entropy_bottleneck.")
    if filters is None or filters == eb.filters:
        return lambda: None
    old_filters = eb.filters
    old_values = {
        k: v.detach().clone() for k, v in eb.named_parameters() if k.startswith(("_matrix", "_bias", "_factor"))
    }
    eb.set_filters(filters)

    def undo() -> None:
        eb.set_filters(old_filters)
        with torch.no_grad():
            for k, v in old_values.items():
                getattr(eb, k).copy_(v)

    return undo


def describe_entropic(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """C of an Entropic Student state dict (from its last encoder conv), None when it is not one."""
    w = state_dict.get(ENTROPIC_PREFIX + "encoder.4.weight")
    return int(w.shape[0]) if w is not None else None
