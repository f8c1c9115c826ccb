"""A shaping TCP proxy: put a slow, distant link between hnd-edge and hnd-server without root.

    python -m hnd.bench.linkproxy --listen 127.0.0.1:50052 --to 127.0.0.1:50051 --rate 2mbit --delay 40ms
    python -m hnd.bench.linkproxy --listen 127.0.0.1:50052 --to gpu-host:50051 --schedule trace.csv --jitter 5ms
    hnd-edge --server 127.0.0.1:50052 ...            # the edge talks to the proxy

In the spirit of toxiproxy and comcast, for a machine where ``tc netem`` is missing (no kernel module) or
root is not at hand. Each direction is one link shared by every connection through the proxy:

* **rate**: a token bucket (``--rate``, refilled at the rate, ``--burst`` bytes deep: by default 1 ms of the
  rate, at least 100 bytes, so that no small message passes at line speed after an idle moment): a chunk of bytes
  leaves once the bucket holds its size, so a transfer of N bytes takes ``8 N / rate``; the proxy reads the
  next chunk only then, so the sender's own TCP buffers fill as they would behind a slow link;
* **delay**: each chunk is delivered ``--delay`` after it left (one way: a round trip adds twice
  ``--delay``), plus ``--jitter`` (uniform in +-jitter), never out of order (TCP delivers a byte stream);
* **loss**: gRPC is HTTP/2 over TCP, and TCP hides a lost segment by sending it again: what an application
  sees of loss is a *stall*, the segment and every byte behind it waiting for the retransmission. So
  ``--loss P`` (the share of ~1448-byte segments lost) holds a chunk with a lost segment back for one
  retransmission time, ``max(200 ms, 2 x delay)`` (Linux's minimum retransmission timeout, or a round
  trip), before it and what follows are delivered. Nothing is dropped: a TCP proxy cannot drop bytes
  without breaking the stream; throughput losses from congestion control are not modelled;
* **schedule** (``--schedule trace.csv``): rows ``time_s,rate[,delay]`` (``0,50mbit,40ms`` /
  ``10,1mbit`` / ``20,10mbit``; a header line and ``#`` comments are skipped): at ``time_s`` seconds after
  the proxy started, the rate (and delay) change; the last row holds until the proxy stops.

:class:`LinkProxy` runs the proxy in a thread of this process (tests, ``hnd-bench --adapt-trace``), with
``set_link()`` to change the link while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import math
import random
import sys
import threading
from dataclasses import dataclass, replace
from collections.abc import Callable
from pathlib import Path

from hnd.common.errors import USER_ERRORS, UsageError, report
from hnd.common.flags import HelpFormatter

from hnd.bench.linkmodel import parse_rate_mbit, parse_time_ms

PROG = "python -m hnd.bench.linkproxy"
CHUNK = 8192  # bytes read (and shaped) at a time
SEGMENT = 1448  # a TCP segment's payload on a 1500-byte MTU: the unit --loss counts in
MIN_RTO_S = 0.2  # Linux's minimum retransmission timeout
# A deeper bucket lets whole small messages through at line speed after an idle moment: at 10 kbit/s a
# 1500-byte burst is 1.2 s of the link's time given away.
MIN_BURST = 100


@dataclass(frozen=True)
class LinkSettings:
    """One direction's link: rate (Mbit/s, None: unlimited), one-way delay and jitter (ms), segment loss."""

    rate_mbit: float | None = None
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    burst_bytes: int | None = None  # None: 1 ms of the rate, at least MIN_BURST

    @property
    def burst(self) -> int:
        """The token bucket's depth: a burst passes at once after the link idled, the rest at the rate."""
        if self.burst_bytes is not None:
            return self.burst_bytes
        return max(MIN_BURST, int((self.rate_mbit or 0) * 1e6 / 8 * 1e-3))


class TokenBucket:
    """Bytes at ``rate_bps`` bits/s, at most ``burst`` bytes at once; times in seconds, given by the caller.

    ``reserve(n, now)`` takes ``n`` bytes' worth of tokens and returns how long to wait before they may leave
    (the bucket may go into debt: later reservations wait for it to be paid back first).
    """

    def __init__(self, rate_bps: float | None, burst: int = 1500, now: float = 0.0) -> None:
        self.rate_bps = rate_bps
        self.burst = burst
        self.tokens = float(burst)
        self.t = now

    def _refill(self, now: float) -> None:
        if self.rate_bps and now > self.t:
            self.tokens = min(float(self.burst), self.tokens + (now - self.t) * self.rate_bps / 8)
        self.t = max(self.t, now)

    def set_rate(self, rate_bps: float | None, now: float) -> None:
        """From ``now`` on, refill at ``rate_bps`` (what accrued until now at the old rate stays)."""
        self._refill(now)
        self.rate_bps = rate_bps

    def reserve(self, n: int, now: float) -> float:
        if not self.rate_bps:
            return 0.0
        self._refill(now)
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens * 8 / self.rate_bps


