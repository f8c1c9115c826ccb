"""``hnd.aio``: the edge API for asyncio applications.

    import hnd.aio

    async with hnd.aio.connect("gpu-host:50051", head="head.onnx", key_interval=30) as detector:
        det = await detector.detect(frame)             # frame: [H, W, 3] uint8 RGB numpy array
        async for det in detector.detect_many(frames):  # frames: an iterable or an async iterable
            ...

The same :class:`hnd.edge.api.Detector` underneath (same options as ``hnd.connect``, same results and
errors), driven from one worker thread of its own so that the event loop never blocks on the head, the
encoder or the network; calls on one detector run one at a time, in the order they were awaited.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterable, AsyncIterator, Callable, Generator, Iterable
from typing import Any, TypeVar

import numpy as np

from hnd.edge.api import Detection, Detector, FrameFailed, connect as connect_sync

__all__ = ["AsyncDetector", "connect"]

T = TypeVar("T")


class AsyncDetector:
    """``await detect(frame)``, ``async for det in detect_many(frames)``, ``push`` / ``drain``, ``aclose``:
    :class:`hnd.edge.api.Detector`'s methods, awaitable. ``detector``: the synchronous one underneath."""

    def __init__(self, detector: Detector, executor: concurrent.futures.ThreadPoolExecutor) -> None:
        self.detector = detector
        self._executor = executor

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def detect(self, frame: np.ndarray) -> Detection:
        """Detections of one frame ([H, W, 3] uint8 RGB); raises as ``Detector.detect``."""
        return await self._call(self.detector.detect, frame)

    async def push(self, frame: np.ndarray) -> list[Detection]:
        """Send one frame without waiting for it; the detections of earlier frames that are done."""
        return await self._call(self.detector.push, frame)

    async def drain(self) -> list[Detection]:
        """Wait for every frame in flight; their detections, oldest first."""
        return await self._call(self.detector.drain)

    async def detect_many(
        self, frames: Iterable[np.ndarray] | AsyncIterable[np.ndarray], raise_errors: bool = True
    ) -> AsyncIterator[Detection]:
        """Detections of each frame in frame order, up to ``max_inflight`` on the wire at once.

        frames: an iterable or an async iterable (a camera feed). raise_errors as ``Detector.detect_many``.
        """
        finished = False
        try:
            async for image in _aiter(frames):
                for det in await self.push(image):
                    yield _checked(det, raise_errors)
            for det in await self.drain():
                yield _checked(det, raise_errors)
            finished = True
            await self._call(self.detector._check_gone)
        finally:
            if not finished:
                await self._call(self.detector._abandon)

    async def aclose(self) -> None:
        """Abandon frames in flight and close the connection (the worker thread ends)."""
        try:
            await self._call(self.detector.close)
        finally:
            self._executor.shutdown(wait=False)

    async def __aenter__(self) -> AsyncDetector:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


def _checked(det: Detection, raise_errors: bool) -> Detection:
    if raise_errors and not det.ok:
        raise FrameFailed(det.record)
    return det


async def _aiter(frames: Iterable[np.ndarray] | AsyncIterable[np.ndarray]) -> AsyncIterator[np.ndarray]:
    if isinstance(frames, AsyncIterable):
        async for image in frames:
            yield image
    else:
        for image in frames:
            yield image


class _Connecting:
    """What ``connect`` returns: ``await`` it for an AsyncDetector, or ``async with`` it (closed on exit)."""

    def __init__(self, server: str, head: str | None, options: dict[str, Any]) -> None:
        self._args = (server, head, options)
        self._detector: AsyncDetector | None = None

    async def _open(self) -> AsyncDetector:
        server, head, options = self._args
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hnd-aio")
        try:
            loop = asyncio.get_running_loop()
            detector = await loop.run_in_executor(executor, lambda: connect_sync(server, head, **options))
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return AsyncDetector(detector, executor)

    def __await__(self) -> Generator[Any, None, AsyncDetector]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncDetector:
        self._detector = await self._open()
        return self._detector

    async def __aexit__(self, *exc: Any) -> None:
        if self._detector is not None:
            await self._detector.aclose()


def connect(server: str, head: str | None = None, **options: Any) -> _Connecting:
    """``hnd.connect`` for asyncio: ``async with hnd.aio.connect(...) as detector`` or
    ``detector = await hnd.aio.connect(...)`` (then ``await detector.aclose()``). Same arguments and errors
    as :func:`hnd.edge.api.connect`; the set-up (model load, server check) runs off the event loop."""
    return _Connecting(server, head, options)
