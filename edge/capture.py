"""Frame sources for the edge: image files, video files (every frame, in order) and live cameras.

A live source (a camera, or a video paced at its own frame rate to stand in for one)
runs a capture thread that keeps only the newest frame: when the pipeline is slower
than the camera, stale frames are dropped and counted instead of queueing up latency.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from hnd.common.errors import HndError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
# Statuses of frames that failed on the edge, before any request (records' "status"; the server's are
# gRPC status names).
READ_ERROR = "EDGE_READ_ERROR"  # the file could not be read (permission denied, vanished, not a file...)
DECODE_ERROR = "EDGE_DECODE_ERROR"  # read, but not a decodable image (corrupt, truncated, unknown format)

log = logging.getLogger("hnd.edge")


class SourceError(HndError):
    """A frame source that cannot be opened; the message names it."""


@dataclass
class Frame:
    """One captured frame.

    image: [H, W, 3] uint8 RGB (None when ``error`` says why the frame could not be read).
    captured_ns: monotonic time at which capture of this frame finished.
    capture_ms: time spent reading/decoding it.
    status: with ``error``, READ_ERROR or DECODE_ERROR.
    """

    index: int
    source: str
    image: np.ndarray | None
    captured_ns: int
    capture_ms: float
    wall_time: float
    error: str | None = None
    status: str | None = None


class FrameSource:
    """Iterable of Frames; ``dropped`` counts frames a live source discarded as stale."""

    name = "source"
    dropped = 0

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _read_start() -> tuple[int, float]:
    return time.perf_counter_ns(), time.time()


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _not_regular(mode: int) -> str | None:
    """What a non-regular file is ("a FIFO", ...), None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "not a regular file")


def _decode_failure(data: bytes) -> str:
    """Why OpenCV could not decode ``data``, as far as the container tells."""
    if not data:
        return "empty file"
    if data.startswith(b"\xff\xd8"):
        # The EOI marker cannot occur inside entropy-coded data (0xFF is stuffed there), and an EXIF
        # thumbnail's EOI comes before the main image's last start-of-scan.
        if data.find(b"\xff\xd9", max(data.rfind(b"\xff\xda"), 0)) < 0:
            return "truncated JPEG (no end-of-image marker after the last scan)"
        return "corrupt JPEG data"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "truncated PNG (no IEND chunk)" if b"IEND" not in data[-16:] else "corrupt PNG data"
    return "not an image format OpenCV decodes"


def read_image(path: str) -> tuple[np.ndarray | None, str | None, str | None]:
    """One image file -> (RGB [H, W, 3] uint8, None, None), or (None, status, "path: reason").

    Decodes from memory: ``cv2.imdecode`` refuses a truncated file, where ``cv2.imread`` returns it
    filled with grey and only warns on stderr. The file is opened non-blocking and checked to be a
    regular file first, so a FIFO swapped in cannot hang the edge.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            kind = _not_regular(os.fstat(f.fileno()).st_mode)
            if kind is not None:
                return None, READ_ERROR, f"{path}: cannot read: {kind}, not a regular file"
            data = f.read()
    except OSError as exc:
        return None, READ_ERROR, f"{path}: cannot read: {exc.strerror or exc}"
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if bgr is None:
        return None, DECODE_ERROR, f"{path}: cannot decode: {_decode_failure(data)}"
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), None, None


class ImageFiles(FrameSource):
    """Every image of a folder or glob, in sorted order.

    Entries that exist but are not regular files (FIFOs, sockets, devices, folders named like images)
    are skipped with a warning (listed in ``skipped``); reading one could block forever.
    """

    def __init__(self, pattern: str, max_frames: int | None = None) -> None:
        p = Path(pattern)
        if p.is_dir():
            paths = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths = sorted(f for f in glob.glob(pattern) if Path(f).suffix.lower() in IMAGE_SUFFIXES)
        self.skipped: list[str] = []
        kept = []
        for path in paths:
            try:
                kind = _not_regular(os.stat(path).st_mode)
            except OSError:
                kind = None  # vanished or unreadable: recorded as a failed frame with its reason
            if kind is None:
                kept.append(path)
            else:
                log.warning("%s: skipped: %s, not a regular file", path, kind)
                self.skipped.append(path)
        if not kept:
            raise SourceError(
                f"{pattern}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}"
                + (f"; skipped {len(self.skipped)} non-regular files" if self.skipped else "")
                + ")"
            )
        self.paths = kept[:max_frames] if max_frames else kept
        self.name = pattern

    def __iter__(self) -> Iterator[Frame]:
        for i, path in enumerate(self.paths):
            start, wall = _read_start()
            rgb, status, error = read_image(path)
            done = time.perf_counter_ns()
            yield Frame(i, path, rgb, done, (done - start) / 1e6, wall, error=error, status=status)


class ArrayFrames(FrameSource):
    """Frames from in-memory RGB arrays (samples, tests)."""

    def __init__(self, images: list[np.ndarray], names: list[str] | None = None) -> None:
        self.images = images
        self.names = names or [f"frame{i}" for i in range(len(images))]
        self.name = "memory"

    def __iter__(self) -> Iterator[Frame]:
        for i, (img, name) in enumerate(zip(self.images, self.names)):
            start, wall = _read_start()
            done = time.perf_counter_ns()
            yield Frame(i, name, img, done, (done - start) / 1e6, wall)


# Network sources OpenCV reads through FFmpeg (--video rtsp://camera/stream): live, latest frame, reconnected.
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
STREAM_TIMEOUT_MS = 10_000  # opening a network stream, and each read from it, give up after this


def is_stream_url(target: object) -> bool:
    """Whether ``target`` names a network stream (``rtsp://``, ``http://``, ...) rather than a file."""
    return isinstance(target, str) and target.split("://", 1)[0].lower() in STREAM_SCHEMES and "://" in target


def redact_url(url: str) -> str:
    """``url`` without the password of its ``user:password@`` part (messages and records name the source)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def set_opencv_logging(level: int) -> None:
    """OpenCV's own ``[ WARN ]`` lines, and FFmpeg's through it, follow the edge's log level: shown at INFO
    or DEBUG; otherwise only OpenCV's errors, since the edge says what failed in a line of its own
    (``camera 0: cannot open``). FFmpeg's level is read when OpenCV first uses FFmpeg: call this early."""
    verbose = level <= logging.INFO
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_WARNING if verbose else cv2.utils.logging.LOG_LEVEL_ERROR)
    os.environ["OPENCV_FFMPEG_LOGLEVEL"] = "24" if verbose else "-8"  # AV_LOG_WARNING / AV_LOG_QUIET


