"""Adaptation as a policy: measured operating points, an objective, and a pure function choosing among them.

An **operating point** is one way of sending a frame (split at N bits, per tensor or channel, intra or
temporal, at some resize; or the frame as JPEG / WebP / H.264 / HEVC) with what a profile run measured for
it (``hnd-bench --rate-accuracy --profile-out points.json``): bytes per frame, edge and server compute,
agreement with the unsplit model. The **objective** is any of a p95 end-to-end latency target, a bitrate
cap and an agreement floor. Given the link estimate (:mod:`hnd.edge.linkest`), :func:`choose` predicts each
point's latency and bitrate and returns the point to run:

* among the points that meet the objective, the highest agreement; among equal agreements, fewest bytes;
* none meets it: the cheapest (fewest bytes), with a note said once when that starts and once when it ends;
* nothing measured yet: the cheapest (the estimate then tells whether to move up). The edge measures before
  its first frame (a timed GetModelInfo: :meth:`hnd.edge.linkest.LinkEstimator.observe_probe`), so this
  only happens without a probe;
* **hysteresis** (state kept explicit in :class:`PolicyState`): a point with more bytes than the current one
  must meet the objective with ``up_margin`` to spare (0.8: its predicted latency and bitrate within 80 % of
  the target), the current one only has to meet it; and no switch before the estimate holds
  ``min_samples`` observations made since the last switch (frames sent with the new point), so the edge
  never switches faster than its estimate can tell the switch's effect; except away from a current point
  the estimate says misses the objective (a link that collapsed: each frame kept there would be late).

Predicted latency of a point over a link of ``bandwidth`` and round trip ``rtt``::

    latency_ms = edge_ms + server_ms + rtt_ms + inflight * 8 * (bytes_p95 + response_bytes) / bandwidth_bits_per_ms

plus ``latency_bias_ms``, the running point's recent achieved-minus-predicted latency
(:class:`~hnd.edge.linkest.LinkEstimator` keeps it: a high quantile of the last errors, or the last error
when it is higher, so one late frame moves the edge down at once), with edge / server compute at their p95 (the edge's own observations of a point replace the profile's once
it has some; a point not observed yet gets the profile's figure scaled by how the observed points compare
with theirs: the profile may come from another machine, or a quieter hour), ``bytes_p95`` over key and delta frames together, and ``inflight`` the requests the edge keeps
in flight (on a link that is the bottleneck a frame waits behind the others) and ``response_bytes`` what an
answer brings back (detections: the same whatever the point; observed by the edge). With a known frame rate, a
point whose mean bitrate exceeds ``max_link_share`` of the bandwidth cannot hold any latency (its queue
grows without bound) and is ruled out. Predicted bitrate: ``8 * bytes_mean * fps``; without a frame rate
(frames sent as fast as answers come), ``inflight`` frames per predicted latency.

Everything here is plain data and arithmetic: no torch, no gRPC (the ONNX edge imports it).
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hnd.common.errors import HndError
from hnd.common.meta import check_fingerprint

PROFILE_FORMAT = "hnd-operating-points"
PROFILE_VERSION = 1


class ProfileError(HndError):
    """An operating-points file that cannot be used (missing, malformed, no usable point)."""


@dataclass(frozen=True)
class OperatingPoint:
    """One measured way of sending a frame.

    id: unique name, e.g. ``split-4b-tensor-temporal-k30-native``; mode: split | offload | local;
    reproduce: the settings that make it (split: bits, granularity, compression, coding, key_interval,
    resize; offload: image_format, quality or crf, key_interval); bytes_mean / bytes_p95: payload bytes per
    frame over every frame (key and delta); edge_ms / server_ms: compute per frame (p95); agreement: F1 of
    its detections against the unsplit model's (1.0: the same).
    """

    id: str
    mode: str
    reproduce: dict[str, Any]
    bytes_mean: float
    bytes_p95: float
    edge_ms: float
    server_ms: float
    agreement: float

    @property
    def temporal(self) -> bool:
        """Whether frames depend on earlier ones (key / delta bottlenecks, video): a switch starts a stream."""
        return self.reproduce.get("coding") == "temporal" or self.reproduce.get("image_format") in ("h264", "hevc")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OperatingPoint:
        """From a profile's point (``hnd-bench --profile-out``); KeyError / TypeError / ValueError when malformed."""
        return cls(
            id=str(d["id"]),
            mode=str(d["mode"]),
            reproduce=dict(d["reproduce"]),
            bytes_mean=float(d["bytes"]["mean"]),
            bytes_p95=float(d["bytes"]["p95"]),
            edge_ms=float(d["edge_ms"]["p95"]),
            server_ms=float(d["server_ms"]["p95"]),
            agreement=float(d["agreement_f1"]),
        )


