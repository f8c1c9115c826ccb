"""Honest frame statuses on the edge: local read/decode failures with their reasons, non-regular files
skipped, a dead server given up on after --give-up-after, answers received before SIGTERM written,
and connection errors that name the likely TLS / network cause."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from runtime_support import edge_argv, frames, make_certs, serving, slow_tail, write_frames

from hnd.common.checkpoint import fingerprint
from hnd.common.split import split_model
from hnd.edge import cli as edge_cli
from hnd.edge import interrupts
from hnd.edge.api import make_mode
from hnd.edge.capture import DECODE_ERROR, READ_ERROR, ArrayFrames, ImageFiles, read_image
from hnd.edge.client import ClientSettings, EdgeError, SplitClient
from hnd.edge.diagnose import connection_hint
from hnd.edge.pipeline import INTERRUPTED, EdgeOptions, EdgeRunner, ServerGone
from hnd.server.app import TlsFiles

CONFIG = "test/faster_rcnn-b3ch"


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("faster_rcnn")


def _jpeg(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def test_local_failures_get_local_statuses_and_the_real_reason(tmp_path):
    img = frames(1, sizes=((96, 128),))[0]
    data = _jpeg(img)
    (tmp_path / "good.jpg").write_bytes(data)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    got = {p.name: read_image(str(p))[1:] for p in sorted(tmp_path.iterdir())}
    assert got["good.jpg"] == (None, None)
    assert got["cut.jpg"][0] == DECODE_ERROR and "truncated JPEG" in got["cut.jpg"][1]
    assert got["empty.png"][0] == DECODE_ERROR and "empty file" in got["empty.png"][1]
    assert got["text.jpg"][0] == DECODE_ERROR and "text.jpg: cannot decode" in got["text.jpg"][1]
    assert got["gone.jpg"][0] == READ_ERROR and "No such file or directory" in got["gone.jpg"][1]
    rgb, _, _ = read_image(str(tmp_path / "good.jpg"))
    expected = cv2.cvtColor(cv2.imread(str(tmp_path / "good.jpg")), cv2.COLOR_BGR2RGB)
    assert np.array_equal(rgb, expected)  # the same pixels as cv2.imread gives a whole file


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_is_named(tmp_path):
    path = tmp_path / "locked.jpg"
    path.write_bytes(_jpeg(frames(1)[0]))
    path.chmod(0)
    status, error = read_image(str(path))[1:]
    assert status == READ_ERROR and "Permission denied" in error


def test_non_regular_files_are_skipped_with_a_message_and_never_block(tmp_path, caplog):
    (tmp_path / "a.jpg").write_bytes(_jpeg(frames(1)[0]))
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "folder.png").mkdir()
    with caplog.at_level("WARNING", logger="hnd.edge"):
        source = ImageFiles(str(tmp_path))
    assert [Path(p).name for p in source.paths] == ["a.jpg"]
    assert sorted(Path(p).name for p in source.skipped) == ["folder.png", "pipe.jpg"]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "pipe.jpg: skipped: a FIFO" in messages and "folder.png: skipped: a directory" in messages
    # a FIFO swapped in after the listing is refused, not read (opening it blocking would hang)
    start = time.monotonic()
    status, error = read_image(str(tmp_path / "pipe.jpg"))[1:]
    assert status == READ_ERROR and "a FIFO, not a regular file" in error and time.monotonic() - start < 2


def test_cli_records_a_truncated_jpeg_as_failed(model, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    data = _jpeg(frames(1, sizes=((96, 128),))[0])
    (folder / "0.jpg").write_bytes(data)
    (folder / "1.jpg").write_bytes(data[:-200])
    out = tmp_path / "r.jsonl"
    with serving(model) as server:
        code = edge_cli.main(edge_argv(folder, "--output", str(out), "--no-progress", server=server, config=CONFIG))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 1
    assert [r["status"] for r in records] == ["OK", DECODE_ERROR]
    assert "truncated JPEG" in records[1]["error"] and "detections" not in records[1]


def _runner(model, client, **options):
    head, _ = split_model(model)
    options = EdgeOptions(**options)
    return EdgeRunner(options, make_mode(options, head, fingerprint(model)), client)


def test_a_dead_server_ends_the_run_after_give_up_after(model):
    """The server stops for good after frame 2: the run ends within give_up_after_s, every frame recorded."""
    records = []
    with serving(model) as server:
        client = SplitClient(ClientSettings(f"127.0.0.1:{server.port}", timeout_s=10))

        class DyingSource(ArrayFrames):
            def __iter__(self):
                for frame in super().__iter__():
                    if frame.index == 2:
                        server.stop(grace_s=0.5)
                    yield frame

        runner = _runner(model, client, max_inflight=1, give_up_after_s=2.0)
        start = time.monotonic()
        with pytest.raises(ServerGone, match=r"unreachable for 2 s \(--give-up-after\): giving up") as info:
            runner.run(DyingSource(frames(40)), lambda r, f: records.append(r.to_dict()))
        elapsed = time.monotonic() - start
        client.close()
    assert elapsed < 20, elapsed  # not 30 s per frame, forever
    summary = info.value.summary
    assert summary.frames == len(records) >= 3 and len(records) < 40
    assert [r["frame"] for r in records] == list(range(len(records)))
    assert [r["status"] for r in records[:2]] == ["OK", "OK"]
    assert {r["status"] for r in records[2:]} == {"UNAVAILABLE"}


def test_cli_exits_with_its_own_code_and_one_line_when_it_gives_up(monkeypatch, capsys):
    from hnd.edge.summary import Summary

    def gone(args):
        raise ServerGone("server 10.0.0.1:50051 unreachable for 30 s (--give-up-after): giving up", Summary())

    monkeypatch.setattr(edge_cli, "run_edge", gone)
    code = edge_cli.main(["--images", "x", "--config", CONFIG, "--give-up-after", "30"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == edge_cli.EXIT_SERVER_GONE and err == [
        "hnd-edge: error: server 10.0.0.1:50051 unreachable for 30 s (--give-up-after): giving up"
    ]


def test_answers_received_before_sigterm_are_written(model, tmp_path, monkeypatch):
    """SIGTERM (raised as KeyboardInterrupt by the CLI's handler) while K frames are in flight."""
    with serving(model) as server:
        sample = server.service.metrics.registry.get_sample_value

        class InterruptedSource(ArrayFrames):
            def __iter__(self):
                yield from super().__iter__()
                deadline = time.monotonic() + 60  # every request answered on the server, none read yet
                while (sample("hnd_requests_total", {"method": "Infer", "code": "OK"}) or 0) < 4:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                time.sleep(0.3)
                raise KeyboardInterrupt

        monkeypatch.setattr(edge_cli, "open_source", lambda *a, **k: InterruptedSource(frames(4)))
        out = tmp_path / "r.jsonl"
        code = edge_cli.main(
            edge_argv("x", "--max-inflight", "5", "--output", str(out), "--no-progress", server=server, config=CONFIG)
        )
    assert code == 130
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["frame"] for r in records] == [0, 1, 2, 3]
    assert [r["status"] for r in records] == ["OK"] * 4  # the server answered 4: the JSONL holds 4


