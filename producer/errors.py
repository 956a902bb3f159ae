"""One rooted error tree. Each exception carries context and never a secret."""

from __future__ import annotations

from typing import Any


def first_error(err: Any) -> tuple[str, str, str]:
    """The first error of a pydantic ``ValidationError``: (dotted location, message, error type)."""
    first = err.errors()[0]
    loc = ".".join(str(part) for part in first.get("loc", ()))
    return loc, str(first["msg"]).removeprefix("Value error, "), str(first["type"])


def one_line(err: Any) -> str:
    """A pydantic ``ValidationError`` as one line: ``location: message`` (or just the message)."""
    loc, message, _ = first_error(err)
    return f"{loc}: {message}" if loc else message


class FlexqError(Exception):
    """Root of every error flexq raises on purpose, so callers can catch flexq's and only flexq's."""


class ConfigError(FlexqError):
    """The configuration cannot work (missing API key, bad URL); the message says how to fix it."""


class InvalidRequestError(FlexqError, ValueError):
    """A generation request was refused at enqueue; ``field`` names what is wrong."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class JobNotFoundError(FlexqError, KeyError):
    """No record exists for this job id (never enqueued, or expired after retention)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"no job with id {self.job_id!r}"


class JobStateError(FlexqError):
    """The operation does not apply to the job in its current status (e.g. retrying a running job)."""

    def __init__(self, job_id: str, status: str, message: str) -> None:
        super().__init__(f"job {job_id!r} is {status}: {message}")
        self.job_id = job_id
        self.status = status


class StoreUnavailableError(FlexqError):
    """Redis could not be reached or answered with an error; the URL in the message is redacted."""


class WaitTimeoutError(FlexqError, TimeoutError):
    """``wait`` gave up before the job reached a terminal status."""

    def __init__(self, job_id: str, timeout_s: float, status: str) -> None:
        super().__init__(f"job {job_id!r} still {status} after {timeout_s:g}s")
        self.job_id = job_id
        self.status = status


class InvalidJobError(FlexqError):
    """A job's record in Redis cannot be read (corrupt JSON, wrong shape); that job fails, not the worker."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id!r} has an unreadable record: {reason}")
        self.job_id = job_id
        self.reason = reason


class BlobMissingError(FlexqError, KeyError):
    """A record refers to a blob (image bytes, inline data) the blob store no longer holds."""

    def __init__(self, sha256: str) -> None:
        super().__init__(sha256)
        self.sha256 = sha256

    def __str__(self) -> str:
        return f"blob sha256:{self.sha256} is missing from the blob store (expired or never stored)"
