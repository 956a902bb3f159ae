"""producer.redact: the built-in redactor (truth tables, false positives included), loading a hook
(``FLEXQ_REDACT``), and redaction at enqueue: what is stored, what the record says, threads, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from producer.errors import ConfigError, InvalidRequestError
from producer.models import JobRecord, JobResult, Usage
from producer.queue import FlexQueue, JobSpec
from producer.redact import (
    BUILTIN,
    SETTING,
    Redactor,
    apply,
    card_prefix_ok,
    is_card,
    load_redactor,
    luhn_ok,
    redact_text,
)
from producer.request import parse_request
from producer.settings import ProducerSettings, env_name, settings_error
from producer.transitions import Change, succeed
from tests.conftest import API_KEY, ROOT, make_settings
from tests.helpers import running_worker, wait_all, worker_env

MODEL = "gemini-2.5-flash"


# -- hooks named by tests as FLEXQ_REDACT=tests.test_redact:NAME ------------------------------------


def hook(text: str) -> str:
    return text.replace("Ada", "[NAME]")


def failing_hook(text: str) -> str:
    raise RuntimeError(f"cannot redact {text!r}")  # the message quotes the text: it must not be shown


def bytes_hook(text: str) -> bytes:
    return text.encode()


def emptying_hook(text: str) -> str:
    return ""


def refusing_hook(text: str) -> str:
    raise InvalidRequestError("prompt: refused by the data policy", field="prompt")


class Hooks:
    @staticmethod
    def nested(text: str) -> str:
        return text.upper()


NOT_CALLABLE = "a string"


# -- the built-in redactor: truth tables ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # e-mail addresses
        pytest.param("Mail ada@example.com.", "Mail [EMAIL].", id="email"),
        pytest.param("john.doe+tag@mail.example.co.uk", "[EMAIL]", id="email-plus-subdomains"),
        pytest.param("<ada_l-99@ex-ample.io>", "<[EMAIL]>", id="email-in-brackets"),
        pytest.param("mailto:ada@example.org?subject=x", "mailto:[EMAIL]?subject=x", id="email-mailto"),
        pytest.param("a@b.com, c@d.fr", "[EMAIL], [EMAIL]", id="two-emails"),
        # payment cards: Luhn-valid, grouped as cards are written
        pytest.param("card 4111 1111 1111 1111 exp 12/25", "card [CARD] exp 12/25", id="visa-spaces"),
        pytest.param("4111-1111-1111-1111", "[CARD]", id="visa-dashes"),
        pytest.param("4111111111111111.", "[CARD].", id="visa-together"),
        pytest.param("5555 5555 5555 4444", "[CARD]", id="mastercard"),
        pytest.param("2223 0031 2200 3222", "[CARD]", id="mastercard-2-series"),
        pytest.param("Amex 3782 822463 10005", "Amex [CARD]", id="amex-4-6-5"),
        pytest.param("3056 930902 5904", "[CARD]", id="diners-4-6-4"),
        pytest.param("6011 1111 1111 1117", "[CARD]", id="discover"),
        pytest.param("4222222222222", "[CARD]", id="visa-13-digits"),
        pytest.param("6759 6498 2643 8453 268", "[CARD]", id="19-digits-4-4-4-4-3"),
        pytest.param("in 2024 4111 1111 1111 1111", "in 2024 [CARD]", id="card-after-a-year"),
        # phones: international
        pytest.param("+44 20 7946 0958", "[PHONE]", id="intl-uk"),
        pytest.param("call +1 (415) 555-2671 now", "call [PHONE] now", id="intl-us-parens"),
        pytest.param("+14155552671.", "[PHONE].", id="intl-together"),
        pytest.param("+33 1 23 45 67 89", "[PHONE]", id="intl-fr"),
        pytest.param("+44 (0)20 7946 0958", "[PHONE]", id="intl-trunk-in-parens"),
        pytest.param("+91 98765 43210", "[PHONE]", id="intl-in"),
        pytest.param("+81-3-1234-5678", "[PHONE]", id="intl-dashes"),
        pytest.param("+44 20 7946 0958 1234 5678", "[PHONE] 1234 5678", id="intl-stops-at-15-digits"),
        # phones: North American
        pytest.param("(415) 555-2671", "[PHONE]", id="nanp-parens"),
        pytest.param("415-555-2671", "[PHONE]", id="nanp-dashes"),
        pytest.param("415.555.2671", "[PHONE]", id="nanp-dots"),
        pytest.param("415 555 2671", "[PHONE]", id="nanp-spaces"),
        pytest.param("1-800-555-0199", "[PHONE]", id="nanp-with-1"),
        # phones: national, trunk 0
        pytest.param("020 7946 0958", "[PHONE]", id="uk-london"),
        pytest.param("07700 900123", "[PHONE]", id="uk-mobile"),
        pytest.param("01 23 45 67 89", "[PHONE]", id="fr-pairs"),
        pytest.param("06.12.34.56.78", "[PHONE]", id="fr-dots"),
        pytest.param("030 12345678", "[PHONE]", id="de-berlin"),
        pytest.param("030/12345678", "[PHONE]", id="de-slash"),
        pytest.param("(020) 7946 0958", "[PHONE]", id="uk-parens"),
        pytest.param("0412 345 678", "[PHONE]", id="au-mobile"),
        pytest.param("020-123 4567", "[PHONE]", id="nl-mixed-separators"),
        # everything at once
        pytest.param(
            "Ada (ada@example.com, +44 20 7946 0958) paid with 4111 1111 1111 1111 on 2024-01-15.",
            "Ada ([EMAIL], [PHONE]) paid with [CARD] on 2024-01-15.", id="all-three",
        ),
    ],
)
def test_redacts(text: str, expected: str) -> None:
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("In 2024 we sold 1,234,567 units for $1,299.99.", id="years-prices"),
        pytest.param("1999-2024, 2024-01-15 10:30:00, 15.01.2024 12:30, 01/02/2024, 01.02.2024 12", id="dates"),
        pytest.param("version 1.2.3, v10.15.7, 10.0.0.1, 192.168.100.200", id="versions-ips"),
        pytest.param("Order #123-456-7890", id="nanp-shape-area-code-1"),
        pytest.param("ISBN 978-3-16-148410-0", id="isbn"),
        pytest.param("SSN-like 123-45-6789 and local 555-2671", id="no-area-code"),
        pytest.param("uuid 123e4567-e89b-12d3-a456-426614174000", id="uuid"),
        pytest.param("+5 points, +15%, +1,000, +2024", id="signed-numbers"),
        pytest.param("Score 3-2, -40.5 C, 0.5 0.25, pi 3.14159265358979", id="scores-decimals"),
        pytest.param("4111 1111 1111 1112", id="card-shape-fails-luhn"),
        pytest.param("1234567812345670", id="luhn-valid-but-no-card-network"),
        pytest.param("0000 0000 0000 0000", id="zeros-pass-luhn-but-no-network"),
        pytest.param("epoch 1700000000000 ms, 1700000000000000000 ns", id="timestamps"),
        pytest.param("12345678901234567890", id="20-digits"),
        pytest.param("2001 2002 2003 2004", id="a-row-of-years"),
        pytest.param("41111111 11111111", id="card-digits-in-odd-groups"),
        pytest.param("id4111111111111111 and 4111111111111111x", id="digits-inside-a-word"),
        pytest.param("0.4111111111111111", id="decimals"),
        pytest.param("call 12 415 555 2671", id="nanp-continuing-a-number"),
        pytest.param("0044 20 7946 0958", id="00-prefix-not-recognised"),
        pytest.param("zip 94103, SW1A 1AA, 75001 Paris", id="postcodes"),
        pytest.param("pkg@1.2.3, user@localhost, @mention, a @ b.com", id="not-emails"),
        pytest.param("Shed twice [[fault:503x2]] [[fault:429x1:retry=2s]]", id="simulator-directives"),
        pytest.param("[EMAIL] [CARD] [PHONE]", id="already-redacted"),
        pytest.param("", id="empty"),
    ],
)
def test_leaves_alone(text: str) -> None:
    assert redact_text(text) == text


@pytest.mark.parametrize(
    "text",
    ["Mail ada@example.com or +44 20 7946 0958; card 4111 1111 1111 1111", "415-555-2671 / 020 7946 0958"],
)
def test_a_second_run_changes_nothing(text: str) -> None:
    once = redact_text(text)
    assert once != text
    assert redact_text(once) == once


@pytest.mark.parametrize(
    ("digits", "ok"),
    [
        ("4111111111111111", True),
        ("4111111111111112", False),
        ("79927398713", True),  # the textbook example
        ("79927398710", False),
        ("0", True),
        ("18", True),
        ("19", False),
        ("", False),
    ],
)
def test_luhn(digits: str, ok: bool) -> None:
    assert luhn_ok(digits) is ok


@pytest.mark.parametrize(
    ("digits", "ok"),
    [
        ("4111", True), ("3782", True), ("5555", True), ("6011", True),
        ("2221", True), ("2720", True), ("2220", False), ("2721", False),
        ("1234", False), ("7000", False), ("8000", False), ("9000", False), ("0000", False),
    ],
)
def test_card_prefix(digits: str, ok: bool) -> None:
    assert card_prefix_ok(digits + "000000000000") is ok


@pytest.mark.parametrize(
    ("groups", "ok"),
    [
        (["4111", "1111", "1111", "1111"], True),
        (["4111111111111111"], True),
        (["3782", "822463", "10005"], True),
        (["4111", "1111", "1111", "1112"], False),  # Luhn
        (["41", "11", "11", "11", "11", "11", "11", "11"], False),  # not a card's grouping
        (["411", "1111", "1111", "11111"], False),
        (["4111", "1111", "1111"], False),  # 12 digits
        (["4111", "1111", "1111", "1111", "1111"], False),  # 20 digits
        ([], False),
    ],
)
def test_is_card(groups: list[str], ok: bool) -> None:
    assert is_card(groups) is ok


# -- loading a redactor ---------------------------------------------------------------------------------


def test_load_redactor() -> None:
    assert load_redactor(None) is None
    assert load_redactor("") is None
    builtin = load_redactor("builtin")
    assert builtin is not None and builtin.name == BUILTIN and builtin("ada@example.com") == "[EMAIL]"
    custom = load_redactor("tests.test_redact:hook")
    assert custom is not None and custom.name == "tests.test_redact:hook" and custom("Ada") == "[NAME]"
    nested = load_redactor("tests.test_redact:Hooks.nested")
    assert nested is not None and nested("ada") == "ADA"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param("tests.no_such_module:hook", "cannot import 'tests.no_such_module' (ModuleNotFoundError: ",
                     id="no-module"),
        pytest.param("tests.test_redact:no_hook", "'tests.test_redact' has no 'no_hook'", id="no-function"),
        pytest.param("tests.test_redact:NOT_CALLABLE", "is a str, not a function", id="not-callable"),
        pytest.param("just-a-name", "is neither 'builtin' nor 'module:function'", id="no-colon"),
    ],
)
def test_a_hook_that_cannot_be_loaded_is_a_one_line_config_error(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_redactor(spec)
    text = str(caught.value)
    assert text.startswith(f"{SETTING}: ") and message in text
    assert "\n" not in text
    assert caught.value.__cause__ is None  # raised `from None`: no chained traceback to print


def test_the_setting_is_flexq_redact(monkeypatch: pytest.MonkeyPatch) -> None:
    assert env_name(ProducerSettings, "redact") == SETTING
    monkeypatch.setenv(SETTING, "tests.test_redact:hook")
    assert ProducerSettings().redact == "tests.test_redact:hook"
    monkeypatch.setenv(SETTING, "builtin")
    assert ProducerSettings().redact == "builtin"
    monkeypatch.setenv(SETTING, "")
    assert ProducerSettings().redact is None
    assert ProducerSettings(redact="  ").redact is None


@pytest.mark.parametrize("value", ["yes", "my module:hook", "tests.test_redact:", ":hook", "a:b:c"])
def test_a_malformed_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(SETTING, value)
    with pytest.raises(ValidationError) as caught:
        ProducerSettings()
    line = settings_error(caught.value, ProducerSettings)
    assert line.startswith(f"bad configuration: {SETTING}: must be unset, 'builtin', or 'module:function'")
    assert value not in line  # the input is never echoed (hide_input_in_errors)


def test_the_cli_prints_one_line_for_a_bad_hook() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXQ_", "REDIS_"))}
    # nothing listens on port 1: the hook is checked before Redis is dialled, or this would say so
    env.update(FLEXQ_REDACT="tests.no_such_module:hook", REDIS_URL="redis://127.0.0.1:1/0")
    done = subprocess.run([sys.executable, "-m", "flexq", "list"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "flexq: FLEXQ_REDACT: cannot import 'tests.no_such_module' (ModuleNotFoundError: No module named "
        "'tests.no_such_module')"
    ]


# -- applying a redactor to a request --------------------------------------------------------------------


def _request(**fields: Any) -> Any:
    return parse_request({"model": MODEL, **fields}, max_bytes=1 << 20)


def test_apply_to_a_prompt_and_a_system_instruction() -> None:
    request = _request(prompt="Mail ada@example.com", system_instruction="You help +44 20 7946 0958.")
    out, redaction = apply(request, Redactor("builtin", redact_text))
    assert (out.prompt, out.system_instruction) == ("Mail [EMAIL]", "You help [PHONE].")
    assert (redaction.by, redaction.changed) == ("builtin", 2)
    assert request.prompt == "Mail ada@example.com"  # the input is left as it was


def test_apply_to_contents_skips_the_model_turns_and_what_is_not_text() -> None:
    call = {"function_call": {"id": "c1", "name": "lookup", "args": {"email": "ada@example.com"}}}
    answer = {"role": "model", "parts": [{"text": "ada@example.com, I remember", "thought_signature": "c2ln"}, call]}
    response = {"function_response": {"id": "c1", "name": "lookup", "response": {"email": "ada@example.com"}}}
    contents = [
        {"role": "user", "parts": [{"text": "I am ada@example.com"},
                                   {"inline_data": {"mime_type": "text/plain", "data": b"ada@example.com"}}]},
        answer,
        {"role": "user", "parts": [response, {"text": "and +1 415-555-2671"}]},
        {"parts": [{"text": "no role: a user turn, 4111 1111 1111 1111"}]},
    ]
    system = {"parts": [{"text": "Never repeat ada@example.com"}]}
    request = _request(contents=contents, system_instruction=system)
    out, redaction = apply(request, Redactor("builtin", redact_text))
    assert out.contents is not None and request.contents is not None
    first, model, third, fourth = out.contents
    assert first["parts"][0] == {"text": "I am [EMAIL]"}
    assert first["parts"][1] == request.contents[0]["parts"][1]  # a blob reference, untouched
    assert model == answer  # the model's turn, signature and call args untouched
    assert third["parts"] == [response, {"text": "and [PHONE]"}]  # the function response is not text
    assert fourth["parts"] == [{"text": "no role: a user turn, [CARD]"}]
    assert out.system_instruction == {"parts": [{"text": "Never repeat [EMAIL]"}]}
    assert redaction.changed == 4
    assert [blob.data for blob in out.pending_blobs] == [b"ada@example.com"]  # still written with the record
    assert request.contents[0]["parts"][0] == {"text": "I am ada@example.com"}  # the input is not mutated


def test_apply_with_nothing_to_redact_returns_the_same_request() -> None:
    request = _request(prompt="Nothing personal here, 2024.")
    out, redaction = apply(request, Redactor("builtin", redact_text))
    assert out is request and redaction.changed == 0


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        pytest.param("failing_hook", ConfigError, "raised RuntimeError; nothing was enqueued", id="raises"),
        pytest.param("bytes_hook", ConfigError, "returned a bytes, not a str", id="not-a-str"),
        pytest.param("emptying_hook", InvalidRequestError, "prompt: is empty after redaction", id="empties"),
        pytest.param("refusing_hook", InvalidRequestError, "prompt: refused by the data policy", id="refuses"),
    ],
)
def test_a_failing_hook(name: str, error: type[Exception], message: str) -> None:
    redactor = load_redactor(f"tests.test_redact:{name}")
    assert redactor is not None
    with pytest.raises(error) as caught:
        apply(_request(prompt="secret ada@example.com"), redactor)
    assert message in str(caught.value)
    assert "ada@example.com" not in str(caught.value)


# -- at enqueue ------------------------------------------------------------------------------------------


async def _queue(fake_redis: Redis, **overrides: Any) -> FlexQueue:
    return await FlexQueue.connect(make_settings(**overrides), redis=fake_redis)


async def test_the_stored_record_is_redacted(fake_redis: Redis) -> None:
    queue = await _queue(fake_redis, redact="builtin")
    done = await queue.enqueue({"model": MODEL, "prompt": "Reply to ada@example.com"}, job_id="r1")
    raw = await fake_redis.get(queue.store.keys.record("r1"))
    assert b"ada@example.com" not in raw
    stored = JobRecord.from_json(raw)
    assert stored.request is not None and stored.request.prompt == "Reply to [EMAIL]"
    assert stored.redaction is not None and stored.redaction.model_dump() == {"by": "builtin", "changed": 1}
    assert done.record == stored


async def test_without_the_setting_nothing_is_redacted(fake_queue: FlexQueue) -> None:
    done = await fake_queue.enqueue({"model": MODEL, "prompt": "Reply to ada@example.com"}, job_id="r0")
    stored = await fake_queue.get(done.id)
    assert stored.request is not None and stored.request.prompt == "Reply to ada@example.com"
    assert stored.redaction is None


async def test_an_id_enqueued_again_returns_the_redacted_job(fake_redis: Redis) -> None:
    queue = await _queue(fake_redis, redact="builtin")
    first = await queue.enqueue({"model": MODEL, "prompt": "ada@example.com"}, job_id="same")
    again = await queue.enqueue({"model": MODEL, "prompt": "ada@example.com"}, job_id="same")
    assert (first.created, again.created) == (True, False)
    assert again.record.request is not None and again.record.request.prompt == "[EMAIL]"
    assert again.record.redaction is not None and again.record.redaction.by == "builtin"


async def test_a_hook_named_in_the_setting(fake_redis: Redis) -> None:
    queue = await _queue(fake_redis, redact="tests.test_redact:hook")
    [done] = await queue.enqueue_many([JobSpec({"model": MODEL, "prompt": "Ada asks"}, job_id="h1")])
    stored = await queue.get(done.id)
    assert stored.request is not None and stored.request.prompt == "[NAME] asks"
    assert stored.redaction is not None and stored.redaction.model_dump() == {
        "by": "tests.test_redact:hook", "changed": 1,
    }


async def test_a_callable_passed_to_connect_wins_over_the_setting(fake_redis: Redis) -> None:
    queue = await FlexQueue.connect(make_settings(redact="builtin"), redis=fake_redis, redactor=Hooks.nested)
    done = await queue.enqueue({"model": MODEL, "prompt": "ada@example.com"}, job_id="c1")
    assert done.record.request is not None and done.record.request.prompt == "ADA@EXAMPLE.COM"
    assert done.record.redaction is not None and done.record.redaction.by == "tests.test_redact:Hooks.nested"


async def test_a_bad_hook_fails_connect_with_one_line(fake_redis: Redis) -> None:
    with pytest.raises(ConfigError, match=r"^FLEXQ_REDACT: .*'tests.test_redact' has no 'nope'$"):
        await _queue(fake_redis, redact="tests.test_redact:nope")


async def test_a_failing_hook_enqueues_nothing(fake_redis: Redis) -> None:
    queue = await _queue(fake_redis, redact="tests.test_redact:failing_hook")
    with pytest.raises(ConfigError, match="raised RuntimeError"):
        await queue.enqueue({"model": MODEL, "prompt": "hi"}, job_id="f1")
    assert await fake_redis.keys("*") == []


async def test_a_continuation_redacts_its_new_turn_and_keeps_the_answer(fake_redis: Redis) -> None:
    queue = await _queue(fake_redis, redact="builtin")
    await queue.enqueue({"model": MODEL, "prompt": "Hi, I am ada@example.com"}, job_id="t1")
    answer = {"role": "model", "parts": [{"text": "Hello, write to help@example.com", "thought_signature": "c2ln"}]}
    result = JobResult(text="Hello", finish_reason="STOP", usage=Usage(), model_version=MODEL, tier="flex",
                       content=answer)
    await queue.store.update("t1", lambda r: Change(succeed(r, result=result, now=r.updated_at, cost_usd=None,
                                                            standard_cost_usd=None)))
    child = await queue.enqueue({"continue_from": "t1", "prompt": "Call me on 020 7946 0958"}, job_id="t2")
    request = child.record.request
    assert request is not None
    assert request.contents == [
        {"role": "user", "parts": [{"text": "Hi, I am [EMAIL]"}]},
        answer,  # the model's answer goes back exactly as returned
        {"role": "user", "parts": [{"text": "Call me on [PHONE]"}]},
    ]
    assert child.record.redaction is not None and child.record.redaction.changed == 1


@pytest.mark.e2e
@pytest.mark.redis
async def test_the_worker_sends_the_redacted_prompt(redis_url: str, sim_url: str, tmp_path: Path) -> None:
    queue = await FlexQueue.connect(make_settings(redis_url=redis_url, redact="builtin"))
    try:
        await queue.enqueue({"model": MODEL, "prompt": "Write to ada@example.com"}, job_id="sent-1")
        with running_worker(worker_env(redis_url, sim_url, API_KEY), tmp_path / "w.log"):
            record = (await wait_all(queue, ["sent-1"], timeout_s=60))["sent-1"]
    finally:
        await queue.close()
    assert record.result is not None and record.result.text is not None
    assert "Write to [EMAIL]" in record.result.text  # the simulator echoes the prompt it was sent
    assert "ada@example.com" not in record.result.text