def test_sigterm_prints_the_summary_writes_its_json_quietly_and_exits_143(model, tmp_path, capsys, caplog):
    """SIGTERM (docker stop, systemd) mid-run with frames in flight, as a process gets it: the summary on
    stdout and in --summary-json, one line on stderr, no gRPC callback errors, exit 128 + 15."""
    images = write_frames(tmp_path / "frames", 12)
    summary_json = tmp_path / "summary.json"
    with serving(model) as server:
        sample = server.service.metrics.registry.get_sample_value

        def terminate_after_two_answers():
            deadline = time.monotonic() + 120
            while (sample("hnd_requests_total", {"method": "Infer", "code": "OK"}) or 0) < 2:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)

        old_handler = signal.getsignal(signal.SIGTERM)
        threading.Thread(target=terminate_after_two_answers, daemon=True).start()
        try:
            with slow_tail(server, 0.4):  # the next frames stay in flight when the signal comes
                code = edge_cli.main(
                    edge_argv(
                        images,
                        "--max-inflight",
                        "4",
                        "--summary-json",
                        str(summary_json),
                        "--no-progress",
                        server=server,
                    )
                )
        finally:
            signal.signal(signal.SIGTERM, old_handler)
        time.sleep(0.5)  # late gRPC callbacks of the cancelled calls would log now
    out, err = capsys.readouterr()
    assert code == 143  # 128 + SIGTERM, as a shell reports a run the signal ended
    summary = json.loads(summary_json.read_text())
    assert summary["interrupted"] == "SIGTERM" and summary["answered"] >= 1
    assert summary["statuses"].get("CANCELLED", 0) >= 1 and summary["frames"] < 12
    assert summary["frames"] == summary["answered"] + summary["failed"]
    assert f"frames {summary['frames']}  answered {summary['answered']}" in out and "interrupted by SIGTERM" in out
    assert err.strip().splitlines()[-1] == "hnd-edge: interrupted (SIGTERM); records and summary so far were written"
    noise = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] + [err]
    assert not any("InvalidStateError" in m or "Exception in callback" in m for m in noise), noise


