"""Worker logging: one line per attempt at INFO (arq's routine per-run lines only at DEBUG), secrets redacted."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from worker import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(
    ("level", "shown"),
    [pytest.param(logging.INFO, False, id="info-hides-arq-run-lines"),
     pytest.param(logging.DEBUG, True, id="debug-shows-them")],
)
def test_arqs_routine_run_lines_show_only_at_debug(restore_logging: None, level: int, shown: bool) -> None:
    out = io.StringIO()
    logs.configure("json", level=level, stream=out)
    arq = logging.getLogger("arq.worker")
    arq.info("%6.2fs → %s(%s)%s", 0.01, "job:1", "'j1'", "")
    arq.info("%6.2fs ← %s ● %s", 0.01, "job:1", "None")
    arq.info("Starting worker for %d functions: %s", 1, "run_generation")  # not a per-run line: kept
    arq.warning("job %s expired", "j2")
    text = out.getvalue()
    assert ("job:1" in text) == shown
    assert "Starting worker" in text and "j2 expired" in text


def test_a_secret_never_reaches_a_line(restore_logging: None) -> None:
    out = io.StringIO()
    logs.configure("json", stream=out)
    logs.register_secret("sk-secret-value-1234")
    logging.getLogger("arq.worker").warning("failed with key %s", "sk-secret-value-1234")
    logs.get_logger("flexq.worker").info("attempt", error="bad key sk-secret-value-1234")
    assert "sk-secret-value-1234" not in out.getvalue() and out.getvalue().count("***") == 2


@pytest.mark.parametrize(
    ("name", "level"), [("debug", logging.DEBUG), ("info", logging.INFO), ("error", logging.ERROR)]
)
def test_log_level_setting(name: str, level: int) -> None:
    assert logs.level_of(name) == level


def test_flexq_lines_follow_each_configure_and_its_level(restore_logging: None) -> None:
    """Loggers made before a configure (module-level ones) write to its stream at its level."""
    log = logs.get_logger("flexq.worker")
    first, second = io.StringIO(), io.StringIO()
    logs.configure("json", level=logging.INFO, stream=first)
    log.info("attempt", job_id="a")
    log.debug("hidden", job_id="b")
    logs.configure("json", level=logging.WARNING, stream=second)
    log.info("attempt", job_id="c")
    log.warning("lease_lost", job_id="d")
    assert '"job_id": "a"' in first.getvalue() and "hidden" not in first.getvalue()
    assert '"job_id": "c"' not in second.getvalue() and '"job_id": "d"' in second.getvalue()
    assert first.getvalue().count("\n") == 1 and second.getvalue().count("\n") == 1


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_an_exception_line_carries_its_traceback_redacted(restore_logging: None, fmt: str) -> None:
    out = io.StringIO()
    logs.configure(fmt, stream=out)
    logs.register_secret(f"sk-traceback-secret-{fmt}")
    try:
        raise RuntimeError(f"call failed with sk-traceback-secret-{fmt}")
    except RuntimeError:
        logs.get_logger("flexq.worker").exception("unexpected", job_id="j1")
    assert "RuntimeError: call failed with ***" in out.getvalue()
    assert f"sk-traceback-secret-{fmt}" not in out.getvalue()
    if fmt == "json":
        line = json.loads(out.getvalue())
        assert line["level"] == "error" and "RuntimeError: call failed with ***" in line["exception"]
