"""The codec for torch callers: ``hnd.common.codec`` with torch tensors out instead of numpy arrays.

A thin wrapper, no second implementation: encoding a tensor and encoding its ``.numpy()`` give the
same bytes, and every result here is ``torch.from_numpy`` of the numpy codec's result. The server,
evaluation and the torch head use it; the edge's ONNX path uses ``hnd.common.codec`` directly.
"""

from __future__ import annotations

import torch

from hnd.common import codec
from hnd.common.codec import DEFAULT_LIMITS, EncodedTensor, Limits, Quantized, encode, quantize
from hnd.common.entropy_coder import PriorTables

__all__ = ["decode", "dequantize", "encode", "quantize", "roundtrip"]


def decode(encoded: EncodedTensor, limits: Limits = DEFAULT_LIMITS, prior: PriorTables | None = None) -> torch.Tensor:
    """``codec.decode`` as a float32 CPU tensor of ``encoded.shape``."""
    return torch.from_numpy(codec.decode(encoded, limits, prior))


def dequantize(q: Quantized) -> torch.Tensor:
    """``codec.dequantize`` as a float32 CPU tensor of ``q.shape``."""
    return torch.from_numpy(codec.dequantize(q))


def roundtrip(
    tensor: torch.Tensor,
    bits: int = 8,
    granularity: str = "tensor",
    compression: str = "zstd",
    level: int = 3,
    prior: PriorTables | None = None,
) -> torch.Tensor:
    """``codec.roundtrip`` as a float32 CPU tensor: bit for bit ``decode(encode(tensor, ...))``."""
    return torch.from_numpy(codec.roundtrip(tensor, bits, granularity, compression, level, prior))
