"""One rooted error tree. Each exception carries context and never a secret."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, urlsplit


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
    """No record exists for this job id (never enqueued, or expired after retention).

    ``where``, when known, says where the search looked (``queue 'flexq' on redis://host:6379/0``, the
    URL redacted), so that a wrong ``REDIS_URL`` or ``FLEXQ_QUEUE`` shows in the message."""

    def __init__(self, job_id: str, *, where: str | None = None) -> None:
        super().__init__(job_id)
        self.job_id = job_id
        self.where = where

    def __str__(self) -> str:
        return f"no job with id {self.job_id!r}" + (f" in {self.where}" if self.where else "")


class JobStateError(FlexqError):
    """The operation does not apply to the job in its current status (e.g. retrying a running job)."""

    def __init__(self, job_id: str, status: str, message: str) -> None:
        super().__init__(f"job {job_id!r} is {status}: {message}")
        self.job_id = job_id
        self.status = status


class StoreUnavailableError(FlexqError):
    """Redis could not be reached or answered with an error; the URL in the message is redacted."""


#: How ``connect_redis`` starts its message: ``cannot reach Redis at URL: ErrorType``.
UNREACHABLE = "cannot reach Redis at "
_CREDENTIALS = re.compile(r"(\w+://)[^/@\s]*@")


def redis_failure(url: str, err: BaseException) -> str:
    """One line for a failure to connect to the Redis at ``url`` (already redacted) that says what
    Redis or the network answered: a database index the server does not have, refused credentials,
    or why it cannot be reached. Credentials in the answer's text, if any, are masked."""
    name = type(err).__name__
    text = _CREDENTIALS.sub(r"\1***@", " ".join(str(err).split()))[:300]
    if "DB index is out of range" in text:  # Redis answered SELECT: it is reachable
        return (f"Redis at {url} has no database {database_of(url)}: it answered 'ERR DB index is out of "
                "range' (a server has 16 databases, /0 to /15, unless its `databases` setting says otherwise)")
    if name == "AuthenticationError" or text.startswith(("NOAUTH", "WRONGPASS")):
        return f"Redis at {url} refused the connection's credentials: {name}: {text}"
    return f"{UNREACHABLE}{url}: {name}: {text}" if text else f"{UNREACHABLE}{url}: {name}"


def explain_unavailable(err: StoreUnavailableError) -> str:
    """``err``'s message, with what Redis answered when the message names only the exception's type
    (``connect_redis`` raises it ``from None``; the Redis error is still its ``__context__``)."""
    message = str(err)
    cause = err.__cause__ or err.__context__
    if cause is None or not message.startswith(UNREACHABLE):
        return message
    url = message.removeprefix(UNREACHABLE).split(": ", 1)[0]
    return redis_failure(url, cause)


def database_of(url: str) -> str:
    """The database number a Redis URL selects (``/N``, or ``?db=N``; 0 if it names none)."""
    parts = urlsplit(url)
    path = parts.path.strip("/") if parts.scheme != "unix" else ""
    if path.isdigit():
        return path
    db = parse_qs(parts.query).get("db", [])
    return db[0] if db and db[0].isdigit() else "0"


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
