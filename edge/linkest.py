"""The edge's estimate of its link, from its own traffic: bandwidth, round trip, and compute per point.

Each answered frame is one observation: the bytes it put on the wire (request and response) and its
``network_server`` time (request sent -> response arrived, on the edge's clock) minus the server's own
stage times (as the server reports them; durations, never clocks subtracted across hosts). What is left,
``wire_ms``, is the round trip plus the time the bytes took on the link (plus gRPC's own small cost).

* **Round trip** (``rtt_ms``): the windowed minimum of ``wire_ms`` over the last ``rtt_window_s`` seconds,
  as BBR keeps its RTprop: the smallest frames give the tightest bound (their bytes take least time), and an
  old minimum ages out so a longer path is learnt (30 s rather than BBR's 10: see ``EstimatorParams``).
  Or, below it, the round trip a fast link showed: a minimum whose own bytes took under ``pair_min_share``
  of it at the rate of the moment (less that transfer), kept ``fit_window_s``. When the link slows, frames
  are still timed against it, not against a minimum of seconds that holds transfer.
* **Pairs of sizes** (as pathchar does: the minimum delay grows with size, and the slope is the rate). On a
  slow link even the smallest frame spends seconds on the wire, so the minimum is no bare round trip, and a
  frame timed against it over-reads the rate: a 4-bit frame at 9 kbit/s read 22 kbit/s and the edge tried
  8-bit; a 2-bit frame 20 ms slower than the 2-bit minimum read 400 kbit/s at 4 kbit/s.
  A frame at least ``pair_ratio`` times the bytes of the quickest of the last ``pair_window`` samples (since
  the window's last restart) is timed against that one: its extra bytes took its extra wire time, whatever
  the round trip and the per-call bytes the edge does not see (HTTP/2 headers). So
  ``8 * (bytes - bytes_ref) / (wire_ms - wire_ref)`` is its delivery rate, where the reference's own
  transfer at that rate is over ``pair_min_share`` of its wire time and ``min_transfer_ms`` (else the
  pair adds little) and no longer than its whole wire time (else the rate changed between the two).
  A recent reference, not the window's minimum: a pair across a rise of the rate reads the rise as a high
  rate. Frames of about the minimum's size are then timed no higher than the last pair's rate (or than
  their own lower bound ``8 * bytes / wire_ms``, where that is higher). The pair's intercept is not taken for
  the round trip: it holds those unseen bytes' transfer at the rate of the moment, and a frame timed
  against it after the link sped up looked three times as fast as it was. The edge's first frame pairs with
  its probe, and a switch or a key frame makes another pair.
* **Bandwidth** (``bandwidth_bps``): a delivery-rate sample per frame: the pair's above, else
  ``8 * bytes / (wire_ms - rtt_ms)`` (``8 * bytes / wire_ms`` for a frame whose wire time is below both the
  minimum and the round trip: it would otherwise look instant), and the windowed maximum over the last
  ``bw_window`` samples, as BBR keeps its BtlBw: a frame that waited
  behind another in flight, or whose transfer was too short to time (floored at ``min_transfer_ms``), only
  understates the rate, so the largest recent sample is the best one. A maximum filter alone would keep a
  rate the link lost for a whole window; like WebRTC's delay-based controller (GCC), which cuts its
  estimate when the delay grows (overuse), the window restarts from the recent samples when
  ``overuse_samples`` frames in a row took more than ``overuse_factor`` times the transfer time the
  estimate predicts for their bytes, or one frame took more than ``gross_overuse_factor`` times it (a link
  that lost most of its rate, where each frame may now take seconds), or one frame did within ``bw_window``
  frames of the last restart (the window then holds frames that straddled the drop, partly sent at the old
  rate); each plus a slack for jitter of ``overuse_slack_ms`` or half the round trip, whichever is more.
* **Responses**: the answers' bytes (detections) travel the link back whatever the point; their recent
  90th percentile goes into every point's predicted transfer.
* **A first measurement** before any frame (:meth:`LinkEstimator.observe_probe`): one small timed call (the
  edge's GetModelInfo) of ``b`` bytes taking ``t`` ms counts as a round trip of ``t`` and a rate of
  ``8 b / t``: both bounds on the safe side (the call's time is at least the round trip, and its bytes went
  no slower), so the first point is the best that fits a link at least this bad, not blindly the cheapest.
* **A frame still in flight** bounds the rate from above (``estimate(outstanding=...)``): the oldest frame
  not answered yet, ``b`` bytes sent ``e`` ms ago, has spent at least ``e - rtt - compute`` on the link and
  is not through; once that exceeds ``overuse_factor`` times what the estimate predicts for it (plus the
  jitter slack), the link delivers less than ``8 b / (e - rtt - compute)``, and the estimate says so before
  the answer comes (the next frame, prepared while it is out, is already cheaper).
* **Calibration** (``latency_bias_ms``): each answered frame's achieved end-to-end latency minus the
  policy's raw prediction for it when it was chosen. Over the trailing frames of the running point (a
  switch starts afresh), the bias is the ``calib_quantile`` of the last ``calib_window`` errors, or the
  last error when that is higher (a late frame moves the edge down at once); with fewer than
  ``calib_min`` errors, only a positive last error counts; a restart of the bandwidth window clears them
  (the new estimate explains a frame that overused the link). The raw prediction (p90 compute, p95 bytes, the
  answers' p90 bytes) is meant to be safe; the bias takes out what it overstates on this link and host.
* **Compute** per operating point: the edge's edge-stage and server times of the last frames sent with it
  (a high quantile), which replace the profile's figures in the policy's predictions once there are a few.

Pure bookkeeping (no clock of its own, no gRPC): callers pass times, tests pass numbers.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from hnd.edge.adapt import LinkEstimate


@dataclass(frozen=True)
class EstimatorParams:
    bw_window: int = 10  # delivery-rate samples in the max filter
    # The min filter's horizon. Longer than BBR's 10 s: a frame is one message, never a small probe, so
    # over a slow link every recent sample carries seconds of transfer, and a short window would take
    # that for round trip (then the transfer looks instant and the bandwidth huge).
    rtt_window_s: float = 30.0
    # How long a round trip fitted from a pair holds. Longer than the minimum's window: frames of one size give
    # no new fit, and without one a frame at the minimum of a slow link looks instant; short enough that a
    # path whose round trip grew is learnt again (until then its rate is under-read: the edge runs cheaper).
    fit_window_s: float = 120.0
    min_transfer_ms: float = 0.5  # below this a transfer is not timed: the sample is a lower bound
    pair_ratio: float = 1.5  # a frame this many times the bytes of a recent one is timed against it as a pair
    pair_window: int = 3  # ... one of the last this many samples (the quickest of them)
    pair_min_share: float = 0.1  # ... when the minimum's own transfer is at least this share of its wire time
    overuse_factor: float = 2.0
    overuse_slack_ms: float = 5.0
    overuse_samples: int = 2
    gross_overuse_factor: float = 8.0  # one frame this much slower than predicted is enough
    compute_window: int = 20  # compute observations kept per point
    compute_min: int = 3  # observations of a point before they replace the profile's figures
    compute_quantile: float = 0.9
    calib_window: int = 10  # latency errors of the running point in the calibration
    calib_min: int = 3  # errors before a negative bias (the prediction overstates) is trusted
    calib_quantile: float = 0.9


class LinkEstimator:
    """Observations in, :class:`~hnd.edge.adapt.LinkEstimate` out."""

    def __init__(
        self, params: EstimatorParams = EstimatorParams(), fps: float | None = None, inflight: int = 1
    ) -> None:
        self.params = params
        self.fps = fps  # the source's frame rate when it is paced, else None
        self.inflight = inflight  # requests the edge keeps in flight
        self.samples = 0
        self._rates: deque[float] = deque(maxlen=params.bw_window)  # bit/s
        self._wire: deque[tuple[float, int, float]] = deque(maxlen=1024)  # (time s, bytes both ways, wire ms)
        self._fits: deque[tuple[float, float]] = deque(maxlen=64)  # (time s, round trip ms a fast link showed)
        self._slopes: deque[tuple[float, float]] = deque(maxlen=64)  # (time s, a pair's rate bit/s)
        self._overuse: list[float] = []  # rates of the overusing samples in a row
        self._since_reset = params.bw_window  # samples since the window last restarted
        self._restart_s = -math.inf  # when it last restarted
        self._compute: dict[str, deque[float]] = {}
        self._responses: deque[int] = deque(maxlen=params.compute_window)
        self._errors: deque[tuple[str | None, float]] = deque(maxlen=256)  # (point, achieved - predicted ms)

    def _minimum(self, now_s: float) -> tuple[float, int, float] | None:
        """(time s, bytes, wire ms) of the smallest ``wire_ms`` of the last ``rtt_window_s`` (the newest sample
        when all are older)."""
        while len(self._wire) > 1 and now_s - self._wire[0][0] > self.params.rtt_window_s:
            self._wire.popleft()
        return min(self._wire, key=lambda sample: sample[2]) if self._wire else None

    def rtt_ms(self, now_s: float) -> float | None:
        """The round trip without payload: the windowed minimum of ``wire_ms``, or below it the newest round
        trip a fast link showed in the last ``fit_window_s`` (see the module docstring)."""
        minimum = self._minimum(now_s)
        if minimum is None:
            return None
        while self._fits and now_s - self._fits[0][0] > self.params.fit_window_s:
            self._fits.popleft()
        return min(self._fits[-1][1], minimum[2]) if self._fits else minimum[2]

    def _slope_bps(self, now_s: float) -> float | None:
        """The newest pair's rate since the window's last restart, within ``fit_window_s``; None without one."""
        while self._slopes and now_s - self._slopes[0][0] > self.params.fit_window_s:
            self._slopes.popleft()
        return self._slopes[-1][1] if self._slopes and self._slopes[-1][0] >= self._restart_s else None

    @property
    def bandwidth_bps(self) -> float | None:
        return max(self._rates) if self._rates else None

    def observe(
        self,
        now_s: float,
        request_bytes: int,
        response_bytes: int,
        network_ms: float,
        server_ms: float,
        point: str | None = None,
        compute_ms: float | None = None,
        predicted_ms: float | None = None,
        total_ms: float | None = None,
    ) -> None:
        """One answered frame: its bytes both ways, request sent -> response arrived (``network_ms``), the
        server's own time in it, and (optional) its operating point, edge + server compute, and the raw
        predicted and achieved end-to-end latency (for the calibration)."""
        p = self.params
        wire = max(network_ms - server_ms, 0.0)
        nbytes = request_bytes + response_bytes
        rate, transfer = self._delivery_rate(now_s, nbytes, wire)
        self._wire.append((now_s, nbytes, wire))
        restarted = self._check_overuse(now_s, nbytes, transfer, rate)
        self._rates.append(rate)
        self._responses.append(response_bytes)
        self.samples += 1
        if point is not None and compute_ms is not None:
            self._compute.setdefault(point, deque(maxlen=p.compute_window)).append(compute_ms)
        if predicted_ms is not None and total_ms is not None and math.isfinite(predicted_ms) and not restarted:
            self._errors.append((point, total_ms - predicted_ms))

    def _delivery_rate(self, now_s: float, nbytes: int, wire: float) -> tuple[float, float]:
        """This frame's delivery-rate sample (bit/s) and the time its bytes took on the link (ms): timed as a
        pair with a recent frame, or against the round trip (see the module docstring)."""
        p = self.params
        minimum = self._minimum(now_s)
        if minimum is None:  # the first sample: its own round trip, untimed transfer (a lower bound)
            return 8 * nbytes / p.min_transfer_ms * 1e3, 0.0
        min_time, min_bytes, min_wire = minimum
        bw = self.bandwidth_bps
        since_restart = min_time >= self._restart_s  # the minimum was sent at the rate the window holds now
        if bw and since_restart:  # a minimum whose own bytes take a small share of it is a round trip
            own = 8 * min_bytes / bw * 1e3
            if own <= p.pair_min_share * min_wire:
                self._fits.append((now_s, min_wire - own if own > p.min_transfer_ms else min_wire))
        # a pair with the quickest of the last few samples (the same link rate, most likely: an older one may
        # have crossed a slower link, and timed against it this frame would look fast), since the last restart
        recent = [s for s in list(self._wire)[-p.pair_window :] if s[0] >= self._restart_s]
        if recent:
            _, ref_bytes, ref_wire = min(recent, key=lambda sample: sample[2])
            if nbytes >= p.pair_ratio * ref_bytes and wire > ref_wire:
                rate = 8 * (nbytes - ref_bytes) / max(wire - ref_wire, p.min_transfer_ms) * 1e3
                own = 8 * ref_bytes / rate * 1e3  # the reference's own transfer at that rate
                # a pair where that transfer is long enough to time and a share of its wire time worth taking
                # out, and consistent (no longer than its whole wire time: else the rate changed between)
                if max(p.min_transfer_ms, p.pair_min_share * ref_wire) < own <= ref_wire:
                    self._slopes.append((now_s, rate))
                    return rate, 8 * nbytes / rate * 1e3
        rtt = self.rtt_ms(now_s) or 0.0
        floor = 8 * nbytes / max(wire, p.min_transfer_ms) * 1e3  # against no round trip: a lower bound
        if wire < min_wire and wire - rtt <= p.min_transfer_ms:
            # faster than the round trip as known (a slow link's minimum holds transfer): against it this frame
            # would look instant, so it is timed against none (a lower bound), and it overused nothing
            return floor, 0.0
        rate = 8 * nbytes / max(wire - rtt, p.min_transfer_ms) * 1e3
        slope = self._slope_bps(now_s)
        if slope is not None:
            # a frame of about the minimum's size, timed against a minimum that may hold transfer, reads its
            # jitter as rate: no higher than the last pair's rate, or this frame's lower bound if higher
            rate = min(rate, max(slope, floor))
        return rate, wire - rtt

    def observe_probe(self, now_s: float, nbytes: int, ms: float) -> None:
        """A small timed call before any frame (``nbytes`` both ways in ``ms``): a round trip of at most
        ``ms`` and a rate of at least ``8 nbytes / ms``, so the first choice errs on the safe side. Not a
        frame: ``samples`` is unchanged (the policy's hysteresis counts frames)."""
        ms = max(ms, self.params.min_transfer_ms)
        self._wire.append((now_s, nbytes, ms))
        self._rates.append(8 * max(nbytes, 1) / ms * 1e3)

    def latency_bias_ms(self, point: str | None) -> float:
        """Achieved minus predicted latency over ``point``'s trailing frames (see the module docstring)."""
        p = self.params
        errors: list[float] = []
        for pid, err in reversed(self._errors):
            if pid != point or len(errors) == p.calib_window:
                break
            errors.append(err)
        if not errors:
            return 0.0
        last = errors[0]
        if len(errors) < p.calib_min:
            return max(last, 0.0)
        return max(float(np.quantile(np.asarray(errors), p.calib_quantile)), last)

    def rate_bound_bps(self, now_s: float, outstanding: tuple[float, int, float] | None) -> float | None:
        """The upper bound on the rate that the oldest frame in flight gives (``outstanding``: its send time
        in seconds, request bytes, expected compute ms), None when it is not overdue (see the module docstring)."""
        bw = self.bandwidth_bps
        if outstanding is None or bw is None:
            return None
        sent_s, nbytes, compute = outstanding
        rtt = self.rtt_ms(now_s) or 0.0
        on_link = (now_s - sent_s) * 1e3 - rtt - compute
        predicted = 8 * nbytes / bw * 1e3
        slack = max(self.params.overuse_slack_ms, rtt / 2)
        if on_link <= self.params.overuse_factor * predicted + slack:
            return None
        return 8 * nbytes / on_link * 1e3

    def _check_overuse(self, now_s: float, nbytes: int, transfer_ms: float, rate: float) -> bool:
        """Restart the max filter from the recent samples when frames keep taking far longer than predicted
        (True: restarted; the calibration's errors then go too, this frame's included)."""
        p, bw = self.params, self.bandwidth_bps
        if bw is None:
            return False
        predicted = 8 * nbytes / bw * 1e3
        # jitter grows with the path (and with a loaded host's scheduling): half a round trip of slack
        slack = max(p.overuse_slack_ms, (self.rtt_ms(self._wire[-1][0]) or 0.0) / 2)
        self._since_reset += 1
        if transfer_ms > p.overuse_factor * predicted + slack:
            self._overuse.append(rate)
            gross = transfer_ms > p.gross_overuse_factor * predicted + slack
            # just after a restart the window holds a frame or two that straddled the drop: trust them less
            recovering = self._since_reset <= p.bw_window
            if gross or recovering or len(self._overuse) >= p.overuse_samples:
                self._rates.clear()
                self._rates.extend(self._overuse[:-1])  # the last one is appended by observe()
                self._overuse.clear()
                self._since_reset = 0
                self._restart_s = now_s
                # the errors were measured against the link that just went: the new estimate explains them,
                # and counting them again would put the edge below what the new rate carries
                self._errors.clear()
                return True
        else:
            self._overuse.clear()
        return False

    def compute_ms(self) -> dict[str, float]:
        """Per point with enough observations: the ``compute_quantile`` of its recent edge + server times."""
        p = self.params
        return {
            k: float(np.quantile(np.asarray(v), p.compute_quantile))
            for k, v in self._compute.items()
            if len(v) >= p.compute_min
        }

    def estimate(
        self, now_s: float, point: str | None = None, outstanding: tuple[float, int, float] | None = None
    ) -> LinkEstimate:
        """The estimate now; ``point``: the running point (its calibration); ``outstanding``: the oldest frame
        in flight (send time s, request bytes, expected compute ms), which may bound the rate."""
        bw = self.bandwidth_bps
        bound = self.rate_bound_bps(now_s, outstanding)
        return LinkEstimate(
            bandwidth_bps=bw if bound is None or bw is None else min(bw, bound),
            rtt_ms=self.rtt_ms(now_s),
            fps=self.fps,
            inflight=self.inflight,
            samples=self.samples,
            compute_ms=self.compute_ms(),
            response_bytes=float(np.quantile(np.asarray(self._responses), 0.9)) if self._responses else 0.0,
            latency_bias_ms=self.latency_bias_ms(point),
        )
