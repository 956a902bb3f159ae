"""``flexq batch`` and ``flexq demo`` end to end, as a user runs them (a subprocess)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulator import RunningSimulator
from tests.conftest import API_KEY
from tests.helpers import ROOT, poll

pytestmark = pytest.mark.e2e
MODEL = "gemini-2.5-flash"

LINES = [
    {"id": "ok-1", "model": MODEL, "prompt": "plain question"},
    "{this is not json",
    {"id": "shed", "model": MODEL, "prompt": "shed thrice [[fault:503x3]]"},
    {"model": MODEL},  # invalid: neither prompt nor contents
    {"id": "refused", "model": MODEL, "prompt": "bad request [[fault:400]]"},
    {"id": "unsafe", "model": MODEL, "prompt": "blocked answer [[fault:safety]]"},
    {"model": MODEL, "contents": [{"role": "user", "parts": [{"text": "no id: derived from the line"}]}]},
    {"id": "limited", "model": MODEL, "prompt": "rate limited [[fault:429x1:retry=1s]]",
     "config": {"temperature": 0.1}},
    {"id": "reset", "model": MODEL, "prompt": "connection reset [[fault:resetx1]]", "system_instruction": "Be brief."},
]
VALID = 7  # lines 1, 3, 5, 6, 7, 8, 9


def write_input(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def batch_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXQ_", "GEMINI_", "GOOGLE_", "REDIS_"))}
    env.update(FLEXQ_RETRY_BASE_S="0.2", FLEXQ_RETRY_MAX_S="1", NO_PROXY="127.0.0.1,localhost", FLEXQ_QUEUE="batch")
    env.update(extra)
    return env


def run_batch(args: list[str], env: dict[str, str], timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flexq", "batch", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False,
    )


async def run_batch_async(args: list[str], env: dict[str, str], timeout_s: float = 90) -> tuple[int, str, str]:
    """Like run_batch, but keeps this event loop (and an in-process simulator on it) running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flexq", "batch", *args,
        env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def read_out(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_output(out: list[dict[str, object]]) -> None:
    assert [item["line"] for item in out] == [1, 3, 5, 6, 7, 8, 9]  # input order, valid lines only
    by_id = {item["id"]: item for item in out}
    for job_id in ("ok-1", "shed", "limited", "reset"):
        item = by_id[job_id]
        assert item["status"] == "succeeded", item
        assert item["text"] and item["finish_reason"] == "STOP" and item["tier"] == "flex"
        assert item["usage"]["total_tokens"] > 0 and item["error"] is None
    assert by_id["shed"]["attempts"] == 4 and by_id["limited"]["attempts"] == 2 and by_id["reset"]["attempts"] == 2
    assert by_id["refused"]["status"] == "failed" and by_id["refused"]["error"]["kind"] == "client_error"
    assert by_id["unsafe"]["status"] == "failed" and by_id["unsafe"]["error"]["kind"] == "blocked"
    assert by_id["refused"]["attempts"] == 1 and by_id["unsafe"]["attempts"] == 1
    derived = out[4]
    assert derived["status"] == "succeeded" and str(derived["id"]).startswith("b-")
    for item in out:
        assert set(item) >= {"id", "status", "text", "finish_reason", "usage", "tier", "attempts", "error"}


def test_embedded_batch_with_faults_and_bad_lines(tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", LINES)
    out = tmp_path / "out.jsonl"
    done = run_batch([str(source), "-o", str(out), "--simulate", "--json"], batch_env())
    assert done.returncode == 0, done.stderr
    assert "in-process Redis stand-in" in done.stderr and "simulator in-process (--simulate)" in done.stderr
    assert "line 2: not valid JSON" in done.stderr
    assert "line 4:" in done.stderr and "prompt" in done.stderr
    out_lines = read_out(out)
    check_output(out_lines)
    summary = json.loads(done.stdout)
    assert summary["jobs"] == {"succeeded": 5, "failed": 2}
    assert summary["attempts"]["by_outcome"]["overloaded"] == 3
    cost = summary["cost"]
    # flex is half price: saved equals spent, to the report's resolution (USD rounded to 6 places)
    assert cost["spent_usd"] > 0 and cost["saved_usd"] == pytest.approx(cost["spent_usd"], abs=1.01e-6)
    assert len(summary["batch"]["bad_lines"]) == 2
    assert not (tmp_path / "out.jsonl.progress").exists()  # the journal is folded into OUT at the end


@pytest.mark.redis
async def test_batch_on_real_redis_runs_each_job_once(tmp_path: Path, redis_url: str, sim: RunningSimulator) -> None:
    source = write_input(tmp_path / "in.jsonl", LINES)
    out = tmp_path / "out.jsonl"
    env = batch_env(REDIS_URL=redis_url, GEMINI_API_KEY=API_KEY, GEMINI_BASE_URL=sim.base_url)
    code, stdout, stderr = await run_batch_async([str(source), "-o", str(out)], env)
    assert code == 0, stderr
    assert "stand-in" not in stderr and "summary" in stdout
    check_output(read_out(out))
    calls = sim.sim.stats.requests
    out.unlink()
    code, _, stderr = await run_batch_async([str(source), "-o", str(out)], env)  # same ids: found in Redis
    assert code == 0, stderr
    check_output(read_out(out))
    assert sim.sim.stats.requests == calls


async def test_batch_resumes_after_a_kill_without_resending(tmp_path: Path, sim: RunningSimulator) -> None:
    lines: list[object] = [{"id": f"q{i}", "model": MODEL, "prompt": f"quick {i}"} for i in range(6)]
    lines += [{"id": f"s{i}", "model": MODEL, "prompt": f"stuck {i} [[fault:hangx1]]"} for i in range(2)]
    source = write_input(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    journal = tmp_path / "out.jsonl.progress"
    env = batch_env(GEMINI_API_KEY=API_KEY, GEMINI_BASE_URL=sim.base_url)  # embedded Redis, external simulator
    proc = subprocess.Popen(  # noqa: ASYNC220 - started, not waited on; the loop keeps serving the simulator
        [sys.executable, "-m", "flexq", "batch", str(source), "-o", str(out)],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    async def quick_done_and_stuck_sent() -> bool | None:
        journaled = len(journal.read_text().splitlines()) if journal.exists() else 0
        return True if journaled >= 6 and sim.sim.stats.requests >= 8 else None

    await poll(quick_done_and_stuck_sent, timeout_s=30, what="quick jobs journaled and stuck calls sent")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert not out.exists()
    assert sim.sim.stats.requests == 8
    code, stdout, stderr = await run_batch_async([str(source), "-o", str(out), "--json"], env)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["batch"]["reused_from_earlier_run"] == 6
    assert summary["jobs"] == {"succeeded": 8}
    assert summary["attempts"]["by_outcome"] == {"ok": 2}
    assert [item["id"] for item in read_out(out)] == [f"q{i}" for i in range(6)] + ["s0", "s1"]
    assert sim.sim.stats.requests == 10  # only the two unfinished jobs were sent again


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path: Path) -> None:
    lines = [{"id": f"h{i}", "model": MODEL, "prompt": f"held {i} [[latency:30s]]"} for i in range(3)]
    source = write_input(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flexq", "batch", str(source), "-o", str(out), "--simulate"],
        env=batch_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    first_line = proc.stderr.readline()  # the "not durable" note: the batch is under way
    assert "REDIS_URL" in first_line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "run the same command again to resume" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_demo_finishes_with_every_job_accounted_for(tmp_path: Path) -> None:
    out = tmp_path / "demo.jsonl"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "flexq", "demo", "-o", str(out), "--json"],
        env=batch_env(), cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 120
    summary = json.loads(done.stdout)
    results = read_out(out)
    assert len(results) == summary["batch"]["lines"] == 200
    failed = {item["id"]: item["error"]["kind"] for item in results if item["status"] != "succeeded"}
    assert failed == {"demo-197": "client_error", "demo-198": "blocked", "demo-199": "blocked",
                      "demo-200": "client_error"}
    assert summary["attempts"]["by_outcome"]["overloaded"] > 0  # a peak hour: flex calls are shed
    assert summary["cost"]["saved_usd"] > 0


def test_images_are_written_beside_the_output_and_threads_wait_for_their_parent(tmp_path: Path) -> None:
    from simulator.images import png_bytes

    tools = [{"function_declarations": [{"name": "lookup", "parameters": {"type": "OBJECT"}}]}]
    lines = [
        {"id": "pic", "model": "gemini-3-pro-image-preview", "prompt": "a lighthouse"},
        {"id": "pic-edit", "continue_from": "pic", "prompt": "make it purple"},
        {"id": "call", "model": "gemini-3-flash-preview", "prompt": "look it up", "config": {"tools": tools}},
        {"id": "call-2", "continue_from": "call",
         "parts": [{"function_response": {"name": "lookup", "response": {"value": 1}}}]},
        {"id": "doomed", "model": MODEL, "prompt": "refused [[fault:400]]"},
        {"id": "orphan", "continue_from": "doomed", "prompt": "never sent"},
    ]
    source = write_input(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    done = run_batch([str(source), "-o", str(out), "--simulate", "--json"], batch_env())
    assert done.returncode == 0, done.stderr
    rows = {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert {k: r["status"] for k, r in rows.items()} == {
        "pic": "succeeded", "pic-edit": "succeeded", "call": "succeeded", "call-2": "succeeded",
        "doomed": "failed", "orphan": "failed",
    }
    image = rows["pic"]["images"][0]
    assert Path(image["path"]) == tmp_path / "out.jsonl.images" / "pic-0.png"
    assert Path(image["path"]).read_bytes() == png_bytes(1024, 1024)
    assert (image["width"], image["height"], image["mime_type"]) == (1024, 1024, "image/png")
    assert Path(rows["pic-edit"]["images"][0]["path"]).is_file()
    assert [c["name"] for c in rows["call"]["function_calls"]] == ["lookup"]
    assert rows["call-2"]["function_calls"] == [] and rows["call-2"]["text"]
    assert rows["orphan"]["error"]["kind"] == "parent_failed" and "'doomed'" in rows["orphan"]["error"]["message"]
    summary = json.loads(done.stdout)
    assert summary["batch"]["failures"]["orphan"].startswith("parent_failed")


def test_a_line_the_queue_refuses_fails_alone(tmp_path: Path) -> None:
    lines = [
        {"id": "fine", "model": MODEL, "prompt": "hello"},
        {"id": "lost", "continue_from": "no-such-job", "prompt": "more"},
    ]
    source = write_input(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    done = run_batch([str(source), "-o", str(out), "--simulate"], batch_env())
    assert done.returncode == 0, done.stderr
    rows = {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert rows["fine"]["status"] == "succeeded"
    assert rows["lost"]["status"] == "failed" and rows["lost"]["error"]["kind"] == "invalid_request"
    assert "no job with id 'no-such-job'" in rows["lost"]["error"]["message"]


def test_resume_reuses_a_result_only_for_the_same_request_at_its_new_line(tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, [{"id": "a", "model": MODEL, "prompt": "first"}, {"id": "b", "model": MODEL, "prompt": "old"}])
    assert run_batch([str(source), "-o", str(out), "--simulate"], batch_env()).returncode == 0
    before = {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}
    # b edited, and the lines swapped: a's result is reused (at line 2 now), b runs again
    write_input(source, [{"id": "b", "model": MODEL, "prompt": "new"}, {"id": "a", "model": MODEL, "prompt": "first"}])
    done = run_batch([str(source), "-o", str(out), "--simulate", "--json"], batch_env())
    assert done.returncode == 0, done.stderr
    rows = [json.loads(text) for text in out.read_text().splitlines()]
    assert [(row["id"], row["line"]) for row in rows] == [("b", 1), ("a", 2)]
    assert rows[1]["text"] == before["a"]["text"] and rows[1]["request_sha256"] == before["a"]["request_sha256"]
    assert "new" in rows[0]["text"] and rows[0]["request_sha256"] != before["b"]["request_sha256"]
    assert json.loads(done.stdout)["batch"]["reused_from_earlier_run"] == 1


# -- a new user's frictions (issue 11) -------------------------------------------------------------


def test_without_a_key_batch_refuses_instead_of_answering_from_the_simulator(tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", [{"id": "a", "model": MODEL, "prompt": "hi"}])
    out = tmp_path / "out.jsonl"
    done = run_batch([str(source), "-o", str(out)], batch_env(GEMINI_API_KY="typo-" + API_KEY))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("flexq: no Gemini API key: set GEMINI_API_KEY")
    assert "--simulate" in lines[0] and "GEMINI_API_KY is set: a typo?" in lines[0]
    assert API_KEY not in done.stderr  # the misspelt variable is named, its value never shown
    assert not out.exists() and not (tmp_path / "out.jsonl.progress").exists()


def test_workers_0_without_redis_url_is_refused(tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", [{"id": "a", "model": MODEL, "prompt": "hi"}])
    done = run_batch([str(source), "-o", str(tmp_path / "out.jsonl"), "--workers", "0", "--simulate"], batch_env())
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "flexq: --workers 0 needs REDIS_URL: no `flexq worker` can reach the in-process Redis stand-in, "
        "so nothing would run the jobs"
    )


def test_batch_warns_once_per_model_with_no_known_price_and_names_it_in_the_summary(tmp_path: Path) -> None:
    lines = [{"id": f"t{i}", "model": "gemini-2.5-flsh", "prompt": f"typo {i}"} for i in range(2)]
    lines.append({"id": "ok", "model": MODEL, "prompt": "priced"})
    source = write_input(tmp_path / "in.jsonl", lines)
    done = run_batch([str(source), "-o", str(tmp_path / "out.jsonl"), "--simulate"], batch_env())
    assert done.returncode == 0, done.stderr  # accepted: new models appear all the time
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: model 'gemini-2.5-flsh' is not in flexq's price table, so its cost will show as unknown; "
        "did you mean 'gemini-2.5-flash'?"
    ]
    assert "2 job(s) on models with no known price: gemini-2.5-flsh" in " ".join(done.stdout.split())
