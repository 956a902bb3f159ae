"""The response cache: an identical request answered within the TTL is answered again from Redis.

Opt in per job (``JobSpec(cache=True)``, ``enqueue(..., cache=True)``) or per queue (``FLEXQ_CACHE=1``
at the producer: every job it enqueues opts in). A job that opted in is looked up before it asks for a
permit or calls: on a hit it succeeds with one ``cached`` attempt at zero cost, no call made. A fresh
answer to a job that opted in is stored for ``FLEXQ_CACHE_TTL_S`` (the worker's setting).

The key is the SHA-256 of the request's canonical JSON (model, contents, system instruction and
config, keys sorted, nulls dropped): inline data is already a blob reference by content hash, so two
requests with the same bytes share a key. Only the answer (``JobResult``) is stored, as JSON.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import ValidationError

from producer.models import JobResult
from producer.request import GenerateRequest


def request_key(request: GenerateRequest) -> str:
    """The cache key of a request: SHA-256 (hex) of its canonical JSON."""
    doc = request.model_dump(mode="json", exclude_none=True)
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def dump(result: JobResult) -> str:
    return result.model_dump_json(exclude_none=True)


def load(raw: Any) -> JobResult | None:
    """A cached answer, or None when the entry is unreadable (an older format: treated as a miss)."""
    try:
        return JobResult.model_validate_json(raw)
    except (ValidationError, ValueError):
        return None
