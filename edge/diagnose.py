"""Connection failures in words: what a failed first call most likely means (TLS, CA, plain text, port).

With ``wait_for_ready`` a call to an unreachable server ends as DEADLINE_EXCEEDED and hides why; one
more call without it gets gRPC's transport error ("Tls handshake failed ... CERTIFICATE_VERIFY_FAILED",
"Socket closed", "Connection refused"), which :func:`connection_hint` turns into the likely cause.
"""

from __future__ import annotations

import grpc

# (substring of gRPC's transport error, TLS client?, hint); the first match wins. None: either side.
_HINTS: tuple[tuple[str, bool | None, str], ...] = (
    (
        "CERTIFICATE_VERIFY_FAILED",
        None,
        "TLS: the server's certificate is not signed by the CA given in --tls-ca (wrong CA?)",
    ),
    (
        "Hostname Verification",
        None,
        "TLS: the server's certificate does not name the host in --server (check its subjectAltName)",
    ),
    (
        "WRONG_VERSION_NUMBER",
        True,
        "TLS handshake failed: the server speaks plain text (drop --tls-ca, or start it with --tls-cert/--tls-key)",
    ),
    ("Socket closed", False, "the server closed the connection: it probably expects TLS (give --tls-ca)"),
    (
        "Socket closed",
        True,
        "the server closed the TLS handshake: it probably requires a client certificate (--tls-cert/--tls-key)",
    ),
    ("handshake", None, "TLS handshake failed"),
    ("Connection refused", None, "nothing listens there (server down, or wrong host or port)"),
    ("DNS resolution failed", None, "cannot resolve the host name"),
)


def connection_hint(details: str, tls: bool) -> str | None:
    """The likely cause of a transport error's ``details`` for a TLS (or plain-text) client, or None."""
    for needle, side, hint in _HINTS:
        if needle.lower() in details.lower() and (side is None or side == tls):
            return hint
    return None


def describe_failure(exc: grpc.RpcError, probe, target: str, tls: bool) -> str:
    """One line for a failed first call: code, gRPC's details and the likely cause.

    probe: a callable making the same call without wait_for_ready (a few seconds at most), used when
    the failure is a bare DEADLINE_EXCEEDED or UNAVAILABLE.
    """
    code, details = exc.code(), exc.details() or ""
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
        try:
            probe()
        except grpc.RpcError as again:
            if again.code() == grpc.StatusCode.UNAVAILABLE:
                code, details = again.code(), again.details() or details
        except Exception:  # noqa: BLE001 - the probe only adds detail
            pass
    hint = connection_hint(details, tls)
    return f"{target}: {code.name}: {details}" + (f" ({hint})" if hint else "")