def _open_capture(target: int | str) -> cv2.VideoCapture:
    if is_stream_url(target):  # FFmpeg, with timeouts: a dead camera must not block a read for ever
        timeouts = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            STREAM_TIMEOUT_MS,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            STREAM_TIMEOUT_MS,
        ]
        cap = cv2.VideoCapture(target, cv2.CAP_FFMPEG, timeouts)
    else:
        cap = cv2.VideoCapture(target)
    if not cap.isOpened():
        cap.release()
        if isinstance(target, int):
            raise SourceError(f"camera {target}: cannot open (no such video device?)")
        if is_stream_url(target):
            raise SourceError(f"{redact_url(target)}: cannot open (unreachable, or not a stream FFmpeg reads)")
        raise SourceError(f"{target}: cannot open (missing file or unsupported format)")
    return cap


class VideoFile(FrameSource):
    """Every frame of a video file, in order (no drops: the pipeline sets the pace)."""

    def __init__(self, path: str, max_frames: int | None = None) -> None:
        if not os.path.isfile(path):
            raise SourceError(f"{path}: no such video file")
        self.cap = _open_capture(path)
        self.max_frames = max_frames
        self.name = path

    def __iter__(self) -> Iterator[Frame]:
        i = 0
        while self.max_frames is None or i < self.max_frames:
            start, wall = _read_start()
            ok, bgr = self.cap.read()
            if not ok:
                break
            done = time.perf_counter_ns()
            yield Frame(i, self.name, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), done, (done - start) / 1e6, wall)
            i += 1
        self.close()

    def close(self) -> None:
        self.cap.release()


class SourceLost(SourceError):
    """A live source stopped delivering frames and did not come back in time (exit code 3)."""