def test_a_signal_that_lands_inside_grpcs_call_creation_ends_the_run_and_the_channel_closes(model, tmp_path):
    """A signal handler runs wherever the main thread is: one that came while grpc created a call ran right
    after it, before grpc counted the call; raising there left a call no thread completes and the channel's
    close waited for it forever (hnd-edge hung on SIGTERM). The handler now runs at that very point (a trace
    hook puts it there) and the run still ends 143, its channel closed, in bounded time."""
    import grpc._channel

    images = write_frames(tmp_path / "frames", 8)
    source = Path(grpc._channel.__file__)
    lines = source.read_text().splitlines()
    create = next(i for i, line in enumerate(lines) if "def _channel_managed_call_management" in line)
    counted = next(i for i, line in enumerate(lines[create:], create + 1) if "state.managed_calls == 0:" in line)
    calls = {"n": 0}

    def at_line(frame, event, arg):
        if event == "line" and frame.f_lineno == counted:
            calls["n"] += 1
            if calls["n"] == 3:  # two calls in flight: grpc's call thread is running
                interrupts.on_signal(signal.SIGTERM, frame)
        return at_line

    def trace(frame, event, arg):
        return at_line if frame.f_code.co_name == "create" and frame.f_code.co_filename == str(source) else None

    got = {}

    def edge():  # a thread, so that a hang fails the test instead of holding it (the handler is called directly)
        sys.settrace(trace)
        try:
            got["code"] = edge_cli.main(edge_argv(images, "--max-inflight", "4", "--no-progress", server=server))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            got["error"] = exc
        finally:
            sys.settrace(None)

    with serving(model) as server, slow_tail(server, 0.3):  # answers stay in flight
        thread = threading.Thread(target=edge, daemon=True)
        thread.start()
        thread.join(timeout=180)
    assert not thread.is_alive(), "hnd-edge hung after the signal"
    assert calls["n"] >= 3 and got == {"code": 143}


def test_a_slow_server_gets_a_window_and_deadline_it_can_serve(model):
    """A server whose tail takes over a second a frame (a CPU server): a fixed window of 4 queues frames past
    the deadline; the window the edge sizes from the answers gets every frame answered."""
    got = {}
    with serving(model) as server, slow_tail(server, 1.2):
        for auto in (False, True):
            client = SplitClient(ClientSettings(f"127.0.0.1:{server.port}", timeout_s=4.0))
            runner = _runner(model, client, max_inflight=4, auto_window=auto, auto_deadline=auto)
            runner.fit_server(client.model_info())
            got[auto] = runner.run(ArrayFrames(frames(5)))
            client.close()
    assert got[False].failed_by_status().get("DEADLINE_EXCEEDED", 0) >= 1  # the 4th frame waits >= 4.8 s
    assert got[True].answered == 5 and got[True].failed == 0, got[True].statuses
    assert got[True].window.startswith("window 2 (auto, up to 4), deadline ")
    assert "DEADLINE_EXCEEDED" in got[False].format() and "--timeout S waits longer" in got[False].format()


