"""A web front for flexq: enqueue over HTTP, answer when the job ends, stream its progress.

    POST /jobs                  {"model": ..., "prompt": ..., "id"?, "deadline_s"?, "fallback"?, "tags"?}
                                -> 201 (new) or 200 (the id existed), {"id", "status"}; 422 names the bad field
    GET  /jobs/{id}             -> the job now: status, answer text, error, attempts
    GET  /jobs/{id}?wait=30     -> the same, once the job has ended or after 30 s (at most 60)
    GET  /jobs/{id}/events      -> server-sent events: the job's status now, then each change until it ends

One ``FlexQueue`` is opened in the app's lifespan (``cleanup_ctx``) and shared by every request;
``wait`` is woken by the queue's event stream, so thousands of held requests cost Redis nothing
while they wait. Run a ``flexq worker`` on the same Redis and queue, then:

    python examples/web_app.py --port 8080
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from producer.errors import InvalidRequestError, JobNotFoundError
from producer.events import Event
from producer.models import JobRecord
from producer.queue import FlexQueue
from producer.settings import ProducerSettings

QUEUE = web.AppKey("queue", FlexQueue)
SETTINGS = web.AppKey("settings", ProducerSettings)
MAX_WAIT_S = 60.0
#: A comment line this often keeps proxies from closing a quiet event stream.
KEEPALIVE_S = 15.0


async def lifespan(app: web.Application) -> AsyncIterator[None]:
    app[QUEUE] = await FlexQueue.connect(app.get(SETTINGS))  # REDIS_URL, FLEXQ_QUEUE... from the environment
    yield
    await app[QUEUE].close()


def view(record: JobRecord) -> dict[str, Any]:
    """What a client sees of a job (no request, no raw usage)."""
    return {
        "id": record.id,
        "status": str(record.status),
        "text": record.result.text if record.result else None,
        "error": record.error.model_dump() if record.error else None,
        "attempts": [
            {"number": a.number, "tier": str(a.tier), "outcome": str(a.outcome) if a.outcome else None,
             "http_status": a.http_status, "latency_ms": a.latency_ms}
            for a in record.attempts
        ],
    }


async def create_job(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return web.json_response({"field": None, "error": "the body must be a JSON object"}, status=400)
    if not isinstance(body, dict):
        return web.json_response({"field": None, "error": "the body must be a JSON object"}, status=400)
    options = {key: body.pop(key) for key in ("id", "deadline_s", "fallback", "tags") if key in body}
    try:
        job = await request.app[QUEUE].enqueue(
            body, job_id=options.get("id"), deadline_s=options.get("deadline_s"),
            fallback=options.get("fallback", "none"), tags=options.get("tags"),
        )
    except InvalidRequestError as err:  # nothing was enqueued; the message names the field
        return web.json_response({"field": err.field, "error": str(err)}, status=422)
    return web.json_response({"id": job.id, "status": str(job.record.status)}, status=201 if job.created else 200)


def _wait_s(request: web.Request) -> float:
    raw = request.query.get("wait", "0")
    try:
        value = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text="wait: a number of seconds") from None
    if not 0 <= value <= MAX_WAIT_S:
        raise web.HTTPBadRequest(text=f"wait: between 0 and {MAX_WAIT_S:g} seconds")
    return value


async def get_job(request: web.Request) -> web.Response:
    queue, job_id, wait_s = request.app[QUEUE], request.match_info["id"], _wait_s(request)
    try:
        record = (await queue.wait_many([job_id], wait_s))[0] if wait_s > 0 else None
        record = record or await queue.get(job_id)
    except JobNotFoundError:
        raise web.HTTPNotFound(text=f"no job with id {job_id!r}") from None
    return web.json_response(view(record))


async def job_events(request: web.Request) -> web.StreamResponse:
    queue, job_id = request.app[QUEUE], request.match_info["id"]
    after = await queue.last_event_id()  # before the read below: nothing after it is missed
    try:
        record = await queue.get(job_id)
    except JobNotFoundError:
        raise web.HTTPNotFound(text=f"no job with id {job_id!r}") from None
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    await response.write(_sse("status", {"id": record.id, "status": str(record.status)}))
    if record.terminal:
        return response
    stream = queue.events(after=after, job_id=job_id)
    following: asyncio.Future[Event] | None = None
    try:
        while True:
            following = asyncio.ensure_future(anext(stream))
            while not (await asyncio.wait({following}, timeout=KEEPALIVE_S))[0]:
                await response.write(b": keep-alive\n\n")  # nothing for a while: keep the connection open
            event = following.result()
            await response.write(_sse("change", event.to_json()))
            if event.terminal:
                return response
    finally:
        if following is not None and not following.done():
            following.cancel()
        await stream.aclose()


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def make_app(settings: ProducerSettings | None = None) -> web.Application:
    app = web.Application()
    if settings is not None:
        app[SETTINGS] = settings
    app.cleanup_ctx.append(lifespan)
    app.add_routes([
        web.post("/jobs", create_job), web.get("/jobs/{id}", get_job), web.get("/jobs/{id}/events", job_events),
    ])
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    web.run_app(make_app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
