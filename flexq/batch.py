"""``flexq batch``: a file of prompts in, a file of answers out, resumable, at flex prices.

The journal (``OUT.progress``) gets one line per job as it ends, flushed at once, so a run that
is interrupted or killed loses nothing it finished: the same command again reuses those results
and sends only the rest. OUT itself is written whole, in input order, when every job has ended.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from flexq.exits import clean
from flexq.jsonl import Line, LineError, parse_jsonl, stable_line_id
from producer.blobs import extension
from producer.errors import InvalidRequestError
from producer.models import JobRecord
from producer.queue import FlexQueue
from producer.request import GenerateRequest
from producer.stats import add_up, attempt_counts, cost_counts, summarize
from producer.status import TERMINAL, Outcome, Status

#: Failures worth running again on resume; permanent ones (client_error, blocked…) are kept.
RERUN_KINDS = frozenset({"deadline_exceeded", "interrupted", "cancelled", "parent_failed", "invalid_request"})
POLL_S = 0.5
#: How much of the latest retry's error the progress line shows.
LAST_ERROR_CHARS = 80
#: Every this many polls the batch reads every pending record (attempt counts for the progress line,
#: a record that became unreadable); in between, only the records the status indexes say ended.
FULL_READ_EVERY = 10


def journal_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress")


def images_dir(out: Path) -> Path:
    """Where a batch writes its answers' images: ``OUT.images/<id>-<index>.<ext>``."""
    return out.with_name(out.name + ".images")


def request_key(line: Line) -> str:
    """A digest of a line's request: a result saved by an earlier run is reused only for the same one."""
    request = line.spec.request
    data = request.model_dump(mode="json", exclude_none=True) if isinstance(request, GenerateRequest) else request
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def output_line(record: JobRecord, line: int, image_paths: list[str] | None = None) -> dict[str, Any]:
    result = record.result
    images = [
        {**image.model_dump(), "path": path}
        for image, path in zip(result.images if result else [], image_paths or [], strict=False)
    ]
    return {
        "id": record.id,
        "line": line,
        "status": str(record.status),
        "text": result.text if result else None,
        "function_calls": [call.model_dump() for call in result.function_calls] if result else [],
        "parsed": result.parsed if result else None,
        "images": images,
        "finish_reason": result.finish_reason if result else None,
        "usage": result.usage.model_dump() if result else None,
        "tier": result.tier if result else None,
        "attempts": len(record.attempts),
        "error": record.error.model_dump() if record.error else None,
        "cost_usd": record.cost_usd,
        "standard_cost_usd": record.standard_cost_usd,
    }


def load_previous(out: Path) -> dict[str, dict[str, Any]]:
    """Finished results of an earlier run (its OUT and journal), minus those worth re-running."""
    done: dict[str, dict[str, Any]] = {}
    for path in (out, journal_path(out)):
        if not path.exists():
            continue
        for text in path.read_text(encoding="utf-8").splitlines():
            try:
                item = json.loads(text)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if not isinstance(item, dict) or "id" not in item:
                continue
            error = item.get("error") or {}
            if item.get("status") == Status.SUCCEEDED or (
                item.get("status") == Status.FAILED and error.get("kind") not in RERUN_KINDS
            ):
                done[str(item["id"])] = item
    return done


@dataclass
class Progress:
    total: int
    succeeded: int = 0
    failed: int = 0
    retrying: int = 0
    in_flight: int = 0
    queued: int = 0
    overloaded: int = 0
    rate_limited: int = 0
    reused: int = 0
    reused_succeeded: int = 0
    #: why the latest failed attempt of a job now retrying failed (``connection_error: Cannot connect…``)
    last_error: str | None = None
    started_s: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    def eta_s(self) -> float | None:
        fresh_done = self.done - self.reused
        if fresh_done <= 0:
            return None
        rate = fresh_done / max(1e-6, time.monotonic() - self.started_s)
        return (self.total - self.done) / rate

    def line(self) -> str:
        eta = self.eta_s()
        return (
            f"{self.done}/{self.total} done (succeeded {self.succeeded}, failed {self.failed}), "
            f"retrying {self.retrying}{self._why()}, in flight {self.in_flight}, queued {self.queued}, "
            f"503s {self.overloaded}, 429s {self.rate_limited}, eta {'-' if eta is None else f'{eta:.0f}s'}"
        )

    def _why(self) -> str:
        """`` (last: KIND: MESSAGE)`` while jobs are retrying: an unreachable API shows at once, not in the log."""
        if not self.retrying or not self.last_error:
            return ""
        return f" (last: {brief(self.last_error, LAST_ERROR_CHARS)})"


