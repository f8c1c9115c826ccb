"""The server the hostile benchmarks attack: ``hnd-server`` of any checkout's interpreter, on loopback.

``python -m hnd.bench.hostile`` measures main against an older checkout the same way (``--server-python`` /
``--server-pythonpath``), so the server is started from that interpreter, not this one
(``hnd.server.local.server_command`` always runs this one), and readiness is its GetModelInfo answering (an
old server's health service may differ).
"""

from __future__ import annotations

import os
import subprocess
import time

import grpc

CONFIG = "test/mask_rcnn-b3ch"


def start_server(
    python: str, port: int, config: str = CONFIG, flags: tuple[str, ...] = (), pythonpath: str | None = None
) -> subprocess.Popen:
    """``python -m hnd.server.cli`` with seeded weights on 127.0.0.1:port, once GetModelInfo answers.

    ``flags``: further hnd-server flags; ``pythonpath``: the checkout to import hnd from (None: ``python``'s own).
    """
    cmd = [
        python,
        "-m",
        "hnd.server.cli",
        "--config",
        config,
        "--random-weights",
        "0",
        "--port",
        str(port),
        "--threads",
        "1",
        "--log-level",
        "ERROR",
        "--drain-seconds",
        "1",
        *flags,
    ]
    env = dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            try:
                ch.unary_unary("/hnd.v1.SplitInference/GetModelInfo")(b"", timeout=2)
                return proc
            except grpc.RpcError:
                time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")