def test_a_server_slower_than_the_deadline_and_the_give_up_is_waited_for_not_given_up_on(model, caplog):
    """The README's quickstart on a busy machine: the tail takes longer than the first deadline and longer than
    --give-up-after. The server answers a probe (it is computing, not gone), so the edge goes on with the
    doubled deadline and gets its frames answered; it used to exit "answered nothing ...: giving up"."""
    with serving(model) as server, slow_tail(server, 3.0):
        client = SplitClient(ClientSettings(f"127.0.0.1:{server.port}", timeout_s=1.0))
        runner = _runner(model, client, auto_window=True, auto_deadline=True, give_up_after_s=2.0)
        with caplog.at_level(logging.WARNING, logger="hnd.edge"):
            summary = runner.run(ArrayFrames(frames(4)))
        client.close()
    assert runner.gave_up is None and summary.statuses.get("OK", 0) >= 1, summary.statuses
    assert runner.sizing.deadline_s >= 4.0  # doubled past the tail's 3 s
    assert caplog.text.count("is serving but slower than the") == 1, caplog.text


def test_interrupt_marks_unanswered_frames_cancelled(model):
    with serving(model) as server:
        runner_ref = {}
        client = SplitClient(ClientSettings(f"127.0.0.1:{server.port}"))
        hold = server.service.runner.run_split

        def never(items):
            time.sleep(3)
            return hold(items)

        server.service.runner.run_split = never

        class InterruptedSource(ArrayFrames):
            def __iter__(self):
                yield from super().__iter__()
                raise KeyboardInterrupt

        records = []
        runner_ref["r"] = _runner(model, client, max_inflight=5)
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            runner_ref["r"].run(InterruptedSource(frames(2)), lambda r, f: records.append(r.to_dict()))
        assert time.monotonic() - start < 2.5  # nothing waited for the slow answers
        server.service.runner.run_split = hold
        client.close()
    assert [(r["frame"], r["status"]) for r in records] == [(0, INTERRUPTED), (1, INTERRUPTED)]
    assert all("interrupted before the server answered" in r["error"] for r in records)


@pytest.mark.parametrize(
    "details,tls,hint",
    [
        (
            "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed",
            False,
            "expects TLS",
        ),
        (
            "... Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: ... CERTIFICATE_VERIFY_FAILED: unable to get "
            "local issuer certificate: OK",
            True,
            "not signed by the CA given in --tls-ca",
        ),
        (
            "... SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER",
            True,
            "speaks plain text",
        ),
        ("... Socket closed", True, "requires a client certificate"),
        (
            "... Custom verification check failed with error: UNAUTHENTICATED: Hostname Verification Check failed.",
            True,
            "does not name the host",
        ),
        ("... Failed to connect to remote host: Connection refused", False, "nothing listens there"),
    ],
)
def test_connection_hints(details, tls, hint):
    assert hint in connection_hint(details, tls)


def test_tls_mistakes_name_their_likely_cause(model, tmp_path):
    certs = make_certs(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    wrong_ca = make_certs(other)["ca"]

    def first_call(port, **kw) -> str:
        client = SplitClient(ClientSettings(f"127.0.0.1:{port}", connect_timeout_s=1.5, **kw))
        try:
            with pytest.raises(EdgeError) as info:
                client.model_info()
        finally:
            client.close()
        return str(info.value)

    with serving(model, tls=TlsFiles(certs["server_cert"], certs["server_key"])) as server:
        assert "probably expects TLS (give --tls-ca)" in first_call(server.port)
        assert "not signed by the CA given in --tls-ca" in first_call(server.port, tls_ca=wrong_ca)
    with serving(model) as server:
        assert "speaks plain text" in first_call(server.port, tls_ca=certs["ca"])
