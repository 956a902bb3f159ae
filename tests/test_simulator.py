"""The Gemini simulator, driven by the real google-genai SDK (and raw aiohttp where the SDK hides the wire)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google import genai
from google.genai import errors, types

from simulator import RunningSimulator, SimConfig, directive_key
from simulator.cli import main
from simulator.wire import BILLING_MESSAGE, INTERNAL_MESSAGE, OVERLOADED_MESSAGES
from tests.conftest import SimFactory

# google-genai 3.4 subclasses aiohttp.ClientSession inside every new session; aiohttp warns about it.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession from ClientSession is discouraged:DeprecationWarning"
)

MODEL = "gemini-2.5-flash"
KEY = "test-key-123"
RPC = "type.googleapis.com/google.rpc."
FLEX = types.GenerateContentConfig(service_tier=types.ServiceTier.FLEX)
ROOT = Path(__file__).resolve().parents[1]

ClientFactory = Callable[..., genai.Client]


@pytest.fixture
async def sim(make_sim: SimFactory) -> RunningSimulator:
    return await make_sim()


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    clients: list[genai.Client] = []

    def factory(base_url: str, timeout_ms: int = 5000, api_key: str = KEY) -> genai.Client:
        options = types.HttpOptions(
            base_url=base_url,
            api_version="v1beta",
            retry_options=types.HttpRetryOptions(attempts=1),
            timeout=timeout_ms,
        )
        client = genai.Client(api_key=api_key, http_options=options)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.aio.aclose()


@pytest.fixture
def client(sim: RunningSimulator, make_client: ClientFactory) -> genai.Client:
    return make_client(sim.base_url)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def ask(client: genai.Client, text: str, config: types.GenerateContentConfig | None = None) -> Any:
    return await client.aio.models.generate_content(model=MODEL, contents=text, config=config)


def url(sim: RunningSimulator, model: str = MODEL, action: str = "generateContent") -> str:
    return f"{sim.base_url}/v1beta/models/{model}:{action}"


def body(text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}], "generationConfig": {}} | extra


def rpc_details(err: errors.APIError) -> list[dict[str, Any]]:
    assert isinstance(err.details, dict)
    details: list[dict[str, Any]] = err.details["error"].get("details", [])
    return details


def detail_of(details: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [d for d in details if d["@type"] == RPC + kind]
    assert len(matches) == 1, details
    return matches[0]


# ---- success ------------------------------------------------------------------------------------
async def test_flex_success_has_real_shape(client: genai.Client, sim: RunningSimulator) -> None:
    response = await ask(client, "hi", FLEX)
    assert response.text == "Simulated answer to: hi"
    cand = response.candidates[0]
    assert cand.finish_reason == types.FinishReason.STOP
    assert cand.content.role == "model"
    assert cand.index == 0
    usage = response.usage_metadata
    assert usage.prompt_token_count == 1
    assert usage.candidates_token_count == 6
    assert usage.thoughts_token_count is None
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
    assert response.model_version == MODEL
    assert len(response.response_id) == 22
    headers = {k.lower(): v for k, v in response.sdk_http_response.headers.items()}
    assert headers["x-gemini-service-tier"] == "flex"
    assert sim.sim.stats.ok_by_tier == {"flex": 1}


async def test_raw_success_body(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    async with http.post(url(sim), json=body("x" * 40, serviceTier="flex"), headers={"x-goog-api-key": KEY}) as r:
        assert r.status == 200
        assert r.headers["X-Gemini-Service-Tier"] == "flex"
        data = await r.json()
    assert data["candidates"][0]["content"] == {
        "parts": [{"text": "Simulated answer to: " + "x" * 40}],
        "role": "model",
    }
    usage = data["usageMetadata"]
    assert usage["serviceTier"] == "flex"
    assert usage["promptTokenCount"] == 10
    assert "thoughtsTokenCount" not in usage
    assert usage["promptTokensDetails"] == [{"modality": "TEXT", "tokenCount": 10}]
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"]


async def test_standard_is_the_default_tier(client: genai.Client, sim: RunningSimulator) -> None:
    response = await ask(client, "hello")
    assert response.sdk_http_response.headers["x-gemini-service-tier"] == "standard"
    assert sim.sim.stats.by_tier == {"standard": 1}


@pytest.mark.parametrize(
    ("field", "value", "tier"),
    [
        ("service_tier", "flex", "flex"),
        ("serviceTier", "SERVICE_TIER_FLEX", "flex"),
        ("service_tier", "Flex", "flex"),
        ("serviceTier", "STANDARD", "standard"),
        ("service_tier", "SERVICE_TIER_UNSPECIFIED", "standard"),
        ("serviceTier", "priority", "priority"),
        (None, None, "standard"),
    ],
)
async def test_tier_spellings(
    sim: RunningSimulator, http: aiohttp.ClientSession, field: str | None, value: str | None, tier: str
) -> None:
    payload = body("hi", **({field: value} if field else {}))
    async with http.post(url(sim), json=payload, params={"key": KEY}) as r:
        assert r.status == 200
        assert r.headers["x-gemini-service-tier"] == tier
        assert (await r.json())["usageMetadata"]["serviceTier"] == tier
    assert sim.sim.stats.by_tier == {tier: 1}


async def test_thinking_budget_and_thought_parts(client: genai.Client) -> None:
    thinking = types.ThinkingConfig(thinking_budget=20, include_thoughts=True)
    response = await ask(client, "think", types.GenerateContentConfig(thinking_config=thinking))
    parts = response.candidates[0].content.parts
    assert [bool(p.thought) for p in parts] == [True, False]
    usage = response.usage_metadata
    assert usage.thoughts_token_count == 20
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count + 20
    assert response.text == "Simulated answer to: think"  # .text skips thought parts


async def test_thinking_directive(client: genai.Client) -> None:
    response = await ask(client, "plan [[fault:thinking]]")
    assert response.candidates[0].content.parts[0].thought is True
    assert response.usage_metadata.thoughts_token_count > 0


async def test_max_output_tokens_truncates(client: genai.Client) -> None:
    response = await ask(client, "a long question", types.GenerateContentConfig(max_output_tokens=3))
    assert response.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert response.text == "Simulated an"


async def test_camel_and_snake_nested_fields(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    payload = {
        "contents": [{"role": "user", "parts": [{"text": "abcd"}]}],
        "system_instruction": {"parts": [{"text": "be brief"}]},
        "generation_config": {"thinking_config": {"thinking_budget": 9}},
        "service_tier": "flex",
    }
    async with http.post(url(sim), json=payload, headers={"x-goog-api-key": KEY}) as r:
        usage = (await r.json())["usageMetadata"]
    assert usage["promptTokenCount"] == 3  # ceil((8 + 4) / 4): the system instruction counts
    assert usage["thoughtsTokenCount"] == 9


# ---- request errors -----------------------------------------------------------------------------
async def test_missing_key_is_403_and_query_key_works(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    async with http.post(url(sim), json=body()) as r:
        assert r.status == 403
        assert r.content_type == "application/json"
        error = (await r.json())["error"]
    assert error["status"] == "PERMISSION_DENIED"
    assert error["message"].startswith("Method doesn't allow unregistered callers")
    async with http.post(url(sim), json=body(), params={"key": KEY}) as r:
        assert r.status == 200


async def test_unknown_model_is_404(client: genai.Client) -> None:
    with pytest.raises(errors.ClientError) as info:
        await client.aio.models.generate_content(model="gpt-4", contents="hi")
    assert info.value.code == 404
    assert info.value.status == "NOT_FOUND"
    assert str(info.value.message).startswith("models/gpt-4 is not found for API version v1beta, or is not supported")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{not json", "Invalid JSON payload received"),
        (json.dumps({"contents": [], "generationConfig": {}}).encode(), "Request has empty input."),
        (json.dumps({"generationConfig": {}}).encode(), "Request has empty input."),
    ],
)
async def test_bad_bodies_are_400(
    sim: RunningSimulator, http: aiohttp.ClientSession, payload: bytes, message: str
) -> None:
    headers = {"x-goog-api-key": KEY, "Content-Type": "application/json"}
    async with http.post(url(sim), data=payload, headers=headers) as r:
        assert r.status == 400
        error = (await r.json())["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    assert error["message"].startswith(message)


async def test_invalid_tier_is_400_with_field_violation(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    async with http.post(url(sim), json=body(serviceTier="turbo"), headers={"x-goog-api-key": KEY}) as r:
        assert r.status == 400
        error = (await r.json())["error"]
    assert error["message"].startswith("Invalid value at 'service_tier'")
    violation = error["details"][0]["fieldViolations"][0]
    assert error["details"][0]["@type"] == RPC + "BadRequest"
    assert violation["field"] == "service_tier"


async def test_unknown_directive_is_rejected(client: genai.Client) -> None:
    with pytest.raises(errors.ClientError) as info:
        await ask(client, "x [[fault:503y2]]")
    assert info.value.code == 400
    assert "unknown directive" in str(info.value.message)


# ---- fault directives ---------------------------------------------------------------------------
async def test_503x3_then_success(client: genai.Client, sim: RunningSimulator) -> None:
    text = "summarise [[fault:503x3]]"
    for _ in range(3):
        with pytest.raises(errors.ServerError) as info:
            await ask(client, text, FLEX)
        assert info.value.code == 503
        assert info.value.status == "UNAVAILABLE"
        assert info.value.message in OVERLOADED_MESSAGES
        assert rpc_details(info.value) == []  # a 503 never carries a delay
    response = await ask(client, text, FLEX)
    assert response.text is not None
    assert sim.sim.stats.calls_by_directive_key[directive_key("503x3", text)] == 4
    assert sim.sim.stats.by_status == {503: 3, 200: 1}


async def test_directive_counters_are_per_prompt(client: genai.Client) -> None:
    for prompt in ("first [[fault:500x1]]", "second [[fault:500x1]]"):
        with pytest.raises(errors.ServerError) as info:
            await ask(client, prompt)
        assert info.value.message == INTERNAL_MESSAGE
        assert (await ask(client, prompt)).text is not None


async def test_429_with_retry_info(client: genai.Client) -> None:
    text = "q [[fault:429x2:retry=3s]]"
    for _ in range(2):
        with pytest.raises(errors.ClientError) as info:
            await ask(client, text, FLEX)
        assert info.value.code == 429
        assert info.value.status == "RESOURCE_EXHAUSTED"
        details = rpc_details(info.value)
        assert all(d["@type"].startswith(RPC) for d in details)
        assert detail_of(details, "RetryInfo")["retryDelay"] == "3s"
        violation = detail_of(details, "QuotaFailure")["violations"][0]
        assert violation["quotaId"] == "GenerateRequestsPerMinutePerProjectPerModel"
        assert violation["quotaDimensions"] == {"model": MODEL, "location": "global"}
        assert detail_of(details, "Help")["links"]
        assert "Please retry in 3s." in str(info.value.message)
    assert (await ask(client, text, FLEX)).text is not None


async def test_429_daily_billing_and_legacy(client: genai.Client) -> None:
    with pytest.raises(errors.ClientError) as daily:
        await ask(client, "[[fault:429-daily]]")
    details = rpc_details(daily.value)
    assert "PerDay" in detail_of(details, "QuotaFailure")["violations"][0]["quotaId"]
    assert detail_of(details, "RetryInfo")["retryDelay"] == "3600s"

    with pytest.raises(errors.ClientError) as billing:
        await ask(client, "[[fault:429-billing]]")
    assert billing.value.code == 429
    assert billing.value.message == BILLING_MESSAGE
    assert "details" not in billing.value.details["error"]

    with pytest.raises(errors.ClientError) as legacy:
        await ask(client, "[[fault:429-legacy]]")
    details = rpc_details(legacy.value)
    assert detail_of(details, "ErrorInfo")["reason"] == "RATE_LIMIT_EXCEEDED"
    assert not [d for d in details if d["@type"] == RPC + "RetryInfo"]


@pytest.mark.parametrize(
    ("code", "status"), [(400, "INVALID_ARGUMENT"), (403, "PERMISSION_DENIED"), (404, "NOT_FOUND")]
)
async def test_client_error_directives(client: genai.Client, code: int, status: str) -> None:
    for _ in range(2):  # without xN they fire every time
        with pytest.raises(errors.ClientError) as info:
            await ask(client, f"bad [[fault:{code}]]", FLEX)
        assert info.value.code == code
        assert info.value.status == status
    if code == 400:
        assert detail_of(rpc_details(info.value), "BadRequest")["fieldViolations"]


@pytest.mark.parametrize(
    ("spec", "code", "status"),
    [
        ("500x1", 500, "INTERNAL"),
        ("504x1", 504, "DEADLINE_EXCEEDED"),
        ("502x1", 502, "Bad Gateway"),  # an HTML page: the SDK falls back to the reason phrase
        ("html500x1", 500, "Internal Server Error"),
    ],
)
async def test_server_error_directives(client: genai.Client, spec: str, code: int, status: str) -> None:
    with pytest.raises(errors.ServerError) as info:
        await ask(client, f"x [[fault:{spec}]]")
    assert info.value.code == code
    assert info.value.status == status
    assert (await ask(client, f"x [[fault:{spec}]]")).text is not None


async def test_html500_is_not_json(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    async with http.post(url(sim), json=body("[[fault:html500]]"), headers={"x-goog-api-key": KEY}) as r:
        assert r.status == 500
        assert r.content_type == "text/html"
        assert "<!DOCTYPE html>" in await r.text()


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("safety", types.FinishReason.SAFETY),
        ("recitation", types.FinishReason.RECITATION),
        ("prohibited", types.FinishReason.PROHIBITED_CONTENT),
        ("image_safety", types.FinishReason.IMAGE_SAFETY),
    ],
)
async def test_stopped_candidates(client: genai.Client, spec: str, reason: types.FinishReason) -> None:
    response = await ask(client, f"x [[fault:{spec}]]", FLEX)
    assert response.candidates[0].finish_reason == reason
    assert not response.candidates[0].content or not response.candidates[0].content.parts
    assert response.text is None


async def test_max_tokens_directive_gives_partial_text(client: genai.Client) -> None:
    response = await ask(client, "tell me a story [[fault:max_tokens]]")
    assert response.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    full = "Simulated answer to: tell me a story [[fault:max_tokens]]"
    assert response.text
    assert full.startswith(response.text)
    assert len(response.text) < len(full)


async def test_blocked_prompt(client: genai.Client) -> None:
    response = await ask(client, "x [[fault:block]]", FLEX)
    assert response.candidates is None
    assert response.text is None
    assert response.prompt_feedback.block_reason == types.BlockedReason.PROHIBITED_CONTENT
    assert response.usage_metadata.total_token_count == response.usage_metadata.prompt_token_count


async def test_reset_drops_the_connection(client: genai.Client, sim: RunningSimulator) -> None:
    text = "x [[fault:resetx1]]"
    with pytest.raises(aiohttp.ClientConnectionError) as info:
        await ask(client, text, FLEX)
    assert isinstance(info.value, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError)
    assert sim.sim.stats.connection_resets == 1
    assert (await ask(client, text, FLEX)).text is not None


async def test_hang_times_out_without_blocking_others(
    sim: RunningSimulator, make_client: ClientFactory, client: genai.Client
) -> None:
    slow = make_client(sim.base_url, timeout_ms=1000)
    started = time.monotonic()
    hanging = asyncio.create_task(ask(slow, "x [[fault:hang]]", FLEX))
    assert (await ask(client, "other", FLEX)).text is not None  # served while the other one hangs
    with pytest.raises(TimeoutError):
        await hanging
    assert 0.9 < time.monotonic() - started < 3.0
    assert sim.sim.stats.server_timeout_headers[-1] == "1"
    closing = time.monotonic()
    await sim.close()  # the hanging handler is cancelled promptly
    assert time.monotonic() - closing < 1.5


async def test_hang_past_server_timeout_is_504(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    headers = {"x-goog-api-key": KEY, "X-Server-Timeout": "0.1"}
    async with http.post(url(sim), json=body("[[fault:hang]]", serviceTier="flex"), headers=headers) as r:
        assert r.status == 504
        assert (await r.json())["error"]["status"] == "DEADLINE_EXCEEDED"
    assert sim.sim.stats.server_timeout_headers == ["0.1"]


async def test_latency_directive(client: genai.Client) -> None:
    started = time.monotonic()
    response = await ask(client, "slow [[latency:0.3s]]")
    assert response.text is not None
    assert time.monotonic() - started >= 0.3


# ---- capacity, rate limits, random faults -------------------------------------------------------
async def test_flex_capacity_sheds_excess(make_sim: SimFactory, make_client: ClientFactory) -> None:
    sim = await make_sim(capacity=2, latency_s=0.3)
    client = make_client(sim.base_url)
    results = await asyncio.gather(*(ask(client, f"job {i}", FLEX) for i in range(6)), return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    shed = [r for r in results if isinstance(r, errors.ServerError) and r.code == 503]
    assert len(ok) == 2
    assert len(shed) == 4
    assert sim.sim.stats.max_in_flight_flex == 2
    assert sim.sim.stats.in_flight_flex == 0
    standard = await asyncio.gather(*(ask(client, f"std {i}") for i in range(4)))  # not limited
    assert all(r.text for r in standard)


async def test_rate_503_sheds_flex_only(make_sim: SimFactory, make_client: ClientFactory) -> None:
    sim = await make_sim(rate_503=1.0)
    client = make_client(sim.base_url)
    with pytest.raises(errors.ServerError) as info:
        await ask(client, "x", FLEX)
    assert info.value.code == 503
    assert (await ask(client, "x")).text is not None
    assert sim.sim.stats.by_status == {503: 1, 200: 1}


async def test_directive_requests_skip_random_faults(make_sim: SimFactory, make_client: ClientFactory) -> None:
    sim = await make_sim(rate_503=1.0, rate_500=1.0)
    client = make_client(sim.base_url)
    assert (await ask(client, "x [[fault:thinking]]", FLEX)).text is not None


async def test_rpm_limit_gives_429_with_retry_delay(make_sim: SimFactory, make_client: ClientFactory) -> None:
    sim = await make_sim(rpm=2)
    client = make_client(sim.base_url)
    await ask(client, "a")
    await ask(client, "b", FLEX)
    with pytest.raises(errors.ClientError) as info:
        await ask(client, "c", FLEX)
    assert info.value.code == 429
    delay = detail_of(rpc_details(info.value), "RetryInfo")["retryDelay"]
    assert delay.endswith("s")
    assert 55 <= int(delay[:-1]) <= 60
    other = await client.aio.models.generate_content(model="gemini-2.5-pro", contents="d")  # per model
    assert other.text is not None


async def test_random_429_and_500(make_sim: SimFactory, make_client: ClientFactory) -> None:
    sim = await make_sim(rate_429=1.0, retry_delay_s=7.9)
    client = make_client(sim.base_url)
    with pytest.raises(errors.ClientError) as info:
        await ask(client, "x")
    assert detail_of(rpc_details(info.value), "RetryInfo")["retryDelay"] == "7s"  # truncated
    assert "Please retry in 7.9s." in str(info.value.message)
    sim500 = await make_sim(rate_500=1.0)
    with pytest.raises(errors.ServerError) as info500:
        await ask(make_client(sim500.base_url), "x")
    assert info500.value.status == "INTERNAL"


async def test_seeded_runs_repeat(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    runs: list[list[int]] = []
    for _ in range(2):
        sim = await make_sim(rate_503=0.5, seed=3)
        statuses = []
        for i in range(12):
            async with http.post(url(sim), json=body(f"p{i}", serviceTier="flex"), params={"key": KEY}) as r:
                statuses.append(r.status)
        runs.append(statuses)
    assert runs[0] == runs[1]
    assert {200, 503} == set(runs[0])


def test_profiles_scale_capacity_and_shedding() -> None:
    assert SimConfig(capacity=10, profile="peak").effective_capacity(0.0) == 5
    assert SimConfig(capacity=10, profile="offpeak").effective_capacity(0.0) == 15
    assert SimConfig(rate_503=0.5, profile="peak").effective_rate_503(0.0) == pytest.approx(0.75)
    wave = SimConfig(capacity=10, rate_503=0.5, profile="wave", profile_period_s=60.0)
    assert wave.effective_capacity(0.0) == 15
    assert wave.effective_capacity(30.0) == 5
    assert wave.effective_rate_503(30.0) == pytest.approx(0.75)
    assert SimConfig(capacity=1, profile="peak").effective_capacity(0.0) == 1
    assert SimConfig(capacity=4).effective_capacity(123.0) == 4


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="rate_429"):
        SimConfig(rate_429=-0.1)
    with pytest.raises(ValueError, match="latency_dist"):
        SimConfig(latency_dist="pareto")
    with pytest.raises(ValueError, match="capacity"):
        SimConfig(capacity=0)


# ---- streaming ----------------------------------------------------------------------------------
async def test_stream_sse_wire_format(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    target = url(sim, action="streamGenerateContent")
    payload = body("stream this please", serviceTier="flex")
    async with http.post(target, json=payload, params={"alt": "sse", "key": KEY}) as r:
        assert r.status == 200
        assert r.headers["x-gemini-service-tier"] == "flex"
        raw = (await r.read()).decode()
    events = [e for e in raw.split("\r\n\r\n") if e]
    assert len(events) > 1
    assert all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e.removeprefix("data: ")) for e in events]
    assert "[DONE]" not in raw
    assert [("finishReason" in c["candidates"][0]) for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert len({c["responseId"] for c in chunks}) == 1
    text = "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks)
    assert text == "Simulated answer to: stream this please"


async def test_stream_through_sdk(client: genai.Client) -> None:
    stream = await client.aio.models.generate_content_stream(model=MODEL, contents="hello there", config=FLEX)
    pieces = [chunk async for chunk in stream]
    assert "".join(p.text or "" for p in pieces) == "Simulated answer to: hello there"
    assert pieces[-1].candidates
    assert pieces[-1].candidates[0].finish_reason == types.FinishReason.STOP


# ---- control endpoints --------------------------------------------------------------------------
async def test_stats_endpoint_counts_and_resets(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    leak_probe = "sk-very-secret-value-42"
    async with http.get(f"{sim.base_url}/healthz") as r:
        assert (r.status, await r.text()) == (200, "ok")
    await (await http.post(url(sim), json=body(serviceTier="flex"), headers={"x-goog-api-key": leak_probe})).read()
    await (await http.post(url(sim), json=body("[[fault:503]]"), params={"key": leak_probe})).read()
    await (await http.post(url(sim), json=body())).read()
    async with http.get(f"{sim.base_url}/_sim/stats") as r:
        raw = await r.text()
    stats = json.loads(raw)
    assert leak_probe not in raw
    assert stats["requests"] == 3
    assert stats["by_status"] == {"200": 1, "503": 1, "403": 1}
    assert stats["by_tier"] == {"flex": 1, "standard": 1}
    assert stats["ok_by_tier"] == {"flex": 1}
    assert stats["api_keys_seen"] == 2
    assert stats["calls_by_directive_key"] == {directive_key("503", "[[fault:503]]"): 1}
    async with http.post(f"{sim.base_url}/_sim/reset") as r:
        cleared = await r.json()
    assert cleared["requests"] == 0
    assert cleared["calls_by_directive_key"] == {}
    assert sim.sim.stats.by_status == {}


async def test_server_timeout_history_keeps_last_20(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    for i in range(25):
        headers = {"x-goog-api-key": KEY, "X-Server-Timeout": str(100 + i)}
        await (await http.post(url(sim), json=body(), headers=headers)).read()
    assert sim.sim.stats.server_timeout_headers == [str(100 + i) for i in range(5, 25)]


async def test_config_can_change_at_run_time(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{sim.base_url}/_sim/config", json={"rate_503": 1.0}) as r:
        assert (await r.json())["rate_503"] == 1.0
    async with http.post(url(sim), json=body(serviceTier="flex"), params={"key": KEY}) as r:
        assert r.status == 503
    async with http.post(f"{sim.base_url}/_sim/config", json={"rate_503": 3}) as r:
        assert r.status == 400
    assert sim.sim.config.rate_503 == 1.0


# ---- CLI ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "word"),
    [(["--rate-503", "2"], "rate-503"), (["--capacity", "0"], "capacity"), (["--latency-s", "-1"], "latency")],
)
def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str], argv: list[str], word: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert word in err


async def test_cli_serves_until_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "simulator", "--port", "0", "--rate-503", "0.5",
        stdout=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=10)).decode().strip()
        assert line.startswith("simulator listening on http://127.0.0.1:")
        base_url = line.removeprefix("simulator listening on ")
        async with aiohttp.ClientSession() as http, http.get(f"{base_url}/healthz") as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), timeout=10)
    assert code == 0
