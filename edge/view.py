"""``hnd-edge --view-port PORT``: a small local web page with the annotated live stream and live charts.

Served by Tornado (a well-kept HTTP + WebSocket server with no dependencies of its own, running on its
own event loop in a daemon thread, so the edge loop never waits for a browser). Bound to 127.0.0.1
unless ``--view-host`` says otherwise. Everything the page needs is in this file: no external assets,
it works offline.

- ``GET /``: the page. ``GET /frame.jpg``: the latest annotated frame. ``GET /stream.mjpg``: the same
  frames as MJPEG (``multipart/x-mixed-replace``), for VLC, ffplay or an ``<img>``. ``GET /ws``: a WebSocket that
  sends, per published frame, a JSON text message ``{"type": "frame", "frame": i, "status", "bytes",
  "ms": {stage: ms}}`` followed by the JPEG as a binary message, and once a second the live window
  (``{"type": "window", ...}``, the ``--stats-interval`` line's figures).
- Frames are drawn with :func:`hnd.edge.draw.draw_detections` (boxes, masks, keypoints), scaled to at
  most ``max_width`` pixels wide and JPEG-encoded while a browser is connected, at most ``max_fps``
  times a second; with nobody connected the edge only keeps a reference to the latest frame, drawn and
  encoded when ``/frame.jpg`` asks for it: the view costs the edge nothing when nobody looks.
- **Slow viewers** cost a bounded amount: a WebSocket viewer is sent a frame only once the previous one
  left the process (tornado's write future), otherwise it skips to a later frame; one that has read
  nothing for ``stall_s`` seconds is disconnected. An MJPEG viewer is written the latest frame after its
  previous one was flushed. Each viewer holds at most one frame in the edge's memory.
- **Host check** (DNS rebinding): a request whose ``Host`` is not the bound address, a loopback name, an
  IP literal (when bound to all interfaces), this machine's name or one of ``allowed_hosts``
  (``--view-allow-host``) gets 403, page, frames and WebSocket upgrades alike; WebSocket upgrades must
  also come from the same origin (tornado's ``check_origin``).
- The page charts bytes/frame and per-stage latency over the last ``HISTORY`` frames (canvas, drawn by
  the page's own script) and shows the status line.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

import cv2
import numpy as np
import tornado.httpserver
import tornado.httputil
import tornado.iostream
import tornado.netutil
import tornado.web
import tornado.websocket
from tornado.ioloop import IOLoop

from hnd.edge.draw import draw_detections
from hnd.edge.records import FrameRecord

log = logging.getLogger("hnd.edge")

HISTORY = 120  # frames the charts show
STALL_S = 30.0  # a WebSocket viewer that has taken no frame for this long is disconnected
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class LiveView:
    """The view server. ``publish(image, detections, record)`` from the edge loop; ``window(w)`` from the
    live stats ticker; ``close()`` at the end of the run."""

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        max_fps: float = 10.0,
        max_width: int = 960,
        jpeg_quality: int = 80,
        min_score: float = 0.5,
        allowed_hosts: Iterable[str] = (),
        stall_s: float = STALL_S,
    ) -> None:
        self.host = host
        self.allowed_hosts = allowed_host_names(host, allowed_hosts)
        self.stall_s = stall_s
        self.skipped = 0  # frames a slow WebSocket viewer did not get (it got a later one)
        self.latest: tuple[np.ndarray, dict[str, Any] | None] | None = None  # published, maybe not encoded
        self._latest_seq = 0
        self._encoded_seq = 0
        self.min_score = min_score
        self.max_fps = max_fps
        self.max_width = max_width
        self.jpeg_quality = jpeg_quality
        self.clients: set[_Socket] = set()
        self.mjpeg_clients = 0
        self._waiters: list[asyncio.Future] = []  # MJPEG handlers waiting for the next frame
        self.latest_jpeg: bytes | None = None
        self.published = 0
        self._last_publish = 0.0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.loop: IOLoop | None = None
        self.port = port
        self._thread = threading.Thread(target=self._serve, name="hnd-view", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise OSError(f"--view-port {port}: cannot listen on {host}: {self._error}") from None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def _serve(self) -> None:
        asyncio.set_event_loop(asyncio.new_event_loop())
        app = tornado.web.Application(
            [
                (r"/", _Page, {"view": self}),
                (r"/frame.jpg", _Frame, {"view": self}),
                (r"/stream.mjpg", _Mjpeg, {"view": self}),
                (r"/ws", _Socket, {"view": self}),
            ]
        )
        try:
            sockets = tornado.netutil.bind_sockets(self.port, address=self.host)
            self.port = sockets[0].getsockname()[1]  # port 0: the OS's choice
            server = tornado.httpserver.HTTPServer(app)
            server.add_sockets(sockets)
        except OSError as exc:
            self._error = exc
            self._ready.set()
            return
        self.loop = IOLoop.current()
        self._ready.set()
        self.loop.start()
        server.stop()

    # --- from the edge ---------------------------------------------------------------------------

    def publish(self, image: np.ndarray | None, detections: dict[str, Any] | None, record: FrameRecord) -> None:
        """Keep the frame as the latest (for ``/frame.jpg``), and draw, encode and send it to the connected
        browsers (not when none is connected, or too soon after the last)."""
        if self.loop is None or image is None:
            return
        self.latest = (image, detections)
        self._latest_seq += 1
        if not (self.clients or self.mjpeg_clients):
            return
        now = time.monotonic()
        if now - self._last_publish < 1.0 / self.max_fps:
            return
        self._last_publish = now
        seq = self._latest_seq
        jpeg = self.render(image, detections)
        if jpeg is None:
            return
        meta = json.dumps(
            {
                "type": "frame",
                "frame": record.frame,
                "status": record.status,
                "bytes": record.bytes.message,
                "ms": record.ms.to_dict(),
            }
        )
        self.loop.add_callback(self._broadcast, meta, jpeg, seq)

    def render(self, image: np.ndarray, detections: dict[str, Any] | None) -> bytes | None:
        """The frame as the view shows it: detections drawn, at most ``max_width`` wide, JPEG-encoded."""
        shown = draw_detections(image, detections, self.min_score) if detections is not None else image
        h, w = shown.shape[:2]
        if w > self.max_width:
            shown = cv2.resize(shown, (self.max_width, round(h * self.max_width / w)), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(shown, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality]
        )
        return buf.tobytes() if ok else None

    def latest_frame(self) -> bytes | None:
        """The latest published frame as a JPEG, encoded now when no viewer had it encoded (on the view's loop)."""
        latest, seq = self.latest, self._latest_seq
        if latest is not None and seq != self._encoded_seq:
            jpeg = self.render(*latest)
            if jpeg is not None:
                self.latest_jpeg, self._encoded_seq = jpeg, seq
        return self.latest_jpeg

    def window(self, w: dict[str, Any]) -> None:
        if self.loop is not None and self.clients:
            self.loop.add_callback(self._broadcast, json.dumps({"type": "window", **w}), None)

    def _broadcast(self, meta: str, jpeg: bytes | None, seq: int = 0) -> None:
        if jpeg is not None:
            if seq >= self._encoded_seq:
                self.latest_jpeg, self._encoded_seq = jpeg, seq
            self.published += 1
            waiters, self._waiters = self._waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        now = time.monotonic()
        for client in list(self.clients):
            if not client.send(meta, jpeg, now):
                self.skipped += jpeg is not None

    def close(self) -> None:
        if self.loop is not None:
            self.loop.add_callback(self.loop.stop)
            self._thread.join(timeout=5)


def allowed_host_names(bound: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """Host names (no port) a request may name: the bound address, loopback names, this machine's names
    when bound to all interfaces, and ``extra``; lower case."""
    names = {bound, *LOOPBACK_NAMES, *extra}
    if bound in ("", "0.0.0.0", "::"):
        names |= {socket.gethostname(), socket.getfqdn()}
    return frozenset(n.lower().strip("[]") for n in names if n)


def host_allowed(view: LiveView, host_header: str) -> bool:
    """Whether a request's ``Host`` names this view (DNS rebinding: a page of evil.example whose name now
    resolves to this machine sends ``Host: evil.example``). IP literals pass when bound to all interfaces."""
    name = tornado.httputil.split_host_and_port(host_header.lower())[0].strip("[]")
    if name in view.allowed_hosts:
        return True
    if view.host in ("", "0.0.0.0", "::"):
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False
    return False


class _Checked(tornado.web.RequestHandler):
    """Every handler: 403 for a Host that does not name this view."""

    view: LiveView

    def initialize(self, view: LiveView) -> None:
        self.view = view

    def prepare(self) -> None:
        if not host_allowed(self.view, self.request.host):
            log.warning("live view: refused a request for Host %r (allow it with --view-allow-host)", self.request.host)
            raise tornado.web.HTTPError(403, "Host not allowed")


class _Page(_Checked):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.write(PAGE)


class _Frame(_Checked):
    def get(self) -> None:
        jpeg = self.view.latest_frame()
        if jpeg is None:
            raise tornado.web.HTTPError(404, "no frame yet")
        self.set_header("Content-Type", "image/jpeg")
        self.set_header("Cache-Control", "no-store")
        self.write(jpeg)


class _Mjpeg(_Checked):
    async def get(self) -> None:
        self.set_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.set_header("Cache-Control", "no-store")
        self.view.mjpeg_clients += 1
        try:
            await self.flush()  # the headers now: a player connects before the first frame
            while True:
                fut = asyncio.get_running_loop().create_future()
                self.view._waiters.append(fut)
                await fut
                jpeg = self.view.latest_jpeg
                assert jpeg is not None  # waiters are woken only once a frame is published
                self.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg))
                self.write(jpeg)
                self.write(b"\r\n")
                await self.flush()
        except tornado.iostream.StreamClosedError:
            pass
        finally:
            self.view.mjpeg_clients -= 1


