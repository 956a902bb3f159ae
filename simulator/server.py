"""Running the simulator on a TCP port inside the current event loop."""

from __future__ import annotations

from types import TracebackType

from aiohttp import web

from simulator.app import Simulator
from simulator.config import SimConfig

SHUTDOWN_TIMEOUT_S = 2.0


class RunningSimulator:
    """A simulator bound to a port; close it with `await close()` or use it as `async with`."""

    def __init__(self, sim: Simulator, runner: web.AppRunner, host: str, port: int) -> None:
        self.sim = sim
        self.host = host
        self.port = port
        self._runner = runner
        self._closed = False

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        """Drop hanging and in-service requests, then stop listening. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.sim.begin_shutdown()
        await self._runner.cleanup()

    async def __aenter__(self) -> RunningSimulator:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def start_simulator(config: SimConfig, host: str = "127.0.0.1", port: int = 0) -> RunningSimulator:
    """Serve a new Simulator on host:port (port 0: any free port, see `.port`)."""
    sim = Simulator(config)
    # access_log=None: the request line may carry ?key=..., which must never be logged
    runner = web.AppRunner(sim.app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = port
    for address in runner.addresses:
        bound_port = int(address[1])
        break
    return RunningSimulator(sim, runner, host, bound_port)
