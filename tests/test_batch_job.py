"""flexq.batch.BatchJob in process: JSONL in, answers out, progress, the journal, resume and idempotency.

The queue is on fakeredis and a stand-in worker runs the jobs with the real ``Runner`` and a Gemini
scripted per prompt. The worker stand-in runs every active job each time the batch reports progress,
without waiting out deferrals; the batch's own progress poll is shortened to a millisecond.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from flexq import batch
from flexq.batch import BatchJob, BatchResult, Progress, journal_path, load_previous, output_line, summarize_batch
from producer.pricing import cost_usd
from producer.queue import FlexQueue
from producer.status import ACTIVE, Tier
from tests.conftest import make_settings
from tests.fakes import USAGE, PromptGemini, Step, answer, client_error, overloaded
from worker.runner import Runner

MODEL = "gemini-2.5-flash"
LINES: list[object] = [
    {"id": "ok-1", "model": MODEL, "prompt": "plain question"},
    "{this is not json",
    {"id": "shed", "model": MODEL, "prompt": "shed twice"},
    {"model": MODEL},  # neither prompt nor contents
    {"id": "refused", "model": MODEL, "prompt": "refuse me"},
    {"id": "unsafe", "model": MODEL, "prompt": "unsafe answer", "tags": {"kind": "safety"}},
    {"model": MODEL, "contents": [{"role": "user", "parts": [{"text": "no id here"}]}]},
]
SCRIPTS: dict[str, list[Step]] = {
    "shed twice": [overloaded(), overloaded()],
    "refuse me": [client_error(400, message="Invalid argument")],
    "unsafe answer": [answer(None, finish_reason="SAFETY")],
}


def write_input(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture(autouse=True)
def quick_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch, "POLL_S", 0.001)


@dataclass
class Harness:
    """A batch run with a stand-in worker driven by the batch's progress reports."""

    queue: FlexQueue
    gemini: PromptGemini
    runner_settings: dict[str, Any] = field(default_factory=dict)
    progress: list[Progress] = field(default_factory=list)
    watch: Callable[[Progress], None] | None = None
    #: Runs in the worker stand-in before a sweep; returning True skips that sweep's jobs.
    before_sweep: Callable[[], Awaitable[bool]] | None = None

    async def run(self, source: Path, out: Path, **job_kw: Any) -> BatchResult:
        runner = Runner(
            store=self.queue.store, gemini=self.gemini, settings=make_settings(**self.runner_settings),
            worker_name="batch-test-worker", rand=lambda: 0.5,
        )
        progressed = asyncio.Event()

        def on_progress(progress: Progress) -> None:
            self.progress.append(replace(progress))
            if self.watch is not None:
                self.watch(progress)
            progressed.set()

        async def work() -> None:
            while True:
                await progressed.wait()
                progressed.clear()
                if self.before_sweep is not None and await self.before_sweep():
                    continue
                for job_id in await self.queue.store.ids(ACTIVE, limit=10_000, newest_first=False):
                    await runner.run(job_id)  # a deferral is not waited out

        job = BatchJob(self.queue, source, out, on_progress=on_progress, **job_kw)
        lines, bad = job.parse()
        worker = asyncio.create_task(work())
        try:
            return await asyncio.wait_for(job.run(lines, bad), timeout=20)
        finally:
            worker.cancel()
            with pytest.raises(asyncio.CancelledError):
                await worker


@pytest.fixture
def harness(fake_queue: FlexQueue) -> Harness:
    return Harness(fake_queue, PromptGemini.of(SCRIPTS))


