"""Servers on this machine, for hnd-demo, hnd-bench and the tests: one place for how they start and stop.

* ``server_process``: a real ``hnd-server`` subprocess on 127.0.0.1 (as on a GPU host), waited for until
  its health check says SERVING, stopped with SIGTERM (graceful drain). Its pieces
  (``server_command``, ``launch_server_process``, ``wait_serving``, ``stop_server_process``) also drive
  replicas that are killed, frozen and restarted on their ports (``hnd.bench.scaleout.Replica``).
* ``background_server``: a ``BackgroundServer`` in this process on a free port around a model (CPU).
* ``answered_requests`` / ``scrape_answered_requests``: the server's own count of answered ``Infer``
  calls (``hnd_requests_total``), from its registry or its Prometheus endpoint; ``scrape_requests``: all
  of them by (method, code).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from hnd.common.errors import HndError
from hnd.server.app import BackgroundServer, ServerSettings
from hnd.server.healthcheck import check
from hnd.server.service import BatchingOptions, ModelRunner

LOOPBACK = "127.0.0.1"
REQUESTS_METRIC = "hnd_requests_total"
REQUESTS_LABELS = {"method": "Infer", "code": "OK"}


class ServerStartError(HndError, RuntimeError):
    """A local hnd-server that exited or did not become SERVING in time."""


def free_port() -> int:
    """A TCP port free on the loopback right now (the OS's choice)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (bound and released together, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((LOOPBACK, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def server_command(config: str, port: int, weights: list[str], extra: list[str] | None = None) -> list[str]:
    """The ``hnd-server`` command line (this interpreter's ``python -m hnd.server.cli``) on 127.0.0.1:port.

    ``weights``: hnd-server's weight arguments (``["--checkpoint", P]`` or ``["--random-weights", S]``);
    ``extra``: further hnd-server flags.
    """
    return [sys.executable, "-m", "hnd.server.cli", "--config", config, "--port", str(port), *weights, *(extra or [])]


def launch_server_process(
    config: str,
    port: int,
    weights: list[str],
    extra: list[str] | None = None,
    log: Any = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Start ``hnd-server`` and return at once (``wait_serving`` waits for its warm-up).

    ``log``: an open file for its stdout and stderr (None: this process's); ``env``: its environment.
    """
    out = subprocess.STDOUT if log is not None else None
    return subprocess.Popen(server_command(config, port, weights, extra), stdout=log, stderr=out, env=env)


def wait_serving(
    proc: subprocess.Popen, port: int, timeout_s: float = 300.0, name: str = "hnd-server", why: Any = None
) -> None:
    """Wait until the server on 127.0.0.1:port says SERVING; ServerStartError when ``proc`` exits first or
    the time runs out (the message starts with ``name``; ``why()``, when given, adds the end of its log)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"{name} exited with code {proc.returncode}{why() if why else ''}")
        if check(f"{LOOPBACK}:{port}", timeout_s=1.0) == "SERVING":
            return
        time.sleep(0.2)
    raise ServerStartError(f"{name} did not become SERVING within {timeout_s:.0f} s")


def start_server_process(
    config: str, port: int, weights: list[str], extra: list[str] | None = None, timeout_s: float = 300.0
) -> subprocess.Popen:
    """Start ``hnd-server`` on 127.0.0.1:port and wait until its health check says SERVING.

    Arguments as ``server_command``. Raises ServerStartError when it exits or is not SERVING in time.
    """
    proc = launch_server_process(config, port, weights, extra)
    try:
        wait_serving(proc, port, timeout_s)
    except ServerStartError:
        if proc.poll() is None:
            proc.kill()
        raise
    return proc


def stop_server_process(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM (graceful drain), then kill if it lingers past ``timeout_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass(frozen=True)
class ServerProcess:
    """A running hnd-server subprocess: its address and, when started with one, its metrics URL."""

    proc: subprocess.Popen
    port: int
    metrics_port: int | None = None

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def metrics_url(self) -> str | None:
        return None if self.metrics_port is None else f"http://{LOOPBACK}:{self.metrics_port}/metrics"


@contextlib.contextmanager
def server_process(
    config: str, weights: list[str], extra: list[str] | None = None, metrics: bool = False, timeout_s: float = 300.0
) -> Iterator[ServerProcess]:
    """``start_server_process`` on a free port (and a free ``--metrics-port`` with ``metrics``), stopped on exit."""
    port = free_port()
    metrics_port = free_port() if metrics else None
    flags = [*(extra or []), *(["--metrics-port", str(metrics_port)] if metrics_port is not None else [])]
    proc = start_server_process(config, port, weights, flags, timeout_s)
    try:
        yield ServerProcess(proc, port, metrics_port)
    finally:
        stop_server_process(proc)


@contextlib.contextmanager
def background_server(model: torch.nn.Module, device: str = "cpu", **settings: Any) -> Iterator[BackgroundServer]:
    """A ``BackgroundServer`` serving ``model`` on a free loopback port (``ServerSettings(**settings)``).

    ``batching`` defaults to ``BatchingOptions(max_delay_ms=0)``: take what queued meanwhile, never wait.
    """
    settings.setdefault("port", 0)
    settings.setdefault("batching", BatchingOptions(max_delay_ms=0.0))
    with BackgroundServer(ModelRunner(model, torch.device(device)), ServerSettings(**settings)) as server:
        yield server


def answered_requests(registry: CollectorRegistry) -> float:
    """hnd_requests_total{method="Infer",code="OK"} of an in-process server's registry (0 before the first)."""
    return registry.get_sample_value(REQUESTS_METRIC, REQUESTS_LABELS) or 0.0


def scrape_requests(metrics_url: str) -> dict[tuple[str, str], float]:
    """``hnd_requests_total`` by (method, code), read from a server's Prometheus endpoint."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:  # noqa: S310 - loopback
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == REQUESTS_METRIC:
                out[(sample.labels.get("method", ""), sample.labels.get("code", ""))] = float(sample.value)
    return out


def scrape_answered_requests(metrics_url: str) -> float:
    """The same count as ``answered_requests``, read from a server's Prometheus endpoint (0 before the first)."""
    return scrape_requests(metrics_url).get((REQUESTS_LABELS["method"], REQUESTS_LABELS["code"]), 0.0)
