"""`python -m simulator`: serve the Gemini simulator until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from dataclasses import fields

from simulator.config import BATCH_OUTCOMES, LATENCY_DISTS, PROFILES, SERVED_FLEX_TIERS, SimConfig
from simulator.server import start_simulator

USAGE_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    defaults = SimConfig()
    p = argparse.ArgumentParser(prog="simulator", description="Gemini-compatible HTTP simulator (flex tier).")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument("--port", type=int, default=8089, help="port to bind, 0 for any (default %(default)s)")
    p.add_argument("--latency-s", type=float, default=defaults.latency_s, help="mean service time")
    p.add_argument("--latency-dist", choices=LATENCY_DISTS, default=defaults.latency_dist)
    p.add_argument("--rate-503", type=float, default=defaults.rate_503, help="flex shed probability")
    p.add_argument("--rate-429", type=float, default=defaults.rate_429, help="random 429 probability")
    p.add_argument("--retry-delay-s", type=float, default=defaults.retry_delay_s, help="RetryInfo delay")
    p.add_argument("--rate-500", type=float, default=defaults.rate_500, help="random 500 probability")
    p.add_argument("--capacity", type=int, default=defaults.capacity, help="flex requests in service at once")
    p.add_argument("--rpm", type=int, default=defaults.rpm, help="requests per minute per model")
    p.add_argument("--profile", choices=PROFILES, default=defaults.profile)
    p.add_argument("--profile-period-s", type=float, default=defaults.profile_period_s)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--shed-latency-s", type=float, default=defaults.shed_latency_s, help="time a 503 takes")
    p.add_argument("--capacity-schedule", default=defaults.capacity_schedule,
                   help="capacity over time, SECONDS:CAPACITY,... e.g. 0:20,20:8,40:30 (overrides --capacity)")
    p.add_argument("--serve-flex-as", choices=SERVED_FLEX_TIERS, default=defaults.serve_flex_as,
                   help="the tier a flex call that is not shed is served and billed at (default %(default)s)")
    p.add_argument("--priority-capacity", type=int, default=defaults.priority_capacity,
                   help="priority calls in service at once; one more is served at standard (default unlimited)")
    p.add_argument("--batch-turnaround-s", type=float, default=defaults.batch_turnaround_s,
                   help="seconds from batches.create until a batch ends (default %(default)s)")
    p.add_argument("--batch-outcome", choices=BATCH_OUTCOMES, default=defaults.batch_outcome,
                   help="how a batch ends (default %(default)s)")
    p.add_argument("--batch-inline-limit-bytes", type=int, default=defaults.batch_inline_limit_bytes,
                   help="largest inline batch request body (default %(default)s)")
    p.add_argument("--batch-shuffle", action="store_true", default=defaults.batch_shuffle,
                   help="answer inline batch requests in a shuffled order")
    return p


def _config_from(args: argparse.Namespace) -> SimConfig:
    return SimConfig(**{f.name: getattr(args, f.name) for f in fields(SimConfig)})


async def _serve(config: SimConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with await start_simulator(config, host, port) as running:
            print(f"simulator listening on http://{host}:{running.port}", flush=True)
            await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, validate them (one-line error, exit 2) and serve until a signal; exit 0."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its message (or --help)
        return exc.code if isinstance(exc.code, int) else USAGE_ERROR
    if not 0 <= args.port <= 65535:
        print(f"simulator: error: --port must be in [0, 65535], got {args.port}", file=sys.stderr)
        return USAGE_ERROR
    try:
        config = _config_from(args)
    except ValueError as exc:
        flag = "--" + str(exc).split(" ", 1)[0].replace("_", "-")
        print(f"simulator: error: {flag}: {exc}", file=sys.stderr)
        return USAGE_ERROR
    with contextlib.suppress(KeyboardInterrupt):
        try:
            asyncio.run(_serve(config, args.host, args.port))
        except OSError as exc:
            print(f"simulator: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 1
    return 0