@dataclass(frozen=True)
class Objective:
    """What the run must hold; None: no bound. At least one is set for an adaptive run."""

    target_latency_ms: float | None = None  # p95 end to end
    max_kbps: float | None = None  # payload bitrate, kbit/s
    min_agreement: float | None = None  # F1 against the unsplit model

    def describe(self) -> str:
        parts = []
        if self.target_latency_ms is not None:
            parts.append(f"p95 latency <= {self.target_latency_ms:g} ms")
        if self.max_kbps is not None:
            parts.append(f"<= {self.max_kbps:g} kbit/s")
        if self.min_agreement is not None:
            parts.append(f"agreement >= {self.min_agreement:g}")
        return ", ".join(parts) or "none"


@dataclass(frozen=True)
class LinkEstimate:
    """What the edge knows of its link (:class:`hnd.edge.linkest.LinkEstimator`). None: not known yet.

    bandwidth_bps: bits per second the link delivers edge -> server; rtt_ms: round trip without payload;
    fps: frames per second the source delivers (None: as fast as answers come); inflight: requests the edge
    keeps in flight now, its runner's window (a frame may wait on the link behind the others); samples:
    observations so far; compute_ms: the edge's own p95-ish edge + server compute per point id, where it
    has seen some.
    """

    bandwidth_bps: float | None = None
    rtt_ms: float | None = None
    fps: float | None = None
    samples: int = 0
    inflight: int = 1
    compute_ms: dict[str, float] = field(default_factory=dict)
    compute_scale: float = 1.0  # observed / profile compute, for the points not observed yet (see choose)
    response_bytes: float = 0.0  # what an answer takes back over the link (detections), whatever the point
    # achieved minus predicted latency of the running point's recent frames (negative: the prediction was
    # conservative), added to every point's prediction; 0 until the running point has answers
    latency_bias_ms: float = 0.0


@dataclass(frozen=True)
class PolicyParams:
    up_margin: float = 0.8  # a point with more bytes must fit within this share of each bound
    min_samples: int = 3  # observations since the last switch before the next one
    max_link_share: float = 0.9  # mean bitrate above this share of the bandwidth: the queue grows


@dataclass(frozen=True)
class PolicyState:
    """The policy's memory between frames (explicit, so the function stays pure)."""

    current: str | None = None  # point id in use
    samples_at_switch: int = 0  # estimate.samples when ``current`` was chosen
    infeasible: bool = False  # no point met the objective at the last decision
    switches: int = 0


@dataclass(frozen=True)
class Prediction:
    latency_ms: float
    kbps: float


@dataclass(frozen=True)
class Decision:
    point: OperatingPoint
    state: PolicyState
    switched: bool  # ``point`` differs from the previous decision's (the first choice is no switch)
    feasible: bool  # ``point`` meets the objective (False: nothing does, it is the cheapest)
    note: str | None = None  # said once: the objective became unreachable, or reachable again


def predict(point: OperatingPoint, est: LinkEstimate, params: PolicyParams = PolicyParams()) -> Prediction:
    """Predicted p95 latency (ms) and bitrate (kbit/s) of ``point`` over the estimated link, calibrated by
    ``est.latency_bias_ms`` (pass an estimate without it for the raw prediction the bias is measured against).

    Unknown bandwidth / RTT count as infinite / zero: with no observation yet, no link term.
    """
    compute = expected_compute_ms(point, est)
    transfer = 0.0
    if est.bandwidth_bps:
        transfer = 8 * (point.bytes_p95 + est.response_bytes) / est.bandwidth_bps * 1e3 * est.inflight
        if est.fps and 8 * point.bytes_mean * est.fps > params.max_link_share * est.bandwidth_bps:
            transfer = math.inf  # more than the link carries: every frame waits longer than the last
    latency = max(compute + (est.rtt_ms or 0.0) + transfer + est.latency_bias_ms, 0.0)
    fps = est.fps if est.fps else (est.inflight * 1e3 / latency if 0 < latency < math.inf else 0.0)
    return Prediction(latency, 8 * point.bytes_mean * fps / 1e3)


def expected_compute_ms(point: OperatingPoint, est: LinkEstimate) -> float:
    """``point``'s edge + server compute: the edge's own observations of it, else the profile's figures at
    ``est.compute_scale`` (:func:`calibrated`)."""
    return est.compute_ms.get(point.id, (point.edge_ms + point.server_ms) * est.compute_scale)


def meets(point: OperatingPoint, est: LinkEstimate, objective: Objective, share: float = 1.0) -> bool:
    """Whether ``point`` meets every bound of ``objective`` within ``share`` of it (agreement: as is)."""
    if objective.min_agreement is not None and point.agreement < objective.min_agreement:
        return False
    pred = predict(point, est)
    if objective.target_latency_ms is not None and pred.latency_ms > share * objective.target_latency_ms:
        return False
    return objective.max_kbps is None or pred.kbps <= share * objective.max_kbps


def cheapest(points: list[OperatingPoint]) -> OperatingPoint:
    """Fewest bytes per frame (then lowest compute, then id: deterministic)."""
    return min(points, key=lambda p: (p.bytes_mean, p.edge_ms + p.server_ms, p.id))


