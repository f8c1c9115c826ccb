"""``hnd.serve``: a real hnd-server on a port, in this process (notebooks, tests, applications).

    import hnd

    with hnd.serve("test/faster_rcnn-b3ch", random_weights=0) as server:   # a free port on 127.0.0.1
        with hnd.connect(server.target, config="test/faster_rcnn-b3ch", random_weights=0) as detector:
            det = detector.detect(frame)

The options are hnd-server's flags as keywords (``--max-batch 4`` is ``max_batch=4``), read by the same
code as ``hnd-server`` (:func:`hnd.server.cli.load_server`) and served by the same transport
(:class:`hnd.server.app.BackgroundServer`: gRPC with health, reflection, metrics, drain), on its own
event loop thread. Unlike hnd-server, ``port`` defaults to 0 (a free port).
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from hnd.common.errors import UsageError
from hnd.server.app import BackgroundServer
from hnd.server.cli import build_parser, load_server
from hnd.server.service import SplitInferenceService

__all__ = ["Server", "serve", "server_args"]


def server_args(config: str, **options: Any) -> argparse.Namespace:
    """hnd-server's parsed flags for ``config`` and ``options`` (flag names with ``_``), parsed by hnd-server's
    own parser (its types, choices and checks); an unknown option or a bad value is a UsageError."""
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    unknown = sorted(set(options) - set(actions))
    if unknown:
        raise UsageError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"(hnd.serve takes hnd-server's options: {', '.join(sorted(actions))})"
        )
    argv = ["--config", config]
    for name, value in options.items():
        flag = actions[name].option_strings[-1]
        if isinstance(actions[name], argparse._StoreTrueAction):
            argv += [flag] if value else []
        elif value is not None:
            argv += [flag, str(value)]

    def refuse(message: str) -> NoReturn:
        raise UsageError(f"hnd.serve: {message}")

    parser.error = refuse  # type: ignore[method-assign]  # a UsageError, not SystemExit
    return parser.parse_args(argv)


class Server:
    """A running hnd-server in this process: ``target`` ("127.0.0.1:PORT") is what ``hnd.connect`` takes.

    Stops (graceful drain: health NOT_SERVING, in-flight calls finish) on ``stop()`` or leaving ``with``.
    """

    def __init__(self, background: BackgroundServer) -> None:
        self._background = background

    @property
    def port(self) -> int:
        return self._background.port

    @property
    def target(self) -> str:
        host = self._background.settings.host
        return f"{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{self.port}"

    @property
    def service(self) -> SplitInferenceService:
        """The hnd.v1 service (its ``metrics.registry`` holds the server's Prometheus metrics)."""
        return self._background.service

    def stop(self, grace_s: float = 1.0) -> None:
        self._background.stop(grace_s)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve(config: str, port: int = 0, **options: Any) -> Server:
    """Start hnd-server for ``config`` (a YAML file or a bundled name such as ``hnd/faster_rcnn-b3ch``) on
    127.0.0.1:``port`` (0: a free one) and return once it is SERVING (warm-up done).

    options: hnd-server's flags as keywords, e.g. ``checkpoint="student.pt"`` or ``random_weights=0``,
    ``device="cpu"``, ``host="0.0.0.0"``, ``max_batch=4``, ``metrics_port=9100``, ``token_file=...``.
    Raises ConfigError / UsageError (HndError) for bad options, OSError when the port cannot be bound.
    """
    runner, settings = load_server(server_args(config, port=port, **options))
    background = BackgroundServer(runner, settings)
    try:
        background.__enter__()
    except BaseException:
        background.stop()
        raise
    return Server(background)
