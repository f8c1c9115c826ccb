"""The link model hnd-bench applies to measured message sizes: deterministic, cheap to sweep.

Per frame, over a link of rate ``bandwidth`` (the same both directions) and round trip ``rtt``::

    latency_ms = edge_ms + 8 * (request_bytes + response_bytes) / bandwidth_bits_per_ms
                 + rtt_ms + loopback_ms + server_ms

``edge_ms``: the edge's compute before sending; ``request_bytes`` / ``response_bytes``: the serialized
hnd.v1.InferRequest / InferResponse; ``server_ms``: the server's own stages (decode + queue + compute +
encode); ``loopback_ms``: what gRPC and the loopback cost in the measured run (network_server - server_ms).
Local inference has no link term. Framing (gRPC, HTTP/2, TCP/IP), TCP slow start, loss and jitter are not
modeled. Example: 10 ms edge, 125,000 B out, 1,250 B back over 10 Mbit/s with 40 ms RTT, 1 ms loopback and
100 ms on the server: 10 + 101 + 40 + 1 + 100 = 252 ms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from hnd.common.errors import UsageError

SWEEP_MBIT = (0.5, 100.0)  # the plot's bandwidth axis
CROSSOVER_MBIT = (0.01, 10_000.0)  # crossovers are searched on a wider range than the plot shows
FORMULA = (
    "latency_ms = edge_ms + 8 * (request_bytes + response_bytes) / bandwidth_bits_per_ms "
    "+ rtt_ms + loopback_ms + server_ms  (local: latency_ms = edge_ms)"
)


@dataclass(frozen=True)
class Link:
    """An emulated network link: rate (both directions) and round-trip time."""

    name: str
    mbit: float
    rtt_ms: float


_RATE_UNITS = {"kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}
_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_LINK_RE = re.compile(r"^\s*([\w.-]+)\s*=\s*([0-9.]+)\s*(kbit|mbit|gbit)\s*/\s*([0-9.]+)\s*(us|ms|s)\s*$", re.I)
_RATE_RE = re.compile(r"^\s*([0-9.]+)\s*(kbit|mbit|gbit)\s*$", re.I)
_TIME_RE = re.compile(r"^\s*([0-9.]+)\s*(us|ms|s)\s*$", re.I)


def parse_rate_mbit(text: str, what: str = "rate") -> float:
    """``"2mbit"``, ``"500kbit"``, ``"1gbit"`` -> Mbit/s (> 0); UsageError naming ``what`` otherwise."""
    m = _RATE_RE.match(text)
    if m is None or float(m.group(1)) <= 0:
        raise UsageError(f"{what} {text!r}: expected a positive RATE(kbit|mbit|gbit), e.g. 2mbit")
    return float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]


def parse_time_ms(text: str, what: str = "time") -> float:
    """``"40ms"``, ``"1s"``, ``"500us"`` -> ms (>= 0); UsageError naming ``what`` otherwise."""
    m = _TIME_RE.match(text)
    if m is None:
        raise UsageError(f"{what} {text!r}: expected TIME(us|ms|s), e.g. 40ms")
    return float(m.group(1)) * _TIME_UNITS[m.group(2).lower()]


def parse_links(text: str) -> list[Link]:
    """``"wifi=50mbit/5ms,3g=1mbit/100ms"`` -> Links; raises ValueError naming the bad entry."""
    links = []
    for part in text.split(","):
        m = _LINK_RE.match(part)
        if m is None:
            raise UsageError(
                f"bad link {part.strip()!r}: expected NAME=RATE(kbit|mbit|gbit)/RTT(us|ms|s), e.g. lte=10mbit/40ms"
            )
        name, rate, rate_unit, rtt, rtt_unit = m.groups()
        mbit = float(rate) * _RATE_UNITS[rate_unit.lower()]
        if mbit <= 0:
            raise UsageError(f"bad link {part.strip()!r}: the rate must be positive")
        links.append(Link(name, mbit, float(rtt) * _TIME_UNITS[rtt_unit.lower()]))
    if len({link.name for link in links}) != len(links):
        raise UsageError(f"link names must be unique: {text!r}")
    return links


def transfer_ms(nbytes: float, mbit: float) -> float:
    """Serialization time of ``nbytes`` at ``mbit`` Mbit/s, in ms (1 Mbit/s = 1000 bits per ms)."""
    return nbytes * 8 / (mbit * 1e3)


def link_latency_ms(
    edge_ms: float, request_bytes: float, response_bytes: float, server_ms: float, loopback_ms: float, link: Link
) -> float:
    """End-to-end latency of one frame over ``link``: the module docstring's formula."""
    return edge_ms + transfer_ms(request_bytes + response_bytes, link.mbit) + link.rtt_ms + loopback_ms + server_ms


def crossovers(curves: dict[str, np.ndarray], mbits: np.ndarray) -> list[dict[str, Any]]:
    """Bandwidths where one curve overtakes another (log-linear interpolation between grid points)."""
    names = list(curves)
    out = []
    for a_i, a in enumerate(names):
        for b in names[a_i + 1 :]:
            d = curves[a] - curves[b]
            for k in np.nonzero(np.sign(d[:-1]) * np.sign(d[1:]) < 0)[0]:
                w = d[k] / (d[k] - d[k + 1])
                mbit = float(np.exp(np.log(mbits[k]) + w * (np.log(mbits[k + 1]) - np.log(mbits[k]))))
                lat = float(curves[a][k] + w * (curves[a][k + 1] - curves[a][k]))
                faster_above = a if d[k + 1] < 0 else b
                out.append({"between": [a, b], "mbit": mbit, "latency_ms": lat, "faster_above": faster_above})
    return out
