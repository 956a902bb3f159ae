"""examples/ run as a user runs them: a real worker, the simulator, real Redis, the script as a process."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from simulator import RunningSimulator
from simulator.images import png_bytes
from tests.conftest import API_KEY
from tests.helpers import running_worker, worker_env

ROOT = Path(__file__).resolve().parents[1]


async def run_example(env: dict[str, str], *args: str) -> str:
    """Run a script as a process; this event loop keeps serving the in-process simulator meanwhile."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=100)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_agent_loop_and_image_edit_examples(redis_url: str, sim: RunningSimulator, tmp_path: Path) -> None:
    env = worker_env(redis_url, sim.base_url, API_KEY)
    reference = tmp_path / "boat.png"
    reference.write_bytes(png_bytes(80, 60))
    with running_worker(env, tmp_path / "w.log", "--concurrency", "4"):
        agent = await run_example(env, "examples/agent_loop.py", "Should I walk to the museum in Paris?")
        edits = await run_example(env, "examples/image_edit.py", str(tmp_path / "out"), str(reference))
    assert "the model calls get_weather" in agent and "the model calls get_time" in agent
    assert agent.strip().splitlines()[-1].startswith("answer: ") and len(agent.strip().splitlines()[-1]) > 10
    saved = sorted((tmp_path / "out").glob("turn-*.png"))
    assert [p.name for p in saved] == ["turn-1-0.png", "turn-2-0.png", "turn-3-0.png"]
    assert all(p.read_bytes() == png_bytes(2048, 1536) for p in saved)  # 2K at 4:3, the bytes served
    assert "turn 3: 2048x1536" in edits
    assert sim.sim.stats.signatures_checked >= 3 and sim.sim.stats.signatures_rejected == 0
