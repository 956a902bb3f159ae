"""The Batch API of the Gemini API, as google-genai 3.6.1 calls it (``client.batches``, not Vertex AI):
``models/{model}:batchGenerateContent`` with inline requests or a JSONL file, then get, list, cancel
and delete of ``batches/{id}``.

A batch is PENDING for the first half of its turnaround (``batch_turnaround_s``), RUNNING for the
second, then ends as ``batch_outcome`` says. Its requests are answered when it ends (the first time
it is looked at after that), each the way generateContent would answer it; a request that would get an
error gets an ``error`` entry instead, and the batch still succeeds. docs/gemini-wire.md ("Batch API and
Files API") says what is copied from the real service and what is only modelled.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from simulator import files, wire
from simulator.config import SimConfig, SimStats

BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
PENDING = "BATCH_STATE_PENDING"
RUNNING = "BATCH_STATE_RUNNING"
SUCCEEDED = "BATCH_STATE_SUCCEEDED"
FAILED = "BATCH_STATE_FAILED"
CANCELLED = "BATCH_STATE_CANCELLED"
EXPIRED = "BATCH_STATE_EXPIRED"
OUTCOME_STATES: dict[str, str] = {"succeeded": SUCCEEDED, "expired": EXPIRED, "failed": FAILED}
BATCH_ID_LENGTH = 36
RESPONSES_MIME = "application/jsonl"
NOT_FOUND_MESSAGE = "Requested entity was not found."
FAILED_MESSAGE = "Simulator: the batch failed (batch_outcome=failed)."
#: google.rpc.Code of an HTTP error status, for the google.rpc.Status of a request's ``error`` entry
GRPC_CODES: dict[str, int] = {
    "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5, "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8, "INTERNAL": 13, "UNAVAILABLE": 14,
}

#: (model, request body) -> (a 200 GenerateContentResponse body, None) or (None, an HTTP error body)
Answerer = Callable[[str, Any], Awaitable[tuple[dict[str, Any] | None, dict[str, Any] | None]]]


def rpc_status(http_error: dict[str, Any]) -> dict[str, Any]:
    """An HTTP error body ``{"error": {"code": 400, "status": ...}}`` as the google.rpc.Status of a batch
    entry: ``{"code": 3, "message": ...}`` (the SDK's JobError keeps code, message and string details)."""
    error = http_error["error"]
    return {"code": GRPC_CODES.get(error.get("status", ""), 2), "message": error["message"]}


@dataclass
class _Item:
    """One request of a batch: its body, and its metadata (inline) or key (file)."""

    request: Any
    metadata: Any = None
    key: Any = None
    problem: str | None = None  # a JSONL line that is not {"key", "request"}


@dataclass
class Batch:
    batch_id: str
    model: str
    items: list[_Item]
    display_name: str | None
    file_name: str | None  # the JSONL source, or None for inline requests
    turnaround_s: float
    outcome: str
    shuffle: bool
    created_wall_s: float = field(default_factory=time.time)
    created_s: float = field(default_factory=time.monotonic)
    final_state: str | None = None
    ended_wall_s: float | None = None
    output: dict[str, Any] | None = None
    answered: int = 0
    errors: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return f"batches/{self.batch_id}"

    def state(self, now_s: float) -> str:
        """The state at `now_s` (monotonic); ``due`` once the turnaround is over but the end not written."""
        if self.final_state is not None:
            return self.final_state
        elapsed_s = now_s - self.created_s
        if elapsed_s >= self.turnaround_s:
            return "due"
        return PENDING if elapsed_s < self.turnaround_s / 2 else RUNNING

    def operation(self, now_s: float) -> dict[str, Any]:
        """The long-running operation that create, get and list answer."""
        state = self.state(now_s)
        if state == "due":
            state = RUNNING
        update_wall_s = self.ended_wall_s or self.created_wall_s
        meta: dict[str, Any] = {"@type": BATCH_TYPE, "model": f"models/{self.model}"}
        if self.display_name is not None:
            meta["displayName"] = self.display_name
        if self.file_name is not None:
            meta["inputConfig"] = {"fileName": self.file_name}
        meta |= {"createTime": files.rfc3339(self.created_wall_s), "updateTime": files.rfc3339(update_wall_s)}
        if self.ended_wall_s is not None:
            meta["endTime"] = files.rfc3339(self.ended_wall_s)
        meta["batchStats"] = self._stats(state)
        if self.output is not None:
            meta["output"] = self.output
        meta |= {"state": state, "name": self.name}
        op: dict[str, Any] = {"name": self.name, "metadata": meta}
        if self.final_state is not None:
            op["done"] = True
            if self.output is not None:
                op["response"] = {"@type": OUTPUT_TYPE, **self.output}
            if self.final_state == FAILED:
                op["error"] = {"code": 13, "message": FAILED_MESSAGE}
        return op

    def _stats(self, state: str) -> dict[str, str]:
        """batchStats: int64 counts, so strings."""
        total = len(self.items)
        if state == SUCCEEDED:
            return {"requestCount": str(total), "successfulRequestCount": str(self.answered),
                    "failedRequestCount": str(self.errors)}
        if state in (PENDING, RUNNING):
            return {"requestCount": str(total), "pendingRequestCount": str(total)}
        return {"requestCount": str(total)}


def _inline_items(requests: Any) -> list[_Item] | None:
    """``inputConfig.requests.requests``: [{"request": {...}, "metadata": {...}}, ...], or None if malformed."""
    items = requests.get("requests") if isinstance(requests, dict) else None
    if not isinstance(items, list) or not items:
        return None
    return [
        _Item(entry.get("request"), entry.get("metadata")) if isinstance(entry, dict) else _Item(entry)
        for entry in items
    ]


def _file_items(data: bytes) -> list[_Item]:
    """The lines of a JSONL source, ``{"key": ..., "request": {...}}`` each; blank lines are skipped."""
    items: list[_Item] = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            items.append(_Item(None, problem=f"Line {number} of the input file is not valid JSON."))
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("request"), dict):
            key = entry.get("key") if isinstance(entry, dict) else None
            items.append(_Item(None, key=key, problem=f"Line {number} of the input file has no request object."))
            continue
        items.append(_Item(entry["request"], key=entry.get("key")))
    return items


