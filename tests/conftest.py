"""Shared fixtures: the tiny seeded models of configs/test/ and a few small images."""

from __future__ import annotations

import os

# Busy-waiting OpenMP workers burn the CPU that the other processes of a test (servers, edges, other
# workers) need: on a loaded 2-core machine passive waiting makes a forward several times faster.
# Only takes effect before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _ram_temp_root(path: str = "/dev/shm", min_free: int = 8 * 2**30) -> str | None:
    """``path`` when it is a writable folder with ``min_free`` bytes free, else None."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return path if os.access(path, os.W_OK) and stat.f_bavail * stat.f_frsize >= min_free else None


# The tests write many ~170 MB checkpoints: with pytest's tmp_path folders on a RAM file system the three
# test files that write most ran in 45-48 s instead of 60-72 s on this machine's disk (side by side). Used only where /dev/shm has room (a
# container's 64 MB one is passed over); PYTEST_DEBUG_TEMPROOT (pytest's own setting) or --basetemp given
# by the user win. tmp_path_retention_policy = "failed" (pyproject.toml) removes a passing test's tmp_path
# when it ends, so what the suite holds in memory stays bounded; a failing test's folder is kept.
if (_root := _ram_temp_root()) is not None:
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", _root)

import pytest  # noqa: E402
import torch  # noqa: E402

KINDS = ("faster_rcnn", "mask_rcnn", "keypoint_rcnn")

# Test layers (markers registered in pyproject.toml). A test is
#   e2e    when it runs a real server (in process or a subprocess) with an edge, or a CLI end to end;
#   slow   when it trains, runs hnd-bench, or otherwise takes over ~10 s on the project machine, or
#          repeats for another model kind (~1.5-3 s each) a check the fast layer makes for Faster R-CNN;
#   docker when it checks deployment files: containers, compose, Kubernetes manifests, DEPLOY.md.
# `pytest -m "not slow and not e2e and not docker"` is the fast unit layer; `.ci/run` runs everything.
# Marks are given here, in one place: per module, per fixture a test uses, per test, and per
# parametrization of a test (by its id).
MODULE_MARKS = {
    "test_docker.py": ("docker",),
    "test_k8s.py": ("docker",),
    "test_grafana.py": ("docker",),  # deploy/grafana
    "test_edge_streams.py": ("e2e",),
    "test_demo.py": ("e2e", "slow"),
    "test_edge.py": ("e2e",),
    "test_edge_onnx.py": ("e2e",),  # a live server and a torch-free hnd-edge subprocess
    "test_runtime.py": ("e2e",),
    "test_server_errors.py": ("e2e",),
    "test_streams.py": ("e2e",),
    "test_train.py": ("slow",),
    "test_rate.py": ("e2e", "slow"),
    "test_eval.py": ("slow",),
    "test_balancing.py": ("e2e",),
    "test_scaleout.py": ("e2e", "slow"),
    "test_scaleout_server.py": ("e2e",),
    "test_bench_speed.py": ("slow",),
    "test_edge_statuses.py": ("e2e",),
    "test_entropic_runtime.py": ("e2e",),
    "test_entropic_onnx.py": ("e2e",),
    "test_entropic_train.py": ("slow",),
    "test_hostile.py": ("e2e",),
    "test_memory_kept.py": ("e2e",),  # an in-process server answering 1080p video frames on loopback
    "test_longrun.py": ("e2e", "slow"),
    "test_protocol.py": ("e2e",),
    "test_view.py": ("e2e", "slow"),
    "test_api.py": ("e2e",),  # hnd.serve with hnd.connect / hnd.aio, and a torch-free API process
    "test_adapt_e2e.py": ("e2e",),  # a live server (behind the shaping proxy) and hnd-edge --adapt
    "test_kserve.py": ("e2e",),  # hnd.serve answering KServe v2 and hnd.v1 side by side
    "test_examples.py": ("e2e",),  # examples/ against hnd.serve
    "test_tracing.py": ("e2e",),  # servers and edges in fresh interpreters with the in-memory span exporter
    "test_tritonclient.py": ("e2e",),  # hnd-server with tritonclient and perf_analyzer from their own venv
    "test_adapt_trace.py": ("e2e",),  # hnd-bench --adapt-trace: a live server behind the shaping proxy
}
FIXTURE_MARKS = {
    "quick": ("e2e", "slow"),  # test_bench: one hnd-bench --quick run
    "quick_filter": ("e2e", "slow"),
    "trained": ("e2e", "slow"),  # test_filter: hnd-train of the neural filter, then hnd-eval / hnd-edge
    "edge_venv": ("e2e",),  # test_install: console scripts of the fresh edge venv (.ci/make-edge-venv)
}
TEST_MARKS = {
    # rate steps through the proxy while 16 frames go through the adaptive edge (~40 s on a loaded machine)
    "test_adapt_e2e.py::test_the_point_follows_rate_steps_through_the_proxy": ("slow",),
    "test_adapt_trace.py::test_adapt_trace_writes_the_table_the_runs_and_the_plot": ("slow",),  # hnd-bench (~30 s)
    "test_linkproxy.py::test_a_transfer_takes_the_time_the_rate_and_delay_imply": ("e2e",),  # loopback TCP
    "test_linkproxy.py::test_set_link_changes_the_rate_while_it_runs": ("e2e",),
    "test_bench.py::test_bench_filter_options_are_checked": ("e2e",),
    "test_split.py::test_split_is_bit_exact": ("slow",),  # every kind, batches of 1 and 3 (~1 min)
    "test_edge_modes.py::test_the_edge_imports_no_server_module": ("slow",),  # a fresh interpreter
    "test_filter.py::test_filter_errors_are_one_clear_line": ("slow",),
    "test_filter.py::test_head_holds_the_filter_export_and_fingerprint": ("slow",),
    "test_filter.py::test_edge_drops_frames_below_threshold_with_empty_results_shaped_as_the_servers": ("e2e",),
    "test_onnx_head.py::test_hnd_eval_with_onnx_head": ("e2e",),
    "test_tritonclient.py::test_perf_analyzer_load_tests_the_offload_model": (
        "slow",
    ),  # measurement windows  # hnd-export-head, then hnd-eval, end to end
    # Tests run for every kind check Faster R-CNN in the fast layer and the other kinds in the slow one
    # (each ~1.5-3 s: a build, a checkpoint or an export of a ResNet-50 R-CNN).
    "test_onnx_head.py::test_fp32_head_matches_torch[mask_rcnn]": ("slow",),
    "test_accel.py::test_dense_split_of_the_tail_is_bit_exact[keypoint_rcnn]": ("slow",),
    "test_entropic.py::test_split_and_codec_round_trip_are_bit_exact[mask_rcnn]": ("slow",),
    "test_entropic.py::test_split_and_codec_round_trip_are_bit_exact[keypoint_rcnn]": ("slow",),
    # The role matrix checks the torch-free edge install in the fast layer, the roles with torch in the slow one.
    "test_install.py::test_role_install_answers_every_console_script[server]": ("slow",),
    "test_install.py::test_role_install_answers_every_console_script[train]": ("slow",),
    "test_install.py::test_role_install_answers_every_console_script[bench]": ("slow",),
    "test_install.py::test_role_install_answers_every_console_script[all]": ("slow",),
    # CompressAI's default prior filters; the fast layer loads the non-default (3, 3, 3) ones.
    "test_entropic.py::test_prior_filters_are_read_off_the_file[filters1]": ("slow",),
}


# The test files that take longest (30-95 s each serially on the 2-core project machine), longest first.
LONGEST_FILES = (
    "test_scaleout.py",
    "test_bench_speed.py",
    "test_edge_statuses.py",
    "test_filter.py",
    "test_edge_streams.py",
    "test_streams.py",
    "test_train.py",
    "test_entropic.py",
)


def pytest_xdist_auto_num_workers(config) -> int:
    """How many worker processes ``-n auto`` (pyproject.toml's addopts) starts: one per core this process may
    use, at most 4 (each holds torch and its own servers); none on one core, or for a run that names a
    single test file (its tests stay on one worker under --dist loadfile, so a worker would only add an
    interpreter start)."""
    files = {arg.split("::")[0] for arg in config.args}
    if len(files) == 1 and not os.path.isdir(next(iter(files))):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 4) if cores > 1 else 0


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        names = [
            *MODULE_MARKS.get(module, ()),
            *TEST_MARKS.get(f"{module}::{item.originalname}", ()),  # every parametrization
            *TEST_MARKS.get(f"{module}::{item.name}", ()),  # one of them, by its id
        ]
        for fixture in getattr(item, "fixturenames", ()):
            names += FIXTURE_MARKS.get(fixture, ())
        for name in dict.fromkeys(names):
            item.add_marker(name)
    # Under xdist's --dist loadfile a file runs whole on one worker, so the longest files go first: started
    # last, one of them would run alone on one core at the end of the run while the other cores idle.
    items.sort(
        key=lambda item: LONGEST_FILES.index(item.path.name) if item.path.name in LONGEST_FILES else len(LONGEST_FILES)
    )


# The RPN proposal counts the configs/test/ models use (torchvision: 1000), for tests that build
# models from other configs.
FAST_PARAMS = {"rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100}


@pytest.fixture(scope="session")
def test_model():
    """``test_model(config)``: the model of a bundled config such as ``test/faster_rcnn-b3ch`` (seeded
    random weights, eval; an Entropic Student's tables updated).

    Built once per session and shared: treat it as read-only (``copy.deepcopy`` it to change it).
    """
    from hnd.common.build import build_model_from_config
    from hnd.common.config import load_config

    cache: dict[str, torch.nn.Module] = {}

    def get(config: str) -> torch.nn.Module:
        if config not in cache:
            cfg = load_config(config)
            cache[config] = build_model_from_config(cfg.model, cfg.path)
        return cache[config]

    return get


@pytest.fixture(scope="session")
def tiny_model(test_model):
    """``tiny_model(kind)``: the HND student of ``configs/test/{kind}-b3ch.yaml`` (shared: read-only)."""
    return lambda kind: test_model(f"test/{kind}-b3ch")


@pytest.fixture(scope="session")
def entropic_model(test_model):
    """``entropic_model(kind)``: the Entropic Student of ``configs/test/{kind}-entropic-b24ch.yaml`` (shared: read-only)."""
    return lambda kind: test_model(f"test/{kind}-entropic-b24ch")


@pytest.fixture(scope="session")
def images() -> list[torch.Tensor]:
    """Three seeded RGB images in 0..1 of different sizes (3x120x150, 3x200x100, 3x90x90)."""
    g = torch.Generator().manual_seed(1234)
    return [torch.rand(3, h, w, generator=g) for h, w in ((120, 150), (200, 100), (90, 90))]
