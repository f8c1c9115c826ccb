"""hnd-healthcheck: exit 0 when hnd-server's grpc.health.v1 status is SERVING (container health checks).

hnd-healthcheck --server 127.0.0.1:50051 [--tls-ca ca.pem] [--timeout 3]
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hnd.common.channel import SERVICE_NAME, client_channel
from hnd.common.flags import HelpFormatter


def check(
    target: str,
    tls_ca: str | None = None,
    timeout_s: float = 3.0,
    service: str = SERVICE_NAME,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> str:
    """The serving status name (SERVING, NOT_SERVING, ...) or the gRPC error code name.

    tls_cert / tls_key: a client certificate, for servers that require mutual TLS.
    """
    with client_channel(target, tls_ca, tls_cert, tls_key) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hnd-healthcheck", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    p.add_argument("--server", default="127.0.0.1:50051", help="hnd-server address HOST:PORT")
    p.add_argument("--tls-ca", help="CA certificate (PEM) when the server uses TLS")
    p.add_argument("--tls-cert", help="client certificate (PEM) when the server requires mutual TLS")
    p.add_argument("--tls-key", help="client private key (PEM) for --tls-cert")
    p.add_argument("--timeout", type=float, default=3.0, help="deadline of the check in seconds")
    p.add_argument("--service", default=SERVICE_NAME, help="service name ('' for the whole server)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    status = check(args.server, args.tls_ca, args.timeout, args.service, args.tls_cert, args.tls_key)
    print(f"{args.server}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
