"""JSON for arq payloads and results: never pickle (pickle from Redis is remote code execution).

arq's job envelope is ``{"t": try, "f": function, "a": args, "k": kwargs, "et": enqueue_ms}``;
flexq's args are only the job id, so JSON covers it. A result that is an exception (arq stores
those on failure) is written as ``{"error": "ClassName: message"}``.
"""

from __future__ import annotations

import json
from typing import Any

from producer.keys import ARQ_FUNCTION


def _default(value: Any) -> Any:
    if isinstance(value, BaseException):
        return {"error": f"{type(value).__name__}: {value}"}
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def serialize(data: dict[str, Any]) -> bytes:
    return json.dumps(data, default=_default, separators=(",", ":")).encode()


def deserialize(raw: bytes) -> dict[str, Any]:
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("arq payload is not a JSON object")
    return value


def arq_job_payload(job_id: str, *, enqueue_ms: int, job_try: int | None = None) -> bytes:
    """The arq job envelope for one flexq job, as arq's own ``serialize_job`` would write it."""
    return serialize({"t": job_try, "f": ARQ_FUNCTION, "a": [job_id], "k": {}, "et": enqueue_ms})
