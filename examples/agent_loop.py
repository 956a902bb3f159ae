"""A tool-using agent whose every model turn is a durable flex job.

The loop enqueues a turn, waits for it, runs the function calls the model asked for (here: two
local stand-ins), and continues the thread with their results, until the model answers in text.
Thought signatures and function-call ids travel untouched: the queue sends each earlier turn back
exactly as the API returned it. Run a `flexq worker` on the same Redis, then:

    python examples/agent_loop.py "Should I walk to the museum in Paris this morning?"
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Callable
from typing import Any

from producer.queue import FlexQueue

MODEL = "gemini-3-flash-preview"
CITY = {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}, "required": ["city"]}
TOOLS = [{"function_declarations": [
    {"name": "get_weather", "description": "current weather in a city", "parameters": CITY},
    {"name": "get_time", "description": "local time in a city", "parameters": CITY},
]}]
FUNCTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "get_weather": lambda city: {"city": city, "sky": "clear", "temperature_c": 14},
    "get_time": lambda city: {"city": city, "time": "09:10"},
}
MAX_TURNS = 8


async def run(question: str) -> str:
    run_id = uuid.uuid4().hex[:8]
    async with await FlexQueue.connect() as queue:
        job = await queue.enqueue({"model": MODEL, "prompt": question, "config": {"tools": TOOLS}},
                                  job_id=f"agent-{run_id}-1", deadline_s=3600)
        for turn in range(2, MAX_TURNS + 1):
            record = await queue.wait(job.id, timeout_s=3600)
            if record.result is None:
                raise SystemExit(f"turn {job.id} {record.status}: {record.error}")
            calls = record.result.function_calls
            if not calls:
                return record.result.text or ""
            for call in calls:
                print(f"turn {turn - 1}: the model calls {call.name}({call.args})")
            responses = [{"function_response": {"id": c.id, "name": c.name, "response": FUNCTIONS[c.name](**c.args)}}
                         for c in calls]
            job = await queue.enqueue({"continue_from": job.id, "parts": responses}, job_id=f"agent-{run_id}-{turn}")
    raise SystemExit(f"no final answer after {MAX_TURNS} turns")


if __name__ == "__main__":
    print("answer:", asyncio.run(run(" ".join(sys.argv[1:]) or "Should I walk to the museum in Paris?")))
