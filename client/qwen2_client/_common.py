"""What Client and AsyncClient share: credentials, metadata, channel options, deadlines."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Union

import grpc

DEFAULT_TARGET = "localhost:50051"
# Responses with per-token top-n logprobs of long generations outgrow gRPC's 4 MiB default.
DEFAULT_OPTIONS = (
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Our own RetryPolicy retries; gRPC's built-in retries would multiply the attempts.
    ("grpc.enable_retries", 0),
)

PemSource = Union[bytes, str, "os.PathLike[str]", None]


def read_pem(source: PemSource) -> bytes | None:
    """PEM bytes as given, or read from a file path (str / PathLike)."""
    if source is None or isinstance(source, bytes):
        return source
    with open(source, "rb") as f:
        return f.read()


def channel_credentials(tls: bool, root_certificates: PemSource, private_key: PemSource,
                        certificate_chain: PemSource) -> grpc.ChannelCredentials | None:
    """TLS credentials (mutual when a key and chain are given), or None for a plaintext channel.

    Any certificate argument implies TLS; root_certificates=None uses the system's roots."""
    if not (tls or root_certificates is not None or private_key is not None or certificate_chain is not None):
        return None
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("mutual TLS needs both private_key and certificate_chain")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(root_certificates), private_key=read_pem(private_key),
        certificate_chain=read_pem(certificate_chain))


def channel_options(options: Sequence[tuple[str, object]] | None, server_name: str | None) -> list:
    merged = dict(DEFAULT_OPTIONS)
    if server_name:
        merged["grpc.ssl_target_name_override"] = server_name
        merged["grpc.default_authority"] = server_name
    merged.update(dict(options or ()))
    return list(merged.items())


def call_metadata(token: str | None, metadata: Sequence[tuple[str, str]] | None) -> tuple[tuple[str, str], ...]:
    md = [(k.lower(), v) for k, v in (metadata or ())]
    if token:
        md.append(("authorization", f"Bearer {token}"))
    return tuple(md)


class Deadline:
    """An absolute deadline for a call and all its retries (None: no deadline)."""

    def __init__(self, timeout: float | None):
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())