def stall_probability(nbytes: int, loss: float) -> float:
    """The chance that a chunk of ``nbytes`` holds at least one lost segment, at segment loss ``loss``."""
    return 1.0 - (1.0 - loss) ** math.ceil(nbytes / SEGMENT) if loss > 0 else 0.0


class _Direction:
    """One direction of the link: its bucket and settings, and the last delivery time (no reordering)."""

    def __init__(self, settings: LinkSettings, rng: random.Random, now: float) -> None:
        self.settings = settings
        self.rng = rng
        self.bucket = TokenBucket(_bps(settings.rate_mbit), settings.burst, now)
        self.last_delivery = 0.0

    def update(self, settings: LinkSettings, now: float) -> None:
        self.settings = settings
        self.bucket.burst = settings.burst
        self.bucket.set_rate(_bps(settings.rate_mbit), now)

    def delivery_time(self, nbytes: int, sent: float) -> float:
        """When a chunk that left at ``sent`` arrives: delay, jitter, a retransmission stall; in order."""
        s = self.settings
        at = sent + s.delay_ms / 1e3
        if s.jitter_ms:
            at += self.rng.uniform(-s.jitter_ms, s.jitter_ms) / 1e3
        if s.loss and self.rng.random() < stall_probability(nbytes, s.loss):
            at += max(MIN_RTO_S, 2 * s.delay_ms / 1e3)
        self.last_delivery = max(at, self.last_delivery, sent)
        return self.last_delivery


def _bps(rate_mbit: float | None) -> float | None:
    return None if rate_mbit is None else rate_mbit * 1e6


def read_schedule(
    path: str | Path, base: LinkSettings, rate_of: Callable[[str], float] | None = None
) -> list[tuple[float, LinkSettings]]:
    """``time_s,rate[,delay]`` rows -> [(time_s, settings)], times ascending; UsageError naming the line.
    ``rate_of``: Mbit/s of a rate cell that is no ``RATE(kbit|mbit|gbit)`` (hnd-bench --adapt-trace's
    ``fit:`` rates), or UsageError."""
    out: list[tuple[float, LinkSettings]] = []
    header_seen = False
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UsageError(path, f"cannot read the schedule ({exc.strerror or exc})") from None
    for n, row in enumerate(csv.reader(lines), 1):
        cells = [c.strip() for c in row]
        if not cells or not cells[0] or cells[0].startswith("#"):
            continue
        try:
            t = float(cells[0])
        except ValueError:
            if not out and not header_seen:
                header_seen = True  # a header line before the first row
                continue
            raise UsageError(f"{path}:{n}", f"time {cells[0]!r} is not a number of seconds") from None
        if len(cells) < 2 or t < 0 or (out and t < out[-1][0]):
            raise UsageError(f"{path}:{n}", "expected time_s,rate[,delay] with times >= 0, ascending")
        try:
            rate = rate_of(cells[1]) if rate_of is not None and cells[1].startswith("fit:") else None
            settings = replace(base, rate_mbit=rate if rate is not None else parse_rate_mbit(cells[1], "rate"))
            if len(cells) > 2 and cells[2]:
                settings = replace(settings, delay_ms=parse_time_ms(cells[2], "delay"))
        except UsageError as exc:
            raise UsageError(f"{path}:{n}", str(exc)) from None
        out.append((t, settings))
    if not out:
        raise UsageError(path, "no rows (time_s,rate[,delay])")
    return out


