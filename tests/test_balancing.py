"""The edge's side of scale-out, in process: gRPC target syntax, --lb through the service config,
and a replica with other weights that stops the edge with one line naming it."""

from __future__ import annotations

import copy
import json

import grpc
import pytest
import torch
from hnd.common.checkpoint import fingerprint
from hnd.edge import cli
from hnd.edge.client import (
    ClientSettings,
    EdgeError,
    SplitClient,
    WeightsMismatch,
    check_target,
    service_config,
)
from hnd.server.app import TlsFiles
from runtime_support import edge_argv, frames, make_certs, run_edge, serving, write_frames


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("faster_rcnn")


@pytest.fixture(scope="module")
def other_model(model):
    """The same architecture with one weight changed: another fingerprint."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.roi_heads.parameters()).add_(1e-3)
    assert fingerprint(other) != fingerprint(model)
    return other


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1:50051",
        "gpu-host:50051",
        "dns:///hnd-server.hnd.svc.cluster.local:50051",
        "ipv4:127.0.0.1:50051,127.0.0.1:50052",
        "ipv6:[::1]:50051",
        "unix:/run/hnd.sock",
    ],
)
def test_targets_accepted(target):
    assert check_target(target) == target


@pytest.mark.parametrize(
    "target, why",
    [
        ("gpu-host", "HOST:PORT"),
        ("http://gpu-host:50051", "unknown scheme"),
        ("ipv4:", "no address"),
        (":50051", "HOST:PORT"),
    ],
)
def test_targets_refused_with_the_reason(target, why):
    with pytest.raises(EdgeError, match=why):
        check_target(target)


@pytest.mark.parametrize("lb", ["round_robin", "pick_first"])
def test_service_config_uses_grpc_policies(lb):
    config = json.loads(service_config(lb, 3))
    assert config["loadBalancingConfig"] == [{lb: {}}]
    assert config["healthCheckConfig"]["serviceName"] == "hnd.v1.SplitInference"
    retry = config["methodConfig"][0]["retryPolicy"]
    assert retry["maxAttempts"] == 3 and retry["retryableStatusCodes"] == ["UNAVAILABLE"]
    with pytest.raises(EdgeError):
        service_config("least_request_typo")
    with pytest.raises(EdgeError):
        service_config(lb, 9)  # gRPC caps attempts at 5
    assert cli.build_parser().parse_args(["--images", "x", "--lb", lb]).lb == lb


def test_round_robin_spreads_over_an_ipv4_list(model):
    with serving(model, replica="a") as a, serving(model, replica="b") as b:
        client = SplitClient(ClientSettings(f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}", lb="round_robin"))
        try:
            summary, records, _ = run_edge(model, client, frames(6), max_inflight=2)
        finally:
            client.close()
    assert summary.answered == 6
    assert set(summary.replicas) == {"a", "b"} and sum(summary.replicas.values()) == 6
    assert {r["replica"] for r in records} == {"a", "b"}


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_replica_with_other_weights_stops_the_edge_naming_it(model, other_model, stream):
    with serving(model, replica="good") as good, serving(other_model, replica="stale-weights") as bad:
        # Unary calls alternate over both; one stream stays on one replica, so it opens on the stale
        # one alone (checked from the stream's initial metadata, before any answer is used).
        addresses = ([f"127.0.0.1:{good.port}"] if not stream else []) + [f"127.0.0.1:{bad.port}"]
        client = SplitClient(ClientSettings("ipv4:" + ",".join(addresses)))
        client.expected_fingerprint = fingerprint(model)
        try:
            with pytest.raises(WeightsMismatch, match="replica stale-weights .* serves other weights"):
                run_edge(model, client, frames(8), max_inflight=2, stream=stream)
        finally:
            client.close()


def test_offload_edge_checks_weights_from_the_replica_metadata(model, other_model):
    """Offload requests carry no fingerprint, so the server cannot refuse; the edge still stops."""
    with serving(model, replica="good") as good, serving(other_model, replica="stale-weights") as bad:
        client = SplitClient(ClientSettings(f"ipv4:127.0.0.1:{good.port},127.0.0.1:{bad.port}"))
        client.expected_fingerprint = fingerprint(model)
        try:
            with pytest.raises(WeightsMismatch, match="stale-weights"):
                run_edge(model, client, frames(8), mode="offload", max_inflight=1)
        finally:
            client.close()


def test_hnd_edge_cli_prints_one_line_naming_the_replica(model, other_model, tmp_path, capsys):
    images = write_frames(tmp_path / "frames", 6, "{i}.png")
    out = tmp_path / "records.jsonl"
    with serving(model, replica="good") as good, serving(other_model, replica="stale-weights") as bad:
        rc = cli.main(
            edge_argv(
                images,
                *("--lb", "round_robin", "--output", str(out), "--no-progress"),
                server=f"ipv4:127.0.0.1:{good.port},127.0.0.1:{bad.port}",
            )
        )
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2
    assert len(err) == 1 and "stale-weights" in err[0] and "Traceback" not in err[0], err
    if not out.exists():  # the start-up model-info check met the stale replica first: nothing sent
        assert "weights fingerprint mismatch" in err[0]
        return
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records and records[-1]["status"] == "FAILED_PRECONDITION"  # the frame that met it is recorded
    assert all(r["status"] == "OK" for r in records[:-1])


def test_bad_target_and_lb_get_one_line(capsys, tmp_path):
    rc = cli.main(edge_argv(tmp_path, "--no-progress", server="gpu-host"))
    err = capsys.readouterr().err
    assert rc == 2 and "HOST:PORT" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--images", "x", "--lb", "random"])


def test_max_connection_age_lets_calls_finish(model):
    """GOAWAY from connection aging moves calls to a new connection without failing any frame."""
    with serving(model, max_connection_age_s=0.5, max_connection_age_grace_s=10) as server:
        client = SplitClient(ClientSettings(f"127.0.0.1:{server.port}"))
        try:
            summary, _, _ = run_edge(model, client, frames(4), max_inflight=1)
        finally:
            client.close()
    assert summary.answered == 4 and summary.failed == 0


def test_pick_first_moves_to_the_next_address_when_one_is_dead(model):
    """pick_first over [dead, alive]: every frame answered by the live one, none failed."""
    import socket

    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens there
    with serving(model, replica="alive") as alive:
        client = SplitClient(ClientSettings(f"ipv4:127.0.0.1:{dead_port},127.0.0.1:{alive.port}", lb="pick_first"))
        try:
            summary, records, _ = run_edge(model, client, frames(2), max_inflight=1)
        finally:
            client.close()
    assert summary.answered == 2 and {r["replica"] for r in records} == {"alive"}
    assert grpc.StatusCode.UNAVAILABLE.name not in summary.statuses


def test_tls_over_an_ipv4_list_checks_the_given_server_name(model, tmp_path):
    """An ipv4: list has no host name to check the certificate against: --tls-server-name gives it."""
    certs = make_certs(tmp_path)  # server certificate for DNS:localhost, IP:127.0.0.1
    tls = TlsFiles(certs["server_cert"], certs["server_key"])
    with serving(model, tls=tls, replica="a") as a, serving(model, tls=tls, replica="b") as b:
        client = SplitClient(
            ClientSettings(
                f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}", tls_ca=certs["ca"], tls_server_name="localhost"
            )
        )
        try:
            summary, _, _ = run_edge(model, client, frames(4), max_inflight=2)
        finally:
            client.close()
    assert summary.answered == 4 and set(summary.replicas) == {"a", "b"}
