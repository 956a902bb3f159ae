"""examples/web_app.py served for real: real Redis, a real worker, the simulator, HTTP from a client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from examples.web_app import make_app
from tests.conftest import API_KEY, make_settings
from tests.helpers import running_worker, worker_env

pytestmark = [pytest.mark.redis, pytest.mark.e2e]


@pytest.fixture
async def http(redis_url: str) -> AsyncIterator[ClientSession]:
    server = TestServer(make_app(make_settings(redis_url=redis_url)))
    await server.start_server()
    async with ClientSession(str(server.make_url(""))) as session:
        yield session
    await server.close()


async def _sse(
    http: ClientSession, path: str, first: asyncio.Event | None = None
) -> list[tuple[str, dict[str, object]]]:
    events: list[tuple[str, dict[str, object]]] = []
    async with http.get(path) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        name = ""
        async for raw in resp.content:
            text = raw.decode().rstrip("\n")
            if text.startswith("event: "):
                name = text[len("event: "):]
            elif text.startswith("data: "):
                events.append((name, json.loads(text[len("data: "):])))
                if first is not None:
                    first.set()
    return events


async def test_post_wait_and_stream_a_job(http: ClientSession, redis_url: str, sim_url: str, tmp_path: Path) -> None:
    job = {"model": "gemini-2.5-flash", "prompt": "web [[fault:503x1]]", "id": "web-1", "tags": {"user": "u1"}}
    async with http.post("/jobs", json=job) as resp:
        assert (resp.status, await resp.json()) == (201, {"id": "web-1", "status": "queued"})
    async with http.post("/jobs", json=job) as resp:  # a retried POST finds the same job
        assert resp.status == 200
    async with http.get("/jobs/web-1") as resp:
        assert (await resp.json())["status"] == "queued"
    connected = asyncio.Event()
    following = asyncio.ensure_future(_sse(http, "/jobs/web-1/events", connected))
    await asyncio.wait_for(connected.wait(), 10)  # the stream is open before the job starts
    with running_worker(worker_env(redis_url, sim_url, API_KEY), tmp_path / "w.log"):
        async with http.get("/jobs/web-1", params={"wait": "30"}) as resp:
            done = await resp.json()
        stream = await asyncio.wait_for(following, 10)
    assert done["status"] == "succeeded" and "web" in done["text"]
    assert [a["outcome"] for a in done["attempts"]] == ["overloaded", "ok"]
    assert stream[0] == ("status", {"id": "web-1", "status": "queued"})
    changes = [(data["status"], data.get("outcome")) for name, data in stream if name == "change"]
    assert changes == [("running", None), ("retrying", "overloaded"), ("running", None), ("succeeded", "ok")]
    async with http.get("/jobs/web-1/events") as resp:  # an ended job: its status, then the end
        assert (await resp.text()).count("event:") == 1


async def test_bad_requests_get_clear_answers(http: ClientSession) -> None:
    async with http.post("/jobs", json={"model": "gemini-2.5-flash", "prompt": ""}) as resp:
        body = await resp.json()
        assert resp.status == 422 and body["field"] == "prompt"
    async with http.post("/jobs", data=b"not json") as resp:
        assert resp.status == 400
    async with http.get("/jobs/nope") as resp:
        assert resp.status == 404
    async with http.get("/jobs/nope/events") as resp:
        assert resp.status == 404
    async with http.get("/jobs/nope", params={"wait": "900"}) as resp:
        assert resp.status == 400 and "wait" in await resp.text()