class _Socket(tornado.websocket.WebSocketHandler):
    def initialize(self, view: LiveView) -> None:
        self.view = view
        self.sending: asyncio.Future | None = None  # the write of the last frame, until it left the process
        self.last_sent = time.monotonic()
        self.sent = 0

    def prepare(self) -> None:
        _Checked.prepare(self)  # type: ignore[arg-type]

    def open(self) -> None:
        self.view.clients.add(self)

    def send(self, meta: str, jpeg: bytes | None, now: float) -> bool:
        """Send a frame (or a window line) unless the previous frame is still being written: False when
        skipped. A viewer that took nothing for ``stall_s`` is disconnected."""
        if self.sending is not None and not self.sending.done():
            if now - self.last_sent > self.view.stall_s:
                log.warning("live view: a viewer read nothing for %.0f s: disconnected", now - self.last_sent)
                self.view.clients.discard(self)
                self.close(1008, "not reading")
            return False
        try:
            last = self.write_message(meta)
            if jpeg is not None:
                last = self.write_message(jpeg, binary=True)
                self.sent += 1
        except tornado.websocket.WebSocketClosedError:
            self.view.clients.discard(self)
            return False
        self.sending, self.last_sent = last, now
        return True

    def on_close(self) -> None:
        self.view.clients.discard(self)

    def on_message(self, message: str | bytes) -> None:
        pass  # the page only listens


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hnd-edge live view</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 14px system-ui, sans-serif; margin: 0; background: #111; color: #ddd; }
 header { padding: 8px 14px; background: #1d1d1d; display: flex; gap: 16px; align-items: baseline; }
 header b { color: #fff; } #status { font-family: ui-monospace, monospace; color: #9fd; }
 #status.waiting { color: #fb4; }
 main { display: grid; grid-template-columns: minmax(320px, 2fr) minmax(280px, 1fr); gap: 12px; padding: 12px; }
 #frame { width: 100%; background: #000; min-height: 240px; object-fit: contain; }
 canvas { width: 100%; height: 200px; background: #191919; display: block; margin-bottom: 4px; }
 h2 { font-size: 13px; font-weight: 600; margin: 6px 0; color: #aaa; }
 .legend span { margin-right: 10px; font-size: 12px; } #conn { color: #888; }
</style></head>
<body data-frames="0" data-distinct="0" data-chart-updates="0" data-windows="0">
<header><b>hnd-edge</b><span id="status">connecting...</span><span id="conn"></span></header>
<main>
 <div><img id="frame" alt="latest annotated frame"><div id="caption"></div></div>
 <div>
  <h2>bytes / frame (request)</h2><canvas id="bytes" width="600" height="200"></canvas>
  <h2>latency per stage (ms)</h2><canvas id="stages" width="600" height="200"></canvas>
  <div class="legend" id="legend"></div>
 </div>
</main>
<script>
"use strict";
const HISTORY = __HISTORY__;
const STAGES = ["capture", "preprocess", "head", "encode", "network_server", "total"];
const COLORS = ["#888", "#6af", "#fc5", "#c8f", "#f76", "#5e9"];
const series = [];  // {frame, bytes, ms}
const seen = new Set();
let frames = 0, updates = 0, windows = 0, pending = null, shownUrl = null;
const img = document.getElementById("frame");
document.getElementById("legend").innerHTML =
  STAGES.map((s, i) => `<span style="color:${COLORS[i]}">&#9632; ${s}</span>`).join("");

function fmt(v, d) { return v === null || v === undefined ? "-" : v.toFixed(d); }

function draw(canvas, lines, unit) {
  const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height, pad = 34;
  ctx.clearRect(0, 0, W, H);
  let max = 0;
  for (const l of lines) for (const v of l.values) if (v !== null && v > max) max = v;
  max = max > 0 ? max * 1.1 : 1;
  ctx.strokeStyle = "#333"; ctx.fillStyle = "#777"; ctx.font = "11px sans-serif";
  for (let k = 0; k <= 4; k++) {
    const y = H - pad / 2 - (H - pad) * k / 4;
    ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(W, y); ctx.stroke();
    ctx.fillText((max * k / 4).toFixed(max < 10 ? 1 : 0), 2, y + 4);
  }
  for (const l of lines) {
    ctx.strokeStyle = l.color; ctx.lineWidth = 1.5; ctx.beginPath();
    let started = false;
    l.values.forEach((v, i) => {
      if (v === null) return;
      const x = pad + (W - pad) * i / Math.max(HISTORY - 1, 1), y = H - pad / 2 - (H - pad) * v / max;
      if (started) ctx.lineTo(x, y); else { ctx.moveTo(x, y); started = true; }
    });
    ctx.stroke();
  }
}

function redraw() {
  draw(document.getElementById("bytes"), [{color: "#6af", values: series.map(s => s.bytes)}], "B");
  draw(document.getElementById("stages"), STAGES.map((st, i) => ({
    color: COLORS[i], values: series.map(s => (s.ms[st] === undefined ? null : s.ms[st]))})), "ms");
  updates += 1; document.body.dataset.chartUpdates = updates;
  document.body.dataset.points = series.length;
}

function connect() {
  const ws = new WebSocket(`ws://${location.host}/ws`);
  ws.binaryType = "blob";
  ws.onopen = () => { document.getElementById("conn").textContent = "live"; };
  ws.onclose = () => { document.getElementById("conn").textContent = "disconnected, retrying"; setTimeout(connect, 1000); };
  ws.onmessage = (ev) => {
    if (typeof ev.data !== "string") {
      const url = URL.createObjectURL(ev.data);
      img.onload = () => { if (shownUrl) URL.revokeObjectURL(shownUrl); shownUrl = url; };
      img.src = url;
      frames += 1; document.body.dataset.frames = frames;
      if (pending !== null) { seen.add(pending.frame); document.body.dataset.distinct = seen.size;
        document.getElementById("caption").textContent =
          `frame ${pending.frame}  ${pending.status}  ${pending.bytes} B  total ${fmt(pending.ms.total, 1)} ms`; }
      return;
    }
    const msg = JSON.parse(ev.data);
    if (msg.type === "frame") {
      pending = msg;
      series.push({frame: msg.frame, bytes: msg.status === "OK" ? msg.bytes : null, ms: msg.ms || {}});
      while (series.length > HISTORY) series.shift();
      redraw();
    } else if (msg.type === "window") {
      windows += 1; document.body.dataset.windows = windows;
      const st = document.getElementById("status"), lat = msg.latency_ms;
      let text = `${fmt(msg.fps, 1)} fps  ${fmt(msg.kbit_s, 0)} kbit/s  p50 ${fmt(lat.p50, 0)} ms  ` +
                 `p95 ${fmt(lat.p95, 0)} ms  dropped ${msg.dropped}  failed ${msg.failed}  reconnects ${msg.reconnects}`;
      if (msg.operating_point !== undefined) {  // hnd-edge --adapt: the point in use and the link estimate
        const link = msg.link || {};
        text += `  point ${msg.operating_point} (link ${fmt(link.kbps, 0)} kbit/s, RTT ${fmt(link.rtt_ms, 0)} ms)`;
      }
      if (msg.waiting_s !== null) text = `WAITING for the server ${msg.waiting_s.toFixed(0)} s | ` + text;
      st.textContent = text; st.className = msg.waiting_s !== null ? "waiting" : "";
    }
  };
}
connect();
</script></body></html>
""".replace("__HISTORY__", str(HISTORY))
