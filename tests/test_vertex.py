"""Vertex AI: the simulator's Vertex paths, the worker's Vertex mode of the Gemini seam, cost as served.

On Vertex AI flex is asked for with the ``X-Vertex-AI-LLM-Shared-Request-Type: flex`` header; the body's
``serviceTier`` is refused (``"flex"``) or ignored and billed at standard (``"SERVICE_TIER_FLEX"``), and the
served tier comes back as ``usageMetadata.trafficType`` (docs/gemini-wire.md, "Vertex AI").
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import google.oauth2.credentials
import pytest
from google.genai import errors as genai_errors
from google.genai import types

from producer.errors import ConfigError
from producer.pricing import cost_usd
from producer.queue import FlexQueue
from producer.request import GenerateRequest
from producer.status import Outcome, Status, Tier
from simulator import RunningSimulator
from simulator.vertex import RESOURCE_EXHAUSTED_MESSAGE
from tests.conftest import make_settings
from tests.fakes import USAGE, ScriptedGemini, answer
from tests.helpers import running_worker, wait_all, worker_env
from worker import classify
from worker.config import WorkerConfig
from worker.gemini import GeminiClient, require_api_key, to_answer, traffic_tier
from worker.runner import Runner

MODEL = "gemini-2.5-flash"
KEY = "vertex-key-DO-NOT-LEAK-51c2e8"
TOKEN = "ya29.fake-access-token"  # noqa: S105 - a made-up OAuth token
TIER_HEADER = "X-Vertex-AI-LLM-Shared-Request-Type"
EXPRESS = f"/v1beta1/publishers/google/models/{MODEL}:generateContent"
PROJECT = f"/v1/projects/proj-1/locations/global/publishers/google/models/{MODEL}:generateContent"

# google-genai subclasses aiohttp.ClientSession inside every new session; aiohttp warns about it.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession from ClientSession is discouraged:DeprecationWarning"
)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def body(text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}], "generationConfig": {}} | extra


async def post(
    http: aiohttp.ClientSession, sim: RunningSimulator, path: str, payload: dict[str, Any],
    headers: dict[str, str] | None = None, *, auth: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    sent = ({"x-goog-api-key": KEY} if auth is None else auth) | (headers or {})
    async with http.post(sim.base_url + path, json=payload, headers=sent) as r:
        return r.status, await r.json(), {k.lower(): v for k, v in r.headers.items()}


# -- the simulator's Vertex paths --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "auth", "credential"),
    [
        pytest.param(EXPRESS, {"x-goog-api-key": KEY}, "api_key", id="express-api-key"),
        pytest.param(PROJECT, {"Authorization": f"Bearer {TOKEN}"}, "bearer", id="project-bearer-token"),
        pytest.param(PROJECT.replace("/v1/", "/v1beta1/"), {"x-goog-api-key": KEY}, "api_key", id="project-api-key"),
    ],
)
async def test_vertex_paths_answer_with_traffic_type(
    sim: RunningSimulator, http: aiohttp.ClientSession, path: str, auth: dict[str, str], credential: str
) -> None:
    status, data, headers = await post(http, sim, path, body(), auth=auth)
    assert status == 200, data
    assert data["candidates"][0]["content"]["parts"] == [{"text": "Simulated answer to: hi"}]
    usage = data["usageMetadata"]
    assert usage["trafficType"] == "ON_DEMAND" and "serviceTier" not in usage
    assert "x-gemini-service-tier" not in headers  # the Gemini API's header; Vertex says it in the body
    [facts] = sim.sim.stats.vertex_calls
    assert (facts["path"], facts["credential"], facts["status"]) == (path, credential, 200)
    assert KEY not in str(sim.sim.stats.to_json()) and TOKEN not in str(sim.sim.stats.to_json())


async def test_vertex_refuses_a_call_without_credentials_and_unknown_publishers(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    status, data, _ = await post(http, sim, PROJECT, body(), auth={"Authorization": "Bearer "})
    assert (status, data["error"]["status"]) == (401, "UNAUTHENTICATED")
    status, data, _ = await post(http, sim, PROJECT.replace("publishers/google", "publishers/acme"), body())
    assert (status, data["error"]["status"]) == (404, "NOT_FOUND")
    assert "publishers/acme/models/gemini-2.5-flash" in data["error"]["message"]
    assert sim.sim.stats.by_status == {401: 1, 404: 1}


@pytest.mark.parametrize(
    ("header", "traffic_type", "tier"),
    [
        pytest.param(None, "ON_DEMAND", "standard", id="no-header"),
        pytest.param("flex", "ON_DEMAND_FLEX", "flex", id="flex"),
        pytest.param("priority", "ON_DEMAND_PRIORITY", "priority", id="priority"),
    ],
)
async def test_the_header_chooses_the_tier(
    sim: RunningSimulator, http: aiohttp.ClientSession, header: str | None, traffic_type: str, tier: str
) -> None:
    status, data, _ = await post(http, sim, EXPRESS, body(), {TIER_HEADER: header} if header else None)
    assert status == 200
    assert data["usageMetadata"]["trafficType"] == traffic_type
    assert sim.sim.stats.by_tier == {tier: 1}
    assert sim.sim.stats.by_traffic_type == {traffic_type: 1}
    assert sim.sim.stats.vertex_calls[-1]["shared_request_type"] == header


@pytest.mark.parametrize(
    ("field", "value"),
    [("serviceTier", "flex"), ("service_tier", "flex"), ("serviceTier", "standard"), ("serviceTier", 7)],
)
async def test_a_body_service_tier_that_is_not_an_enum_name_is_refused(
    sim: RunningSimulator, http: aiohttp.ClientSession, field: str, value: Any
) -> None:
    status, data, _ = await post(http, sim, PROJECT, body(**{field: value}), {TIER_HEADER: "flex"})
    assert status == 400
    error = data["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    assert error["message"].startswith(
        "Invalid value at 'service_tier' (type.googleapis.com/google.cloud.aiplatform.v1.ServiceTier)"
    )
    [violation] = error["details"][0]["fieldViolations"]
    assert violation["field"] == "service_tier"
    facts = sim.sim.stats.vertex_calls[-1]
    assert facts["body_has_service_tier"] and facts["status"] == 400 and facts["traffic_type"] is None
    assert sim.sim.stats.ok_by_tier == {}


async def test_service_tier_flex_in_the_body_is_served_and_billed_at_standard(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    sim.sim.config = sim.sim.config.updated({"rate_503": 1.0})  # every flex call would be shed
    status, data, _ = await post(http, sim, EXPRESS, body(serviceTier="SERVICE_TIER_FLEX"))
    assert status == 200  # not shed: the body field is not flex on Vertex
    assert data["usageMetadata"]["trafficType"] == "ON_DEMAND"
    facts = sim.sim.stats.vertex_calls[-1]
    assert (facts["body_service_tier"], facts["traffic_type"]) == ("SERVICE_TIER_FLEX", "ON_DEMAND")


async def test_flex_by_header_is_shed_like_the_gemini_api_and_priority_is_not(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    sim.sim.config = sim.sim.config.updated({"rate_503": 1.0})
    status, data, _ = await post(http, sim, EXPRESS, body(), {TIER_HEADER: "flex"})
    assert (status, data["error"]["status"]) == (503, "UNAVAILABLE")
    status, data, _ = await post(http, sim, EXPRESS, body(), {TIER_HEADER: "priority"})
    assert status == 200 and data["usageMetadata"]["trafficType"] == "ON_DEMAND_PRIORITY"
    assert sim.sim.stats.sheds == {"random": 1}


async def test_a_simulator_that_serves_flex_at_standard_says_so(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    sim.sim.config = sim.sim.config.updated({"serve_flex_as": "standard"})
    status, data, _ = await post(http, sim, EXPRESS, body(), {TIER_HEADER: "flex"})
    assert status == 200 and data["usageMetadata"]["trafficType"] == "ON_DEMAND"
    status, data, headers = await post(http, sim, f"/v1beta/models/{MODEL}:generateContent", body(serviceTier="flex"))
    assert status == 200 and headers["x-gemini-service-tier"] == "standard"  # the Gemini API path says it too
    assert data["usageMetadata"]["serviceTier"] == "standard"
    assert sim.sim.stats.by_tier == {"flex": 2}


async def test_vertex_stream_chunks_carry_the_traffic_type(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    path = EXPRESS.replace(":generateContent", ":streamGenerateContent")
    headers = {"x-goog-api-key": KEY, TIER_HEADER: "flex"}
    async with http.post(f"{sim.base_url}{path}?alt=sse", json=body("stream this please"), headers=headers) as r:
        assert r.status == 200 and "x-gemini-service-tier" not in {k.lower() for k in r.headers}
        text = await r.text()
    chunks = [line for line in text.splitlines() if line.startswith("data: ")]
    assert len(chunks) > 1
    assert all('"trafficType": "ON_DEMAND_FLEX"' in chunk and '"serviceTier"' not in chunk for chunk in chunks)


async def test_a_vertex_429_has_no_details_and_is_not_a_billing_stop(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    status, data, _ = await post(http, sim, EXPRESS, body("busy [[fault:429:retry=3s]]"), {TIER_HEADER: "flex"})
    assert status == 429
    assert data == {"error": {"code": 429, "message": RESOURCE_EXHAUSTED_MESSAGE, "status": "RESOURCE_EXHAUSTED"}}
    vertex = classify.classify_api_error(429, "RESOURCE_EXHAUSTED", RESOURCE_EXHAUSTED_MESSAGE, data)
    assert (vertex.outcome, vertex.quota, vertex.retry_after_s) == (Outcome.RATE_LIMITED, classify.QuotaKind.PER_MINUTE,
                                                                    None)
    status, data, _ = await post(http, sim, f"/v1beta/models/{MODEL}:generateContent", body("[[fault:429-billing]]"))
    billing = classify.classify_api_error(429, "RESOURCE_EXHAUSTED", data["error"]["message"], data)
    assert billing.quota == classify.QuotaKind.BILLING  # the Gemini API's detail-less 429 still is


# -- the worker's Vertex mode of the Gemini seam --------------------------------------------------------


def vertex_settings(sim: RunningSimulator, **overrides: Any) -> WorkerConfig:
    base: dict[str, Any] = {"vertex": True, "vertex_api_key": KEY, "gemini_base_url": sim.base_url,
                            "gemini_api_key": None, "request_timeout_s": 10}
    return make_settings(**(base | overrides))


async def generate(client: GeminiClient, tier: Tier, model: str = MODEL) -> Any:
    try:
        return await client.generate(GenerateRequest(model=model, prompt="Hello there"), tier=tier, timeout_s=10)
    finally:
        await client.aclose()


async def test_express_mode_flex_sends_the_header_and_never_the_body_tier(sim: RunningSimulator) -> None:
    got = await generate(GeminiClient(vertex_settings(sim)), Tier.FLEX)
    assert got.served_tier == "flex" and got.usage.traffic_type == "ON_DEMAND_FLEX" and got.text
    [facts] = sim.sim.stats.vertex_calls
    assert facts["path"] == EXPRESS and facts["credential"] == "api_key"
    assert facts["shared_request_type"] == "flex"
    assert facts["body_has_service_tier"] is False


async def test_express_mode_standard_sends_neither(sim: RunningSimulator) -> None:
    got = await generate(GeminiClient(vertex_settings(sim)), Tier.STANDARD)
    assert got.served_tier == "standard"
    [facts] = sim.sim.stats.vertex_calls
    assert facts["shared_request_type"] is None and facts["body_has_service_tier"] is False


async def test_project_mode_uses_the_credentials_project_and_location(sim: RunningSimulator) -> None:
    settings = vertex_settings(sim, vertex_api_key=None, vertex_project="proj-1", vertex_location="us-central1",
                               vertex_api_version="v1")
    credentials = google.oauth2.credentials.Credentials(token=TOKEN)  # type: ignore[no-untyped-call]
    got = await generate(GeminiClient(settings, credentials=credentials), Tier.FLEX, model=f"models/{MODEL}")
    assert got.served_tier == "flex"
    [facts] = sim.sim.stats.vertex_calls
    # "models/" dropped: on Vertex it would name a project's own model, not Google's
    assert facts["path"] == PROJECT.replace("global", "us-central1")
    assert facts["credential"] == "bearer" and facts["shared_request_type"] == "flex"


@pytest.mark.parametrize(
    ("traffic_type", "tier"),
    [
        pytest.param("ON_DEMAND_FLEX", "flex", id="flex"),
        pytest.param("ON_DEMAND", "standard", id="standard"),
        pytest.param("ON_DEMAND_PRIORITY", "priority", id="priority"),
        pytest.param("PROVISIONED_THROUGHPUT", "provisioned", id="provisioned-throughput"),
        pytest.param("ON_DEMAND_SOMETHING_NEW", "on_demand_something_new", id="unknown-kept",
                     marks=pytest.mark.filterwarnings("ignore:ON_DEMAND_SOMETHING_NEW is not a valid TrafficType")),
        pytest.param("TRAFFIC_TYPE_UNSPECIFIED", None, id="unspecified"),
        pytest.param(None, None, id="absent"),
    ],
)
def test_served_tier_from_the_traffic_type(traffic_type: str | None, tier: str | None) -> None:
    usage: dict[str, Any] = {"promptTokenCount": 1, "totalTokenCount": 2}
    if traffic_type is not None:
        usage["trafficType"] = traffic_type
    response = types.GenerateContentResponse.model_validate({"candidates": [], "usageMetadata": usage})
    assert traffic_tier(response) == tier
    assert to_answer(response, vertex=True).served_tier == tier


def test_the_gemini_api_path_still_reads_only_its_header() -> None:
    wire = {"candidates": [], "usageMetadata": {"promptTokenCount": 1, "trafficType": "ON_DEMAND"}}
    response = types.GenerateContentResponse.model_validate(wire)
    response.sdk_http_response = types.HttpResponse(headers={"X-Gemini-Service-Tier": "flex"})
    assert to_answer(response).served_tier == "flex"
    assert to_answer(response, vertex=True).served_tier == "standard"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"vertex": True}, "FLEXQ_VERTEX=1 needs FLEXQ_VERTEX_API_KEY", id="vertex-without-credentials"),
        pytest.param({"vertex": True, "vertex_api_key": KEY, "vertex_project": "p"}, "both set", id="both"),
        pytest.param({"vertex_project": "p"}, "FLEXQ_VERTEX is not", id="project-without-vertex"),
        pytest.param({"vertex_api_key": KEY}, "FLEXQ_VERTEX is not", id="key-without-vertex"),
    ],
)
def test_vertex_settings_that_cannot_make_a_call_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        require_api_key(make_settings(**overrides))
    assert KEY not in str(raised.value)


def test_vertex_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLEXQ_VERTEX", "1")
    monkeypatch.setenv("FLEXQ_VERTEX_API_KEY", KEY)
    express = WorkerConfig()
    assert require_api_key(express) == KEY  # no GEMINI_API_KEY needed
    assert KEY in express.secrets and KEY not in repr(express) and KEY not in express.model_dump_json()
    assert (express.vertex_location, express.vertex_api_version) == ("global", "v1beta1")
    monkeypatch.delenv("FLEXQ_VERTEX_API_KEY")
    monkeypatch.setenv("FLEXQ_VERTEX_PROJECT", "proj-1")
    monkeypatch.setenv("FLEXQ_VERTEX_LOCATION", "europe-west4")
    adc = WorkerConfig()
    assert require_api_key(adc) is None  # Application Default Credentials, found by the SDK
    assert (adc.vertex_project, adc.vertex_location) == ("proj-1", "europe-west4")


# -- cost follows the served tier (worker.runner._finish) ------------------------------------------------


@pytest.mark.parametrize(
    ("served", "billed"),
    [
        pytest.param("flex", Tier.FLEX, id="served-flex"),
        pytest.param("standard", Tier.STANDARD, id="flex-served-at-standard"),
        pytest.param(None, Tier.FLEX, id="not-said"),
        pytest.param("provisioned", Tier.FLEX, id="other-tier-keeps-the-asked-price"),
    ],
)
async def test_cost_follows_the_served_tier(fake_queue: FlexQueue, served: str | None, billed: Tier) -> None:
    await fake_queue.enqueue({"model": MODEL, "prompt": "Hi"}, job_id="j1")
    gemini = ScriptedGemini.of(answer(served_tier=served))
    runner = Runner(store=fake_queue.store, gemini=gemini, settings=make_settings(), worker_name="w", rand=lambda: 0.5)
    assert await runner.run("j1") is None
    record = await fake_queue.get("j1")
    assert record.status == Status.SUCCEEDED and record.attempts[0].tier == Tier.FLEX
    assert record.cost_usd == cost_usd(MODEL, USAGE, billed)
    assert record.standard_cost_usd == cost_usd(MODEL, USAGE, Tier.STANDARD)
    stats = await fake_queue.stats()
    assert stats["cost"]["spent_usd"] == pytest.approx(cost_usd(MODEL, USAGE, billed), abs=1e-6)


# -- end to end: a `flexq worker` in Vertex mode, the simulator, Redis ------------------------------------


def vertex_env(redis_url: str, sim_url: str) -> dict[str, str]:
    # no Gemini API key at all: Vertex mode runs on FLEXQ_VERTEX_API_KEY alone
    return worker_env(redis_url, sim_url, "", FLEXQ_VERTEX="1", FLEXQ_VERTEX_API_KEY=KEY)


@pytest.mark.e2e
@pytest.mark.redis
async def test_worker_in_vertex_mode_runs_a_flex_job_at_the_flex_price(
    real_queue: FlexQueue, redis_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    await real_queue.enqueue({"model": MODEL, "prompt": "Vertex, please"}, job_id="vx1")
    with running_worker(vertex_env(redis_url, sim.base_url), tmp_path / "w.log") as worker:
        record = (await wait_all(real_queue, ["vx1"], timeout_s=30))["vx1"]
    assert record.status == Status.SUCCEEDED, (record.error, worker.log())
    [facts] = sim.sim.stats.vertex_calls
    assert facts["path"] == EXPRESS and facts["credential"] == "api_key"
    assert facts["shared_request_type"] == "flex"
    assert facts["body_has_service_tier"] is False  # never the body field: Vertex bills it at standard
    [attempt] = record.attempts
    assert (attempt.tier, attempt.served_tier) == (Tier.FLEX, "flex")
    assert record.result is not None and record.result.usage.traffic_type == "ON_DEMAND_FLEX"
    usage = record.result.usage
    assert record.cost_usd is not None and record.cost_usd == cost_usd(MODEL, usage, Tier.FLEX)
    assert record.standard_cost_usd == pytest.approx(2 * record.cost_usd)
    assert KEY not in worker.log()


@pytest.mark.e2e
@pytest.mark.redis
async def test_a_flex_call_served_at_standard_is_recorded_at_the_standard_price(
    real_queue: FlexQueue, redis_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    sim.sim.config = sim.sim.config.updated({"serve_flex_as": "standard"})
    await real_queue.enqueue({"model": MODEL, "prompt": "Vertex, cheaply please"}, job_id="vx2")
    with running_worker(vertex_env(redis_url, sim.base_url), tmp_path / "w.log") as worker:
        record = (await wait_all(real_queue, ["vx2"], timeout_s=30))["vx2"]
    assert record.status == Status.SUCCEEDED, (record.error, worker.log())
    assert sim.sim.stats.vertex_calls[-1]["shared_request_type"] == "flex"
    [attempt] = record.attempts
    assert (attempt.tier, attempt.served_tier) == (Tier.FLEX, "standard")
    assert record.result is not None and record.result.tier == "standard"
    assert record.result.usage.traffic_type == "ON_DEMAND"
    assert record.cost_usd is not None and record.cost_usd == record.standard_cost_usd
    assert record.cost_usd == cost_usd(MODEL, record.result.usage, Tier.STANDARD)


@pytest.fixture
async def vertex_client(sim: RunningSimulator) -> AsyncIterator[GeminiClient]:
    client = GeminiClient(vertex_settings(sim))
    yield client
    await client.aclose()


async def test_a_vertex_429_through_the_sdk_pauses_briefly_not_for_billing(vertex_client: GeminiClient) -> None:
    request = GenerateRequest(model=MODEL, prompt="[[fault:429]]")
    with pytest.raises(genai_errors.ClientError) as raised:
        await vertex_client.generate(request, tier=Tier.FLEX, timeout_s=10)
    classified = classify.classify_exception(raised.value)
    assert (classified.outcome, classified.http_status, classified.quota) == (
        Outcome.RATE_LIMITED, 429, classify.QuotaKind.PER_MINUTE
    )
