"""The simulator's Batch API and Files API, driven by the real google-genai SDK (Gemini API, not Vertex AI).

A batch is PENDING for the first half of ``batch_turnaround_s``, RUNNING for the second, then ends as
``batch_outcome`` says; tests wait for it with ``poll`` (a deadline), never a bare sleep.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from google import genai
from google.genai import errors, types

from simulator import RunningSimulator, SimConfig
from simulator.cli import _config_from, _parser, main
from tests.conftest import SimFactory, sdk_client
from tests.helpers import poll

pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession from ClientSession is discouraged:DeprecationWarning"
)

MODEL = "gemini-2.5-flash"
KEY = "batch-key-DO-NOT-LEAK-2b9d41"
FAST_S = 0.2  # a batch turnaround short enough to wait for
ENDED = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}



@pytest.fixture
def make_sim(make_sim: SimFactory) -> SimFactory:
    """Simulators whose batches end after ``FAST_S`` unless told otherwise."""

    async def factory(**overrides: Any) -> RunningSimulator:
        return await make_sim(**({"batch_turnaround_s": FAST_S} | overrides))

    return factory


@pytest.fixture
async def sim(make_sim: SimFactory) -> RunningSimulator:
    return await make_sim()


def new_client(clients: list[genai.Client], sim: RunningSimulator, api_key: str = KEY) -> genai.Client:
    return sdk_client(clients, sim, api_key)


@pytest.fixture
def client(sim: RunningSimulator, clients: list[genai.Client]) -> genai.Client:
    return new_client(clients, sim)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def inline(text: str, key: str, **extra: Any) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}], "metadata": {"key": key}} | extra


async def wait_ended(client: genai.Client, name: str, seen: list[str] | None = None) -> types.BatchJob:
    async def check() -> types.BatchJob | None:
        job = await client.aio.batches.get(name=name)
        assert job.state is not None
        if seen is not None:
            seen.append(job.state.value)
        return job if job.state.value in ENDED else None

    return await poll(check, timeout_s=15, what=f"batch {name} to end")


def jsonl(*lines: Any) -> io.BytesIO:
    return io.BytesIO("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines).encode())


# ---- inline batches -----------------------------------------------------------------------------


async def test_inline_batch_goes_pending_running_succeeded_with_answers_by_key(
    make_sim: SimFactory, clients: list[genai.Client]
) -> None:
    sim = await make_sim(batch_turnaround_s=1.0)  # RUNNING lasts 0.5 s: longer than poll's longest pause
    client = new_client(clients, sim)
    src = [inline("hello", "a"), inline("bye", "b"), inline("third", "c")]
    job = await client.aio.batches.create(model=MODEL, src=src, config={"display_name": "nightly"})
    assert job.name is not None and job.name.startswith("batches/")
    assert (job.state, job.display_name, job.model) == (types.JobState.JOB_STATE_PENDING, "nightly", f"models/{MODEL}")
    assert job.dest is None and job.create_time is not None

    seen: list[str] = []
    done = await wait_ended(client, job.name, seen)
    assert done.state == types.JobState.JOB_STATE_SUCCEEDED
    assert "JOB_STATE_RUNNING" in seen and set(seen) <= {"JOB_STATE_PENDING", "JOB_STATE_RUNNING", *ENDED}
    assert done.end_time is not None and done.end_time >= job.create_time
    assert done.dest is not None and done.dest.file_name is None
    answers = done.dest.inlined_responses or []
    assert [r.metadata for r in answers] == [{"key": "a"}, {"key": "b"}, {"key": "c"}]
    assert [r.response.text for r in answers if r.response] == [
        "Simulated answer to: hello", "Simulated answer to: bye", "Simulated answer to: third"
    ]
    assert all(r.error is None for r in answers)
    usage = answers[0].response.usage_metadata if answers[0].response else None
    assert usage is not None and usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
    stats = sim.sim.stats
    assert stats.batches_created == 1 and stats.batches_by_state == {"BATCH_STATE_SUCCEEDED": 1}
    assert (stats.batch_requests_answered, stats.batch_request_errors) == (3, 0)
    assert stats.requests == 0  # batch requests are not generateContent calls
    assert KEY not in json.dumps(stats.to_json())


async def test_a_batch_answers_like_generate_content_json_schema_included(client: genai.Client) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["city", "n"]}
    config = {"response_mime_type": "application/json", "response_json_schema": schema}
    job = await client.aio.batches.create(model=MODEL, src=[inline("where?", "j", config=config)])
    assert job.name is not None
    done = await wait_ended(client, job.name)
    [answer] = (done.dest.inlined_responses if done.dest else None) or []
    assert answer.response is not None and answer.response.text is not None
    value = json.loads(answer.response.text)
    assert set(value) == {"city", "n"} and isinstance(value["n"], int)


async def test_a_bad_request_in_a_batch_is_an_error_entry_not_a_failed_batch(
    client: genai.Client, sim: RunningSimulator
) -> None:
    src = [inline("fine", "ok"), inline("hi [[fault:bogus]]", "bad"), inline("busy [[fault:503]]", "shed")]
    job = await client.aio.batches.create(model=MODEL, src=src)
    assert job.name is not None
    done = await wait_ended(client, job.name)
    assert done.state == types.JobState.JOB_STATE_SUCCEEDED
    by_key = {(r.metadata or {})["key"]: r for r in (done.dest.inlined_responses if done.dest else None) or []}
    assert by_key["ok"].response is not None and by_key["ok"].error is None
    bad, shed = by_key["bad"], by_key["shed"]
    assert bad.response is None and bad.error is not None
    assert (bad.error.code, bad.error.message) == (3, "Simulator: unknown directive(s): [[fault:bogus]]")
    assert shed.response is None and shed.error is not None and shed.error.code == 14  # UNAVAILABLE
    assert (sim.sim.stats.batch_requests_answered, sim.sim.stats.batch_request_errors) == (1, 2)


async def test_shuffled_answers_keep_their_metadata(make_sim: SimFactory, clients: list[genai.Client]) -> None:
    client = new_client(clients, await make_sim(batch_shuffle=True))
    keys = [f"k{i}" for i in range(8)]
    job = await client.aio.batches.create(model=MODEL, src=[inline(f"prompt {k}", k) for k in keys])
    assert job.name is not None
    done = await wait_ended(client, job.name)
    answers = (done.dest.inlined_responses if done.dest else None) or []
    got = [(r.metadata or {})["key"] for r in answers]
    assert got != keys and sorted(got) == keys
    for key, answer in zip(got, answers, strict=True):
        assert answer.response is not None and answer.response.text == f"Simulated answer to: prompt {key}"


# ---- a JSONL file as the source -----------------------------------------------------------------


async def test_jsonl_file_round_trip_keeps_keys_and_order(client: genai.Client, sim: RunningSimulator) -> None:
    source = jsonl(
        {"key": "first", "request": {"contents": [{"parts": [{"text": "one"}]}]}},
        {"key": "empty", "request": {"contents": []}},
        "not json at all",
        {"key": "last", "request": {"contents": [{"parts": [{"text": "two"}]}],
                                    "generationConfig": {"responseMimeType": "application/json"}}},
    )
    config = {"mime_type": "application/jsonl", "display_name": "in"}
    uploaded = await client.aio.files.upload(file=source, config=config)
    assert uploaded.name is not None and uploaded.name.startswith("files/")
    assert (uploaded.display_name, uploaded.mime_type, uploaded.source) == ("in", "application/jsonl",
                                                                           types.FileSource.UPLOADED)
    assert uploaded.size_bytes == len(source.getvalue())
    fetched = await client.aio.files.get(name=uploaded.name)
    assert fetched.sha256_hash == uploaded.sha256_hash and fetched.download_uri is None

    job = await client.aio.batches.create(model=MODEL, src=uploaded.name)
    assert job.name is not None
    done = await wait_ended(client, job.name)
    assert done.state == types.JobState.JOB_STATE_SUCCEEDED
    assert done.dest is not None and done.dest.inlined_responses is None
    assert done.dest.file_name is not None and done.dest.file_name.startswith("files/")

    lines = [json.loads(line) for line in (await client.aio.files.download(file=done.dest.file_name)).splitlines()]
    assert [line.get("key") for line in lines] == ["first", "empty", None, "last"]
    assert lines[0]["response"]["candidates"][0]["content"]["parts"] == [{"text": "Simulated answer to: one"}]
    assert lines[1]["error"] == {"code": 3, "message": "Request has empty input."} and "response" not in lines[1]
    assert lines[2]["error"]["code"] == 3 and "line 3" in lines[2]["error"]["message"].lower()
    assert json.loads(lines[3]["response"]["candidates"][0]["content"]["parts"][0]["text"]) == {
        "answer": "Simulated answer to: two"
    }
    # the responses file is a generated file: downloadable through its File too
    responses = await client.aio.files.get(name=done.dest.file_name)
    assert responses.source == types.FileSource.GENERATED and responses.download_uri is not None
    assert responses.download_uri.startswith(sim.base_url + "/download/v1beta/files/")
    assert await client.aio.files.download(file=responses) == await client.aio.files.download(file=done.dest.file_name)
    assert sim.sim.stats.files_uploaded == 1


async def test_an_uploaded_file_cannot_be_downloaded_and_a_deleted_one_is_gone(client: genai.Client) -> None:
    uploaded = await client.aio.files.upload(file=jsonl({"key": 1}), config={"mime_type": "application/jsonl"})
    assert uploaded.name is not None
    with pytest.raises(errors.ClientError) as refused:
        await client.aio.files.download(file=uploaded.name)
    assert refused.value.code == 400
    await client.aio.files.delete(name=uploaded.name)
    with pytest.raises(errors.ClientError) as gone:
        await client.aio.files.get(name=uploaded.name)
    assert gone.value.code == 403 and "may not exist" in str(gone.value.message)
    with pytest.raises(errors.ClientError) as missing:
        await client.aio.batches.create(model=MODEL, src=uploaded.name)
    assert missing.value.code == 400


async def test_a_large_file_uploads_in_several_chunks(client: genai.Client) -> None:
    data = b"x" * (8 * 1024 * 1024 + 100)  # the SDK sends 8 MiB chunks: two requests, then finalize
    uploaded = await client.aio.files.upload(file=io.BytesIO(data), config={"mime_type": "text/plain"})
    assert uploaded.size_bytes == len(data)


async def test_the_upload_url_is_absolute_and_points_back_at_the_simulator(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    start = {"X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start", "x-goog-api-key": KEY,
             "X-Goog-Upload-Header-Content-Length": "3", "X-Goog-Upload-Header-Content-Type": "text/plain"}
    async with http.post(f"{sim.base_url}/upload/v1beta/files", json={"file": {}}, headers=start) as r:
        assert r.status == 200 and r.headers["X-Goog-Upload-Status"] == "active"
        upload_url = r.headers["X-Goog-Upload-URL"]
    assert upload_url.startswith(f"{sim.base_url}/upload/v1beta/files?upload_id=")
    finalize = {"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"}
    async with http.post(upload_url, data=b"abc", headers=finalize) as r:
        assert r.status == 200 and r.headers["X-Goog-Upload-Status"] == "final"
        resource = (await r.json())["file"]
    assert (resource["sizeBytes"], resource["mimeType"], resource["state"]) == ("3", "text/plain", "ACTIVE")
    no_key = {"X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start"}
    async with http.post(f"{sim.base_url}/upload/v1beta/files", json={}, headers=no_key) as r:
        assert r.status == 403  # no API key


# ---- list, cancel, delete, outcomes -------------------------------------------------------------


async def test_list_pages_through_every_batch_newest_first(client: genai.Client) -> None:
    names = []
    for i in range(3):
        job = await client.aio.batches.create(model=MODEL, src=[inline(f"p{i}", f"k{i}")])
        names.append(job.name)
    pager = await client.aio.batches.list(config={"page_size": 2})
    assert len(pager.page) == 2
    listed = [job.name async for job in pager]
    assert listed == names[::-1]


async def test_cancel_ends_a_running_batch_at_once_without_output(
    make_sim: SimFactory, clients: list[genai.Client]
) -> None:
    sim = await make_sim(batch_turnaround_s=600.0)
    client = new_client(clients, sim)
    job = await client.aio.batches.create(model=MODEL, src=[inline("slow", "s")])
    assert job.name is not None
    await client.aio.batches.cancel(name=job.name)
    cancelled = await client.aio.batches.get(name=job.name)
    assert cancelled.state == types.JobState.JOB_STATE_CANCELLED and cancelled.done
    assert cancelled.dest is None and cancelled.end_time is not None
    assert sim.sim.stats.batches_by_state == {"BATCH_STATE_CANCELLED": 1}


@pytest.mark.parametrize(
    ("outcome", "state"),
    [("expired", types.JobState.JOB_STATE_EXPIRED), ("failed", types.JobState.JOB_STATE_FAILED)],
)
async def test_a_forced_outcome_ends_the_batch_without_output(
    sim: RunningSimulator, client: genai.Client, http: aiohttp.ClientSession, outcome: str, state: types.JobState
) -> None:
    async with http.post(f"{sim.base_url}/_sim/config", json={"batch_outcome": outcome}) as r:
        assert r.status == 200 and (await r.json())["batch_outcome"] == outcome
    job = await client.aio.batches.create(model=MODEL, src=[inline("late", "l")])
    assert job.name is not None and job.state == types.JobState.JOB_STATE_PENDING
    done = await wait_ended(client, job.name)
    assert done.state == state and done.dest is None
    assert sim.sim.stats.batch_requests_answered == 0


async def test_delete_and_unknown_batches(client: genai.Client) -> None:
    job = await client.aio.batches.create(model=MODEL, src=[inline("x", "x")])
    assert job.name is not None
    await client.aio.batches.delete(name=job.name)
    with pytest.raises(errors.ClientError) as gone:
        await client.aio.batches.get(name=job.name)
    assert gone.value.code == 404 and gone.value.status == "NOT_FOUND"
    with pytest.raises(errors.ClientError) as cancel_gone:
        await client.aio.batches.cancel(name="batches/nosuchbatch")
    assert cancel_gone.value.code == 404


async def test_create_is_validated_like_generate_content(
    make_sim: SimFactory, clients: list[genai.Client]
) -> None:
    sim = await make_sim(batch_inline_limit_bytes=2000)
    client = new_client(clients, sim)
    with pytest.raises(errors.ClientError) as unknown:
        await client.aio.batches.create(model="not-a-model", src=[inline("x", "x")])
    assert unknown.value.code == 404 and "models/not-a-model is not found" in str(unknown.value.message)
    with pytest.raises(errors.ClientError) as too_big:
        await client.aio.batches.create(model=MODEL, src=[inline("y" * 3000, "big")])
    assert too_big.value.code == 400
    assert str(too_big.value.message) == "Request payload size exceeds the limit: 2000 bytes."
    small = await client.aio.batches.create(model=MODEL, src=[inline("y" * 100, "small")])
    assert small.state == types.JobState.JOB_STATE_PENDING
    assert sim.sim.stats.batches_created == 1


async def test_batch_routes_need_an_api_key(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    body = {"batch": {"inputConfig": {"requests": {"requests": [{"request": {"contents": "hi"}}]}}}}
    async with http.post(f"{sim.base_url}/v1beta/models/{MODEL}:batchGenerateContent", json=body) as r:
        assert r.status == 403 and (await r.json())["error"]["status"] == "PERMISSION_DENIED"
    async with http.get(f"{sim.base_url}/v1beta/batches") as r:
        assert r.status == 403
    headers = {"x-goog-api-key": KEY}
    async with http.post(f"{sim.base_url}/v1beta/models/{MODEL}:batchGenerateContent", json=body, headers=headers) as r:
        assert r.status == 200
        op = await r.json()
    meta = op["metadata"]
    assert meta["state"] == "BATCH_STATE_PENDING" and meta["name"] == op["name"] and "done" not in op
    assert meta["batchStats"] == {"requestCount": "1", "pendingRequestCount": "1"}  # int64s as strings


async def test_reset_forgets_batches_and_files(client: genai.Client, sim: RunningSimulator,
                                               http: aiohttp.ClientSession) -> None:
    job = await client.aio.batches.create(model=MODEL, src=[inline("x", "x")])
    uploaded = await client.aio.files.upload(file=jsonl({"key": 1}), config={"mime_type": "application/jsonl"})
    assert job.name is not None and uploaded.name is not None
    async with http.post(f"{sim.base_url}/_sim/reset") as r:
        assert r.status == 200 and (await r.json())["batches_created"] == 0
    with pytest.raises(errors.ClientError) as gone:
        await client.aio.batches.get(name=job.name)
    assert gone.value.code == 404
    pager = await client.aio.files.list()
    assert [f.name async for f in pager] == []


def test_batch_knobs_have_flags_and_are_validated() -> None:
    args = ["--batch-turnaround-s", "0.5", "--batch-outcome", "expired", "--batch-inline-limit-bytes", "100",
            "--batch-shuffle"]
    config = _config_from(_parser().parse_args(args))
    assert (config.batch_turnaround_s, config.batch_outcome, config.batch_inline_limit_bytes, config.batch_shuffle) == (
        0.5, "expired", 100, True
    )
    assert SimConfig().batch_inline_limit_bytes == 20 * 1024 * 1024
    assert main(["--batch-turnaround-s", "-1"]) == 2
    with pytest.raises(ValueError, match="batch_outcome must be one of"):
        SimConfig().updated({"batch_outcome": "lost"})
