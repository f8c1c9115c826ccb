"""hnd: split-computing runtime for HND / GHND distilled R-CNN detectors.

The Python API (what an application imports; loaded on first use, so ``import hnd`` stays light and an
edge with an ONNX head never imports torch)::

    import hnd

    with hnd.connect("gpu-host:50051", head="head.onnx", bits=4, key_interval=30) as detector:
        det = detector.detect(frame)   # frame: [H, W, 3] uint8 RGB; det.boxes float32 [N, 4], ...

    with hnd.serve("hnd/faster_rcnn-b3ch", checkpoint="student.pt") as server:   # hnd-server in a thread
        ...

* :func:`connect` -> :class:`hnd.edge.api.Detector` (``detect``, ``detect_many``, ``push`` / ``drain``),
  results as :class:`hnd.edge.api.Detection`;
* :mod:`hnd.aio` -> the same for asyncio (``await detector.detect(frame)``);
* :func:`serve` -> :class:`hnd.server.api.Server` (a real gRPC server on a port; needs ``hnd[server]``);
* :class:`HndError`: every error the API raises for bad input, an unreachable server or a failed frame.

This folder (``hnd_init/``, named so that it never shadows the installed package when
Python runs from the repository root) holds only the package root and the API's front. The subpackages
live in top-level folders of the repository and are mapped in pyproject.toml:
``hnd.common`` -> ``common/``, ``hnd.proto`` -> ``proto/``, ``hnd.server`` ->
``server/``, ``hnd.edge`` -> ``edge/``, ``hnd.train`` -> ``train/``,
``hnd.bench`` -> ``bench/``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from hnd.common.errors import HndError
    from hnd.edge.api import Detection, Detector, FrameFailed, connect
    from hnd.server.api import Server, serve

# name -> the module that defines it (imported on first access).
_LAZY = {
    "connect": "hnd.edge.api",
    "Detector": "hnd.edge.api",
    "Detection": "hnd.edge.api",
    "FrameFailed": "hnd.edge.api",
    "serve": "hnd.server.api",
    "Server": "hnd.server.api",
    "HndError": "hnd.common.errors",
}

__all__ = ["Detection", "Detector", "FrameFailed", "HndError", "Server", "aio", "connect", "serve"]


def __getattr__(name: str) -> Any:
    if name == "aio":
        return importlib.import_module("hnd.aio")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hnd' has no attribute {name!r}")
