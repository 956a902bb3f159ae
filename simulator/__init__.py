"""A Gemini-compatible HTTP simulator (aiohttp.web) with flex capacity, rate limits and fault directives."""

from simulator.app import Simulator
from simulator.config import SimConfig, SimStats
from simulator.faults import directive_key
from simulator.server import RunningSimulator, start_simulator

__all__ = ["RunningSimulator", "SimConfig", "SimStats", "Simulator", "directive_key", "start_simulator"]
