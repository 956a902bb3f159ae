"""The chaos run at a small size (``make chaos`` runs 2,000 jobs): workers SIGKILLed and frozen past
their lease, Redis SIGKILLed and restarted from its AOF during the bulk enqueue, random sheds, 429s
and 500s; every invariant must hold."""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.chaos import ChaosConfig, run_chaos
from tests.conftest import require_or_skip


async def test_small_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        require_or_skip("redis-server is not installed")
    cfg = ChaosConfig(jobs=150, workers=2, concurrency=30, kills=1, stops=1, restarts=1, blackout_s=0, timeout_s=240)
    result = await run_chaos(cfg, tmp_path)
    assert {k: v[:5] for k, v in result.violations.items() if v} == {}
    assert result.faults == {"redis_restarts": 1, "worker_kills": 1, "worker_stops": 1}
    assert sum(result.statuses.values()) == cfg.jobs
    assert result.statuses.get("succeeded", 0) >= cfg.jobs * 0.9  # the rest: the planted 400s
    assert set(result.error_kinds) <= {"client_error"}


async def test_small_churn_soak_keeps_every_invariant(tmp_path: Path) -> None:
    """Jobs arrive steadily while a worker is killed, another replaced gracefully (a deploy) and Redis
    is killed and restarted under them: nothing lost, nothing paid for thrown away."""
    if shutil.which("redis-server") is None:
        require_or_skip("redis-server is not installed")
    cfg = ChaosConfig(jobs=120, workers=2, concurrency=30, kills=1, stops=0, drains=1, restarts=1, blackout_s=0,
                      churn_s=12, timeout_s=240)
    result = await run_chaos(cfg, tmp_path)
    assert {k: v[:5] for k, v in result.violations.items() if v} == {}
    assert result.faults == {"redis_restarts": 1, "worker_kills": 1, "worker_drains": 1}
    assert sum(result.statuses.values()) == cfg.jobs
    assert result.statuses.get("succeeded", 0) >= cfg.jobs * 0.9
