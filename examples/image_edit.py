"""Generate an image, then edit it twice, the second time with a reference image.

Each edit continues the thread: the queue sends the earlier turns back with the image part's
thought signature untouched, and keeps the images' bytes in the blob store, not in the records.
Run a `flexq worker` on the same Redis, then:

    python examples/image_edit.py OUT_DIR [REFERENCE.png]
"""

from __future__ import annotations

import asyncio
import base64
import sys
import uuid
from pathlib import Path

from producer.queue import FlexQueue

MODEL = "gemini-3-pro-image-preview"


async def run(out_dir: Path, reference: bytes | None) -> list[Path]:
    run_id = uuid.uuid4().hex[:8]
    config = {"image_config": {"image_size": "2K", "aspect_ratio": "4:3"}}
    turns: list[dict[str, object]] = [
        {"model": MODEL, "prompt": "A lighthouse on a cliff at dawn, watercolor", "config": config},
        {"prompt": "Make the sky stormy"},
    ]
    last_turn: dict[str, object] = {"prompt": "Add a sailing boat like this one"}
    if reference is not None:
        last_turn = {"parts": [{"text": "Add a sailing boat like this one"},
                               {"inline_data": {"mime_type": "image/png",
                                                "data": base64.b64encode(reference).decode()}}]}
    turns.append(last_turn)
    saved: list[Path] = []
    parent: str | None = None
    async with await FlexQueue.connect() as queue:
        for number, turn in enumerate(turns, start=1):
            request = dict(turn) if parent is None else {"continue_from": parent, **turn}
            job = await queue.enqueue(request, job_id=f"edit-{run_id}-{number}", deadline_s=3600)
            record = await queue.wait(job.id, timeout_s=3600)
            if record.result is None:
                raise SystemExit(f"turn {job.id} {record.status}: {record.error}")
            for image, data in await queue.images(job.id):
                path = out_dir / f"turn-{number}-{image.index}.png"
                path.write_bytes(data)
                saved.append(path)
                print(f"turn {number}: {image.width}x{image.height} -> {path}")
            parent = job.id
    return saved


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    ref = Path(sys.argv[2]).read_bytes() if len(sys.argv) > 2 else None
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    asyncio.run(run(Path(sys.argv[1]), ref))
