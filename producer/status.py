"""The record's vocabulary: statuses, attempt outcomes, tiers. Plain enums, quick to import.

The admin CLI's parser offers these as choices without loading pydantic, redis or the SDK.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, get_args


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})
ACTIVE = frozenset({Status.QUEUED, Status.RUNNING, Status.RETRYING})


class Outcome(StrEnum):
    OK = "ok"
    OVERLOADED = "overloaded"  # 503
    RATE_LIMITED = "rate_limited"  # 429
    SERVER_ERROR = "server_error"  # 500/502/504
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    CLIENT_ERROR = "client_error"  # other 4xx
    BLOCKED = "blocked"  # safety / prohibited content / prompt block
    NO_IMAGE = "no_image"  # an image was asked for and none came back: re-asked a bounded number of times
    INVALID_OUTPUT = "invalid_output"  # JSON asked for, and the answer does not parse or fit the schema
    INTERRUPTED = "interrupted"  # worker died or shut down mid-attempt
    CACHED = "cached"  # answered from the response cache: no call, no cost
    EXPIRED = "expired"  # its Batch API job expired (not done within the batch's turnaround) or was cancelled


class Tier(StrEnum):
    """A job's tier policy and an attempt's tier. ``batch`` jobs go through the Batch API (worker.batch_tier)."""

    FLEX = "flex"
    STANDARD = "standard"
    PRIORITY = "priority"  # not shed; past its limit the API serves it at standard and says so
    BATCH = "batch"  # half price, up to 24 h: packed into Gemini Batch API jobs


#: Tiers an attempt can call ``generateContent`` on (``batch`` goes through the Batch API).
CALL_TIERS = frozenset({Tier.FLEX, Tier.STANDARD, Tier.PRIORITY})

#: Where a job may go when its tier gives up: ``standard`` after flex; ``flex`` (then, with ``standard``,
#: standard) after an expired or failed Batch API job.
Fallback = Literal["none", "flex", "standard"]
FALLBACKS: tuple[str, ...] = get_args(Fallback)
