"""Every Gemini output survives the queue, end to end: a real ``flexq worker`` process, the real
google-genai SDK, real Redis and the simulator. Images (bytes exact, stored apart from the record),
image-editing and function-calling threads whose thought signatures reach the simulator intact,
structured output checked against its schema, and the bounded re-asks of unusable answers."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis

from producer.queue import FlexQueue
from producer.status import Outcome, Status
from simulator import RunningSimulator
from simulator.images import png_bytes
from tests.conftest import API_KEY
from tests.helpers import running_worker, wait_all, worker_env

IMAGE_MODEL = "gemini-3-pro-image-preview"
AGENT_MODEL = "gemini-3-flash-preview"
ROOT = Path(__file__).resolve().parents[1]


def outcomes(record: Any) -> list[str | None]:
    return [str(a.outcome) if a.outcome else None for a in record.attempts]


async def test_image_jobs_threads_and_blobs(
    real_queue: FlexQueue, redis_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    reference = png_bytes(64, 48)
    other_refs = [png_bytes(32 + i, 32) for i in range(13)]
    edit_parts = [{"text": "put these together"},
                  *[{"inline_data": {"mime_type": "image/png", "data": base64.b64encode(d).decode()}}
                    for d in [reference, *other_refs]]]
    await real_queue.enqueue({"model": IMAGE_MODEL, "prompt": "a lighthouse at dawn",
                              "config": {"image_config": {"image_size": "4K", "aspect_ratio": "16:9"}}}, job_id="img")
    await real_queue.enqueue({"model": IMAGE_MODEL, "contents": [{"role": "user", "parts": edit_parts}]},
                             job_id="refs-a")
    shared_only = [{"text": "again"}, edit_parts[1]]
    await real_queue.enqueue({"model": IMAGE_MODEL, "contents": [{"role": "user", "parts": shared_only}]},
                             job_id="refs-b")
    await real_queue.enqueue({"model": IMAGE_MODEL, "prompt": "a fox [[fault:text_onlyx1]]"}, job_id="late-image")
    await real_queue.enqueue({"model": IMAGE_MODEL, "prompt": "a wolf [[fault:text_only]]"}, job_id="never-image")
    env = worker_env(redis_url, sim.base_url, API_KEY, FLEXQ_MAX_OUTPUT_RETRIES="2")
    with running_worker(env, tmp_path / "w.log", "--concurrency", "8"):
        done = await wait_all(real_queue, ["img", "refs-a", "refs-b", "late-image", "never-image"])
        assert {k: str(r.status) for k, r in done.items()} == {
            "img": "succeeded", "refs-a": "succeeded", "refs-b": "succeeded", "late-image": "succeeded",
            "never-image": "failed",
        }
        # an image edit over two turns: each turn sends the earlier image back with its signature
        await real_queue.enqueue({"continue_from": "img", "prompt": "make the sky purple"}, job_id="edit-1")
        first = await wait_all(real_queue, ["edit-1"])
        assert first["edit-1"].status == Status.SUCCEEDED, first["edit-1"].error
        await real_queue.enqueue({"continue_from": "edit-1", "parts": [
            {"text": "and add this boat"}, {"inline_data": {"mime_type": "image/png",
                                                          "data": base64.b64encode(reference).decode()}}]},
            job_id="edit-2")
        second = await wait_all(real_queue, ["edit-2"])
        assert second["edit-2"].status == Status.SUCCEEDED, second["edit-2"].error

    # the 4K image: the bytes served, stored apart; the record stays small
    record = done["img"]
    assert record.result is not None and len(record.result.images) == 1
    image = record.result.images[0]
    assert (image.width, image.height, image.mime_type) == (4096, 2304, "image/png")
    served = png_bytes(4096, 2304)
    assert image.sha256 == hashlib.sha256(served).hexdigest()
    raw_record = sync_redis.Redis.from_url(redis_url).get(real_queue.store.keys.record("img"))
    assert raw_record is not None and len(raw_record) < 20_000
    assert record.cost_usd == pytest.approx(0.12)  # one 4K image at flex: half of $0.24
    saved = subprocess.run(  # noqa: ASYNC221 - the real CLI, once, after the worker is gone
        [sys.executable, "-m", "flexq", "result", "img", "--save", str(tmp_path / "out")],
        env={**env, "REDIS_URL": redis_url}, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert saved.returncode == 0, saved.stderr
    path = tmp_path / "out" / "img-0.png"
    assert str(path) in saved.stdout and path.read_bytes() == served

    # 14 reference images, one of them shared by a second job: each distinct image stored once
    client = sync_redis.Redis.from_url(redis_url)
    blob_keys = client.keys(f"{real_queue.store.keys.queue}:blob:*")
    answers = {r.sha256 for rec in [*done.values(), first["edit-1"], second["edit-2"]] if rec.result
               for r in rec.result.images}
    assert len(blob_keys) == len({hashlib.sha256(d).hexdigest() for d in [reference, *other_refs]} | answers)

    # a text-only answer to an image request is re-asked, a bounded number of times
    assert outcomes(done["late-image"]) == [Outcome.NO_IMAGE, Outcome.OK]
    never = done["never-image"]
    assert outcomes(never) == [Outcome.NO_IMAGE] * 3
    assert never.error is not None and never.error.kind == "no_image"
    assert "the model said" in never.error.message

    # the thread links its records; the signatures went back intact (the simulator refuses otherwise)
    assert [r.id for r in await real_queue.thread("edit-2")] == ["img", "edit-1", "edit-2"]
    assert sim.sim.stats.signatures_checked >= 2 and sim.sim.stats.signatures_rejected == 0


WEATHER_TOOLS = [{"function_declarations": [
    {"name": "get_weather", "description": "weather in a city",
     "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}, "required": ["city"]}},
    {"name": "get_time", "description": "local time in a city",
     "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}, "required": ["city"]}},
]}]
REPORT_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "temperature_c": {"type": "number"}},
                 "required": ["city", "temperature_c"]}


async def test_function_calling_thread_and_structured_output(
    real_queue: FlexQueue, redis_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    json_config = {"response_mime_type": "application/json", "response_json_schema": REPORT_SCHEMA}
    await real_queue.enqueue({"model": AGENT_MODEL, "prompt": "report", "config": json_config}, job_id="json-ok")
    await real_queue.enqueue({"model": AGENT_MODEL, "prompt": "report [[fault:bad_jsonx1]]", "config": json_config},
                             job_id="json-late")
    await real_queue.enqueue({"model": AGENT_MODEL, "prompt": "report [[fault:truncated_json]]",
                              "config": json_config}, job_id="json-never")
    await real_queue.enqueue({"model": AGENT_MODEL, "prompt": "plan a trip to Paris",
                              "config": {"tools": WEATHER_TOOLS}}, job_id="step-1")
    env = worker_env(redis_url, sim.base_url, API_KEY, FLEXQ_MAX_OUTPUT_RETRIES="1")
    with running_worker(env, tmp_path / "w.log", "--concurrency", "8"):
        done = await wait_all(real_queue, ["json-ok", "json-late", "json-never", "step-1"])
        step = done["step-1"]
        for n in (2, 3):  # act on the function calls, then continue the thread with their responses
            assert step.status == Status.SUCCEEDED and step.result is not None, step.error
            calls = step.result.function_calls
            assert len(calls) == 1
            responses = [{"function_response": {"id": c.id, "name": c.name, "response": {"ok": f"{c.name} done"}}}
                         for c in calls]
            await real_queue.enqueue({"continue_from": step.id, "parts": responses}, job_id=f"step-{n}")
            step = (await wait_all(real_queue, [f"step-{n}"]))[f"step-{n}"]
    assert step.status == Status.SUCCEEDED and step.result is not None, step.error
    assert step.result.function_calls == [] and step.result.text  # the model's final answer
    names = [(await real_queue.get(f"step-{n}")).result.function_calls[0].name for n in (1, 2)]  # type: ignore[union-attr]
    assert names == ["get_weather", "get_time"]
    assert sim.sim.stats.signatures_checked >= 2 and sim.sim.stats.signatures_rejected == 0
    assert [r.id for r in await real_queue.thread("step-3")] == ["step-1", "step-2", "step-3"]

    ok = done["json-ok"]
    assert ok.result is not None and isinstance(ok.result.parsed, dict)
    assert set(REPORT_SCHEMA["required"]) <= set(ok.result.parsed)  # type: ignore[call-overload]
    assert json.loads(ok.result.text or "") == ok.result.parsed
    assert outcomes(done["json-late"]) == [Outcome.INVALID_OUTPUT, Outcome.OK]
    never = done["json-never"]
    assert never.status == Status.FAILED and outcomes(never) == [Outcome.INVALID_OUTPUT] * 2
    assert never.error is not None and never.error.kind == "invalid_output"
    assert "max_output_tokens" in never.error.message  # says why: the answer was cut