class BatchStore:
    """Every batch of one simulator, and the Batch API routes."""

    def __init__(
        self, authorize: files.Authorize, answer: Answerer, file_store: files.FileStore,
        config: Callable[[], SimConfig], stats: SimStats, rng: random.Random,
    ) -> None:
        self._authorize = authorize
        self._answer = answer
        self._files = file_store
        self._config = config
        self._stats = stats
        self._rng = rng
        self.batches: dict[str, Batch] = {}

    def clear(self) -> None:
        self.batches.clear()

    def routes(self, app: web.Application) -> None:
        """Before the generateContent route: ``{model}:batchGenerateContent`` would match it too."""
        app.router.add_post("/{version}/models/{model}:batchGenerateContent", self._create)
        app.router.add_get("/{version}/batches", self._list)
        app.router.add_post("/{version}/batches/{batch_id}:cancel", self._cancel)
        app.router.add_get("/{version}/batches/{batch_id}", self._get)
        app.router.add_delete("/{version}/batches/{batch_id}", self._delete)

    async def finish_due(self, batch: Batch) -> None:
        """Write the end of a batch whose turnaround is over (once, even with concurrent readers)."""
        if batch.state(time.monotonic()) != "due":
            return
        async with batch.lock:
            if batch.final_state is not None:
                return
            if batch.outcome == "succeeded":
                batch.output = await self._answer_all(batch)
            batch.final_state = OUTCOME_STATES[batch.outcome]
            batch.ended_wall_s = time.time()
            self._stats.count_batch_end(batch.final_state, batch.answered, batch.errors)

    async def _answer_all(self, batch: Batch) -> dict[str, Any]:
        entries: list[dict[str, Any]] = []
        for item in batch.items:
            response: dict[str, Any] | None = None
            error: dict[str, Any] | None = None
            if item.problem is not None:
                error = wire.invalid_argument(item.problem)
            else:
                response, error = await self._answer(batch.model, item.request)
            entry: dict[str, Any] = {"response": response} if response is not None else {}
            if error is not None:
                entry["error"] = rpc_status(error)
            batch.answered += int(error is None)
            batch.errors += int(error is not None)
            if batch.file_name is not None:
                entries.append({"key": item.key, **entry} if item.key is not None else entry)
            else:
                entries.append(entry | ({"metadata": item.metadata} if item.metadata is not None else {}))
        if batch.file_name is None:
            if batch.shuffle:
                self._rng.shuffle(entries)
            return {"inlinedResponses": {"inlinedResponses": entries}}
        lines = "".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries)
        stored = self._files.add(lines.encode("utf-8"), RESPONSES_MIME, files.GENERATED, f"responses of {batch.name}")
        return {"responsesFile": stored.name}

    # ---- routes --------------------------------------------------------------------------------
    async def _create(self, request: web.Request) -> web.Response:
        if not self._authorize(request):
            return web.json_response(wire.permission_denied(), status=403)
        version, model = request.match_info["version"], request.match_info["model"]
        if not model.startswith("gemini-"):
            return web.json_response(wire.not_found(model, version), status=404)
        limit = self._config().batch_inline_limit_bytes
        if request.content_length is not None and request.content_length > limit:
            return _too_large(limit)
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return _bad("Invalid JSON payload received. Unexpected token.")
        spec = body.get("batch") if isinstance(body, dict) else None
        source = spec.get("inputConfig") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or not isinstance(source, dict):
            return _bad("batch.input_config is required.")
        file_name = source.get("fileName")
        if isinstance(file_name, str):
            stored = self._files.lookup(file_name)
            if stored is None:
                return _bad(f"Input file {file_name} does not exist.")
            items = _file_items(stored.data)
        elif len(raw) > limit:
            return _too_large(limit)
        else:
            maybe_items = _inline_items(source.get("requests"))
            if maybe_items is None:
                return _bad("batch.input_config must hold a file_name or a non-empty list of requests.")
            items = maybe_items
        display = spec.get("displayName")
        cfg = self._config()
        batch = Batch(
            self._fresh_id(), model, items, display if isinstance(display, str) else None,
            file_name if isinstance(file_name, str) else None, cfg.batch_turnaround_s, cfg.batch_outcome,
            cfg.batch_shuffle,
        )
        self.batches[batch.batch_id] = batch
        self._stats.batches_created += 1
        return web.json_response(batch.operation(time.monotonic()))

    async def _get(self, request: web.Request) -> web.Response:
        if not self._authorize(request):
            return web.json_response(wire.permission_denied(), status=403)
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _not_found()
        await self.finish_due(batch)
        return web.json_response(batch.operation(time.monotonic()))

    async def _list(self, request: web.Request) -> web.Response:
        if not self._authorize(request):
            return web.json_response(wire.permission_denied(), status=403)
        newest_first = sorted(self.batches.values(), key=lambda b: b.created_s, reverse=True)
        page, token = files.page_of([b.batch_id for b in newest_first], request.query)
        if page is None:
            return _bad("Invalid page token.")
        operations = []
        for batch_id in page:
            batch = self.batches[batch_id]
            await self.finish_due(batch)
            operations.append(batch.operation(time.monotonic()))
        body: dict[str, Any] = {"operations": operations}
        if token is not None:
            body["nextPageToken"] = token
        return web.json_response(body)

    async def _cancel(self, request: web.Request) -> web.Response:
        """PENDING or RUNNING -> CANCELLED at once, with no output; an ended batch stays as it is."""
        if not self._authorize(request):
            return web.json_response(wire.permission_denied(), status=403)
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _not_found()
        async with batch.lock:
            if batch.final_state is None:
                batch.final_state = CANCELLED
                batch.ended_wall_s = time.time()
                self._stats.count_batch_end(batch.final_state, batch.answered, batch.errors)
        return web.json_response({})

    async def _delete(self, request: web.Request) -> web.Response:
        if not self._authorize(request):
            return web.json_response(wire.permission_denied(), status=403)
        if self.batches.pop(request.match_info["batch_id"], None) is None:
            return _not_found()
        return web.json_response({})

    def _fresh_id(self) -> str:
        while True:
            batch_id = files.new_id(self._rng, BATCH_ID_LENGTH)
            if batch_id not in self.batches:
                return batch_id


def _bad(message: str) -> web.Response:
    return web.json_response(wire.invalid_argument(message), status=400)


def _too_large(limit: int) -> web.Response:
    return _bad(f"Request payload size exceeds the limit: {limit} bytes.")


def _not_found() -> web.Response:
    return web.json_response(wire.error_body(404, "NOT_FOUND", NOT_FOUND_MESSAGE), status=404)
