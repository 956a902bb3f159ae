"""The simulator's priority tier: never shed, and past ``priority_capacity`` quietly served at standard,
on the Gemini API path (``serviceTier: priority``, the ``x-gemini-service-tier`` header says what was
served) and on Vertex AI (the shared-request-type header, ``usageMetadata.trafficType``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from google import genai
from google.genai import errors, types

from simulator import RunningSimulator
from simulator.cli import _config_from, _parser, main
from tests.conftest import SimFactory, sdk_client

pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession from ClientSession is discouraged:DeprecationWarning"
)

MODEL = "gemini-2.5-flash"
KEY = "priority-key-DO-NOT-LEAK-8c1f07"
PRIORITY = types.GenerateContentConfig(service_tier=types.ServiceTier.PRIORITY)
FLEX = types.GenerateContentConfig(service_tier=types.ServiceTier.FLEX)
VERTEX_EXPRESS = f"/v1beta1/publishers/google/models/{MODEL}:generateContent"
VERTEX_TIER_HEADER = "X-Vertex-AI-LLM-Shared-Request-Type"
SLOW = "[[latency:400ms]]"  # long enough for the other calls of a gather to arrive while it is in service


def new_client(clients: list[genai.Client], sim: RunningSimulator, api_key: str = KEY) -> genai.Client:
    return sdk_client(clients, sim, api_key)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def served_tier(response: types.GenerateContentResponse) -> str:
    assert response.sdk_http_response is not None and response.sdk_http_response.headers is not None
    headers = {k.lower(): v for k, v in response.sdk_http_response.headers.items()}
    return headers["x-gemini-service-tier"]


async def post(
    http: aiohttp.ClientSession, sim: RunningSimulator, path: str, payload: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with http.post(sim.base_url + path, json=payload, headers={"x-goog-api-key": KEY} | (headers or {})) as r:
        return r.status, await r.json(), {k.lower(): v for k, v in r.headers.items()}


def body(text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}], "generationConfig": {}} | extra


# ---- Gemini API ---------------------------------------------------------------------------------


async def test_priority_is_served_as_priority(make_sim: SimFactory, clients: list[genai.Client]) -> None:
    sim = await make_sim()
    client = new_client(clients, sim)
    response = await client.aio.models.generate_content(model=MODEL, contents="urgent", config=PRIORITY)
    assert response.text == "Simulated answer to: urgent"
    assert served_tier(response) == "priority"
    stats = sim.sim.stats
    assert stats.by_tier == {"priority": 1} and stats.ok_by_tier == {"priority": 1}
    assert (stats.priority_downgrades, stats.max_in_flight_priority, stats.in_flight_priority) == (0, 1, 0)


@pytest.mark.parametrize("value", ["priority", "PRIORITY", "SERVICE_TIER_PRIORITY", "service_tier_priority"])
@pytest.mark.parametrize("field", ["serviceTier", "service_tier"])
async def test_priority_spellings(
    make_sim: SimFactory, http: aiohttp.ClientSession, field: str, value: str
) -> None:
    sim = await make_sim()
    status, data, headers = await post(http, sim, f"/v1beta/models/{MODEL}:generateContent", body(**{field: value}))
    assert status == 200
    assert headers["x-gemini-service-tier"] == "priority" and data["usageMetadata"]["serviceTier"] == "priority"


async def test_priority_is_never_shed_when_flex_is(make_sim: SimFactory, clients: list[genai.Client]) -> None:
    sim = await make_sim(rate_503=1.0, capacity=1)
    client = new_client(clients, sim)
    with pytest.raises(errors.ServerError) as shed:
        await client.aio.models.generate_content(model=MODEL, contents="cheap", config=FLEX)
    assert shed.value.code == 503
    answers = await asyncio.gather(
        *(client.aio.models.generate_content(model=MODEL, contents=f"vip {i} {SLOW}", config=PRIORITY)
          for i in range(4))
    )
    assert [served_tier(a) for a in answers] == ["priority"] * 4
    stats = sim.sim.stats
    assert stats.sheds == {"random": 1} and stats.by_status == {200: 4, 503: 1}
    assert stats.max_in_flight_priority == 4 and stats.max_in_flight_flex == 0


async def test_past_priority_capacity_calls_are_served_at_standard(
    make_sim: SimFactory, clients: list[genai.Client]
) -> None:
    sim = await make_sim(priority_capacity=1)
    client = new_client(clients, sim)
    answers = await asyncio.gather(
        *(client.aio.models.generate_content(model=MODEL, contents=f"vip {i} {SLOW}", config=PRIORITY)
          for i in range(3))
    )
    assert sorted(served_tier(a) for a in answers) == ["priority", "standard", "standard"]
    assert all(a.text and a.text.startswith("Simulated answer to: vip") for a in answers)  # served, not refused
    stats = sim.sim.stats
    assert stats.priority_downgrades == 2 and stats.max_in_flight_priority == 1 and stats.in_flight_priority == 0
    assert stats.by_tier == {"priority": 3} and stats.by_status == {200: 3}
    # the capacity frees up once those calls are done
    again = await client.aio.models.generate_content(model=MODEL, contents="vip again", config=PRIORITY)
    assert served_tier(again) == "priority"


async def test_priority_capacity_is_set_at_run_time(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    async with http.post(f"{sim.base_url}/_sim/config", json={"priority_capacity": 0}) as r:
        assert r.status == 200 and (await r.json())["priority_capacity"] == 0
    path = f"/v1beta/models/{MODEL}:generateContent"
    status, data, headers = await post(http, sim, path, body(serviceTier="priority"))
    assert status == 200
    assert headers["x-gemini-service-tier"] == "standard" and data["usageMetadata"]["serviceTier"] == "standard"
    async with http.get(f"{sim.base_url}/_sim/stats") as r:
        stats = await r.json()
    assert stats["priority_downgrades"] == 1 and stats["by_tier"] == {"priority": 1}
    async with http.post(f"{sim.base_url}/_sim/config", json={"priority_capacity": -1}) as r:
        assert r.status == 400 and "priority_capacity" in (await r.json())["error"]
    async with http.post(f"{sim.base_url}/_sim/config", json={"priority_capacity": None}) as r:
        assert r.status == 200
    _, _, headers = await post(http, sim, path, body(serviceTier="priority"))
    assert headers["x-gemini-service-tier"] == "priority"


# ---- Vertex AI ----------------------------------------------------------------------------------


async def test_vertex_priority_header_gives_on_demand_priority(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(rate_503=1.0)
    status, data, headers = await post(http, sim, VERTEX_EXPRESS, body(), {VERTEX_TIER_HEADER: "priority"})
    assert status == 200 and data["usageMetadata"]["trafficType"] == "ON_DEMAND_PRIORITY"
    assert "x-gemini-service-tier" not in headers and "serviceTier" not in data["usageMetadata"]
    assert sim.sim.stats.by_traffic_type == {"ON_DEMAND_PRIORITY": 1}


async def test_vertex_priority_past_capacity_is_on_demand(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(priority_capacity=1)
    results = await asyncio.gather(
        *(post(http, sim, VERTEX_EXPRESS, body(f"vip {i} {SLOW}"), {VERTEX_TIER_HEADER: "priority"})
          for i in range(2))
    )
    assert [status for status, _, _ in results] == [200, 200]
    traffic = sorted(data["usageMetadata"]["trafficType"] for _, data, _ in results)
    assert traffic == ["ON_DEMAND", "ON_DEMAND_PRIORITY"]
    stats = sim.sim.stats
    assert stats.by_traffic_type == {"ON_DEMAND": 1, "ON_DEMAND_PRIORITY": 1} and stats.priority_downgrades == 1
    assert sorted(call["traffic_type"] for call in stats.vertex_calls) == ["ON_DEMAND", "ON_DEMAND_PRIORITY"]


def test_priority_capacity_flag() -> None:
    assert _config_from(_parser().parse_args(["--priority-capacity", "3"])).priority_capacity == 3
    assert _config_from(_parser().parse_args([])).priority_capacity is None
    assert main(["--priority-capacity", "-1"]) == 2
