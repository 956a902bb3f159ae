"""Read request files: one JSON object per line, bad lines reported by number, good ones kept."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from producer.errors import InvalidRequestError
from producer.queue import JobSpec
from producer.request import (
    MAX_DEPTH,
    GenerateRequest,
    check_channels,
    check_job_id,
    check_tags,
    check_tier,
    nesting_depth,
    parse_request,
)
from producer.thread import parse_continue

REQUEST_FIELDS = ("model", "prompt", "contents", "system_instruction", "config")
THREAD_FIELDS = ("continue_from", "parts")
LINE_FIELDS = {*REQUEST_FIELDS, *THREAD_FIELDS, "id", "tags", "tier", "channels"}


@dataclass(frozen=True)
class LineError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class Line:
    line: int
    spec: JobSpec

    @property
    def continue_from(self) -> str | None:
        request = self.spec.request
        if isinstance(request, dict) and request.get("continue_from") is not None:
            return str(request["continue_from"])
        return None

    @property
    def model(self) -> str | None:
        """The model the line names (None for a thread's turn that inherits its parent's)."""
        request = self.spec.request
        if isinstance(request, GenerateRequest):
            return request.model
        value = request.get("model") if isinstance(request, Mapping) else None
        return value if isinstance(value, str) else None


def parse_jsonl(
    lines: Iterable[str],
    *,
    max_bytes: int,
    default_id: Callable[[int, str], str | None] = lambda _n, _text: None,
    **spec_defaults: object,
) -> tuple[list[Line], list[LineError]]:
    """Parse and validate every line. Blank lines are skipped; ``default_id(n, text)`` names id-less ones."""
    good: list[Line] = []
    bad: list[LineError] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            bad.append(LineError(number, f"not valid JSON ({err.msg} at column {err.colno})"))
            continue
        except RecursionError:
            bad.append(LineError(number, f"nested deeper than {MAX_DEPTH} levels"))
            continue
        if nesting_depth(data) > MAX_DEPTH:
            bad.append(LineError(number, f"nested deeper than {MAX_DEPTH} levels"))
            continue
        if not isinstance(data, dict):
            bad.append(LineError(number, "not a JSON object"))
            continue
        unknown = sorted(set(data) - LINE_FIELDS)
        if unknown:
            bad.append(LineError(number, f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(LINE_FIELDS))})"))
            continue
        try:
            request, job_id, tags = _line(data, max_bytes, default_id(number, text))
        except InvalidRequestError as err:
            bad.append(LineError(number, str(err)))
            continue
        if job_id is not None and job_id in seen:
            bad.append(LineError(number, f"id {job_id!r} repeats line {seen[job_id]}"))
            continue
        try:
            own = _own_policy(data)
        except InvalidRequestError as err:
            bad.append(LineError(number, str(err)))
            continue
        if job_id is not None:
            seen[job_id] = number
        fields = {**spec_defaults, **own}
        good.append(Line(number, JobSpec(request, job_id=job_id, tags=tags, **fields)))
    return good, bad


def _own_policy(data: dict[str, Any]) -> dict[str, Any]:
    """A line's own ``tier`` and ``channels``, checked here so that a bad one is that line's error."""
    own: dict[str, Any] = {}
    if data.get("tier") is not None:
        own["tier"] = str(check_tier(data["tier"]))
    if data.get("channels") is not None:
        own["channels"] = check_channels(data["channels"])
    return own


def _line(data: dict[str, Any], max_bytes: int, default_id: str | None) -> tuple[Any, str | None, dict[str, str]]:
    """(request, job id, tags) of one parsed line; ``InvalidRequestError`` naming what is wrong."""
    request: Any
    if data.get("continue_from") is not None:  # a thread's next turn: the queue builds it at enqueue
        fields = {k: data[k] for k in (*REQUEST_FIELDS, *THREAD_FIELDS) if k in data}
        parse_continue(fields)
        request = fields
    else:
        if "parts" in data:
            raise InvalidRequestError("parts: only a line with continue_from has parts", field="parts")
        request = parse_request({k: data[k] for k in REQUEST_FIELDS if k in data}, max_bytes=max_bytes)
    job_id = data.get("id")
    job_id = check_job_id(str(job_id)) if job_id is not None else default_id
    tags = check_tags(data.get("tags") or {})
    size = len(json.dumps(tags).encode()) if tags else 0
    size += (len(request.model_dump_json(exclude_none=True).encode()) if isinstance(request, GenerateRequest)
             else len(json.dumps(request).encode()))
    if size > max_bytes:
        raise InvalidRequestError(
            f"the request and its tags ({size} bytes) are over the {max_bytes}-byte limit (FLEXQ_MAX_REQUEST_BYTES)",
            field="tags",
        )
    return request, job_id, tags


def stable_line_id(source: str) -> Callable[[int, str], str]:
    """Ids derived from the file and the line's content, so a re-run finds the same jobs."""
    prefix = hashlib.sha256(source.encode()).hexdigest()[:10]

    def make(number: int, text: str) -> str:
        digest = hashlib.sha256(text.strip().encode()).hexdigest()[:12]
        return f"b-{prefix}-{number}-{digest}"

    return make
