"""The live view's budget and exposure, without a browser: /frame.jpg with nobody watching, WebSocket
viewers that never read, and Host headers that do not name the view (DNS rebinding)."""

from __future__ import annotations

import base64
import os
import socket
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from hnd.edge.records import FrameRecord, Timings
from hnd.edge.view import LiveView


@pytest.fixture
def view():
    v = LiveView(0)
    yield v
    v.close()


def _publish(view: LiveView, i: int, size=(48, 64)) -> None:
    view._last_publish = 0.0  # not rate-limited here
    rng = np.random.default_rng(i)  # noise: JPEGs that do not shrink, as a busy scene's
    image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    view.publish(image, None, FrameRecord(i, "t", 0.0, "split", ms=Timings(total=5.0)))


def _get(url: str, host: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def test_frame_jpg_is_the_latest_frame_with_no_viewer_connected(view):
    assert _get(view.url + "frame.jpg")[0] == 404  # nothing published yet
    for i in range(3):
        _publish(view, i, size=(40 + i, 64))
    status, jpeg = _get(view.url + "frame.jpg")
    import cv2

    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert status == 200 and decoded.shape == (42, 64, 3)  # the last one, encoded when asked for
    assert view.published == 0  # nothing was encoded or sent while nobody watched


def _ws_upgrade(port: int, host: str) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    return sock


def _status_line(sock: socket.socket) -> str:
    return sock.recv(64).split(b"\r\n", 1)[0].decode()


def test_viewers_that_never_read_hold_at_most_a_frame_and_are_dropped(view):
    view.stall_s = 1.5
    sockets = [_ws_upgrade(view.port, f"127.0.0.1:{view.port}") for _ in range(4)]
    assert all(_status_line(s) == "HTTP/1.1 101 Switching Protocols" for s in sockets)
    deadline = time.monotonic() + 10
    while len(view.clients) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    clients = list(view.clients)
    for i in range(60):  # 60 x ~200 kB: 12 MB per viewer if every frame were queued for it
        _publish(view, i, size=(480, 640))
        time.sleep(0.01)
    time.sleep(0.5)
    for client in clients:
        # What the edge process holds for the viewer (the kernel's socket buffers, ~4 MB, take the rest)
        stream = client.ws_connection.stream if client.ws_connection else None
        pending = len(stream._write_buffer) if stream is not None else 0
        assert client.sent < 40 and pending < 450_000, (client.sent, pending)  # at most a frame, not 8 MB
    assert view.skipped >= 4 * 20
    time.sleep(1.6)
    # The next frame finds them stalled past stall_s; the view's loop drops them when it gets to it, which
    # on a loaded machine can take longer than a fixed pause: publish until they are gone (or 20 s).
    deadline = time.monotonic() + 20
    while view.clients and time.monotonic() < deadline:
        _publish(view, 99, size=(480, 640))
        time.sleep(0.1)
    assert not view.clients
    for s in sockets:
        s.close()


@pytest.mark.parametrize("path", ["", "frame.jpg", "stream.mjpg"])
def test_a_host_that_does_not_name_the_view_gets_403(view, path):
    _publish(view, 0)
    assert _get(view.url + path, host="evil.example")[0] == 403
    assert _get(view.url + path, host=f"evil.example:{view.port}")[0] == 403
    if path != "stream.mjpg":  # an endless response
        assert _get(view.url + path, host=f"localhost:{view.port}")[0] == 200
        assert _get(view.url + path)[0] == 200  # Host 127.0.0.1:PORT


def test_websocket_upgrades_check_the_host_and_the_allow_list():
    view = LiveView(0, allowed_hosts=["cam.example"])
    try:
        refused = _ws_upgrade(view.port, "evil.example")
        assert _status_line(refused) == "HTTP/1.1 403 Forbidden"
        allowed = _ws_upgrade(view.port, f"cam.example:{view.port}")
        assert _status_line(allowed) == "HTTP/1.1 101 Switching Protocols"
        refused.close()
        allowed.close()
    finally:
        view.close()