class LiveCapture(FrameSource):
    """Latest-frame capture thread over a camera (or a video paced at its frame rate).

    The thread reads continuously; the consumer always gets the newest frame, and every
    frame overwritten before it was taken counts in ``dropped``.

    A camera (or stream URL) that stops delivering — unplugged, a driver that hangs — gets one clear
    line on stderr, and the thread reopens it with backoff (0.5 s doubling up to 5 s); one line again when
    frames come back. After ``lost_after_s`` seconds without a frame the source gives up: iterating
    raises :class:`SourceLost` naming it (hnd-edge exits with code 3). A video file ends at its end.
    """

    def __init__(
        self,
        target: int | str,
        max_frames: int | None = None,
        pace_fps: float | None = None,
        lost_after_s: float = 60.0,
        opener: Callable[[int | str], cv2.VideoCapture] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.opener = opener or _open_capture
        self.cap = self.opener(target)
        self.target = target
        shown = redact_url(target) if isinstance(target, str) else target
        self.name = f"camera:{target}" if isinstance(target, int) else f"live:{shown}"
        self.what = f"camera {target}" if isinstance(target, int) else str(shown)
        self.max_frames = max_frames
        self.lost_after_s = lost_after_s
        self.retries = not (isinstance(target, str) and os.path.isfile(target))  # a file just ends
        self.warn = warn or (lambda line: print(f"hnd-edge: {line}", file=sys.stderr))
        # A file reads faster than real time; pacing it at its own fps makes it behave like a camera. A camera
        # or a network stream paces itself.
        paced = isinstance(target, str) and not is_stream_url(target)
        fps = pace_fps if pace_fps is not None else (self.cap.get(cv2.CAP_PROP_FPS) if paced else 0)
        self.period = 1.0 / fps if fps and fps > 0 else 0.0
        self.dropped = 0
        self.captured = 0
        self.reopened = 0  # times the source came back after it stopped delivering
        self.lost: str | None = None  # set when the source gave up: why
        self.last_frame_at = time.monotonic()
        self._cond = threading.Condition()
        self._latest: tuple[np.ndarray, int, float, float] | None = None
        self._ended = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._reader, name="hnd-capture", daemon=True)
        self._thread.start()

    @property
    def stalled_s(self) -> float:
        """Seconds since the last frame arrived (0 while frames flow, and once the source has ended)."""
        if self._ended:
            return 0.0
        return max(0.0, time.monotonic() - self.last_frame_at - max(self.period, 1.0))

    def _recover(self) -> bool:
        """The source stopped delivering: reopen with backoff until it does, or until lost_after_s."""
        self.warn(
            f"{self.what}: no frame (unplugged or stalled?); reopening, giving up after "
            f"{self.lost_after_s:g} s without frames"
        )
        delay = 0.5
        while not self._stop.is_set():
            if time.monotonic() - self.last_frame_at >= self.lost_after_s:
                self.lost = f"{self.what}: no frames for {self.lost_after_s:g} s (unplugged?); giving up"
                return False
            self._stop.wait(delay)
            delay = min(delay * 2, 5.0)
            with contextlib.suppress(Exception):
                self.cap.release()
            try:
                self.cap = self.opener(self.target)
            except SourceError:
                continue
            ok, bgr = self.cap.read()
            if ok:
                self.reopened += 1
                self.warn(f"{self.what}: delivering frames again after {time.monotonic() - self.last_frame_at:.1f} s")
                self._deliver(bgr, *_read_start())
                return True
        return False

    def _deliver(self, bgr: np.ndarray, start: int, wall: float) -> None:
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        done = time.perf_counter_ns()
        self.last_frame_at = time.monotonic()
        with self._cond:
            if self._latest is not None:
                self.dropped += 1  # the previous frame was never taken
            self._latest = (rgb, done, (done - start) / 1e6, wall)
            self.captured += 1
            self._cond.notify()

    def _reader(self) -> None:
        next_due = time.perf_counter()
        while not self._stop.is_set():
            start, wall = _read_start()
            ok, bgr = self.cap.read()
            if not ok:
                if not self.retries or not self._recover():
                    break
                next_due = time.perf_counter()
                continue
            self._deliver(bgr, start, wall)
            if self.period:
                next_due += self.period
                delay = next_due - time.perf_counter()
                if delay > 0:
                    self._stop.wait(delay)
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def __iter__(self) -> Iterator[Frame]:
        i = 0
        try:
            while self.max_frames is None or i < self.max_frames:
                with self._cond:
                    while self._latest is None and not self._ended:
                        self._cond.wait(0.5)
                        if self.retries and time.monotonic() - self.last_frame_at >= self.lost_after_s + 5.0:
                            # read() itself hangs (it never returned to let the reader give up)
                            self.lost = self.lost or (
                                f"{self.what}: no frames for {self.lost_after_s:g} s (read hangs); giving up"
                            )
                            self._ended = True
                    if self._latest is None:
                        if self.lost is not None:
                            raise SourceLost(self.lost)
                        return
                    rgb, done, capture_ms, wall = self._latest
                    self._latest = None
                yield Frame(i, self.name, rgb, done, capture_ms, wall)
                i += 1
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2)
        if not self._thread.is_alive():
            self.cap.release()


def open_source(
    camera: int | None = None,
    video: str | None = None,
    images: str | None = None,
    max_frames: int | None = None,
    live: bool = False,
    lost_after_s: float = 60.0,
) -> FrameSource:
    """The frame source the CLI names: ``--camera N``, ``--video FILE [--live]`` or ``--images DIR_OR_GLOB``."""
    if sum(x is not None for x in (camera, video, images)) != 1:
        raise SourceError("give exactly one of --camera, --video, --images")
    if camera is not None:
        return LiveCapture(camera, max_frames=max_frames, lost_after_s=lost_after_s)
    if video is not None:
        if is_stream_url(video):  # a network camera or stream: live whatever --live says
            return LiveCapture(video, max_frames=max_frames, lost_after_s=lost_after_s)
        if live:
            if not os.path.isfile(video):
                raise SourceError(f"{video}: no such video file")
            return LiveCapture(video, max_frames=max_frames, lost_after_s=lost_after_s)
        return VideoFile(video, max_frames=max_frames)
    assert images is not None
    return ImageFiles(images, max_frames=max_frames)


def sample_images() -> tuple[list[np.ndarray], list[str]]:
    """Natural photos that ship with scikit-image (no download): RGB uint8 arrays and names."""
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"]
    images = []
    for n in names:
        img = getattr(data, n)()
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        images.append(np.ascontiguousarray(img[..., :3]))
    return images, names


def write_video(path: str, frames: list[np.ndarray], fps: float = 10.0) -> None:
    """Write RGB frames to a video file (mp4v); used to make sample and test videos."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(path, cv2.VideoWriter.fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise SourceError(f"{path}: cannot open for writing")
    for f in frames:
        writer.write(cv2.cvtColor(cv2.resize(f, (w, h)), cv2.COLOR_RGB2BGR))
    writer.release()