def best(points: list[OperatingPoint]) -> OperatingPoint:
    """Highest agreement; among equal agreements, fewest bytes (then id)."""
    return min(points, key=lambda p: (-p.agreement, p.bytes_mean, p.id))


def choose(
    points: list[OperatingPoint],
    est: LinkEstimate,
    objective: Objective,
    state: PolicyState,
    params: PolicyParams = PolicyParams(),
) -> Decision:
    """The point to run next, and the policy's next state (see the module docstring for the rules)."""
    if not points:
        raise ValueError("no operating points")
    by_id = {p.id: p for p in points}
    est = calibrated(points, est)
    current = by_id.get(state.current) if state.current is not None else None
    if (
        current is not None
        and est.samples - state.samples_at_switch < params.min_samples
        and (not est.bandwidth_bps or meets(current, est, objective))
    ):
        return Decision(current, state, False, not state.infeasible)  # too early to tell: keep it
    if not est.bandwidth_bps:  # nothing measured yet: start with the cheapest, move up once the link is known
        chosen = current or cheapest(points)
        return Decision(chosen, replace(state, current=chosen.id), False, not state.infeasible)

    def allowed(p: OperatingPoint) -> bool:
        up = current is not None and p.bytes_mean > current.bytes_mean
        return meets(p, est, objective, params.up_margin if up else 1.0)

    candidates = [p for p in points if allowed(p)]
    feasible = bool(candidates)
    chosen = best(candidates) if feasible else cheapest(points)
    note = None
    if not feasible and not state.infeasible:
        pred = predict(chosen, est, params)
        note = (
            f"no operating point meets the objective ({objective.describe()}) on the estimated link "
            f"({describe_link(est)}): running the cheapest, {chosen.id} (predicted p95 {pred.latency_ms:,.0f} ms, "
            f"{pred.kbps:,.0f} kbit/s)"
        )
    elif feasible and state.infeasible:
        note = f"the objective ({objective.describe()}) is met again: running {chosen.id}"
    switched = current is not None and chosen.id != current.id
    new_state = replace(
        state,
        current=chosen.id,
        samples_at_switch=est.samples if switched or current is None else state.samples_at_switch,
        infeasible=not feasible,
        switches=state.switches + int(switched),
    )
    return Decision(chosen, new_state, switched, feasible, note)


def calibrated(points: list[OperatingPoint], est: LinkEstimate) -> LinkEstimate:
    """``est`` with ``compute_scale``: the median, over the points observed, of their observed compute over the
    profile's (this edge and server against the machine that measured the profile; 1 when none observed)."""
    ratios = [
        est.compute_ms[p.id] / (p.edge_ms + p.server_ms)
        for p in points
        if p.id in est.compute_ms and p.edge_ms + p.server_ms > 0
    ]
    return replace(est, compute_scale=float(sorted(ratios)[len(ratios) // 2])) if ratios else est


def describe_link(est: LinkEstimate) -> str:
    bw = "?" if not est.bandwidth_bps else f"{est.bandwidth_bps / 1e6:.2f} Mbit/s"
    rtt = "?" if est.rtt_ms is None else f"{est.rtt_ms:.0f} ms"
    return f"{bw}, RTT {rtt}"


# ---------------------------------------------------------------------------------------------------
# The profile file


@dataclass(frozen=True)
class Profile:
    """An operating-points file: the weights it was measured with, where, and its points."""

    path: str
    fingerprint: str
    machine: dict[str, Any]
    points: list[OperatingPoint]

    def check_weights(self, fingerprint: str) -> None:
        """FingerprintMismatch (one line naming the file) when the edge holds other weights."""
        try:
            check_fingerprint(self.fingerprint, fingerprint, expected_is=f"profile {self.path}", given_is="edge")
        except HndError as exc:
            raise ProfileError(self.path, f"measured with other weights: {exc}") from None


def load_profile(path: str | Path) -> Profile:
    """Read ``hnd-bench --profile-out`` output; ProfileError naming the file and the problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(path, "no such operating-points file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(path, f"not an operating-points file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise ProfileError(path, f"not an operating-points file (format is not {PROFILE_FORMAT!r})")
    if data.get("version") != PROFILE_VERSION:
        raise ProfileError(path, f"operating-points version {data.get('version')!r}, this edge reads {PROFILE_VERSION}")
    try:
        points = [OperatingPoint.from_dict(p) for p in data["points"]]
        fp = str(data["model"]["fingerprint"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileError(path, f"malformed operating point or model ({exc!r})") from None
    if not points:
        raise ProfileError(path, "no operating points")
    if len({p.id for p in points}) != len(points):
        raise ProfileError(path, "operating point ids are not unique")
    return Profile(str(path), fp, dict(data.get("machine", {})), points)


def profile_header(fingerprint: str, config: str, weights: str, machine: dict[str, Any] | None) -> dict[str, Any]:
    """The head of a profile file: format, version, the model's fingerprint and the machine."""
    return {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "model": {"fingerprint": fingerprint, "config": config, "weights": weights},
        "machine": machine or {"platform": platform.platform()},
    }