def read_out(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- one run ---------------------------------------------------------------------------------------


async def test_answers_come_out_in_input_order(harness: Harness, tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", LINES)
    out = tmp_path / "out.jsonl"
    result = await harness.run(source, out)
    assert read_out(out) == result.lines
    assert [item["line"] for item in result.lines] == [1, 3, 5, 6, 7]  # valid lines only, in input order
    by_id = {item["id"]: item for item in result.lines}
    for job_id in ("ok-1", "shed"):
        item = by_id[job_id]
        assert item["status"] == "succeeded" and item["error"] is None and item["tier"] == "flex"
        assert item["finish_reason"] == "STOP" and item["usage"] == USAGE.model_dump()
        assert item["cost_usd"] == cost_usd(MODEL, USAGE, Tier.FLEX)
        assert item["standard_cost_usd"] == cost_usd(MODEL, USAGE, Tier.STANDARD)
    assert by_id["ok-1"]["text"] == "answer for: plain question" and by_id["ok-1"]["attempts"] == 1
    assert by_id["shed"]["attempts"] == 3
    refused, unsafe = by_id["refused"], by_id["unsafe"]
    assert refused["status"] == "failed" and refused["attempts"] == 1 and refused["text"] is None
    assert refused["error"]["kind"] == "client_error" and refused["error"]["http_status"] == 400
    assert unsafe["status"] == "failed" and unsafe["error"]["kind"] == "blocked" and unsafe["attempts"] == 1
    derived = result.lines[4]
    assert derived["status"] == "succeeded" and str(derived["id"]).startswith("b-")
    assert derived["text"] == "answer for: no id here"
    assert str(result.bad_lines[0]).startswith("line 2: not valid JSON")
    assert result.bad_lines[1].line == 4 and "prompt" in result.bad_lines[1].message
    assert not journal_path(out).exists()  # folded into OUT at the end
    assert len(harness.gemini.calls) == 7  # 1 + 3 + 1 + 1 + 1: each job as often as its script says
    tags = (await harness.queue.get("unsafe")).tags
    assert tags == {"kind": "safety"}


async def test_summary_of_a_run(harness: Harness, tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", LINES)
    summary = summarize_batch(await harness.run(source, tmp_path / "out.jsonl"))
    assert summary["batch"]["lines"] == 5 and summary["jobs"] == {"succeeded": 3, "failed": 2}
    assert len(summary["batch"]["bad_lines"]) == 2 and summary["batch"]["reused_from_earlier_run"] == 0
    assert summary["attempts"]["by_outcome"] == {"ok": 3, "overloaded": 2, "client_error": 1, "blocked": 1}
    # tokens as the queue's counters count them: every attempt that reported usage (3 answers + the block)
    assert summary["tokens"] == {"flex": {"prompt": 400, "output": 80, "thoughts": 120}}
    flex, standard = cost_usd(MODEL, USAGE, Tier.FLEX), cost_usd(MODEL, USAGE, Tier.STANDARD)
    assert flex is not None and standard is not None
    assert summary["cost"]["spent_usd"] == pytest.approx(3 * flex, abs=1e-6)
    assert summary["cost"]["standard_equivalent_usd"] == pytest.approx(3 * standard, abs=1e-6)
    assert summary["cost"]["saved_usd"] == pytest.approx(3 * (standard - flex), abs=1e-6)
    assert summary["cost"]["jobs_with_unknown_cost"] == 0
    assert summary["latency_ms"]["p50"] is not None
    assert set(summary["batch"]["failures"]) == {"refused", "unsafe"}
    assert summary["batch"]["failures"]["refused"].startswith("client_error: 400 INVALID_ARGUMENT")


async def test_progress_is_reported_until_every_job_has_ended(harness: Harness, tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", LINES)
    await harness.run(source, tmp_path / "out.jsonl")
    first, last = harness.progress[0], harness.progress[-1]
    assert first.total == last.total == 5
    assert (last.done, last.succeeded, last.failed) == (5, 3, 2)
    assert (last.retrying, last.in_flight, last.queued) == (0, 0, 0)
    assert last.overloaded == 2 and last.rate_limited == 0
    dones = [p.done for p in harness.progress]
    assert dones == sorted(dones)  # never goes back
    assert last.line().startswith("5/5 done (succeeded 3, failed 2), retrying 0, in flight 0, queued 0, 503s 2")


async def test_each_finished_job_is_journaled_before_the_output_is_written(
    harness: Harness, tmp_path: Path
) -> None:
    source = write_input(tmp_path / "in.jsonl", LINES)
    out = tmp_path / "out.jsonl"
    seen: list[tuple[int, list[str], bool]] = []

    def watch(progress: Progress) -> None:
        journaled = [json.loads(line)["id"] for line in journal_path(out).read_text().splitlines()]
        seen.append((progress.done, journaled, out.exists()))

    harness.watch = watch
    await harness.run(source, out)
    assert seen[0][0] == 0 and seen[-1][0] == 5  # from nothing ended to everything ended
    for done, journaled, out_written in seen:
        assert len(journaled) == done and len(set(journaled)) == done  # each ended job once, as it ends
        assert not out_written
    assert sorted(seen[-1][1]) == sorted(item["id"] for item in read_out(out))


# -- resume and idempotency ------------------------------------------------------------------------


def previous_item(job_id: str, line: int, status: str, *, text: str | None = None, kind: str | None = None) -> str:
    """A line an earlier run wrote for ``{"id": job_id, "model": MODEL, "prompt": "prompt <id>"}``."""
    error = {"kind": kind, "message": "earlier", "http_status": None} if kind else None
    request = {"model": MODEL, "prompt": f"prompt {job_id}"}
    return json.dumps({
        "id": job_id, "line": line, "status": status, "text": text, "finish_reason": "STOP" if text else None,
        "usage": None, "tier": "flex" if text else None, "attempts": 1, "error": error,
        "cost_usd": None, "standard_cost_usd": None,
        "request_sha256": hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest(),
    })


async def test_resume_reuses_finished_results_and_sends_only_the_rest(harness: Harness, tmp_path: Path) -> None:
    lines: list[object] = [{"id": name, "model": MODEL, "prompt": f"prompt {name}"} for name in "abcd"]
    source = write_input(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    journal_path(out).write_text("\n".join([
        previous_item("a", 1, "succeeded", text="from the earlier run"),
        previous_item("b", 2, "failed", kind="client_error"),  # permanent: kept
        previous_item("c", 3, "failed", kind="deadline_exceeded"),  # worth running again
        "[1, 2]",
        json.dumps({"status": "succeeded"}),
        '{"id": "d", "line": 4, "status": "succ',  # cut short by a kill
    ]) + "\n")
    result = await harness.run(source, out)
    assert sorted(harness.gemini.prompts()) == ["prompt c", "prompt d"]
    by_id = {item["id"]: item for item in read_out(out)}
    assert by_id["a"]["text"] == "from the earlier run" and by_id["a"]["status"] == "succeeded"
    assert by_id["b"]["status"] == "failed" and by_id["b"]["error"]["kind"] == "client_error"
    assert by_id["c"]["status"] == by_id["d"]["status"] == "succeeded"
    assert by_id["c"]["text"] == "answer for: prompt c"
    assert [item["id"] for item in result.lines] == ["a", "b", "c", "d"]
    assert result.progress.reused == 2 and result.progress.reused_succeeded == 1
    last = harness.progress[-1]
    assert (last.done, last.succeeded, last.failed) == (4, 3, 1)
    assert last.eta_s() is not None
    summary = summarize_batch(result)
    assert summary["batch"]["reused_from_earlier_run"] == 2 and summary["jobs"] == {"succeeded": 3, "failed": 1}
    assert not journal_path(out).exists()


async def test_a_finished_output_is_reused_whole(harness: Harness, tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", LINES)
    out = tmp_path / "out.jsonl"
    first = await harness.run(source, out)
    calls = len(harness.gemini.calls)
    second = await harness.run(source, out)
    assert len(harness.gemini.calls) == calls  # nothing sent again
    assert second.lines == first.lines and second.progress.reused == 5
    assert read_out(out) == first.lines


async def test_same_file_on_the_same_redis_runs_each_job_once(harness: Harness, tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", LINES)
    out = tmp_path / "out.jsonl"
    first = await harness.run(source, out)
    calls = len(harness.gemini.calls)
    out.unlink()  # no local trace left: the ids (given or derived from the line) find the jobs
    second = await harness.run(source, out)
    assert len(harness.gemini.calls) == calls
    assert second.progress.reused == 0
    assert [(i["id"], i["status"], i["text"]) for i in second.lines] == [
        (i["id"], i["status"], i["text"]) for i in first.lines
    ]


async def test_a_job_that_ran_out_of_time_runs_again_on_resume(fake_queue: FlexQueue, tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", [{"id": "late", "model": MODEL, "prompt": "slow start"}])
    out = tmp_path / "out.jsonl"
    gemini = PromptGemini.of({"slow start": [overloaded()]})
    # a 50 s backoff against a 20 s deadline: the job fails deadline_exceeded
    harness = Harness(fake_queue, gemini, runner_settings={"retry_base_s": 100, "retry_max_s": 100})
    first = await harness.run(source, out, deadline_s=20)
    assert first.lines[0]["status"] == "failed" and first.lines[0]["error"]["kind"] == "deadline_exceeded"
    second = await harness.run(source, out, deadline_s=20)  # found failed in Redis: `flexq retry`, kept history
    assert second.lines[0]["status"] == "succeeded" and second.lines[0]["attempts"] == 2
    record = await fake_queue.get("late")
    assert record.enqueues == 2 and len(gemini.calls) == 2


async def test_batch_options_reach_every_job(harness: Harness, tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", [{"id": "x", "model": MODEL, "prompt": "hi"}])
    await harness.run(source, tmp_path / "out.jsonl", deadline_s=120, fallback="standard")
    record = await harness.queue.get("x")
    assert record.fallback == "standard"
    assert 100 < (record.deadline_at - record.created_at).total_seconds() <= 120


async def test_a_job_whose_record_is_unreadable_for_a_while_fails_alone(harness: Harness, tmp_path: Path) -> None:
    lines: list[object] = [{"id": name, "model": MODEL, "prompt": f"prompt {name}"} for name in ("fine", "spoilt")]
    source = write_input(tmp_path / "in.jsonl", lines)
    sweeps: list[int] = []

    async def spoil_first() -> bool:
        sweeps.append(1)
        if len(sweeps) == 1:  # garbage where the record was, seen by the batch's next poll
            await harness.queue.redis.set(harness.queue.store.keys.record("spoilt"), b"{not json")
            return True
        return False

    harness.before_sweep = spoil_first
    result = await harness.run(source, tmp_path / "out.jsonl")
    by_id = {item["id"]: item for item in result.lines}
    assert by_id["fine"]["status"] == "succeeded"
    assert by_id["spoilt"]["status"] == "failed" and by_id["spoilt"]["error"]["kind"] == "invalid_job"


# -- the pieces ------------------------------------------------------------------------------------


def test_derived_ids_are_stable_per_file_and_line(fake_queue: FlexQueue, tmp_path: Path) -> None:
    lines: list[object] = [{"model": MODEL, "prompt": "same"}, {"model": MODEL, "prompt": "same"}]
    one = write_input(tmp_path / "one.jsonl", lines)
    two = write_input(tmp_path / "two.jsonl", lines)

    def ids(path: Path) -> list[str | None]:
        parsed, bad = BatchJob(fake_queue, path, tmp_path / "o.jsonl").parse()
        assert bad == []
        return [line.spec.job_id for line in parsed]

    first = ids(one)
    assert first == ids(one) and len(set(first)) == 2  # the same line twice still gets two jobs
    assert all(job_id is not None and job_id.startswith("b-") for job_id in first)
    assert set(first).isdisjoint(ids(two))  # another file: other jobs


def test_load_previous_without_files_is_empty(tmp_path: Path) -> None:
    assert load_previous(tmp_path / "nothing.jsonl") == {}


def test_output_line_of_a_failed_record() -> None:
    from producer import transitions
    from producer.models import utcnow
    from producer.request import GenerateRequest

    record = transitions.new_record(
        "f1", GenerateRequest(model=MODEL, prompt="x"), now=utcnow(), deadline_s=60, fallback="none", tags={}
    )
    record = transitions.fail(record, kind="client_error", message="400 nope", now=utcnow(), http_status=400)
    assert output_line(record, 7) == {
        "id": "f1", "line": 7, "status": "failed", "text": None, "function_calls": [], "parsed": None, "images": [],
        "finish_reason": None, "usage": None, "tier": None, "attempts": 0,
        "error": {"kind": "client_error", "message": "400 nope", "http_status": 400},
        "cost_usd": None, "standard_cost_usd": None,
    }


def test_progress_without_fresh_results_has_no_eta() -> None:
    progress = Progress(total=10, reused=4, reused_succeeded=4, succeeded=4)
    assert progress.eta_s() is None
    assert progress.line().endswith("eta -")


async def test_progress_reads_only_the_records_that_ended(
    fake_queue: FlexQueue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Following 60 pending jobs, a poll reads the records the status indexes say ended, not all 60
    (every FULL_READ_EVERY-th poll reads them all)."""
    from flexq.jsonl import Line
    from producer import transitions
    from producer.models import JobResult, Usage, utcnow
    from producer.queue import JobSpec

    monkeypatch.setattr(batch, "POLL_S", 0.0)
    ids = [f"p{n:02d}" for n in range(60)]
    by_id: dict[str | None, Line] = {}
    for n, job_id in enumerate(ids):
        await fake_queue.enqueue({"model": MODEL, "prompt": job_id}, job_id=job_id)
        by_id[job_id] = Line(n + 1, JobSpec({"model": MODEL, "prompt": job_id}, job_id=job_id))
    reads: list[int] = []
    real_get_many = fake_queue.store.get_many

    async def counting_get_many(job_ids: Any) -> Any:
        reads.append(len(job_ids))
        return await real_get_many(job_ids)

    monkeypatch.setattr(fake_queue.store, "get_many", counting_get_many)
    result = JobResult(text="ok", finish_reason="STOP", usage=Usage(), model_version=MODEL, tier="flex")

    async def finish(job_ids: list[str]) -> None:
        for job_id in job_ids:
            await fake_queue.store.update(job_id, lambda r: transitions.Change(
                transitions.succeed(r, result=result, now=utcnow(), cost_usd=None, standard_cost_usd=None)))

    left = list(ids)
    tasks: list[asyncio.Task[None]] = []

    def on_progress(_: Progress) -> None:  # between polls, five more jobs end
        ending = [left.pop() for _ in range(min(5, len(left)))]
        tasks.append(asyncio.get_running_loop().create_task(finish(ending)))

    job = BatchJob(fake_queue, tmp_path / "in.jsonl", tmp_path / "out.jsonl", on_progress=on_progress)
    final = await job._follow(ids, by_id, Progress(total=60))
    assert sorted(final) == ids
    full = [n for n in reads if n > 10]
    assert reads[0] == 60 and len(full) <= 1 + len(reads) // batch.FULL_READ_EVERY
    assert max(n for n in reads[1:batch.FULL_READ_EVERY]) <= 10  # only what ended since the last poll


# -- a new user's frictions (issue 11) -------------------------------------------------------------


async def test_progress_says_why_jobs_are_retrying(fake_queue: FlexQueue, tmp_path: Path) -> None:
    """An unreachable API shows on the progress line, not only in the log (control characters escaped)."""
    refused = ConnectionRefusedError(111, "refused \x1b[31mred")
    gemini = PromptGemini.of({"unreachable": [refused] * (batch.FULL_READ_EVERY + 5)})
    source = write_input(tmp_path / "in.jsonl", [{"id": "u", "model": MODEL, "prompt": "unreachable"}])
    harness = Harness(fake_queue, gemini)
    result = await harness.run(source, tmp_path / "out.jsonl")
    assert result.lines[0]["status"] == "succeeded"  # reachable again after the script's refusals
    retrying = [p.line() for p in harness.progress if p.retrying]
    assert retrying, "the job was never seen retrying"
    explained = [line for line in retrying if "(last: " in line]
    assert explained, retrying
    assert "retrying 1 (last: connection_error: ConnectionRefusedError: [Errno 111] refused \\x1b[31mred), " \
        "in flight" in explained[-1]
    assert "\x1b" not in "".join(p.line() for p in harness.progress)
    assert "(last: " not in harness.progress[-1].line()  # nothing retrying, nothing to explain


def test_progress_line_cuts_the_latest_error_and_drops_aiohttp_noise() -> None:
    def shown(error: str) -> str:
        return Progress(total=5, retrying=3, last_error=error).line().split("(last: ")[1].split("), in flight")[0]

    noisy = "connection_error: ClientConnectorError: Cannot connect to host h:1 ssl:<ssl.SSLContext object at 0x7f> [x]"
    assert shown(noisy) == "connection_error: ClientConnectorError: Cannot connect to host h:1 [x]"
    long = "connection_error: ClientConnectorDNSError: Cannot connect to host generativelanguage.googleapis.com:443 " \
           "ssl:default [Name or service not known]"
    assert len(shown(long)) == batch.LAST_ERROR_CHARS and shown(long).endswith("host generativelan…")
    assert "(last: " not in Progress(total=5, retrying=0, last_error=long).line()


async def test_a_job_out_of_time_says_what_its_last_attempt_hit(fake_queue: FlexQueue, tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", [{"id": "late", "model": MODEL, "prompt": "slow start"}])
    harness = Harness(fake_queue, PromptGemini.of({"slow start": [overloaded()]}),
                      runner_settings={"retry_base_s": 100, "retry_max_s": 100})
    summary = summarize_batch(await harness.run(source, tmp_path / "out.jsonl", deadline_s=20))
    failure = summary["batch"]["failures"]["late"]
    assert failure.startswith("deadline_exceeded: ")
    assert failure.endswith("(last attempt: overloaded: 503 UNAVAILABLE: The model is overloaded.)")


async def test_summary_names_the_models_with_no_known_price(fake_queue: FlexQueue, tmp_path: Path) -> None:
    lines: list[object] = [
        {"id": "typo", "model": "gemini-2.5-flsh", "prompt": "one"},
        {"id": "new", "model": "models/gemini-9-ultra", "prompt": "two"},
        {"id": "known", "model": MODEL, "prompt": "three"},
    ]
    source, out = write_input(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    harness = Harness(fake_queue, PromptGemini.of({}))
    cost = summarize_batch(await harness.run(source, out))["cost"]
    assert cost["jobs_with_unknown_cost"] == 2
    assert cost["unknown_price_models"] == {"gemini-2.5-flsh": 1, "gemini-9-ultra": 1}
    rerun = summarize_batch(await harness.run(source, out))  # reused results: the models come from the lines
    assert rerun["batch"]["reused_from_earlier_run"] == 3
    assert rerun["cost"]["unknown_price_models"] == {"gemini-2.5-flsh": 1, "gemini-9-ultra": 1}
