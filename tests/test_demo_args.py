"""hnd-demo's edge command line, without a server (test_demo.py runs the demo end to end)."""

from __future__ import annotations

from hnd.demo import build_parser, edge_arguments
from hnd.edge import cli as edge_cli
from hnd.edge.api import EdgeSettings, plan_edge


def _edge_settings(demo_argv: list[str]) -> EdgeSettings:
    demo = build_parser().parse_args(demo_argv)
    argv = edge_arguments(demo, "127.0.0.1:50051", "photos", "1")
    return EdgeSettings.from_args(edge_cli.build_parser().parse_args(argv))


def _edge_options(demo_argv: list[str]):
    return plan_edge(_edge_settings(demo_argv)).options


def test_demo_sizes_the_window_from_answers_and_waits_for_a_cpu_tail():
    # On a busy 2-core machine (load 10) the README's main job ended with DEADLINE_EXCEEDED and exit 1: a fixed
    # window of 2 queued the second photo behind the first past the config's 30 s deadline (meant for a GPU
    # host), and alone the first photo's tail took over 30 s, after which hnd-edge gave up on the server.
    options = _edge_options([])
    assert options.auto_window
    settings = _edge_settings([])
    assert settings.timeout is not None and settings.timeout >= 300


def test_demo_max_inflight_fixes_the_window():
    options = _edge_options(["--max-inflight", "3", "--stream"])
    assert not options.auto_window and options.max_inflight == 3 and options.stream
