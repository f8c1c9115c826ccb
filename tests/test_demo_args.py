"""hnd-demo's edge command line, without a server (test_demo.py runs the demo end to end)."""

from __future__ import annotations

from hnd.demo import build_parser, edge_arguments
from hnd.edge import cli as edge_cli
from hnd.edge.api import EdgeSettings, plan_edge


def _edge_options(demo_argv: list[str]):
    demo = build_parser().parse_args(demo_argv)
    argv = edge_arguments(demo, "127.0.0.1:50051", "photos", "1")
    return plan_edge(EdgeSettings.from_args(edge_cli.build_parser().parse_args(argv))).options


def test_demo_leaves_the_window_and_deadline_to_the_edge():
    # A fixed window of 2 against a CPU tail on a busy 2-core machine queued the second photo behind the
    # first past its deadline: the README's main job ended with DEADLINE_EXCEEDED and exit 1.
    options = _edge_options([])
    assert options.auto_window and options.auto_deadline


def test_demo_max_inflight_fixes_the_window():
    options = _edge_options(["--max-inflight", "3", "--stream"])
    assert not options.auto_window and options.max_inflight == 3 and options.stream
