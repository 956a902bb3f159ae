"""producer.blobs and the producer API around it: inline bytes out of records, content-addressed,
kept as long as the jobs that refer to them; threads (``continue_from``) built at enqueue."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest
from google.genai import types
from redis.asyncio import Redis

from producer import blobs
from producer.blobs import REF, Blob, FileBlobStore, RedisBlobStore, image_size, open_blob_store, strip_inline
from producer.errors import BlobMissingError, ConfigError, InvalidRequestError
from producer.models import FunctionCall, ImageRef, JobResult, Usage
from producer.queue import FlexQueue
from producer.transitions import succeed

MODEL = "gemini-3-flash-preview"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (640).to_bytes(4, "big") + (480).to_bytes(4, "big") + b"\x08\x02rest"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_part(data: bytes, mime: str = "image/png") -> dict[str, Any]:
    return {"inline_data": {"mime_type": mime, "data": b64(data)}}


# -- pure -------------------------------------------------------------------------------------------


def test_strip_inline_replaces_bytes_by_references_once_per_content() -> None:
    contents = [{"role": "user", "parts": [{"text": "edit"}, image_part(PNG), image_part(PNG), image_part(b"other")]}]
    stripped, found = strip_inline(contents)
    sha = hashlib.sha256(PNG).hexdigest()
    assert stripped[0]["parts"][1] == {"inline_data": {"mime_type": "image/png", REF: sha}}
    assert stripped[0]["parts"][0] == {"text": "edit"}
    assert [b.sha256 for b in found] == [sha, hashlib.sha256(b"other").hexdigest()]  # the shared one once
    assert blobs.refs(stripped) == {b.sha256 for b in found}
    assert blobs.fill_with(stripped, {b.sha256: b.data for b in found})[0]["parts"][1]["inline_data"]["data"] == PNG


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        pytest.param({"max_part_bytes": 10}, "contents[0].parts[1].inline_data", id="part-too-big"),
        pytest.param({"max_total_bytes": len(PNG) + 3}, "contents", id="job-too-big"),
    ],
)
def test_strip_inline_limits_name_the_part(kwargs: dict[str, Any], field: str) -> None:
    contents = [{"role": "user", "parts": [{"text": "x"}, image_part(PNG), image_part(b"other")]}]
    with pytest.raises(InvalidRequestError) as err:
        strip_inline(contents, **kwargs)
    assert err.value.field == field and "limit" in str(err.value)


def test_strip_inline_refuses_bad_base64() -> None:
    with pytest.raises(InvalidRequestError, match="not valid base64"):
        strip_inline([{"parts": [{"inline_data": {"mime_type": "image/png", "data": "!!!"}}]}])


@pytest.mark.parametrize(
    ("data", "size"),
    [
        pytest.param(PNG, (640, 480), id="png"),
        pytest.param(b"GIF89a" + (3).to_bytes(2, "little") + (5).to_bytes(2, "little"), (3, 5), id="gif"),
        pytest.param(b"\xff\xd8\xff\xc0\x00\x11\x08" + (7).to_bytes(2, "big") + (9).to_bytes(2, "big") + b"\0" * 8,
                     (9, 7), id="jpeg"),
        pytest.param(b"not an image", None, id="unknown"),
    ],
)
def test_image_size(data: bytes, size: tuple[int, int] | None) -> None:
    assert image_size(data) == size


# -- stores -----------------------------------------------------------------------------------------


async def test_redis_store_keeps_one_copy_and_only_extends_life(fake_redis: Redis) -> None:
    store = RedisBlobStore(fake_redis, queue="q")
    blob = Blob.of(PNG, "image/png")
    await store.put([blob], ttl_s=1000)
    await store.put([blob], ttl_s=100)  # a shorter-lived job does not shorten it
    assert await store.get(blob.sha256) == PNG
    assert 900 < await fake_redis.ttl(f"q:blob:{blob.sha256}") <= 1000
    await store.touch([blob.sha256], ttl_s=5000)
    assert await fake_redis.ttl(f"q:blob:{blob.sha256}") > 4000
    assert await store.get("0" * 64) is None


async def test_file_store_round_trip_expiry_and_sweep(tmp_path: Path) -> None:
    store = open_blob_store(f"file://{tmp_path}", redis=None, queue="q")
    assert isinstance(store, FileBlobStore)
    kept, gone = Blob.of(PNG, "image/png"), Blob.of(b"old", "text/plain")
    await store.put([kept, gone], ttl_s=3600)
    assert await store.get(kept.sha256) == PNG
    path = tmp_path / gone.sha256[:2] / gone.sha256
    os.utime(path, (time.time() - 10, time.time() - 10))  # its last job's life ended
    assert await store.get(gone.sha256) is None
    assert store.sweep() == 1 and not path.exists()
    assert await store.get(kept.sha256) == PNG


@pytest.mark.parametrize("spec", ["s3://bucket", "file://relative/dir", ""])
def test_unknown_blob_store_is_a_config_error(spec: str) -> None:
    with pytest.raises(ConfigError, match="FLEXQ_BLOB_STORE"):
        open_blob_store(spec, redis=None, queue="q")


# -- the producer API -----------------------------------------------------------------------------


async def test_enqueue_stores_inline_data_apart_and_the_worker_can_fill_it(fake_queue: FlexQueue) -> None:
    request = {"model": MODEL, "contents": [{"role": "user", "parts": [{"text": "describe"}, image_part(PNG)]}]}
    done = await fake_queue.enqueue(request, job_id="img-in")
    raw = await fake_queue.redis.get(fake_queue.store.keys.record("img-in"))
    assert raw is not None and b64(PNG).encode() not in raw and len(raw) < 2000
    record = await fake_queue.get(done.id)
    assert record.request is not None and record.request.contents is not None
    filled = await blobs.fill(record.request.contents, fake_queue.store.blobs)
    assert types.Content.model_validate(filled[0]).parts[1].inline_data.data == PNG  # type: ignore[index,union-attr]


async def test_a_missing_blob_is_a_clear_error(fake_queue: FlexQueue) -> None:
    with pytest.raises(BlobMissingError, match="sha256:0000"):
        await fake_queue.blob("0" * 64)


async def _succeed_with(
    queue: FlexQueue, job_id: str, content: dict[str, Any], *, images: tuple[Blob, ...] = ()
) -> None:
    """Stand in for a worker: record an answer (its bytes in the blob store first, as the runner does)."""
    await queue.store.blobs.put(images, ttl_s=3600)
    calls = [FunctionCall(**p["function_call"]) for p in content["parts"] if "function_call" in p]
    refs = [ImageRef(index=i, part_index=0, mime_type=b.mime_type, bytes=len(b.data), sha256=b.sha256)
            for i, b in enumerate(images)]
    result = JobResult(text=None, finish_reason="STOP", usage=Usage(), model_version=MODEL, tier="flex",
                       content=content, function_calls=calls, images=refs)

    def decide(record: Any) -> Any:
        from producer.transitions import Change

        return Change(succeed(record, result=result, now=record.updated_at, cost_usd=None, standard_cost_usd=None))

    await queue.store.update(job_id, decide)


async def test_a_thread_sends_parent_contents_answer_and_the_new_turn(fake_queue: FlexQueue) -> None:
    tools = [{"function_declarations": [{"name": "lookup", "parameters": {"type": "OBJECT"}}]}]
    await fake_queue.enqueue({"model": MODEL, "prompt": "find x", "config": {"tools": tools}}, job_id="t1")
    signature = b64(b"sig-bytes")
    answer = {"role": "model", "parts": [
        {"function_call": {"id": "c1", "name": "lookup", "args": {"q": "x"}}, "thought_signature": signature}]}
    await _succeed_with(fake_queue, "t1", answer)
    turn = [{"function_response": {"id": "c1", "name": "lookup", "response": {"value": 42}}}]
    child = await fake_queue.enqueue({"continue_from": "t1", "parts": turn}, job_id="t2")
    request = child.record.request
    assert request is not None and request.contents is not None
    assert request.model == MODEL and request.config == {"tools": tools}  # inherited
    assert request.contents == [
        {"role": "user", "parts": [{"text": "find x"}]}, answer, {"role": "user", "parts": turn},
    ]  # the answer exactly as returned: id and signature untouched
    assert child.record.parent_id == "t1"
    assert [r.id for r in await fake_queue.thread("t2")] == ["t1", "t2"]
    assert await fake_queue.children("t1") == ["t2"]


async def test_a_thread_keeps_image_references_and_shares_their_bytes(fake_queue: FlexQueue) -> None:
    await fake_queue.enqueue({"model": "gemini-3-pro-image-preview", "prompt": "a cat"}, job_id="i1")
    made = Blob.of(PNG, "image/png")
    await _succeed_with(fake_queue, "i1", {"role": "model", "parts": [
        {"inline_data": {"mime_type": "image/png", REF: made.sha256}, "thought_signature": b64(b"s")}]}, images=(made,))
    child = await fake_queue.enqueue(
        {"continue_from": "i1", "parts": [{"text": "now blue"}, image_part(b"reference")]}, job_id="i2"
    )
    assert child.record.request is not None
    assert blobs.refs(child.record.request.contents) == {made.sha256, hashlib.sha256(b"reference").hexdigest()}
    assert len(await fake_queue.redis.keys(f"{fake_queue.store.keys.queue}:blob:*")) == 2
    content = await fake_queue.content("i1")
    assert content is not None and content["parts"][0]["inline_data"]["data"] == PNG
    assert [data for _, data in await fake_queue.images("i1")] == [PNG]


@pytest.mark.parametrize(
    ("parent", "message"),
    [
        pytest.param(None, "no job with id 'ghost'", id="missing"),
        pytest.param("queued", "is queued; a thread continues a succeeded job", id="not-finished"),
    ],
)
async def test_a_continuation_of_an_unfinished_or_missing_job_is_refused(
    fake_queue: FlexQueue, parent: str | None, message: str
) -> None:
    if parent is not None:
        await fake_queue.enqueue({"model": MODEL, "prompt": "first"}, job_id="ghost")
    with pytest.raises(InvalidRequestError, match=message) as err:
        await fake_queue.enqueue({"continue_from": "ghost", "prompt": "more"})
    assert err.value.field == "continue_from"
    assert await fake_queue.active_count() == (1 if parent else 0)  # nothing was enqueued for the refusal