@dataclass
class BatchResult:
    lines: list[dict[str, Any]]
    bad_lines: list[LineError]
    records: dict[str, JobRecord]
    progress: Progress
    elapsed_s: float
    #: each line's model, as the line names it (for a reused result, which has no record here)
    models: dict[str, str] = field(default_factory=dict)


@dataclass
class BatchJob:
    """One batch run over one input file."""

    queue: FlexQueue
    source: Path
    out: Path
    deadline_s: float | None = None
    fallback: str = "none"
    tier: str | None = None  # every line's tier unless the line gives its own (None: the queue's default)
    on_progress: Callable[[Progress], None] = lambda _p: None
    previous: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: (503s, 429s) per job, from its record when last read
    _active_attempts: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: (when, "outcome: error") of the latest failed attempt per job, from its record when last read
    _last_errors: dict[str, tuple[datetime, str]] = field(default_factory=dict)
    #: output lines of this run's jobs as they ended (and of lines whose parent in the batch failed)
    _output: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def _save_images(self, record: JobRecord) -> list[str]:
        """Write a succeeded job's images next to the output; their paths, in answer order."""
        if record.result is None or not record.result.images:
            return []
        folder = images_dir(self.out)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for image in record.result.images:
            path = folder / f"{record.id}-{image.index}{extension(image.mime_type)}"
            path.write_bytes(await self.queue.blob(image.sha256))
            paths.append(str(path))
        return paths

    def parse(self) -> tuple[list[Line], list[LineError]]:
        text = self.source.read_text(encoding="utf-8")
        return parse_jsonl(
            text.splitlines(),
            max_bytes=self.queue.settings.max_request_bytes,
            default_id=stable_line_id(str(self.source.resolve())),
            deadline_s=self.deadline_s,
            fallback=self.fallback,
            **({"tier": self.tier} if self.tier is not None else {}),
        )

    async def run(self, lines: list[Line], bad: list[LineError]) -> BatchResult:
        started = time.monotonic()
        by_id = {line.spec.job_id: line for line in lines}
        # an earlier result counts only for the same request (an edited line runs again), at its line now
        self.previous = {
            job_id: {**item, "line": by_id[job_id].line}
            for job_id, item in load_previous(self.out).items()
            if job_id in by_id and item.get("request_sha256") == request_key(by_id[job_id])
        }
        todo = [line for line in lines if line.spec.job_id not in self.previous]
        progress = Progress(total=len(lines), reused=len(lines) - len(todo))
        reused = [self.previous[str(line.spec.job_id)] for line in lines if line.spec.job_id in self.previous]
        progress.reused_succeeded = sum(item["status"] == Status.SUCCEEDED for item in reused)
        # a line that continues another line of this batch waits until that line's job has succeeded
        waiting = [line for line in todo if line.continue_from in by_id and line.continue_from not in self.previous]
        waiting_ids = {line.spec.job_id for line in waiting}
        ready = [line for line in todo if line.spec.job_id not in waiting_ids]
        enqueued = await self._enqueue(ready)
        records = await self._follow([item.id for item in enqueued], by_id, progress, waiting)
        out_lines = []
        for line in lines:
            job_id = str(line.spec.job_id)
            out_lines.append(self.previous.get(job_id) or self._output.get(job_id)
                             or {**output_line(records[job_id], line.line), "request_sha256": request_key(line)})
        self._write_output(out_lines)
        models = {str(line.spec.job_id): line.model for line in lines if line.model}
        return BatchResult(out_lines, bad, records, progress, time.monotonic() - started, models)

    async def _enqueue(self, lines: list[Line]) -> list[Any]:
        try:
            enqueued = await self.queue.enqueue_many([line.spec for line in lines])
        except InvalidRequestError:  # one line the queue refuses (a continuation of a missing job...)
            enqueued = []
            for line in lines:  # enqueue the others; fail that one alone
                try:
                    enqueued.append(await self.queue.enqueue(
                        line.spec.request, job_id=line.spec.job_id, deadline_s=line.spec.deadline_s,
                        fallback=line.spec.fallback, tags=line.spec.tags, cache=line.spec.cache, tier=line.spec.tier,
                        channels=line.spec.channels,
                    ))
                except InvalidRequestError as err:
                    self._output[str(line.spec.job_id)] = _never_ran(line, "invalid_request", str(err))
        for item in enqueued:  # a job left failed by an earlier run on this Redis: run it again
            if not item.created and item.record.error and item.record.error.kind in RERUN_KINDS:
                await self.queue.retry(item.id, deadline_s=self.deadline_s)
        return enqueued

    async def _release_children(
        self, final: dict[str, JobRecord], waiting: list[Line], sink: Any
    ) -> tuple[list[str], list[Line]]:
        """Enqueue the waiting lines whose parent succeeded; fail those whose parent did not."""
        started: list[Line] = []
        still: list[Line] = []
        for line in waiting:
            parent = final.get(str(line.continue_from))
            if parent is None:
                still.append(line)
            elif parent.status == Status.SUCCEEDED:
                started.append(line)
            else:
                item = _never_ran(line, "parent_failed", f"the job it continues, {parent.id!r}, ended {parent.status}")
                self._output[str(line.spec.job_id)] = item
                sink.write(json.dumps(item) + "\n")
        enqueued = await self._enqueue(started) if started else []
        return [item.id for item in enqueued], still

    async def _follow(
        self, ids: list[str], by_id: dict[str | None, Line], progress: Progress, waiting: list[Line] | None = None
    ) -> dict[str, JobRecord]:
        """Poll until every job ends; journal each as it does."""
        final: dict[str, JobRecord] = {}
        pending = list(ids)
        waiting = list(waiting or [])
        journal = journal_path(self.out)
        journal.parent.mkdir(parents=True, exist_ok=True)
        polls = 0
        with journal.open("a", encoding="utf-8") as sink:
            while True:
                # the status indexes say which jobs ended; only those records are read (and, every
                # FULL_READ_EVERY polls, all of them: attempt counts, and a record that became unreadable)
                full = polls % FULL_READ_EVERY == 0
                polls += 1
                statuses = dict(zip(pending, await self.queue.store.statuses(pending), strict=True))
                to_read = pending if full else [i for i in pending if statuses[i] is None or statuses[i] in TERMINAL]
                read = set(to_read)
                active_ids = [i for i in pending if i not in read]
                for job_id, record in zip(to_read, await self.queue.store.get_many(to_read), strict=True):
                    if record is None:  # gone or unreadable: that job fails, the batch goes on
                        await self.queue.store.quarantine(job_id, "missing or unreadable while the batch followed it")
                        record = await self.queue.store.get(job_id)
                    if record.terminal:
                        final[job_id] = record
                        self._last_errors.pop(job_id, None)
                        item = output_line(record, by_id[job_id].line, await self._save_images(record))
                        item["request_sha256"] = request_key(by_id[job_id])
                        self._output[job_id] = item
                        sink.write(json.dumps(item) + "\n")
                    else:
                        active_ids.append(job_id)
                        statuses[job_id] = record.status
                        self._active_attempts[job_id] = _shed_counts(record)
                        failed = _last_failure(record)
                        if failed is not None:
                            self._last_errors[job_id] = failed
                released, waiting = await self._release_children(final, waiting, sink) if waiting else ([], [])
                sink.flush()
                os.fsync(sink.fileno())
                pending = active_ids + released
                self._count(progress, final, [(i, statuses[i]) for i in active_ids])
                progress.queued += len(waiting) + len(released)
                progress.failed += len(self._output) - len(final)
                self.on_progress(progress)
                if not pending and not waiting:
                    return final
                await asyncio.sleep(POLL_S)  # progress polling of the output, not a retry backoff

    def _count(
        self, progress: Progress, final: dict[str, JobRecord], active: list[tuple[str, Status | None]]
    ) -> None:
        fresh_ok = sum(r.status == Status.SUCCEEDED for r in final.values())
        progress.succeeded = progress.reused_succeeded + fresh_ok
        progress.failed = (progress.reused - progress.reused_succeeded) + (len(final) - fresh_ok)
        progress.retrying = sum(s == Status.RETRYING for _, s in active)
        progress.in_flight = sum(s == Status.RUNNING for _, s in active)
        progress.queued = sum(s in (Status.QUEUED, None) for _, s in active)
        retrying = [self._last_errors[i] for i, s in active if s == Status.RETRYING and i in self._last_errors]
        progress.last_error = max(retrying)[1] if retrying else None
        for job_id, record in final.items():
            self._active_attempts[job_id] = _shed_counts(record)
        progress.overloaded = sum(n for n, _ in self._active_attempts.values())
        progress.rate_limited = sum(n for _, n in self._active_attempts.values())

    def _write_output(self, lines: list[dict[str, Any]]) -> None:
        tmp = self.out.with_name(self.out.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as sink:
            for item in lines:
                sink.write(json.dumps(item, ensure_ascii=False) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
        tmp.replace(self.out)
        journal_path(self.out).unlink(missing_ok=True)


def _shed_counts(record: JobRecord) -> tuple[int, int]:
    """(503s, 429s) among a record's attempts."""
    outcomes = [a.outcome for a in record.attempts]
    return outcomes.count(Outcome.OVERLOADED), outcomes.count(Outcome.RATE_LIMITED)


#: aiohttp's repr of the TLS context in a connection error (``ssl:<ssl.SSLContext object at 0x...>``): noise here
_SSL_NOISE = re.compile(r" ssl:(?:<[^>]*>|default)")


def brief(error: str, chars: int) -> str:
    """An attempt's error on one line, control characters escaped, cut to ``chars``."""
    text = clean(" ".join(_SSL_NOISE.sub("", error).split()))
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _last_failure(record: JobRecord) -> tuple[datetime, str] | None:
    """(when, ``outcome: error``) of the record's latest closed attempt that failed, if any."""
    for attempt in reversed(record.attempts):
        if attempt.outcome is not None and attempt.outcome != Outcome.OK and attempt.error:
            return attempt.finished_at or attempt.started_at, f"{attempt.outcome}: {attempt.error}"
    return None


def _never_ran(line: Line, kind: str, message: str) -> dict[str, Any]:
    """The output line of an input line that never became a job."""
    return {"request_sha256": request_key(line),
        "id": line.spec.job_id, "line": line.line, "status": str(Status.FAILED), "text": None,
        "function_calls": [], "parsed": None, "images": [], "finish_reason": None, "usage": None,
        "tier": None, "attempts": 0, "cost_usd": None, "standard_cost_usd": None,
        "error": {"kind": kind, "http_status": None, "message": message},
    }


def summarize_batch(result: BatchResult) -> dict[str, Any]:
    """The ``flexq stats`` report (:func:`producer.stats.summarize`) over this batch's jobs, plus a
    ``batch`` section: lines, bad lines, results reused from an earlier run, failures, elapsed time."""
    by_status: dict[str, int] = {}
    for item in result.lines:
        by_status[item["status"]] = by_status.get(item["status"], 0) + 1
    parts: list[dict[str, float]] = []
    latencies: list[int] = []
    for record in result.records.values():
        for attempt in record.attempts:
            parts.append(dict(attempt_counts(attempt)))
            if attempt.outcome == Outcome.OK and attempt.latency_ms is not None:
                latencies.append(attempt.latency_ms)
    fresh = {str(record.id) for record in result.records.values()}
    for item in result.lines:  # a job's cost, this run's or an earlier run's reused result
        if item["status"] == Status.SUCCEEDED:
            ran = result.records.get(item["id"]) if item["id"] in fresh else None
            tier = item.get("tier") if ran is None else _ok_tier(ran)
            model = ran.request.model if ran is not None and ran.request else result.models.get(item["id"])
            parts.append(cost_counts(tier or "unknown", item.get("cost_usd"), item.get("standard_cost_usd"),
                                     model=model))
    doc = summarize(counts=by_status, counters=add_up(parts), latencies_ms=latencies)
    doc["batch"] = {
        "lines": len(result.lines),
        "bad_lines": [str(err) for err in result.bad_lines],
        "reused_from_earlier_run": result.progress.reused,
        "failures": {
            item["id"]: f"{item['error']['kind']}: {item['error']['message']}" + _cause(result.records.get(item["id"]))
            for item in result.lines
            if item["status"] != Status.SUCCEEDED and item.get("error")
        },
        "elapsed_s": round(result.elapsed_s, 1),
    }
    return doc


def _cause(record: JobRecord | None) -> str:
    """`` (last attempt: KIND: MESSAGE)`` for a job that ran out of time after failed attempts: why it kept
    retrying (an unreachable API, a quota) is the thing to fix, and the error itself says only the deadline."""
    if record is None or record.error is None or record.error.kind != "deadline_exceeded":
        return ""
    failed = _last_failure(record)
    if failed is None:
        return ""
    return f" (last attempt: {brief(failed[1], 160)})"


def _ok_tier(record: JobRecord) -> str | None:
    """The tier of the attempt that succeeded (the one the queue's cost counters use)."""
    return next((str(a.tier) for a in reversed(record.attempts) if a.outcome == Outcome.OK), None)
