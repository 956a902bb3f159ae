"""structlog set-up: JSON lines when not on a TTY, console otherwise; secrets redacted everywhere.

flexq's own lines go straight from structlog to the stream (no stdlib ``logging`` record, handler or
second formatting pass: a line costs its processors and one write; a line below the level costs one
comparison). arq's and the libraries' stdlib records go through the same processors and renderer,
so a worker's output is one format.
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


class _Sink:
    """Where flexq's own lines go: the stream of the latest ``configure`` (loggers cache this object)."""

    stream: Any = sys.stderr

    def write(self, text: str) -> None:
        self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


_SINK = _Sink()
#: The level of the latest ``configure``: a flexq line below it is dropped before any processor runs.
_LEVEL = [logging.INFO]


class _Logger(structlog.BoundLoggerBase):
    """structlog's bound logger, with the level checked first (it may change at each ``configure``)."""

    def _at(self, level: int, method: str, event: str | None, kw: dict[str, Any]) -> Any:
        if level < _LEVEL[0]:
            return None
        return self._proxy_to_logger(method, event, **kw)

    def debug(self, event: str | None = None, **kw: Any) -> Any:
        return self._at(logging.DEBUG, "debug", event, kw)

    def info(self, event: str | None = None, **kw: Any) -> Any:
        return self._at(logging.INFO, "info", event, kw)

    def warning(self, event: str | None = None, **kw: Any) -> Any:
        return self._at(logging.WARNING, "warning", event, kw)

    warn = warning

    def error(self, event: str | None = None, **kw: Any) -> Any:
        return self._at(logging.ERROR, "error", event, kw)

    def critical(self, event: str | None = None, **kw: Any) -> Any:
        return self._at(logging.CRITICAL, "critical", event, kw)

    def exception(self, event: str | None = None, **kw: Any) -> Any:
        kw.setdefault("exc_info", True)
        return self._at(logging.ERROR, "error", event, kw)


def configure(fmt: str = "auto", *, level: int = logging.INFO, stream: Any = None) -> None:
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not (hasattr(stream, "isatty") and stream.isatty()))
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    stamp: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    shared: Iterable[Any] = [*stamp, _redact_processor]
    _SINK.stream = stream
    _LEVEL[0] = level
    structlog.configure(
        # the traceback rendered to text before the one redaction pass, so that it is redacted too
        processors=[*stamp, structlog.processors.format_exc_info, _redact_processor, renderer],
        logger_factory=structlog.WriteLoggerFactory(file=_SINK),  # type: ignore[arg-type]
        wrapper_class=_Logger,
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
