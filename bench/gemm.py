"""The machine's matrix-multiply rate through ONNX Runtime: the ceiling a head's convolutions are measured against.

One ``[M, K] x [K, N]`` product per session, the right-hand matrix a constant initializer (as a
convolution's weights are): ``MatMul`` in float32, ``MatMulInteger`` (uint8 x int8 -> int32) and
``QLinearMatMul`` (uint8 x int8 -> uint8, the op a static int8 graph's convolutions lower to) for int8.
Square 1024 products by default: large enough for the CPU's blocked kernels (AVX-512 / VNNI / AMX, whatever
ONNX Runtime's MLAS picks here), small enough to measure in a second on a loaded machine. torch-free.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

__all__ = ["GEMM_OPS", "GemmRate", "gemm_model", "gemm_rate", "ort_session_options"]

GEMM_OPS = {"fp32": "MatMul", "int8": "MatMulInteger", "int8 qlinear": "QLinearMatMul"}


@dataclass
class GemmRate:
    precision: str  # a key of GEMM_OPS
    op: str
    mkn: tuple[int, int, int]
    threads: int
    ms: float  # best of the repeats (the machine's rate, not the load's)
    gmac_per_s: float


def ort_session_options(threads: int):
    """SessionOptions with ``threads`` intra-op threads and one inter-op thread (as ``OnnxHead`` sets them)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return options


def gemm_model(precision: str, m: int, k: int, n: int, seed: int = 0) -> tuple[bytes, np.ndarray]:
    """(serialized ONNX model with input ``A`` [M, K] and constant ``B`` [K, N], a random ``A`` to feed)."""
    from onnx import TensorProto, helper, numpy_helper

    if precision not in GEMM_OPS:
        raise ValueError(f"precision must be one of {sorted(GEMM_OPS)}, got {precision!r}")
    rng = np.random.default_rng(seed)
    if precision == "fp32":
        inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "B")]
        inputs, out_type = ["A", "B"], TensorProto.FLOAT
        a = rng.standard_normal((m, k)).astype(np.float32)
    else:
        scalars = {"a_scale": np.float32(0.02), "a_zp": np.uint8(128), "b_scale": np.float32(0.01)}
        scalars |= {"b_zp": np.int8(0), "y_scale": np.float32(0.5), "y_zp": np.uint8(128)}
        if precision == "int8":
            inputs, out_type = ["A", "B", "a_zp"], TensorProto.INT32
        else:
            inputs = ["A", "a_scale", "a_zp", "B", "b_scale", "b_zp", "y_scale", "y_zp"]
            out_type = TensorProto.UINT8
        inits = [numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "B")]
        inits += [numpy_helper.from_array(np.array(v), name) for name, v in scalars.items() if name in inputs]
        a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    in_type = TensorProto.FLOAT if precision == "fp32" else TensorProto.UINT8
    graph = helper.make_graph(
        [helper.make_node(GEMM_OPS[precision], inputs, ["Y"])],
        "gemm",
        [helper.make_tensor_value_info("A", in_type, [m, k])],
        [helper.make_tensor_value_info("Y", out_type, [m, n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString(), a


def gemm_rate(
    precision: str, threads: int, mkn: tuple[int, int, int] = (1024, 1024, 1024), repeats: int = 10
) -> GemmRate:
    """Best-of-``repeats`` time of one product after a warm-up, as GMAC/s (M * K * N / time)."""
    import onnxruntime as ort

    m, k, n = mkn
    data, a = gemm_model(precision, m, k, n)
    session = ort.InferenceSession(data, ort_session_options(threads), providers=["CPUExecutionProvider"])
    feed = {"A": a}
    session.run(None, feed)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        best = min(best, time.perf_counter() - start)
    return GemmRate(precision, GEMM_OPS[precision], mkn, threads, best * 1e3, m * k * n / best / 1e9)


def gemm_ceiling(gemm: dict[str, float], precision: str) -> float:
    """The GEMM rate a head of this precision is measured against: fp32 MatMul, or the faster int8 op."""
    return gemm["fp32"] if precision == "fp32" else max(gemm["int8"], gemm["int8 qlinear"])
