"""structlog set-up: JSON lines when not on a TTY, console otherwise; secrets redacted everywhere.

arq's own stdlib log records go through the same renderer, so a worker's output is one format.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

_SECRETS: set[str] = set()


def register_secret(value: str | None) -> None:
    """Never print ``value``: any log line containing it shows ``***`` instead."""
    if value and len(value) >= 4:
        _SECRETS.add(value)


def redact(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _redact_processor(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if not _SECRETS:
        return event
    for key, value in list(event.items()):
        if isinstance(value, str):
            event[key] = redact(value)
    return event


#: arq's routine line per job run (start, deferral, end): flexq's one ``attempt`` line per attempt says
#: more, so these show only at DEBUG (each costs a formatted JSON line per run on the hot path).
ARQ_RUN_LINES = frozenset({"%6.2fs → %s(%s)%s", "%6.2fs ↻ %s retrying job in %0.2fs", "%6.2fs ← %s ● %s"})


class ArqRunLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in ARQ_RUN_LINES or logging.getLogger().isEnabledFor(logging.DEBUG)


def configure(fmt: str = "auto", *, level: int = logging.INFO, stream: Any = None) -> None:
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not (hasattr(stream, "isatty") and stream.isatty()))
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    shared: Iterable[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_processor,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _redact_processor,
                renderer,
            ],
            foreign_pre_chain=list(shared),
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "google_genai", "google_genai.models", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    arq_worker = logging.getLogger("arq.worker")
    if not any(isinstance(f, ArqRunLines) for f in arq_worker.filters):
        arq_worker.addFilter(ArqRunLines())


def level_of(name: str) -> int:
    """``FLEXQ_LOG_LEVEL`` (``info``) as a ``logging`` level."""
    return int(logging.getLevelName(name.upper()))


def get_logger(name: str = "flexq") -> Any:
    return structlog.get_logger(name)
