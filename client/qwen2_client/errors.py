"""Typed exceptions, mapped from gRPC status codes (and google.rpc rich error details)."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


class Qwen2Error(Exception):
    """Base class of every error the SDK raises for a failed call.

    `code` is the grpc.StatusCode (None for errors raised by the SDK before any call), `details` the
    server's message, and `status` the decoded google.rpc.Status when the server attached one.
    """

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, details: str = "",
                 status: status_pb2.Status | None = None):
        super().__init__(message)
        self.code = code
        self.details = details
        self.status = status

    @property
    def retry_delay(self) -> float | None:
        """Seconds the server asked the client to wait (google.rpc.RetryInfo), if it said."""
        for detail in self.status.details if self.status is not None else ():
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
        return None


class ValidationError(Qwen2Error, ValueError):
    """INVALID_ARGUMENT: the request was rejected; `field_violations` lists (field, description) pairs."""

    def __init__(self, message: str, *, field_violations: list[tuple[str, str]] | None = None, **kw):
        super().__init__(message, **kw)
        self.field_violations: list[tuple[str, str]] = list(field_violations or [])


class UnsupportedTaskError(ValidationError):
    """FAILED_PRECONDITION: the served checkpoint does not serve this task (generation from a classifier, a
    classification from a causal LM); ModelInfo.tasks lists the ones it does."""


class OverloadedError(Qwen2Error):
    """RESOURCE_EXHAUSTED: the server's queue is full (retried with backoff before being raised)."""


class UnavailableError(Qwen2Error):
    """UNAVAILABLE: no server reachable, or it is not serving (retried with backoff before being raised)."""


class DeadlineError(Qwen2Error, TimeoutError):
    """DEADLINE_EXCEEDED: the call's `timeout` ran out."""


class CancelledError(Qwen2Error):
    """CANCELLED: the call was cancelled (by this client or the server)."""


class ServerError(Qwen2Error):
    """INTERNAL and every other status code."""


class AuthenticationError(ServerError):
    """UNAUTHENTICATED / PERMISSION_DENIED: a missing or wrong token or client certificate."""


_BY_CODE: dict[grpc.StatusCode, type[Qwen2Error]] = {
    grpc.StatusCode.INVALID_ARGUMENT: ValidationError,
    grpc.StatusCode.FAILED_PRECONDITION: UnsupportedTaskError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
}

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def decode_status(trailing_metadata) -> status_pb2.Status | None:
    """The google.rpc.Status in `grpc-status-details-bin`, or None (absent or undecodable)."""
    for key, value in trailing_metadata or ():
        if key == STATUS_DETAILS_KEY:
            if isinstance(value, str):
                value = value.encode("latin-1")
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except DecodeError:
                return None
            return status
    return None


def field_violations(status: status_pb2.Status | None) -> list[tuple[str, str]]:
    """(field, description) of every google.rpc.BadRequest field violation in `status`."""
    out: list[tuple[str, str]] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.extend((v.field, v.description) for v in bad.field_violations)
    return out


def error_from_status(code: grpc.StatusCode | None, details: str | None, trailing_metadata=None) -> Qwen2Error:
    """The typed exception for a failed call's status code, details and trailing metadata."""
    details = details or ""
    status = decode_status(trailing_metadata)
    if not details and status is not None:
        details = status.message
    name = code.name if code is not None else "UNKNOWN"
    cls = _BY_CODE.get(code, ServerError)
    if issubclass(cls, ValidationError):
        violations = field_violations(status)
        shown = details
        if violations and not details:
            shown = "; ".join(f"{f}: {d}" for f, d in violations)
        return cls(f"{name}: {shown}" if shown else name, code=code, details=details,
                               status=status, field_violations=violations)
    return cls(f"{name}: {details}" if details else name, code=code, details=details, status=status)


def error_from_rpc(err: grpc.RpcError) -> Qwen2Error:
    """Map a grpc.RpcError (sync) or grpc.aio.AioRpcError to a Qwen2Error subclass."""
    code = details = trailing = None
    try:
        code = err.code()
        details = err.details()
        trailing = err.trailing_metadata()
    except Exception:  # noqa: BLE001 - an RpcError that is not a Call (e.g. raised by an interceptor)
        pass
    return error_from_status(code, details if details is not None else str(err), trailing)
