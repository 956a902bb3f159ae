"""worker.policy as truth tables: classification, backoff and the retry / escalate / fail decision.

Time is frozen (``now_s`` is an argument) and the random source is injected, so every row is exact.
Error bodies are the shapes recorded in docs/gemini-wire.md.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from typing import Any

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey
from google.genai import errors as genai_errors

from producer.status import Fallback, Outcome, Tier
from worker.classify import (
    BLOCKING_FINISH_REASONS,
    FINISH_REASONS,
    PERMANENT,
    RETRYABLE,
    UNUSABLE,
    Classified,
    QuotaKind,
    classify_api_error,
    classify_exception,
    classify_response,
    error_details,
    outcome_for_status,
    parse_duration_s,
    parse_rate_limit,
)
from worker.policy import (
    DAILY_QUOTA_MIN_DELAY_S,
    DEADLINE_MARGIN_S,
    RETRY_INFO_MARGIN_S,
    Action,
    RetryBudget,
    decide,
    next_delay_s,
    retry_delay_s,
)

# -- wire bodies (docs/gemini-wire.md) ------------------------------------------------------------------

HELP = {
    "@type": "type.googleapis.com/google.rpc.Help",
    "links": [{"description": "Learn more about Gemini API quotas", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}],
}
QUOTA_PER_MINUTE = {
    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
    "violations": [
        {
            "quotaMetric": "generativelanguage.googleapis.com/generate_requests_per_model",
            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel",
            "quotaDimensions": {"model": "gemini-2.5-flash", "location": "global"},
            "quotaValue": "1000",
        }
    ],
}
RETRY_INFO = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "59s"}
RATE_LIMIT_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. "
    "Please retry in 59.628721472s."
)


def error_body(code: int, status: str, message: str, details: list[Any] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        error["details"] = details
    return {"error": error}


def quota_failure(*quota_ids: str) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [{"quotaMetric": "generativelanguage.googleapis.com/x", "quotaId": q} for q in quota_ids],
    }


RATE_LIMIT_BODY = error_body(429, "RESOURCE_EXHAUSTED", RATE_LIMIT_MESSAGE, [HELP, QUOTA_PER_MINUTE, RETRY_INFO])
BILLING_BODY = error_body(
    429,
    "RESOURCE_EXHAUSTED",
    "Your prepayment credits are depleted. Please go to AI Studio at https://ai.studio/projects to manage your "
    "project and billing.",
)
PER_DAY_BODY = error_body(
    429,
    "RESOURCE_EXHAUSTED",
    "You exceeded your current quota.",
    [quota_failure("GenerateRequestsPerDayPerProjectPerModel-FreeTier"), RETRY_INFO],
)
TOKENS_PER_MINUTE_BODY = error_body(
    429,
    "RESOURCE_EXHAUSTED",
    "You exceeded your current quota.",
    [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "12s"},
     quota_failure("GenerateContentPaidTierInputTokensPerModelPerMinute")],
)
LEGACY_BODY = error_body(
    429,
    "RESOURCE_EXHAUSTED",
    "Resource has been exhausted (e.g. check quota).",
    [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "RATE_LIMIT_EXCEEDED",
      "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}],
)
OVERLOADED_BODY = error_body(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
HIGH_DEMAND_BODY = error_body(
    503,
    "UNAVAILABLE",
    "This model is currently experiencing high demand. Spikes in demand are usually temporary. "
    "Please try again later.",
)
UNAVAILABLE_BODY = error_body(503, "UNAVAILABLE", "The service is currently unavailable.")
INTERNAL_BODY = error_body(
    500, "INTERNAL", "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting"
)
BAD_KEY_BODY = error_body(
    400,
    "INVALID_ARGUMENT",
    "API key not valid. Please pass a valid API key.",
    [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}],
)
NOT_FOUND_BODY = error_body(
    404, "NOT_FOUND", "models/x is not found for API version v1beta, or is not supported for generateContent."
)


# -- outcome_for_status --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        pytest.param(200, Outcome.SERVER_ERROR, id="200-as-error-is-server-side"),
        pytest.param(204, Outcome.SERVER_ERROR, id="204-other-2xx"),
        pytest.param(400, Outcome.CLIENT_ERROR, id="400-invalid-argument"),
        pytest.param(401, Outcome.CLIENT_ERROR, id="401-unauthenticated"),
        pytest.param(403, Outcome.CLIENT_ERROR, id="403-permission-denied"),
        pytest.param(404, Outcome.CLIENT_ERROR, id="404-not-found"),
        pytest.param(408, Outcome.TIMEOUT, id="408-request-timeout"),
        pytest.param(409, Outcome.CLIENT_ERROR, id="409-conflict"),
        pytest.param(429, Outcome.RATE_LIMITED, id="429-resource-exhausted"),
        pytest.param(499, Outcome.CLIENT_ERROR, id="499-client-closed"),
        pytest.param(500, Outcome.SERVER_ERROR, id="500-internal"),
        pytest.param(502, Outcome.SERVER_ERROR, id="502-bad-gateway"),
        pytest.param(503, Outcome.OVERLOADED, id="503-unavailable-is-the-flex-signal"),
        pytest.param(504, Outcome.SERVER_ERROR, id="504-deadline-exceeded"),
        pytest.param(599, Outcome.SERVER_ERROR, id="599-top-of-5xx"),
    ],
)
def test_outcome_for_status(code: int, expected: Outcome) -> None:
    assert outcome_for_status(code) == expected


def test_retryable_permanent_and_unusable_partition_the_failures() -> None:
    assert not RETRYABLE & PERMANENT
    assert not UNUSABLE & (RETRYABLE | PERMANENT)
    assert set(Outcome) == RETRYABLE | PERMANENT | UNUSABLE | {Outcome.OK, Outcome.CACHED}  # cached: no call


# -- parse_duration_s ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("37s", 37.0, id="whole-seconds"),
        pytest.param("0s", 0.0, id="zero"),
        pytest.param("0.5s", 0.5, id="fraction"),
        pytest.param("59.628721472s", 59.628721472, id="nanosecond-precision"),
        pytest.param("  12s  ", 12.0, id="surrounding-whitespace"),
        pytest.param("604800s", 604800.0, id="one-week-is-the-limit"),
        pytest.param("604801s", None, id="over-a-week"),
        pytest.param("99999999999s", None, id="overflow-huge"),
        pytest.param("9" * 400 + "s", None, id="overflow-inf"),
        pytest.param("1.5 s", None, id="space-before-unit"),
        pytest.param("37", None, id="no-unit"),
        pytest.param("37ms", None, id="milliseconds-unit"),
        pytest.param("1m", None, id="minutes-unit"),
        pytest.param("1e3s", None, id="exponent"),
        pytest.param(".5s", None, id="no-leading-digit"),
        pytest.param("-3s", None, id="negative"),
        pytest.param("+3s", None, id="explicit-plus"),
        pytest.param("nans", None, id="nan-word"),
        pytest.param("infs", None, id="inf-word"),
        pytest.param("abc", None, id="garbage"),
        pytest.param("", None, id="empty"),
        pytest.param(None, None, id="none"),
        pytest.param(12, None, id="int-not-string"),
        pytest.param(12.5, None, id="float-not-string"),
        pytest.param({"seconds": 12}, None, id="proto-object"),
        pytest.param(["12s"], None, id="list"),
    ],
)
def test_parse_duration_s(value: Any, expected: float | None) -> None:
    assert parse_duration_s(value) == expected


# -- error_details / parse_rate_limit ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected_len"),
    [
        pytest.param(RATE_LIMIT_BODY, 3, id="whole-body"),
        pytest.param([RATE_LIMIT_BODY], 3, id="list-of-one"),
        pytest.param([RATE_LIMIT_BODY, RATE_LIMIT_BODY], 0, id="list-of-two"),
        pytest.param(RATE_LIMIT_BODY["error"], 3, id="inner-error-object"),
        pytest.param(error_body(429, "X", "m", [HELP, "junk", 7, None]), 1, id="non-mapping-details-dropped"),
        pytest.param({"error": {"details": "nope"}}, 0, id="details-not-a-list"),
        pytest.param({"error": "string"}, 0, id="error-not-an-object"),
        pytest.param(BILLING_BODY, 0, id="no-details"),
        pytest.param("429 Too Many Requests", 0, id="text-body"),
        pytest.param(None, 0, id="none"),
        pytest.param([], 0, id="empty-list"),
    ],
)
def test_error_details(body: Any, expected_len: int) -> None:
    assert len(error_details(body)) == expected_len


@pytest.mark.parametrize(
    "order",
    [pytest.param(p, id="-".join(d["@type"].rsplit(".", 1)[1] for d in p)) for p in itertools.permutations(
        [HELP, QUOTA_PER_MINUTE, RETRY_INFO]
    )],
)
def test_parse_rate_limit_real_body_any_detail_order(order: tuple[dict[str, Any], ...]) -> None:
    body = error_body(429, "RESOURCE_EXHAUSTED", RATE_LIMIT_MESSAGE, list(order))
    assert parse_rate_limit(body) == (59.0, QuotaKind.PER_MINUTE, "GenerateRequestsPerMinutePerProjectPerModel")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            [RATE_LIMIT_BODY], (59.0, QuotaKind.PER_MINUTE, "GenerateRequestsPerMinutePerProjectPerModel"),
            id="list-of-one",
        ),
        pytest.param(BILLING_BODY, (None, QuotaKind.BILLING, None), id="no-details-is-billing"),
        pytest.param(
            error_body(429, "RESOURCE_EXHAUSTED", "x", []), (None, QuotaKind.BILLING, None),
            id="empty-details-is-billing",
        ),
        pytest.param(
            PER_DAY_BODY, (59.0, QuotaKind.PER_DAY, "GenerateRequestsPerDayPerProjectPerModel-FreeTier"), id="per-day"
        ),
        pytest.param(
            TOKENS_PER_MINUTE_BODY,
            (12.0, QuotaKind.PER_MINUTE, "GenerateContentPaidTierInputTokensPerModelPerMinute"),
            id="tokens-per-minute",
        ),
        pytest.param(LEGACY_BODY, (None, QuotaKind.PER_MINUTE, None), id="legacy-errorinfo-only"),
        pytest.param(
            error_body(429, "R", "m", [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "abc"}]),
            (None, QuotaKind.PER_MINUTE, None),
            id="garbage-retry-delay",
        ),
        pytest.param(
            error_body(429, "R", "m", [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                       "retryDelay": "99999999999s"}]),
            (None, QuotaKind.PER_MINUTE, None),
            id="overflow-retry-delay",
        ),
        pytest.param(
            error_body(429, "R", "m", [{"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                                       "violations": [{"quotaId": ""}, "junk", {"quotaMetric": "m"}]}]),
            (None, QuotaKind.PER_MINUTE, None),
            id="violations-without-quota-id",
        ),
        pytest.param(
            error_body(429, "R", "m", [{"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": None}]),
            (None, QuotaKind.PER_MINUTE, None),
            id="violations-null",
        ),
        pytest.param(
            error_body(429, "R", "m", [{"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": 5}]),
            (None, QuotaKind.PER_MINUTE, None),
            id="violations-not-iterable",
        ),
        pytest.param(
            error_body(429, "R", "m", [quota_failure(
                "GenerateRequestsPerMinutePerProjectPerModel", "GenerateRequestsPerDayPerProjectPerModel"
            )]),
            (None, QuotaKind.PER_DAY, "GenerateRequestsPerDayPerProjectPerModel"),
            id="minute-then-day-violation",
        ),
        pytest.param(
            error_body(429, "R", "m", [quota_failure(
                "GenerateRequestsPerDayPerProjectPerModel", "GenerateRequestsPerMinutePerProjectPerModel"
            )]),
            (None, QuotaKind.PER_DAY, "GenerateRequestsPerDayPerProjectPerModel"),
            id="day-then-minute-violation",
        ),
    ],
)
def test_parse_rate_limit(body: Any, expected: tuple[float | None, QuotaKind, str | None]) -> None:
    assert parse_rate_limit(body) == expected


# -- classify_api_error --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "body", "outcome", "retry_after_s", "quota"),
    [
        pytest.param(503, OVERLOADED_BODY, Outcome.OVERLOADED, None, None, id="503-overloaded"),
        pytest.param(503, HIGH_DEMAND_BODY, Outcome.OVERLOADED, None, None, id="503-high-demand"),
        pytest.param(503, UNAVAILABLE_BODY, Outcome.OVERLOADED, None, None, id="503-unavailable"),
        pytest.param(
            503, error_body(503, "UNAVAILABLE", "x", [RETRY_INFO]), Outcome.OVERLOADED, None, None,
            id="503-retryinfo-ignored",
        ),
        pytest.param(429, RATE_LIMIT_BODY, Outcome.RATE_LIMITED, 59.0, QuotaKind.PER_MINUTE, id="429-per-minute"),
        pytest.param(429, PER_DAY_BODY, Outcome.RATE_LIMITED, 59.0, QuotaKind.PER_DAY, id="429-per-day"),
        pytest.param(429, BILLING_BODY, Outcome.RATE_LIMITED, None, QuotaKind.BILLING, id="429-billing"),
        pytest.param(429, LEGACY_BODY, Outcome.RATE_LIMITED, None, QuotaKind.PER_MINUTE, id="429-legacy"),
        pytest.param(500, INTERNAL_BODY, Outcome.SERVER_ERROR, None, None, id="500-internal"),
        pytest.param(504, error_body(504, "DEADLINE_EXCEEDED", "x"), Outcome.SERVER_ERROR, None, None, id="504"),
        pytest.param(400, BAD_KEY_BODY, Outcome.CLIENT_ERROR, None, None, id="400-bad-key"),
        pytest.param(404, NOT_FOUND_BODY, Outcome.CLIENT_ERROR, None, None, id="404-model"),
    ],
)
def test_classify_api_error(
    code: int, body: dict[str, Any], outcome: Outcome, retry_after_s: float | None, quota: QuotaKind | None
) -> None:
    error = body["error"]
    classified = classify_api_error(code, error["status"], error["message"], body)
    assert classified.outcome == outcome
    assert classified.http_status == code
    assert classified.retry_after_s == retry_after_s
    assert classified.quota == quota
    assert classified.message == f"{code} {error['status']}: {error['message']}"


def test_classify_api_error_without_status_or_message() -> None:
    classified = classify_api_error(502, None, None, None)
    assert classified == Classified(Outcome.SERVER_ERROR, 502, "502 :")


# -- classify_exception --------------------------------------------------------------------------


def _connector_error() -> aiohttp.ClientConnectorError:
    key = ConnectionKey("127.0.0.1", 9, False, True, None, None, None)
    return aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "Connection refused"))


@pytest.mark.parametrize(
    ("make_exc", "outcome", "http_status", "message_start"),
    [
        pytest.param(
            lambda: genai_errors.ServerError(503, OVERLOADED_BODY), Outcome.OVERLOADED, 503,
            "503 UNAVAILABLE: The model is overloaded", id="sdk-503",
        ),
        pytest.param(
            lambda: genai_errors.ServerError(500, INTERNAL_BODY), Outcome.SERVER_ERROR, 500, "500 INTERNAL",
            id="sdk-500",
        ),
        pytest.param(
            lambda: genai_errors.ServerError(502, {"message": "<html>bad gateway</html>", "status": "Bad Gateway"}),
            Outcome.SERVER_ERROR, 502, "502 Bad Gateway: <html>", id="sdk-502-non-json-body",
        ),
        pytest.param(
            lambda: genai_errors.ClientError(429, RATE_LIMIT_BODY), Outcome.RATE_LIMITED, 429,
            "429 RESOURCE_EXHAUSTED: You exceeded", id="sdk-429",
        ),
        pytest.param(
            lambda: genai_errors.ClientError(429, [RATE_LIMIT_BODY]), Outcome.RATE_LIMITED, 429,
            "429 RESOURCE_EXHAUSTED", id="sdk-429-list-body",
        ),
        pytest.param(
            lambda: genai_errors.ClientError(400, BAD_KEY_BODY), Outcome.CLIENT_ERROR, 400,
            "400 INVALID_ARGUMENT: API key not valid", id="sdk-400",
        ),
        pytest.param(
            lambda: genai_errors.ClientError(404, NOT_FOUND_BODY), Outcome.CLIENT_ERROR, 404, "404 NOT_FOUND",
            id="sdk-404",
        ),
        pytest.param(lambda: TimeoutError(), Outcome.TIMEOUT, None, "request timed out", id="builtin-timeout"),
        pytest.param(
            lambda: asyncio.TimeoutError(),  # noqa: UP041 - the alias is what asyncio.wait_for code raises by name
            Outcome.TIMEOUT, None, "request timed out", id="asyncio-timeout",
        ),
        pytest.param(
            lambda: aiohttp.ServerTimeoutError("read timeout"), Outcome.TIMEOUT, None, "request timed out",
            id="aiohttp-server-timeout",
        ),
        pytest.param(
            lambda: aiohttp.ServerDisconnectedError(), Outcome.CONNECTION_ERROR, None,
            "ServerDisconnectedError: Server disconnected", id="server-disconnected",
        ),
        pytest.param(
            lambda: aiohttp.ClientOSError(), Outcome.CONNECTION_ERROR, None, "ClientOSError", id="client-os-error",
        ),
        pytest.param(
            _connector_error, Outcome.CONNECTION_ERROR, None, "ClientConnectorError: Cannot connect to host",
            id="connector-error",
        ),
        pytest.param(
            lambda: aiohttp.ClientPayloadError("truncated"), Outcome.CONNECTION_ERROR, None, "ClientPayloadError",
            id="payload-error",
        ),
        pytest.param(
            lambda: ConnectionResetError(104, "Connection reset by peer"), Outcome.CONNECTION_ERROR, None,
            "ConnectionResetError", id="connection-reset",
        ),
        pytest.param(
            lambda: ConnectionRefusedError(), Outcome.CONNECTION_ERROR, None, "ConnectionRefusedError",
            id="connection-refused",
        ),
        pytest.param(
            lambda: ValueError("boom"), Outcome.CLIENT_ERROR, None, "unexpected ValueError: boom", id="value-error",
        ),
        pytest.param(
            lambda: KeyError("x"), Outcome.CLIENT_ERROR, None, "unexpected KeyError", id="key-error",
        ),
    ],
)
def test_classify_exception(make_exc: Any, outcome: Outcome, http_status: int | None, message_start: str) -> None:
    classified = classify_exception(make_exc())
    assert classified.outcome == outcome
    assert classified.http_status == http_status
    assert classified.message is not None
    assert classified.message.startswith(message_start), classified.message


def test_classify_exception_reads_retry_info_from_sdk_error() -> None:
    classified = classify_exception(genai_errors.ClientError(429, RATE_LIMIT_BODY))
    assert classified.retry_after_s == 59.0
    assert classified.quota == QuotaKind.PER_MINUTE
    assert classified.quota_id == "GenerateRequestsPerMinutePerProjectPerModel"


def test_classify_exception_billing_429_from_sdk() -> None:
    classified = classify_exception(genai_errors.ClientError(429, BILLING_BODY))
    assert (classified.outcome, classified.retry_after_s, classified.quota) == (
        Outcome.RATE_LIMITED, None, QuotaKind.BILLING
    )


def test_classify_exception_message_has_no_trailing_separator() -> None:
    class ReadError(Exception):  # httpx-style name, empty message
        pass

    classified = classify_exception(ReadError())
    assert classified == Classified(Outcome.CONNECTION_ERROR, None, "ReadError")


# -- classify_response ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("has_candidates", "finish_reason", "block_reason", "outcome"),
    [
        pytest.param(False, None, "PROHIBITED_CONTENT", Outcome.BLOCKED, id="prompt-blocked"),
        pytest.param(False, None, "SAFETY", Outcome.BLOCKED, id="prompt-blocked-safety"),
        pytest.param(False, None, None, Outcome.SERVER_ERROR, id="no-candidates-no-reason"),
        pytest.param(False, None, "", Outcome.SERVER_ERROR, id="no-candidates-empty-reason"),
        pytest.param(True, "SAFETY", None, Outcome.BLOCKED, id="safety"),
        pytest.param(True, "RECITATION", None, Outcome.BLOCKED, id="recitation"),
        pytest.param(True, "PROHIBITED_CONTENT", None, Outcome.BLOCKED, id="prohibited-content"),
        pytest.param(True, "SPII", None, Outcome.BLOCKED, id="spii"),
        pytest.param(True, "BLOCKLIST", None, Outcome.BLOCKED, id="blocklist"),
        pytest.param(True, "IMAGE_SAFETY", None, Outcome.BLOCKED, id="image-safety"),
        pytest.param(True, "IMAGE_PROHIBITED_CONTENT", None, Outcome.BLOCKED, id="image-prohibited"),
        pytest.param(True, "NO_IMAGE", None, Outcome.NO_IMAGE, id="no-image"),
        pytest.param(True, "IMAGE_OTHER", None, Outcome.NO_IMAGE, id="image-other"),
        pytest.param(True, "MALFORMED_FUNCTION_CALL", None, Outcome.CLIENT_ERROR, id="malformed-call"),
        pytest.param(True, "MISSING_THOUGHT_SIGNATURE", None, Outcome.CLIENT_ERROR, id="missing-signature"),
        pytest.param(True, "OTHER", None, Outcome.SERVER_ERROR, id="other"),
        pytest.param(True, "STOP", None, Outcome.OK, id="stop"),
        pytest.param(True, "MAX_TOKENS", None, Outcome.OK, id="max-tokens"),
        pytest.param(True, None, None, Outcome.OK, id="no-finish-reason"),
        pytest.param(True, "SOMETHING_NEW", None, Outcome.OK, id="unknown-reason"),
        pytest.param(True, "safety", None, Outcome.OK, id="lower-case-is-not-a-known-reason"),
    ],
)
def test_classify_response(
    has_candidates: bool, finish_reason: str | None, block_reason: str | None, outcome: Outcome
) -> None:
    classified = classify_response(
        has_candidates=has_candidates, finish_reason=finish_reason, block_reason=block_reason
    )
    assert classified.outcome == outcome
    assert classified.http_status == 200
    if outcome == Outcome.BLOCKED:
        assert classified.message is not None
        assert (block_reason or finish_reason or "") in classified.message


def test_blocking_finish_reasons_match_the_wire_doc() -> None:
    assert {"SAFETY", "RECITATION", "PROHIBITED_CONTENT", "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT"} <= (
        BLOCKING_FINISH_REASONS
    )
    assert "NO_IMAGE" not in BLOCKING_FINISH_REASONS  # re-asked a bounded number of times, not final
    assert "MAX_TOKENS" not in BLOCKING_FINISH_REASONS
    assert "STOP" not in BLOCKING_FINISH_REASONS


# -- retry_delay_s / next_delay_s ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "rand_value", "base_s", "cap_s", "expected"),
    [
        pytest.param(1, 0.0, 5.0, 600.0, 0.0, id="rand-0-is-zero"),
        pytest.param(1, 1.0, 5.0, 600.0, 5.0, id="first-attempt-ceiling-is-base"),
        pytest.param(2, 1.0, 5.0, 600.0, 10.0, id="second-doubles"),
        pytest.param(3, 1.0, 5.0, 600.0, 20.0, id="third-quadruples"),
        pytest.param(3, 0.5, 5.0, 600.0, 10.0, id="half-jitter"),
        pytest.param(8, 1.0, 5.0, 600.0, 600.0, id="capped"),
        pytest.param(1, 1.0, 5.0, 2.0, 2.0, id="cap-below-base"),
        pytest.param(10_000, 1.0, 5.0, 600.0, 600.0, id="huge-attempt-capped"),
        pytest.param(10**18, 0.25, 5.0, 600.0, 150.0, id="absurd-attempt-no-overflow"),
        pytest.param(5, 1.0, 0.0, 600.0, 0.0, id="zero-base"),
    ],
)
def test_retry_delay_s(attempt: int, rand_value: float, base_s: float, cap_s: float, expected: float) -> None:
    assert retry_delay_s(attempt, base_s=base_s, cap_s=cap_s, rand=lambda: rand_value) == pytest.approx(expected)


@pytest.mark.parametrize("attempt", [pytest.param(0, id="zero"), pytest.param(-1, id="negative")])
def test_retry_delay_s_attempt_counts_from_one(attempt: int) -> None:
    with pytest.raises(ValueError, match="from 1"):
        retry_delay_s(attempt, base_s=5.0, cap_s=600.0, rand=lambda: 0.5)


@pytest.mark.parametrize("attempt", range(1, 12))
@pytest.mark.parametrize("rand_value", [0.0, 0.37, 0.999999, 1.0])
def test_retry_delay_s_within_full_jitter_bounds(attempt: int, rand_value: float) -> None:
    delay = retry_delay_s(attempt, base_s=5.0, cap_s=600.0, rand=lambda: rand_value)
    assert 0.0 <= delay <= min(600.0, 5.0 * 2 ** (attempt - 1))


def _classified(
    outcome: Outcome = Outcome.OVERLOADED,
    retry_after_s: float | None = None,
    quota: QuotaKind | None = None,
) -> Classified:
    return Classified(outcome, None, "x", retry_after_s, quota)


@pytest.mark.parametrize(
    ("classified", "attempt", "rand_value", "expected"),
    [
        pytest.param(_classified(), 1, 0.5, 2.5, id="plain-backoff"),
        pytest.param(_classified(), 1, 0.0, 0.0, id="plain-backoff-zero"),
        pytest.param(_classified(Outcome.RATE_LIMITED, 59.0, QuotaKind.PER_MINUTE), 1, 0.0, 60.0,
                     id="retry-info-plus-margin"),
        pytest.param(_classified(Outcome.RATE_LIMITED, 0.0, QuotaKind.PER_MINUTE), 1, 0.0, 1.0,
                     id="retry-info-zero-still-margin"),
        pytest.param(_classified(Outcome.RATE_LIMITED, 2.0, QuotaKind.PER_MINUTE), 8, 1.0, 600.0,
                     id="backoff-longer-than-retry-info-wins"),
        pytest.param(_classified(Outcome.RATE_LIMITED, None, QuotaKind.PER_MINUTE), 1, 0.5, 2.5,
                     id="legacy-no-retry-info"),
        pytest.param(_classified(Outcome.RATE_LIMITED, 59.0, QuotaKind.PER_DAY), 1, 0.0, DAILY_QUOTA_MIN_DELAY_S,
                     id="per-day-at-least-an-hour"),
        pytest.param(_classified(Outcome.RATE_LIMITED, 7200.0, QuotaKind.PER_DAY), 1, 0.0, 7201.0,
                     id="per-day-longer-retry-info"),
        pytest.param(_classified(Outcome.RATE_LIMITED, None, QuotaKind.BILLING), 1, 0.0, 600.0,
                     id="billing-at-least-cap"),
        pytest.param(_classified(), 1, 1 / 3, 1.667, id="rounded-to-ms"),
    ],
)
def test_next_delay_s(classified: Classified, attempt: int, rand_value: float, expected: float) -> None:
    assert next_delay_s(classified, attempt, base_s=5.0, cap_s=600.0, rand=lambda: rand_value) == expected


@pytest.mark.parametrize("retry_after_s", [0.0, 0.4, 1.0, 59.0, 3599.0])
@pytest.mark.parametrize("rand_value", [0.0, 0.5, 1.0])
def test_next_delay_s_never_below_retry_after_plus_margin(retry_after_s: float, rand_value: float) -> None:
    classified = _classified(Outcome.RATE_LIMITED, retry_after_s, QuotaKind.PER_MINUTE)
    delay = next_delay_s(classified, 1, base_s=5.0, cap_s=600.0, rand=lambda: rand_value)
    assert delay >= retry_after_s + RETRY_INFO_MARGIN_S


# -- decide --------------------------------------------------------------------------------------

NOW = 1_900_000_000.0
HOUR = 3600.0


def _budget(**overrides: Any) -> RetryBudget:
    fields: dict[str, Any] = {
        "now_s": NOW,
        "deadline_s": NOW + HOUR,
        "fallback": "none",
        "tier": Tier.FLEX,
        "tier_failures": 1,
        "flex_attempts": 1,
        "max_flex_attempts": None,
        "base_s": 5.0,
        "cap_s": 600.0,
    }
    fields.update(overrides)
    return RetryBudget(**fields)


OVERLOADED = _classified(Outcome.OVERLOADED)
CONNECTION = _classified(Outcome.CONNECTION_ERROR)
RATE_LIMITED_59 = _classified(Outcome.RATE_LIMITED, 59.0, QuotaKind.PER_MINUTE)
PER_DAY = _classified(Outcome.RATE_LIMITED, 59.0, QuotaKind.PER_DAY)
STD = Tier.STANDARD
FLEX = Tier.FLEX
BATCH = Tier.BATCH
EXPIRED = _classified(Outcome.EXPIRED)
RETRY, FAIL, SUCCEED = Action.RETRY, Action.FAIL, Action.SUCCEED


@pytest.mark.parametrize(
    ("classified", "budget", "action", "tier", "delay_s", "error_kind"),
    [
        # outcome -> succeed / permanent failure
        pytest.param(_classified(Outcome.OK), _budget(), SUCCEED, FLEX, 0.0, None, id="ok-flex"),
        pytest.param(_classified(Outcome.OK), _budget(tier=STD), SUCCEED, STD, 0.0, None, id="ok-standard"),
        pytest.param(_classified(Outcome.OK), _budget(deadline_s=NOW - 1), SUCCEED, FLEX, 0.0, None,
                     id="ok-after-deadline-still-succeeds"),
        pytest.param(_classified(Outcome.CLIENT_ERROR), _budget(), FAIL, FLEX, 0.0, "client_error",
                     id="client-error"),
        pytest.param(_classified(Outcome.BLOCKED), _budget(), FAIL, FLEX, 0.0, "blocked", id="blocked"),
        pytest.param(_classified(Outcome.CLIENT_ERROR), _budget(fallback="standard"), FAIL, FLEX, 0.0,
                     "client_error", id="client-error-never-escalates"),
        pytest.param(_classified(Outcome.BLOCKED), _budget(fallback="standard", max_flex_attempts=1), FAIL, FLEX,
                     0.0, "blocked", id="blocked-never-escalates"),
        pytest.param(_classified(Outcome.CLIENT_ERROR), _budget(deadline_s=NOW - 1), FAIL, FLEX, 0.0,
                     "client_error", id="client-error-past-deadline-keeps-its-kind"),
        # retryable with time left -> same tier, backoff delay (rand 0.5: 0.5 * 5 * 2**(n-1))
        pytest.param(OVERLOADED, _budget(), RETRY, FLEX, 2.5, None, id="overloaded-first"),
        pytest.param(OVERLOADED, _budget(tier_failures=3), RETRY, FLEX, 10.0, None, id="overloaded-third"),
        pytest.param(OVERLOADED, _budget(tier_failures=0), RETRY, FLEX, 2.5, None, id="zero-failures-as-one"),
        pytest.param(OVERLOADED, _budget(tier_failures=50), RETRY, FLEX, 300.0, None, id="capped-backoff"),
        pytest.param(_classified(Outcome.SERVER_ERROR), _budget(), RETRY, FLEX, 2.5, None, id="server-error"),
        pytest.param(_classified(Outcome.TIMEOUT), _budget(), RETRY, FLEX, 2.5, None, id="timeout"),
        pytest.param(_classified(Outcome.CONNECTION_ERROR), _budget(), RETRY, FLEX, 2.5, None, id="connection"),
        pytest.param(_classified(Outcome.INTERRUPTED), _budget(), RETRY, FLEX, 2.5, None, id="interrupted"),
        # priority: retried on priority, never escalated (the API itself serves it at standard past its limit)
        pytest.param(OVERLOADED, _budget(tier=Tier.PRIORITY, fallback="standard"), RETRY, Tier.PRIORITY, 2.5, None,
                     id="priority-overloaded-stays-priority"),
        pytest.param(_classified(Outcome.OK), _budget(tier=Tier.PRIORITY), SUCCEED, Tier.PRIORITY, 0.0, None,
                     id="ok-priority"),
        # batch: no second batch; on to flex (fallback flex or standard) or fail
        pytest.param(_classified(Outcome.OK), _budget(tier=BATCH), SUCCEED, BATCH, 0.0, None, id="ok-batch"),
        pytest.param(EXPIRED, _budget(tier=BATCH, fallback="flex"), RETRY, FLEX, 0.0, None,
                     id="batch-expired-to-flex"),
        pytest.param(EXPIRED, _budget(tier=BATCH, fallback="standard"), RETRY, FLEX, 0.0, None,
                     id="batch-expired-standard-fallback-goes-to-flex-first"),
        pytest.param(EXPIRED, _budget(tier=BATCH), FAIL, BATCH, 0.0, "batch_expired", id="batch-expired-no-fallback"),
        pytest.param(EXPIRED, _budget(tier=BATCH, fallback="flex", deadline_s=NOW + 0.5), FAIL, BATCH, 0.0,
                     "deadline_exceeded", id="batch-expired-too-late-for-flex"),
        pytest.param(_classified(Outcome.SERVER_ERROR), _budget(tier=BATCH), FAIL, BATCH, 0.0, "batch_server_error",
                     id="batch-failed-no-fallback"),
        pytest.param(_classified(Outcome.INVALID_OUTPUT), _budget(tier=BATCH, fallback="flex"), RETRY, FLEX, 0.0,
                     None, id="batch-unusable-answer-re-asked-on-flex"),
        pytest.param(_classified(Outcome.CLIENT_ERROR), _budget(tier=BATCH, fallback="flex"), FAIL, BATCH, 0.0,
                     "client_error", id="batch-client-error-is-permanent"),
        pytest.param(RATE_LIMITED_59, _budget(), RETRY, FLEX, 60.0, None, id="429-waits-retry-info"),
        pytest.param(OVERLOADED, _budget(fallback="standard"), RETRY, FLEX, 2.5, None,
                     id="fallback-standard-still-retries-flex-first"),
        pytest.param(OVERLOADED, _budget(tier=STD, fallback="standard"), RETRY, STD, 2.5, None,
                     id="standard-failure-retries-standard"),
        # the next retry would land on or past the deadline
        pytest.param(OVERLOADED, _budget(deadline_s=NOW + 2.0), FAIL, FLEX, 0.0, "deadline_exceeded",
                     id="retry-past-deadline-no-fallback"),
        pytest.param(OVERLOADED, _budget(deadline_s=NOW + 2.5), FAIL, FLEX, 0.0, "deadline_exceeded",
                     id="retry-exactly-at-deadline-no-fallback"),
        pytest.param(OVERLOADED, _budget(deadline_s=NOW + 2.5 + DEADLINE_MARGIN_S), FAIL, FLEX, 0.0,
                     "deadline_exceeded", id="retry-due-exactly-at-margin"),
        pytest.param(OVERLOADED, _budget(deadline_s=NOW + 2.5 + DEADLINE_MARGIN_S / 2), FAIL, FLEX, 0.0,
                     "deadline_exceeded", id="retry-inside-pickup-margin"),
        pytest.param(OVERLOADED, _budget(deadline_s=NOW + 2.5 + DEADLINE_MARGIN_S / 2, fallback="standard"),
                     RETRY, STD, 0.0, None, id="retry-inside-pickup-margin-escalates"),
        pytest.param(OVERLOADED, _budget(deadline_s=NOW + 2.5 + DEADLINE_MARGIN_S + 0.01), RETRY, FLEX, 2.5, None,
                     id="retry-just-before-margin"),
        pytest.param(OVERLOADED, _budget(deadline_s=NOW + 2.501, margin_s=0.0), RETRY, FLEX, 2.5, None,
                     id="zero-margin-retry-just-before-deadline"),
        pytest.param(OVERLOADED, _budget(deadline_s=NOW + 10, margin_s=8.0), FAIL, FLEX, 0.0, "deadline_exceeded",
                     id="custom-margin"),
        pytest.param(OVERLOADED, _budget(deadline_s=NOW + 2.0, fallback="standard"), RETRY, STD, 0.0, None,
                     id="retry-past-deadline-escalates"),
        pytest.param(RATE_LIMITED_59, _budget(deadline_s=NOW + 30, fallback="standard"), RETRY, STD, 0.0, None,
                     id="429-retry-info-past-deadline-escalates"),
        pytest.param(PER_DAY, _budget(), FAIL, FLEX, 0.0, "deadline_exceeded", id="per-day-hour-past-deadline"),
        pytest.param(PER_DAY, _budget(deadline_s=NOW + 2 * HOUR), RETRY, FLEX, HOUR, None,
                     id="per-day-hour-within-deadline"),
        pytest.param(OVERLOADED, _budget(tier=STD, fallback="standard", deadline_s=NOW + 2.0), FAIL, STD, 0.0,
                     "deadline_exceeded", id="standard-past-deadline-fails-not-escalates"),
        # already past the deadline
        pytest.param(OVERLOADED, _budget(deadline_s=NOW - 1), FAIL, FLEX, 0.0, "deadline_exceeded",
                     id="past-deadline-no-fallback"),
        pytest.param(OVERLOADED, _budget(deadline_s=NOW), FAIL, FLEX, 0.0, "deadline_exceeded",
                     id="at-deadline-no-fallback"),
        pytest.param(OVERLOADED, _budget(deadline_s=NOW - 1, fallback="standard"), FAIL, FLEX, 0.0,
                     "deadline_exceeded", id="past-deadline-with-fallback"),
        pytest.param(OVERLOADED, _budget(deadline_s=NOW, fallback="standard"), FAIL, FLEX, 0.0,
                     "deadline_exceeded", id="at-deadline-with-fallback"),
        pytest.param(OVERLOADED, _budget(deadline_s=NOW - 1, fallback="standard", flex_attempts=9,
                                         max_flex_attempts=3), FAIL, FLEX, 0.0, "deadline_exceeded",
                     id="past-deadline-beats-max-flex"),
        # max_flex_attempts
        pytest.param(OVERLOADED, _budget(fallback="standard", flex_attempts=3, max_flex_attempts=3), RETRY, STD,
                     0.0, None, id="max-flex-reached-escalates"),
        pytest.param(OVERLOADED, _budget(fallback="standard", flex_attempts=5, max_flex_attempts=3), RETRY, STD,
                     0.0, None, id="max-flex-exceeded-escalates"),
        pytest.param(OVERLOADED, _budget(fallback="standard", flex_attempts=2, max_flex_attempts=3), RETRY, FLEX,
                     2.5, None, id="max-flex-not-reached"),
        pytest.param(OVERLOADED, _budget(fallback="none", flex_attempts=3, max_flex_attempts=3), RETRY, FLEX,
                     2.5, None, id="max-flex-without-fallback-keeps-flex"),
        pytest.param(OVERLOADED, _budget(fallback="standard", flex_attempts=1, max_flex_attempts=1), RETRY, STD,
                     0.0, None, id="max-flex-one"),
        pytest.param(OVERLOADED, _budget(tier=STD, fallback="standard", tier_failures=2, flex_attempts=3,
                                         max_flex_attempts=3), RETRY, STD, 5.0, None,
                     id="standard-with-max-flex-reached-backs-off"),
        # never reached: every attempt a connection error for FLEXQ_UNREACHABLE_FAIL_S
        pytest.param(CONNECTION, _budget(unreachable_since_s=NOW - 900, unreachable_fail_s=900.0), FAIL, FLEX,
                     0.0, "unreachable", id="unreachable-for-the-span-fails"),
        pytest.param(CONNECTION, _budget(unreachable_since_s=NOW - 899, unreachable_fail_s=900.0), RETRY, FLEX,
                     2.5, None, id="unreachable-not-yet-the-span-retries"),
        pytest.param(CONNECTION, _budget(unreachable_since_s=NOW - 9999, unreachable_fail_s=0.0), RETRY, FLEX,
                     2.5, None, id="unreachable-fail-off"),
        pytest.param(CONNECTION, _budget(unreachable_since_s=None, unreachable_fail_s=900.0), RETRY, FLEX, 2.5,
                     None, id="an-earlier-other-outcome-keeps-retrying"),
        pytest.param(OVERLOADED, _budget(unreachable_since_s=NOW - 9999, unreachable_fail_s=900.0), RETRY, FLEX,
                     2.5, None, id="a-503-is-never-unreachable"),
        pytest.param(CONNECTION, _budget(unreachable_since_s=NOW - 900, unreachable_fail_s=900.0,
                                         fallback="standard"), FAIL, FLEX, 0.0, "unreachable",
                     id="unreachable-does-not-escalate-same-endpoint"),
    ],
)
def test_decide(
    classified: Classified,
    budget: RetryBudget,
    action: Action,
    tier: Tier,
    delay_s: float,
    error_kind: str | None,
) -> None:
    decision = decide(classified, budget, lambda: 0.5)
    assert (decision.action, decision.tier, decision.delay_s, decision.error_kind) == (
        action, tier, delay_s, error_kind
    )
    assert bool(decision.reason) is (action != Action.SUCCEED)
    if action == Action.RETRY and decision.tier == budget.tier:
        assert budget.now_s + decision.delay_s + budget.margin_s < budget.deadline_s


def test_decide_permanent_failure_reason_is_the_error_message() -> None:
    classified = Classified(Outcome.CLIENT_ERROR, 400, "400 INVALID_ARGUMENT: API key not valid.")
    decision = decide(classified, _budget(), lambda: 0.5)
    assert decision.reason == "400 INVALID_ARGUMENT: API key not valid."


def test_decide_does_not_call_rand_for_permanent_or_escalation() -> None:
    def rand() -> float:
        raise AssertionError("rand must not be called")

    assert decide(_classified(Outcome.BLOCKED), _budget(), rand).action == Action.FAIL
    escalation = _budget(fallback="standard", flex_attempts=2, max_flex_attempts=2)
    assert decide(OVERLOADED, escalation, rand).tier == Tier.STANDARD




def test_decide_inputs_untouched() -> None:
    budget = _budget(fallback="standard")
    before = copy.deepcopy(budget)
    decide(OVERLOADED, budget, lambda: 0.5)
    assert budget == before


@pytest.mark.parametrize("rand_value", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("tier_failures", [1, 2, 5, 9, 40])
def test_decide_retry_never_lands_past_deadline(rand_value: float, tier_failures: int) -> None:
    budget = _budget(deadline_s=NOW + 30.0, tier_failures=tier_failures)
    decision = decide(OVERLOADED, budget, lambda: rand_value)
    if decision.action == Action.RETRY:
        assert NOW + decision.delay_s + DEADLINE_MARGIN_S < budget.deadline_s
    else:
        assert decision.error_kind == "deadline_exceeded"
        assert decision.delay_s == 0.0


def test_every_finish_reason_the_sdk_knows_is_classified_on_purpose() -> None:
    from google.genai import types

    assert {reason.value for reason in types.FinishReason} == set(FINISH_REASONS)


@pytest.mark.parametrize(
    ("kwargs", "outcome", "in_message"),
    [
        pytest.param({"wants_image": True, "has_image": True}, Outcome.OK, None, id="image-asked-and-given"),
        pytest.param(
            {"wants_image": True, "has_image": False, "text": "I can only describe it"}, Outcome.NO_IMAGE,
            "I can only describe it", id="image-asked-text-only",
        ),
        pytest.param({"wants_image": False, "has_image": False}, Outcome.OK, None, id="text-asked"),
        pytest.param({"output_error": "the answer is not valid JSON"}, Outcome.INVALID_OUTPUT, "not valid JSON",
                     id="bad-json"),
        pytest.param({"finish_reason": "NO_IMAGE", "text": "nope"}, Outcome.NO_IMAGE, "nope", id="no-image-reason"),
        pytest.param({"finish_reason": "IMAGE_SAFETY", "wants_image": True, "finish_message": "not charged"},
                     Outcome.BLOCKED, "not charged", id="image-safety-beats-no-image"),
        pytest.param({"finish_reason": "BRAND_NEW", "has_content": False}, Outcome.SERVER_ERROR, "BRAND_NEW",
                     id="unknown-reason-no-content"),
        pytest.param({"finish_reason": "MALFORMED_FUNCTION_CALL"}, Outcome.CLIENT_ERROR, "parameter schemas",
                     id="malformed-call-says-what-to-fix"),
    ],
)
def test_classify_response_images_and_outputs(kwargs: dict[str, Any], outcome: Outcome, in_message: str | None) -> None:
    args: dict[str, Any] = {"has_candidates": True, "finish_reason": "STOP", "block_reason": None, **kwargs}
    classified = classify_response(**args)
    assert classified.outcome == outcome
    if in_message is not None:
        assert classified.message is not None and in_message in classified.message


@pytest.mark.parametrize(
    ("outcome", "failures", "max_retries", "fallback", "action", "tier"),
    [
        pytest.param(Outcome.NO_IMAGE, 1, 2, "none", Action.RETRY, Tier.FLEX, id="first-no-image-retried"),
        pytest.param(Outcome.NO_IMAGE, 3, 2, "none", Action.FAIL, Tier.FLEX, id="past-the-bound-fails"),
        pytest.param(Outcome.INVALID_OUTPUT, 2, 2, "standard", Action.RETRY, Tier.FLEX, id="never-escalates"),
        pytest.param(Outcome.INVALID_OUTPUT, 1, 0, "none", Action.FAIL, Tier.FLEX, id="no-retries-allowed"),
    ],
)
def test_decide_unusable_answers(
    outcome: Outcome, failures: int, max_retries: int, fallback: Fallback, action: Action, tier: Tier
) -> None:
    budget = RetryBudget(
        now_s=0.0, deadline_s=10_000.0, fallback=fallback, tier=Tier.FLEX, tier_failures=0, flex_attempts=failures,
        max_flex_attempts=1, base_s=1.0, cap_s=10.0, output_failures=failures, max_output_retries=max_retries,
    )
    decision = decide(Classified(outcome, 200, "why"), budget, lambda: 0.5)
    assert (decision.action, decision.tier) == (action, tier)
    if action == Action.FAIL:
        assert decision.error_kind == str(outcome) and "why" in decision.reason