class LinkProxy:
    """The proxy on its own event loop in a background thread: ``start()``, ``port``, ``set_link()``, ``close()``.

    ``schedule``: [(seconds after start, settings)] applied as time goes (``read_schedule``); ``seed``: the
    jitter and loss draws.
    """

    def __init__(
        self,
        target: tuple[str, int],
        settings: LinkSettings = LinkSettings(),
        listen: tuple[str, int] = ("127.0.0.1", 0),
        schedule: list[tuple[float, LinkSettings]] | None = None,
        seed: int = 0,
        say=None,
    ) -> None:
        self.target, self.listen, self.schedule = target, listen, schedule or []
        self.settings = self.schedule[0][1] if self.schedule and self.schedule[0][0] == 0 else settings
        self.rng = random.Random(seed)
        self.say = say
        self.port = 0
        self.bytes = {"up": 0, "down": 0}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._connections: set[asyncio.Task] = set()

    # --- the link ---------------------------------------------------------------------------------

    def set_link(self, settings: LinkSettings) -> None:
        """Change both directions' link now (from any thread)."""
        if self.loop is None:
            self.settings = settings
            return
        done = threading.Event()

        def apply() -> None:
            self._apply(settings)
            done.set()

        self.loop.call_soon_threadsafe(apply)
        done.wait(5)

    def _apply(self, settings: LinkSettings) -> None:
        assert self.loop is not None
        self.settings = settings
        now = self.loop.time()
        for d in (self.up, self.down):
            d.update(settings, now)
        if self.say is not None:
            self.say(f"link now {describe(settings)}")

    # --- running ----------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Serve until ``close()`` (or cancelled): the foreground form of ``start()``."""
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        now = self.loop.time()
        self.up = _Direction(self.settings, self.rng, now)
        self.down = _Direction(self.settings, self.rng, now)
        server = await asyncio.start_server(self._handle, *self.listen)
        self.port = server.sockets[0].getsockname()[1]
        scheduler = asyncio.create_task(self._run_schedule(now))
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            scheduler.cancel()
            server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await server.wait_closed()

    async def _run_schedule(self, start: float) -> None:
        assert self.loop is not None
        for at, settings in self.schedule:
            wait = start + at - self.loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._apply(settings)

    def start(self) -> LinkProxy:
        def run() -> None:
            try:
                asyncio.run(self.serve())
            except BaseException as exc:  # noqa: BLE001 - handed to start()'s caller
                self._error = exc
                self._ready.set()

        self._thread = threading.Thread(target=run, name="hnd-linkproxy", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def close(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- connections ------------------------------------------------------------------------------

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        server_w = None
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
            await asyncio.gather(
                self._pump(client_r, server_w, self.up, "up"), self._pump(server_r, client_w, self.down, "down")
            )
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a side went away, or the proxy stops: close both
        finally:
            for w in (client_w, server_w):
                if w is not None:
                    w.close()
            self._connections.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Direction, name: str
    ) -> None:
        """Bytes from ``reader`` to ``writer`` over ``link``: each chunk leaves when the bucket allows, and
        arrives its delay later (a second task delivers, so chunks overlap in flight as on a real link)."""
        assert self.loop is not None
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        deliver = asyncio.create_task(self._deliver(queue, writer))
        try:
            while data := await reader.read(CHUNK):
                wait = link.bucket.reserve(len(data), self.loop.time())
                if wait > 0:
                    await asyncio.sleep(wait)
                self.bytes[name] += len(data)
                queue.put_nowait((link.delivery_time(len(data), self.loop.time()), data))
            queue.put_nowait((0.0, b""))  # end of stream
            await deliver
        finally:
            deliver.cancel()

    async def _deliver(self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
        assert self.loop is not None
        while True:
            at, data = await queue.get()
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            wait = at - self.loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()


def describe(s: LinkSettings) -> str:
    rate = "unlimited" if s.rate_mbit is None else f"{s.rate_mbit:g} Mbit/s"
    extra = (f" +-{s.jitter_ms:g} ms" if s.jitter_ms else "") + (f", loss {s.loss:g}" if s.loss else "")
    return f"{rate}, delay {s.delay_ms:g} ms{extra}"


def _host_port(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"{flag} {text!r}: expected HOST:PORT")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=" ".join(__doc__.split("\n\n")[0].split()), formatter_class=HelpFormatter
    )
    p.add_argument(
        "--listen", required=True, metavar="HOST:PORT", help="where the proxy listens (e.g. 127.0.0.1:50052)"
    )
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="the server it forwards to")
    p.add_argument("--rate", help="link rate each way, e.g. 2mbit, 500kbit (default unlimited)")
    p.add_argument("--delay", default="0ms", help="one-way delay, e.g. 40ms (a round trip adds twice it)")
    p.add_argument("--jitter", default="0ms", help="delay jitter, uniform in +-JITTER (never reorders bytes)")
    p.add_argument(
        "--loss",
        type=float,
        default=0.0,
        help="share of TCP segments lost: each stalls its bytes (and those behind) for one retransmission time",
    )
    p.add_argument(
        "--burst", type=int, default=None, help="token bucket depth in bytes (default: 1 ms of the rate, >= 100)"
    )
    p.add_argument("--schedule", metavar="CSV", help="rows time_s,rate[,delay]: the link changes as time goes")
    p.add_argument("--seed", type=int, default=0, help="seed of the jitter and loss draws")
    return p


def settings_from_args(args: argparse.Namespace) -> LinkSettings:
    if not 0.0 <= args.loss < 1.0:
        raise UsageError(f"--loss {args.loss:g}: expected a share in [0, 1)")
    if args.burst is not None and args.burst < 1:
        raise UsageError(f"--burst {args.burst}: expected >= 1 byte")
    return LinkSettings(
        rate_mbit=parse_rate_mbit(args.rate, "--rate") if args.rate else None,
        delay_ms=parse_time_ms(args.delay, "--delay"),
        jitter_ms=parse_time_ms(args.jitter, "--jitter"),
        loss=args.loss,
        burst_bytes=args.burst,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        schedule = read_schedule(args.schedule, settings) if args.schedule else None
        proxy = LinkProxy(
            _host_port(args.to, "--to"),
            settings,
            _host_port(args.listen, "--listen"),
            schedule,
            args.seed,
            say=lambda line: print(f"{PROG}: {line}", file=sys.stderr, flush=True),
        )
        print(f"{PROG}: {args.listen} -> {args.to}, {describe(proxy.settings)}", file=sys.stderr, flush=True)
        asyncio.run(proxy.serve())
    except USER_ERRORS as exc:
        return report(PROG, exc)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
