"""flexq.jsonl: request files, one JSON object per line; bad lines reported by number."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flexq.jsonl import LINE_FIELDS, LineError, parse_jsonl, stable_line_id
from producer.queue import JobSpec

BIG = 1_000_000
GOOD = '{"model": "gemini-2.5-flash", "prompt": "Hi"}'


@pytest.mark.parametrize(
    ("text", "job_id", "tags", "prompt"),
    [
        pytest.param(GOOD, None, {}, "Hi", id="minimal"),
        pytest.param('{"id": "a-1", "model": "gemini-2.5-flash", "prompt": "Hi"}', "a-1", {}, "Hi", id="with-id"),
        pytest.param('{"id": 7, "model": "gemini-2.5-flash", "prompt": "Hi"}', "7", {}, "Hi", id="numeric-id"),
        pytest.param('{"id": null, "model": "gemini-2.5-flash", "prompt": "Hi"}', None, {}, "Hi", id="null-id"),
        pytest.param('{"model": "gemini-2.5-flash", "prompt": "Hi", "tags": {"k": "v"}}', None, {"k": "v"}, "Hi",
                     id="tags"),
        pytest.param('{"model": "gemini-2.5-flash", "prompt": "Hi", "tags": null}', None, {}, "Hi", id="null-tags"),
        pytest.param('{"model": "gemini-2.5-flash", "contents": [{"role": "user", "parts": [{"text": "Yo"}]}]}',
                     None, {}, None, id="contents"),
        pytest.param('  {"model": "gemini-2.5-flash", "prompt": "Hi"}  \r\n', None, {}, "Hi", id="surrounding-space"),
        pytest.param('{"model": "gemini-2.5-flash", "prompt": "Hi", "config": {"temperature": 0}}', None, {}, "Hi",
                     id="config"),
    ],
)
def test_good_line(text: str, job_id: str | None, tags: dict[str, str], prompt: str | None) -> None:
    good, bad = parse_jsonl([text], max_bytes=BIG)
    assert bad == []
    assert len(good) == 1
    line = good[0]
    assert line.line == 1
    assert isinstance(line.spec, JobSpec)
    assert line.spec.job_id == job_id
    assert dict(line.spec.tags) == tags
    assert line.spec.request.prompt == prompt  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("{not json", "not valid JSON (Expecting property name enclosed in double quotes at column 2)",
                     id="malformed"),
        pytest.param('{"model": "gemini-2.5-flash", "prompt": "Hi"', "not valid JSON", id="truncated"),
        pytest.param(GOOD + GOOD, "not valid JSON (Extra data at column", id="two-objects"),
        pytest.param("[1, 2]", "not a JSON object", id="array"),
        pytest.param('"Hi"', "not a JSON object", id="string"),
        pytest.param("42", "not a JSON object", id="number"),
        pytest.param("null", "not a JSON object", id="null"),
        pytest.param('{"model": "gemini-2.5-flash", "prompt": "Hi", "priority": 1}', "unknown field 'priority'",
                     id="unknown-field"),
        pytest.param('{"model": "gemini-2.5-flash", "prompt": "Hi", "b": 1, "a": 2}', "unknown field 'a'",
                     id="first-unknown-field-sorted"),
        pytest.param('{"model": "gemini-2.5-flash", "prompt": ""}', "prompt: must not be empty", id="empty-prompt"),
        pytest.param('{"prompt": "Hi"}', "model: is required", id="no-model"),
        pytest.param('{"model": "gemini-2.5-flash"}', "exactly one of 'prompt'", id="no-prompt"),
        pytest.param('{"model": "gemini-2.5-flash", "prompt": "Hi", "config": {"service_tier": "flex"}}',
                     "config: 'service_tier' may not be set", id="service-tier"),
        pytest.param('{"model": "gemini-2.5-flash", "prompt": "Hi", "config": {"temperature": "hot"}}',
                     "config: is not a GenerateContentConfig", id="bad-config"),
        pytest.param('{"id": "a b", "model": "gemini-2.5-flash", "prompt": "Hi"}', "job_id:", id="bad-id"),
        pytest.param('{"id": "", "model": "gemini-2.5-flash", "prompt": "Hi"}', "job_id:", id="empty-id"),
        pytest.param('{"model": "gemini-2.5-flash", "prompt": "Hi", "tags": ["a"]}', "tags: must be an object",
                     id="tags-list"),
        pytest.param('{"model": "gemini-2.5-flash", "prompt": "' + "x" * 200 + '"}', "byte limit", id="too-big"),
    ],
)
def test_bad_line(text: str, message: str) -> None:
    good, bad = parse_jsonl([GOOD, text, GOOD], max_bytes=150)
    assert [g.line for g in good] == [1, 3]
    assert len(bad) == 1
    assert bad[0].line == 2
    assert message in bad[0].message, bad[0].message
    assert str(bad[0]).startswith("line 2: ")


def test_unknown_field_message_lists_the_allowed_ones() -> None:
    _, bad = parse_jsonl(['{"model": "m", "prompt": "Hi", "x": 1}'], max_bytes=BIG)
    for name in LINE_FIELDS:
        assert name in bad[0].message


def test_blank_lines_are_skipped_but_counted() -> None:
    lines = ["", GOOD, "   ", "\n", "\t\r\n", "{bad", GOOD]
    good, bad = parse_jsonl(lines, max_bytes=BIG)
    assert [g.line for g in good] == [2, 7]
    assert bad == [LineError(6, bad[0].message)]


def test_empty_file() -> None:
    assert parse_jsonl([], max_bytes=BIG) == ([], [])


def test_duplicate_ids() -> None:
    line = '{"id": "dup", "model": "gemini-2.5-flash", "prompt": "Hi"}'
    other = '{"id": "other", "model": "gemini-2.5-flash", "prompt": "Hi"}'
    good, bad = parse_jsonl([line, other, line, "", line], max_bytes=BIG)
    assert [g.line for g in good] == [1, 2]
    assert [(b.line, b.message) for b in bad] == [(3, "id 'dup' repeats line 1"), (5, "id 'dup' repeats line 1")]


def test_lines_without_id_are_never_duplicates_without_default_id() -> None:
    good, bad = parse_jsonl([GOOD, GOOD, GOOD], max_bytes=BIG)
    assert [g.spec.job_id for g in good] == [None, None, None]
    assert bad == []


def test_spec_defaults_are_forwarded() -> None:
    good, _ = parse_jsonl([GOOD], max_bytes=BIG, deadline_s=600.0, fallback="standard")
    assert (good[0].spec.deadline_s, good[0].spec.fallback) == (600.0, "standard")


def test_parses_a_file_object(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_text(f"{GOOD}\n\n{{oops\n{GOOD}\n", encoding="utf-8")
    with path.open(encoding="utf-8") as handle:
        good, bad = parse_jsonl(handle, max_bytes=BIG)
    assert [g.line for g in good] == [1, 4]
    assert [b.line for b in bad] == [3]


# -- stable ids ----------------------------------------------------------------------------------


def test_stable_line_id_is_deterministic() -> None:
    a = stable_line_id("requests.jsonl")
    b = stable_line_id("requests.jsonl")
    assert a(1, GOOD) == b(1, GOOD)
    assert a(1, GOOD) == a(1, f"  {GOOD}\n")  # surrounding whitespace does not change the id
    assert re.fullmatch(r"b-[0-9a-f]{10}-1-[0-9a-f]{12}", a(1, GOOD))


@pytest.mark.parametrize(
    ("left", "right"),
    [
        pytest.param(("f.jsonl", 1, GOOD), ("f.jsonl", 2, GOOD), id="same-text-other-line"),
        pytest.param(("f.jsonl", 1, GOOD), ("f.jsonl", 1, GOOD.replace("Hi", "Ho")), id="other-text"),
        pytest.param(("f.jsonl", 1, GOOD), ("g.jsonl", 1, GOOD), id="other-file"),
    ],
)
def test_stable_line_id_distinct(left: tuple[str, int, str], right: tuple[str, int, str]) -> None:
    assert stable_line_id(left[0])(left[1], left[2]) != stable_line_id(right[0])(right[1], right[2])


def test_stable_ids_name_id_less_lines_and_pass_check_job_id() -> None:
    lines = [GOOD, GOOD, '{"id": "given", "model": "gemini-2.5-flash", "prompt": "Hi"}', GOOD.replace("Hi", "Yo")]
    make = stable_line_id("batch.jsonl")
    good, bad = parse_jsonl(lines, max_bytes=BIG, default_id=make)
    assert bad == []
    ids = [g.spec.job_id for g in good]
    assert ids == [make(1, GOOD), make(2, GOOD), "given", make(4, lines[3])]
    assert len(set(ids)) == 4
    again, _ = parse_jsonl(lines, max_bytes=BIG, default_id=stable_line_id("batch.jsonl"))
    assert [g.spec.job_id for g in again] == ids
    assert all(i is not None and len(i) <= 128 for i in ids)
