"""The shaping proxy (hnd.bench.linkproxy): its token bucket by hand, the schedule file, and a transfer through it
taking the time its rate and delay imply."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from hnd.bench import linkproxy
from hnd.bench.linkproxy import LinkProxy, LinkSettings, TokenBucket, read_schedule, stall_probability


def test_token_bucket_by_hand():
    b = TokenBucket(8000, burst=100)  # 1,000 B/s, 100 B deep
    assert b.reserve(100, now=0.0) == 0.0  # the burst
    assert b.reserve(100, now=0.0) == pytest.approx(0.1)  # 100 B of debt at 1,000 B/s
    assert b.reserve(50, now=0.05) == pytest.approx(0.1)  # 50 B paid back by then, 150 owed
    assert b.reserve(10, now=10.0) == 0.0  # refilled, capped at the burst
    assert b.tokens == pytest.approx(90)
    b.set_rate(80_000, now=10.0)  # 10,000 B/s from now on
    assert b.reserve(1090, now=10.0) == pytest.approx(0.1)
    assert TokenBucket(None).reserve(10**9, now=0.0) == 0.0  # unlimited


def test_default_burst_is_a_millisecond_of_the_rate():
    assert LinkSettings(rate_mbit=50.0).burst == 6250 and LinkSettings(rate_mbit=0.01).burst == 100
    assert LinkSettings(rate_mbit=0.01, burst_bytes=1500).burst == 1500


def test_loss_is_a_stall_per_chunk_with_a_lost_segment():
    assert stall_probability(1448, 0.01) == pytest.approx(0.01)
    assert stall_probability(8192, 0.01) == pytest.approx(1 - 0.99**6)  # 6 segments
    assert stall_probability(8192, 0.0) == 0.0


def test_schedule_rows_and_errors(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("# a comment\ntime_s,rate,delay\n0,50mbit,20ms\n2.5,1mbit\n5,10mbit,40ms\n")
    rows = read_schedule(path, LinkSettings(delay_ms=5.0, jitter_ms=1.0))
    assert [(t, s.rate_mbit, s.delay_ms, s.jitter_ms) for t, s in rows] == [
        (0.0, 50.0, 20.0, 1.0),
        (2.5, 1.0, 5.0, 1.0),
        (5.0, 10.0, 40.0, 1.0),
    ]
    for text, problem in (("0,fast\n", "rate 'fast'"), ("1,1mbit\n0,2mbit\n", "ascending"), ("", "no rows")):
        path.write_text(text)
        with pytest.raises(linkproxy.UsageError, match=problem):
            read_schedule(path, LinkSettings())


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert linkproxy.main(["--listen", "127.0.0.1:0", "--to", "nowhere", "--rate", "2mbit"]) == 2
    assert linkproxy.main(["--listen", "127.0.0.1:0", "--to", "127.0.0.1:1", "--rate", "fast"]) == 2
    assert linkproxy.main(["--listen", "x:0", "--to", "127.0.0.1:1", "--schedule", str(tmp_path / "none.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith(f"{linkproxy.PROG}: error:") for line in err), err


def _ack_server(nbytes: int) -> tuple[socket.socket, threading.Thread]:
    """A TCP server on loopback that answers one byte once it has read ``nbytes``, one connection."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            got = 0
            while got < nbytes and (data := conn.recv(65536)):
                got += len(data)
            conn.sendall(b"k")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


def _round_trip(port: int, nbytes: int) -> float:
    """Seconds to send ``nbytes`` through the proxy and get the server's one-byte answer."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.perf_counter()
        s.sendall(b"x" * nbytes)
        assert s.recv(1) == b"k", "the proxy closed the connection"
        return time.perf_counter() - start


def test_a_transfer_takes_the_time_the_rate_and_delay_imply():
    srv, t = _ack_server(40_000)
    # 40,000 B at 2 Mbit/s is 160 ms, plus 20 ms of delay each way: 200 ms (the answer's byte: 4 us)
    with LinkProxy(srv.getsockname(), LinkSettings(rate_mbit=2.0, delay_ms=20.0)) as proxy:
        elapsed = _round_trip(proxy.port, 40_000)
        assert proxy.bytes == {"up": 40_000, "down": 1}
    srv.close()
    t.join(5)
    assert 0.2 - 0.005 <= elapsed < 3 * 0.2, elapsed


def test_set_link_changes_the_rate_while_it_runs():
    srv, t = _ack_server(400_000)
    with LinkProxy(srv.getsockname(), LinkSettings(rate_mbit=1.0)) as proxy:
        proxy.set_link(LinkSettings(rate_mbit=50.0))
        elapsed = _round_trip(proxy.port, 400_000)  # 64 ms at 50 Mbit/s; 1 Mbit/s would take 3.2 s
    srv.close()
    t.join(5)
    assert elapsed < 1.6, elapsed  # half the old rate's time: slack for a loaded machine, still telling them apart
