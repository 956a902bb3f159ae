"""worker.gemini: the SDK response reduced to an ``Answer``, the call built from a request, and what the
SDK raises mapped to the policy's outcomes.

Responses are SDK models parsed from wire JSON (camelCase, as the API sends them). The call is checked
with the SDK's ``generate_content`` replaced by a recorder; a few round trips go through the real SDK
to the in-process simulator, so that errors are the SDK's own.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import replace
from typing import Any

import pytest
from google.genai import errors as genai_errors
from google.genai import types
from pydantic import SecretStr

from producer.blobs import fill_with
from producer.errors import ConfigError
from producer.models import Usage
from producer.request import GenerateRequest
from producer.status import Outcome, Tier
from simulator import RunningSimulator
from tests.conftest import API_KEY, make_settings
from tests.fakes import overloaded
from worker import classify
from worker.gemini import NO_RETRIES, SERVED_TIER_HEADER, Answer, GeminiClient, require_api_key, served_tier, to_answer

MODEL = "gemini-2.5-flash"
USAGE_WIRE = {"promptTokenCount": 12, "candidatesTokenCount": 5, "thoughtsTokenCount": 40, "totalTokenCount": 57}


def response(body: dict[str, Any], headers: dict[str, str] | None = None) -> types.GenerateContentResponse:
    parsed = types.GenerateContentResponse.model_validate(body)
    if headers is not None:
        parsed.sdk_http_response = types.HttpResponse(headers=headers)
    return parsed


def with_parts(*parts: dict[str, Any], finish: str = "STOP", **extra: Any) -> dict[str, Any]:
    return {
        "candidates": [{"content": {"role": "model", "parts": list(parts)}, "finishReason": finish, "index": 0}],
        "usageMetadata": USAGE_WIRE,
        "modelVersion": "gemini-2.5-flash-001",
        **extra,
    }


def outcome(answer: Answer) -> Outcome:
    classified = classify.classify_response(
        has_candidates=answer.has_candidates, finish_reason=answer.finish_reason, block_reason=answer.block_reason
    )
    return classified.outcome


# -- to_answer -------------------------------------------------------------------------------------

PNG_2x3 = (b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
           + b"\x08\x02\x00\x00\x00" + b"rest-of-the-image")


def test_full_content_is_kept_with_signatures_and_blobs_apart() -> None:
    signature = base64.b64encode(b"opaque-signature-bytes").decode()
    png = base64.b64encode(PNG_2x3).decode()
    body = with_parts(
        {"text": "plan", "thought": True},
        {"functionCall": {"id": "call-1", "name": "lookup", "args": {"q": "x"}}, "thoughtSignature": signature},
        {"inlineData": {"mimeType": "image/png", "data": png}, "thoughtSignature": signature},
        {"executableCode": {"language": "PYTHON", "code": "print(1)"}},
        {"codeExecutionResult": {"outcome": "OUTCOME_OK", "output": "1"}},
    )
    body["candidates"][0]["finishMessage"] = "done"
    got = to_answer(response(body))
    sha = hashlib.sha256(PNG_2x3).hexdigest()
    assert got.content is not None
    image_part = got.content["parts"][2]["inline_data"]
    assert image_part == {"mime_type": "image/png", "blob_sha256": sha}  # no bytes in the record
    assert [b.sha256 for b in got.blobs] == [sha] and got.blobs[0].data == PNG_2x3
    assert [(i.index, i.part_index, i.width, i.height, i.bytes) for i in got.images] == [(0, 2, 2, 3, len(PNG_2x3))]
    assert [(c.id, c.name, c.args) for c in got.function_calls] == [("call-1", "lookup", {"q": "x"})]
    assert got.finish_message == "done"
    filled = fill_with(got.content, {sha: PNG_2x3})
    sdk = types.Content.model_validate(filled)  # the SDK's own Content, signatures byte-exact
    assert sdk.parts is not None
    assert sdk.parts[1].thought_signature == b"opaque-signature-bytes"
    assert sdk.parts[2].inline_data is not None and sdk.parts[2].inline_data.data == PNG_2x3
    assert sdk.parts[3].executable_code is not None and sdk.parts[4].code_execution_result is not None


def test_usage_details_other_candidates_and_metadata_are_kept() -> None:
    body = with_parts({"text": "first"}, responseId="resp-1", promptFeedback={"safetyRatings": []})
    body["usageMetadata"] = {
        **USAGE_WIRE, "cachedContentTokenCount": 3, "toolUsePromptTokenCount": 2, "trafficType": "ON_DEMAND_FLEX",
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 4}, {"modality": "IMAGE", "tokenCount": 258}],
        "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1120}],
    }
    body["candidates"][0]["safetyRatings"] = [{"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"}]
    body["candidates"][0]["groundingMetadata"] = {"webSearchQueries": ["flex tier"]}
    body["candidates"].append({"content": {"role": "model", "parts": [{"text": "second"}]}, "finishReason": "STOP",
                               "index": 1})
    got = to_answer(response(body))
    usage = got.usage
    assert (usage.cached_tokens, usage.tool_use_prompt_tokens, usage.traffic_type) == (3, 2, "ON_DEMAND_FLEX")
    assert usage.prompt_details == {"TEXT": 4, "IMAGE": 258} and usage.output_details == {"IMAGE": 1120}
    result = got.result("flex")
    assert result.response_id == "resp-1"
    assert result.safety_ratings == [{"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"}]
    assert result.grounding_metadata == {"web_search_queries": ["flex tier"]}
    assert [c["text"] for c in result.candidates] == ["second"]
    assert result.text == "first"



def test_text_answer() -> None:
    got = to_answer(response(with_parts({"text": "Hel"}, {"text": "lo"}), {"X-Gemini-Service-Tier": "FLEX"}))
    plain = Answer(
        has_candidates=True, finish_reason="STOP", block_reason=None, text="Hello",
        usage=Usage(prompt_tokens=12, output_tokens=5, thoughts_tokens=40, total_tokens=57),
        model_version="gemini-2.5-flash-001", served_tier="flex",
    )
    assert replace(got, content=None, extras={}) == plain
    assert got.content == {"role": "model", "parts": [{"text": "Hel"}, {"text": "lo"}]}
    assert outcome(got) == Outcome.OK


def test_thought_parts_are_not_the_answer_but_their_tokens_count() -> None:
    got = to_answer(response(with_parts(
        {"text": "Let me think about the user's question...", "thought": True},
        {"text": "42", "thoughtSignature": "c2lnbmF0dXJlLWJ5dGVz"},
    )))
    assert got.text == "42"
    assert got.usage.thoughts_tokens == 40


def test_only_thoughts_is_an_answer_without_text() -> None:
    got = to_answer(response(with_parts({"text": "thinking used the budget", "thought": True}, finish="MAX_TOKENS")))
    assert got.text is None and got.finish_reason == "MAX_TOKENS" and got.has_candidates
    assert outcome(got) == Outcome.OK


def test_function_call_answer_has_no_text() -> None:
    got = to_answer(response(with_parts(
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2ln"},
    )))
    assert got.has_candidates and got.finish_reason == "STOP"
    assert got.text is None  # only text parts become result.text (README: result.text may be null)
    assert outcome(got) == Outcome.OK


def test_mixed_parts_keep_only_the_text() -> None:
    got = to_answer(response(with_parts(
        {"text": "plan", "thought": True},
        {"functionCall": {"name": "lookup", "args": {}}},
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
        {"text": "Here is "},
        {"executableCode": {"language": "PYTHON", "code": "print(1)"}},
        {"text": "the picture."},
    )))
    assert got.text == "Here is the picture."


def test_image_only_answer() -> None:
    got = to_answer(response(with_parts({"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}})))
    assert got.text is None and got.has_candidates and outcome(got) == Outcome.OK


def test_first_candidate_is_the_answer() -> None:
    body = with_parts({"text": "first"})
    body["candidates"].append({"content": {"parts": [{"text": "second"}]}, "finishReason": "SAFETY", "index": 1})
    got = to_answer(response(body))
    assert got.text == "first" and got.finish_reason == "STOP"


@pytest.mark.parametrize(
    "content", [pytest.param({}, id="no-parts"), pytest.param({"parts": []}, id="empty-parts"), None]
)
def test_candidate_without_parts_has_no_text(content: dict[str, Any] | None) -> None:
    candidate: dict[str, Any] = {"finishReason": "STOP", "index": 0}
    if content is not None:
        candidate["content"] = content
    got = to_answer(response({"candidates": [candidate]}))
    assert got.has_candidates and got.text is None


def test_prompt_block_has_no_candidates_and_a_reason() -> None:
    got = to_answer(response({
        "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
        "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
        "modelVersion": MODEL,
    }))
    assert not got.has_candidates and got.block_reason == "PROHIBITED_CONTENT"
    assert got.finish_reason is None and got.text is None
    assert got.usage == Usage(prompt_tokens=9, total_tokens=9)  # missing counts are 0, not None
    assert outcome(got) == Outcome.BLOCKED


@pytest.mark.parametrize(
    ("finish", "expected"),
    [
        ("STOP", Outcome.OK),
        ("MAX_TOKENS", Outcome.OK),
        ("SAFETY", Outcome.BLOCKED),
        ("RECITATION", Outcome.BLOCKED),
        ("PROHIBITED_CONTENT", Outcome.BLOCKED),
        ("SPII", Outcome.BLOCKED),
        ("BLOCKLIST", Outcome.BLOCKED),
        ("IMAGE_SAFETY", Outcome.BLOCKED),
        ("IMAGE_PROHIBITED_CONTENT", Outcome.BLOCKED),
        ("IMAGE_RECITATION", Outcome.BLOCKED),
        ("NO_IMAGE", Outcome.NO_IMAGE),
    ],
)
def test_finish_reason_names_reach_the_policy(finish: str, expected: Outcome) -> None:
    body: dict[str, Any] = {"candidates": [{"finishReason": finish, "index": 0}], "usageMetadata": USAGE_WIRE}
    if finish == "SAFETY":
        body["candidates"][0]["safetyRatings"] = [
            {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}
        ]
    got = to_answer(response(body))
    assert got.finish_reason == finish
    assert outcome(got) == expected


def test_unknown_finish_reason_keeps_its_name() -> None:
    with pytest.warns(UserWarning, match="BRAND_NEW_REASON"):  # the SDK warns about enum values it lacks
        parsed = response({
            "candidates": [{"content": {"parts": [{"text": "ok"}]}, "finishReason": "BRAND_NEW_REASON"}]
        })
    got = to_answer(parsed)
    assert got.finish_reason == "BRAND_NEW_REASON" and got.text == "ok"
    assert outcome(got) == Outcome.OK


def test_no_usage_metadata_is_zero_usage() -> None:
    got = to_answer(response({"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": "STOP"}]}))
    assert got.usage == Usage() and got.model_version is None


def test_empty_response_is_a_server_error_for_the_policy() -> None:
    got = to_answer(types.GenerateContentResponse())
    assert not got.has_candidates and got.block_reason is None and got.text is None
    assert outcome(got) == Outcome.SERVER_ERROR


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(None, None, id="no-http-response"),
        pytest.param({}, None, id="no-headers"),
        pytest.param({"content-type": "application/json"}, None, id="header-missing"),
        pytest.param({SERVED_TIER_HEADER: "flex"}, "flex", id="flex"),
        pytest.param({"X-Gemini-Service-Tier": "STANDARD"}, "standard", id="any-case"),
    ],
)
def test_served_tier_from_the_response_header(headers: dict[str, str] | None, expected: str | None) -> None:
    assert served_tier(response(with_parts({"text": "x"}), headers)) == expected


# -- the call --------------------------------------------------------------------------------------


def test_no_api_key_is_a_config_error_that_says_what_to_set() -> None:
    for key in (None, SecretStr("")):
        settings = make_settings().model_copy(update={"gemini_api_key": key})
        with pytest.raises(ConfigError, match="GEMINI_API_KEY"):
            require_api_key(settings)
        with pytest.raises(ConfigError):
            GeminiClient(settings)
    assert require_api_key(make_settings()) == API_KEY


class Recorder:
    """Stands in for ``client.aio.models``: records the call, answers with ``reply`` or raises it."""

    def __init__(self, reply: types.GenerateContentResponse | BaseException) -> None:
        self.reply = reply
        self.kwargs: dict[str, Any] = {}

    async def generate_content(self, **kwargs: Any) -> types.GenerateContentResponse:
        self.kwargs = kwargs
        if isinstance(self.reply, BaseException):
            raise self.reply
        return self.reply


@pytest.fixture
async def client() -> Any:
    gemini = GeminiClient(make_settings(gemini_base_url="http://127.0.0.1:9"))
    yield gemini
    await gemini.aclose()


def record_calls(client: GeminiClient, reply: types.GenerateContentResponse | BaseException) -> Recorder:
    recorder = Recorder(reply)
    client._client.aio._models = recorder  # type: ignore[assignment]
    models: object = client._client.aio.models
    assert models is recorder
    return recorder


async def test_generate_builds_the_call_on_the_chosen_tier(client: GeminiClient) -> None:
    recorder = record_calls(client, response(with_parts({"text": "hi"}), {SERVED_TIER_HEADER: "flex"}))
    config = {"temperature": 0.2, "max_output_tokens": 64}
    request = GenerateRequest(model=MODEL, prompt="Say hi", system_instruction="Be brief.", config=config)
    got = await client.generate(request, tier=Tier.FLEX, timeout_s=2.5)
    assert got.text == "hi" and got.served_tier == "flex"
    assert recorder.kwargs["model"] == MODEL and recorder.kwargs["contents"] == "Say hi"
    sent: types.GenerateContentConfig = recorder.kwargs["config"]
    assert sent.service_tier == types.ServiceTier.FLEX
    assert sent.temperature == 0.2 and sent.max_output_tokens == 64
    assert sent.system_instruction == "Be brief."
    assert sent.http_options is not None and sent.http_options.timeout == 2500  # ms
    assert sent.http_options.retry_options == NO_RETRIES  # the queue retries, never the SDK
    assert request.config == {"temperature": 0.2, "max_output_tokens": 64}  # the request is left as it was


async def test_generate_on_standard_with_contents(client: GeminiClient) -> None:
    recorder = record_calls(client, response(with_parts({"text": "hi"})))
    contents = [{"role": "user", "parts": [{"text": "Hi"}]}]
    system = {"parts": [{"text": "Be brief."}]}
    request = GenerateRequest(model=MODEL, contents=contents, system_instruction=system)
    await client.generate(request, tier=Tier.STANDARD, timeout_s=0.0001)
    sent: types.GenerateContentConfig = recorder.kwargs["config"]
    assert sent.service_tier == types.ServiceTier.STANDARD
    assert recorder.kwargs["contents"] == contents
    assert sent.system_instruction is not None
    assert sent.http_options is not None and sent.http_options.timeout == 1  # never a zero timeout


async def test_generate_lets_sdk_errors_through_to_the_policy(client: GeminiClient) -> None:
    error = overloaded()
    record_calls(client, error)
    with pytest.raises(genai_errors.ServerError) as raised:
        await client.generate(GenerateRequest(model=MODEL, prompt="Hi"), tier=Tier.FLEX, timeout_s=5)
    assert raised.value is error
    classified = classify.classify_exception(raised.value)
    assert (classified.outcome, classified.http_status) == (Outcome.OVERLOADED, 503)


# -- through the real SDK, to the in-process simulator ---------------------------------------------


@pytest.fixture
async def sim_client(sim: RunningSimulator) -> Any:
    gemini = GeminiClient(make_settings(gemini_base_url=sim.base_url, request_timeout_s=10))
    yield gemini
    await gemini.aclose()


async def call(client: GeminiClient, prompt: str, tier: Tier = Tier.FLEX, **config: Any) -> Answer:
    request = GenerateRequest(model=MODEL, prompt=prompt, config=config or None)
    return await client.generate(request, tier=tier, timeout_s=10)


@pytest.mark.parametrize("tier", [Tier.FLEX, Tier.STANDARD])
async def test_sdk_answer_reports_the_served_tier(sim_client: GeminiClient, tier: Tier) -> None:
    got = await call(sim_client, "Hello there", tier)
    assert got.served_tier == str(tier)
    assert got.text and got.finish_reason == "STOP" and got.usage.total_tokens > 0 and got.model_version


async def test_sdk_answer_with_thoughts(sim_client: GeminiClient) -> None:
    got = await call(sim_client, "Think [[fault:thinking]]", thinking_config={"include_thoughts": True})
    assert got.usage.thoughts_tokens > 0
    assert got.text and "Thinking about" not in got.text  # the thought part is not the answer


@pytest.mark.parametrize(
    ("prompt", "outcome_", "http_status", "retry_after_s"),
    [
        pytest.param("[[fault:503]]", Outcome.OVERLOADED, 503, None, id="503"),
        pytest.param("[[fault:500]]", Outcome.SERVER_ERROR, 500, None, id="500"),
        pytest.param("[[fault:html500]]", Outcome.SERVER_ERROR, 500, None, id="html-500"),
        pytest.param("[[fault:429:retry=2s]]", Outcome.RATE_LIMITED, 429, 2.0, id="429-retry-info"),
        pytest.param("[[fault:400]]", Outcome.CLIENT_ERROR, 400, None, id="400"),
        pytest.param("[[fault:403]]", Outcome.CLIENT_ERROR, 403, None, id="403"),
        pytest.param("[[fault:404]]", Outcome.CLIENT_ERROR, 404, None, id="404"),
        pytest.param("[[fault:reset]]", Outcome.CONNECTION_ERROR, None, None, id="connection-reset"),
    ],
)
async def test_sdk_errors_map_to_outcomes(
    sim_client: GeminiClient, prompt: str, outcome_: Outcome, http_status: int | None, retry_after_s: float | None
) -> None:
    with pytest.raises(Exception) as raised:  # noqa: PT011 - which exception is the SDK's business
        await call(sim_client, f"fail {prompt}")
    classified = classify.classify_exception(raised.value)
    assert (classified.outcome, classified.http_status) == (outcome_, http_status), raised.value
    assert classified.retry_after_s == retry_after_s
    assert classified.message and API_KEY not in classified.message


@pytest.mark.parametrize(
    ("prompt", "finish", "block"),
    [
        pytest.param("[[fault:safety]]", "SAFETY", None, id="candidate-safety"),
        pytest.param("[[fault:block]]", None, "PROHIBITED_CONTENT", id="prompt-blocked"),
    ],
)
async def test_sdk_blocked_answers_are_blocked(
    sim_client: GeminiClient, prompt: str, finish: str | None, block: str | None
) -> None:
    got = await call(sim_client, f"unsafe {prompt}")
    assert (got.finish_reason, got.block_reason, got.text) == (finish, block, None)
    assert outcome(got) == Outcome.BLOCKED
