"""Enqueue latency through a web app: 1,000 concurrent ``POST /jobs`` to ``examples/web_app.py``.

The app (aiohttp, one ``FlexQueue`` opened in its lifespan) is served in this process on a free port;
a client in the same process sends every request at once over up to 1,000 connections and times each
from send to response, after one warm-up round of the same size (connections open, as on a server
that has been up a while). Reported: p50 / p99 / max latency and requests per second. Both sides share
one event loop and one core (as a small web server would), so the figures are an upper bound of the
queue's share.

    python -m bench.run --only web
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import ClientSession, TCPConnector, web

from bench.common import BenchResult, flush, raise_nofile_limit
from examples.web_app import make_app
from producer.settings import ProducerSettings
from producer.stats import percentile

QUEUE = "bench-web"


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1), as ``flexq stats`` and the other benchmarks report it."""
    return percentile(values, 100 * q) or 0.0


async def _run(redis_url: str, requests: int) -> dict[str, Any]:
    flush(redis_url)
    runner = web.AppRunner(make_app(ProducerSettings(redis_url=redis_url, queue=QUEUE)))  # type: ignore[arg-type]
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    latencies_ms: list[float] = []
    statuses: dict[int, int] = {}
    try:
        async with ClientSession(f"http://{host}:{port}", connector=TCPConnector(limit=requests)) as http:
            async def post(n: int) -> None:
                started = time.perf_counter()
                body = {"model": "gemini-2.5-flash", "prompt": f"Summarise document {n}", "id": f"doc-{n}"}
                async with http.post("/jobs", json=body) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                latencies_ms.append((time.perf_counter() - started) * 1000)

            # a warm-up round (connections opened, scripts loaded), as a server that has run a while has
            await asyncio.gather(*(post(n) for n in range(requests, 2 * requests)))
            latencies_ms.clear()
            statuses.clear()
            started = time.perf_counter()
            await asyncio.gather(*(post(n) for n in range(requests)))
            wall_s = time.perf_counter() - started
    finally:
        await runner.cleanup()
        flush(redis_url)
    return {
        "requests": requests, "created": statuses.get(201, 0), "statuses": {str(k): v for k, v in statuses.items()},
        "latency_ms": {"p50": round(_pct(latencies_ms, 0.5), 1), "p99": round(_pct(latencies_ms, 0.99), 1),
                       "max": round(max(latencies_ms, default=0.0), 1)},
        "requests_per_s": round(requests / wall_s, 1),
    }


def run(redis_url: str, *, smoke: bool = False) -> BenchResult:
    raise_nofile_limit()
    figures = asyncio.run(_run(redis_url, 200 if smoke else 1000))
    ok = figures["created"] == figures["requests"]
    verdict = (f"{'MEASURED' if ok else 'FAILED'}: {figures['requests']} concurrent POST /jobs, latency p50 "
               f"{figures['latency_ms']['p50']:g} ms, p99 {figures['latency_ms']['p99']:g} ms, "
               f"{figures['requests_per_s']:g} requests/s")
    return BenchResult("web", figures, "measured (no target): enqueue latency under 1,000 concurrent requests",
                       None if ok else False, verdict)
