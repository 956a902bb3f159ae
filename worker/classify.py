"""Pure classification: what an API answer or an exception means (outcome, quota kind, server's delay).

No I/O, no clock: each function is a truth table (tests/test_policy.py). The decision on what to do
about an outcome lives in :mod:`worker.policy`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from producer.status import Outcome
from worker.finish_reasons import FINISH_REASONS

RETRYABLE = frozenset(
    {
        Outcome.OVERLOADED,
        Outcome.RATE_LIMITED,
        Outcome.SERVER_ERROR,
        Outcome.TIMEOUT,
        Outcome.CONNECTION_ERROR,
        Outcome.INTERRUPTED,
        Outcome.EXPIRED,  # a Batch API job that expired or was cancelled: the job can run elsewhere
    }
)
PERMANENT = frozenset({Outcome.CLIENT_ERROR, Outcome.BLOCKED})
#: Answered, but not as asked: re-asked at most ``max_output_retries`` times, then the job fails.
UNUSABLE = frozenset({Outcome.NO_IMAGE, Outcome.INVALID_OUTPUT})
#: Candidate finish reasons that mean "refused", not "answered".
BLOCKING_FINISH_REASONS = frozenset(
    name for name, verdict in FINISH_REASONS.items() if verdict is not None and verdict[0] == Outcome.BLOCKED
)
_CONNECTION_ERROR_NAMES = frozenset(
    {
        "ClientConnectionError",
        "ClientConnectorError",
        "ClientOSError",
        "ServerDisconnectedError",
        "ClientPayloadError",
        "ConnectError",
        "ReadError",
        "WriteError",
        "RemoteProtocolError",
        "TransportError",
        "ClientConnectorDNSError",
    }
)
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")
#: Vertex AI's 429s carry no details: its shared pay-as-you-go pool out of capacity ("Resource exhausted. Please
#: try again later. ..."), or Provisioned Throughput exceeded. Neither is the Gemini API's billing stop.
_VERTEX_429_MESSAGES = ("resource exhausted", "exceeded the provisioned throughput")


class QuotaKind(StrEnum):
    PER_MINUTE = "per_minute"
    PER_DAY = "per_day"
    BILLING = "billing"  # a 429 with no details: credits depleted; retrying cannot help soon


@dataclass(frozen=True)
class Classified:
    """What one attempt amounted to."""

    outcome: Outcome
    http_status: int | None = None
    message: str | None = None
    retry_after_s: float | None = None  # google.rpc.RetryInfo retryDelay, as sent
    quota: QuotaKind | None = None
    quota_id: str | None = None


# -- classification --------------------------------------------------------------------------------


def outcome_for_status(code: int) -> Outcome:
    if code == 503:
        return Outcome.OVERLOADED
    if code == 429:
        return Outcome.RATE_LIMITED
    if code == 408:
        return Outcome.TIMEOUT
    if code >= 500 or code < 400:
        return Outcome.SERVER_ERROR
    return Outcome.CLIENT_ERROR


def parse_duration_s(value: Any) -> float | None:
    """``"37s"`` → 37.0; anything else (garbage, negative, absurd) → None."""
    if not isinstance(value, str):
        return None
    match = _DURATION_RE.match(value)
    if match is None:
        return None
    seconds = float(match.group(1))
    return seconds if seconds <= 7 * 24 * 3600 else None


def error_details(body: Any) -> list[Mapping[str, Any]]:
    """The ``details`` list of a Gemini error body (the SDK's ``APIError.details`` is the whole body)."""
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    if not isinstance(body, Mapping):
        return []
    error = body.get("error", body)
    details = error.get("details") if isinstance(error, Mapping) else None
    return [d for d in details if isinstance(d, Mapping)] if isinstance(details, list) else []


def parse_rate_limit(body: Any) -> tuple[float | None, QuotaKind, str | None]:
    """RetryInfo delay, quota kind and quota id of a 429 body."""
    details = error_details(body)
    retry_after_s: float | None = None
    quota_id: str | None = None
    for detail in details:
        kind = str(detail.get("@type", ""))
        if kind.endswith("google.rpc.RetryInfo"):
            retry_after_s = parse_duration_s(detail.get("retryDelay"))
        elif kind.endswith("google.rpc.QuotaFailure"):
            violations = detail.get("violations")
            for violation in violations if isinstance(violations, list) else []:
                if isinstance(violation, Mapping) and violation.get("quotaId"):
                    this_id = str(violation["quotaId"])
                    if quota_id is None or "PerDay" in this_id:  # a daily quota decides the wait
                        quota_id = this_id
    if not details:
        return None, QuotaKind.PER_MINUTE if _vertex_429(body) else QuotaKind.BILLING, None
    if quota_id is not None and "PerDay" in quota_id:
        return retry_after_s, QuotaKind.PER_DAY, quota_id
    return retry_after_s, QuotaKind.PER_MINUTE, quota_id


def _vertex_429(body: Any) -> bool:
    """A Vertex AI 429 (told by its message: its bodies have no details to go by)."""
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    error = body.get("error", body) if isinstance(body, Mapping) else None
    message = error.get("message") if isinstance(error, Mapping) else None
    return isinstance(message, str) and any(text in message.lower() for text in _VERTEX_429_MESSAGES)


def classify_api_error(code: int, status: str | None, message: str | None, body: Any) -> Classified:
    outcome = outcome_for_status(code)
    text = f"{code} {status or ''}: {message or ''}".strip()
    if outcome == Outcome.RATE_LIMITED:
        retry_after_s, quota, quota_id = parse_rate_limit(body)
        return Classified(outcome, code, text, retry_after_s, quota, quota_id)
    return Classified(outcome, code, text)


def classify_exception(exc: BaseException) -> Classified:
    """Map anything the SDK call raised to an outcome. Unknown exceptions are not retried."""
    code = getattr(exc, "code", None)
    if isinstance(code, int) and hasattr(exc, "details"):  # google.genai.errors.APIError
        return classify_api_error(code, getattr(exc, "status", None), getattr(exc, "message", None), exc.details)
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return Classified(Outcome.TIMEOUT, None, "request timed out")
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & _CONNECTION_ERROR_NAMES or isinstance(exc, ConnectionError):
        return Classified(Outcome.CONNECTION_ERROR, None, f"{type(exc).__name__}: {exc}".rstrip(": "))
    return Classified(Outcome.CLIENT_ERROR, None, f"unexpected {type(exc).__name__}: {exc}")


def classify_response(
    *, has_candidates: bool, finish_reason: str | None, block_reason: str | None,
    wants_image: bool = False, has_image: bool = False, has_content: bool = True,
    text: str | None = None, output_error: str | None = None, finish_message: str | None = None,
) -> Classified:
    """An HTTP 200 is an answer unless the prompt or the candidate was refused, an image was asked
    for and none came, or the JSON asked for is unusable (``output_error``, from ``worker.outputs``)."""
    if not has_candidates:
        if block_reason:
            return Classified(Outcome.BLOCKED, 200, f"prompt blocked: {block_reason}")
        return Classified(Outcome.SERVER_ERROR, 200, "response had no candidates and no block reason")
    said = f" ({finish_message})" if finish_message else ""
    if finish_reason is not None and finish_reason not in FINISH_REASONS and not has_content:
        return Classified(Outcome.SERVER_ERROR, 200, f"no answer: unknown finish_reason={finish_reason}{said}")
    verdict = FINISH_REASONS.get(finish_reason or "STOP")
    if verdict is not None:
        outcome, why = verdict
        if outcome == Outcome.NO_IMAGE and text:
            why = f"{why}; the model said: {text}"
        lead = "candidate blocked: " if outcome == Outcome.BLOCKED else ""
        return Classified(outcome, 200, f"{lead}finish_reason={finish_reason}: {why}{said}")
    if wants_image and not has_image:
        return Classified(Outcome.NO_IMAGE, 200, f"no image in the answer; the model said: {text or '(nothing)'}")
    if output_error is not None:
        return Classified(Outcome.INVALID_OUTPUT, 200, output_error)
    return Classified(Outcome.OK, 200)
