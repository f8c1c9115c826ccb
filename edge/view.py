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
  most ``max_width`` pixels wide and JPEG-encoded only while a browser is connected, at most ``max_fps``
  times a second: the view costs the edge nothing when nobody looks.
- The page charts bytes/frame and per-stage latency over the last ``HISTORY`` frames (canvas, drawn by
  the page's own script) and shows the status line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any

import cv2
import numpy as np
import tornado.httpserver
import tornado.iostream
import tornado.netutil
import tornado.web
import tornado.websocket
from tornado.ioloop import IOLoop

from hnd.edge.draw import draw_detections
from hnd.edge.records import FrameRecord

log = logging.getLogger("hnd.edge")

HISTORY = 120  # frames the charts show


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
    ) -> None:
        self.host = host
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
                (r"/", _Page),
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
        """Draw, encode and send one frame to the connected browsers (skipped when none, or too soon)."""
        if self.loop is None or not (self.clients or self.mjpeg_clients) or image is None:
            return
        now = time.monotonic()
        if now - self._last_publish < 1.0 / self.max_fps:
            return
        self._last_publish = now
        shown = draw_detections(image, detections, self.min_score) if detections is not None else image
        h, w = shown.shape[:2]
        if w > self.max_width:
            shown = cv2.resize(shown, (self.max_width, round(h * self.max_width / w)), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(shown, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality]
        )
        if not ok:
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
        self.loop.add_callback(self._broadcast, meta, buf.tobytes())

    def window(self, w: dict[str, Any]) -> None:
        if self.loop is not None and self.clients:
            self.loop.add_callback(self._broadcast, json.dumps({"type": "window", **w}), None)

    def _broadcast(self, meta: str, jpeg: bytes | None) -> None:
        if jpeg is not None:
            self.latest_jpeg = jpeg
            self.published += 1
            waiters, self._waiters = self._waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        for client in list(self.clients):
            try:
                client.write_message(meta)
                if jpeg is not None:
                    client.write_message(jpeg, binary=True)
            except tornado.websocket.WebSocketClosedError:
                self.clients.discard(client)

    def close(self) -> None:
        if self.loop is not None:
            self.loop.add_callback(self.loop.stop)
            self._thread.join(timeout=5)


class _Page(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.write(PAGE)


class _Frame(tornado.web.RequestHandler):
    def initialize(self, view: LiveView) -> None:
        self.view = view

    def get(self) -> None:
        if self.view.latest_jpeg is None:
            raise tornado.web.HTTPError(404, "no frame yet")
        self.set_header("Content-Type", "image/jpeg")
        self.set_header("Cache-Control", "no-store")
        self.write(self.view.latest_jpeg)


class _Mjpeg(tornado.web.RequestHandler):
    def initialize(self, view: LiveView) -> None:
        self.view = view

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

    def open(self) -> None:
        self.view.clients.add(self)

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
