"""The simulator's richer answers (images, function calls, thought signatures, JSON), through the real SDK."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pydantic
import pytest
from google import genai
from google.genai import errors, types

from simulator import RunningSimulator, schema_fill

pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession from ClientSession is discouraged:DeprecationWarning"
)

G3_IMAGE = "gemini-3-pro-image-preview"
FLASH_IMAGE = "gemini-2.5-flash-image"
G3 = "gemini-3-flash-preview"
TEXT_MODEL = "gemini-2.5-flash"
BLOCKED_IMAGE_MESSAGE = "You will not be charged for blocked images."


@pytest.fixture
async def client(sim: RunningSimulator) -> AsyncIterator[genai.Client]:
    options = types.HttpOptions(base_url=sim.base_url, retry_options=types.HttpRetryOptions(attempts=1))
    sdk = genai.Client(api_key="test", http_options=options)
    yield sdk
    await sdk.aio.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def stats(sim: RunningSimulator) -> dict[str, Any]:
    return sim.sim.stats.to_json()


def decode_png(data: bytes) -> tuple[int, int]:
    """Check a PNG byte by byte (signature, chunk CRCs, pixel data length, row filters); (width, height)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR"
    assert chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, interlace) == (8, 2, 0)
    pixels = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + 3 * width
    assert len(pixels) == height * stride
    assert all(pixels[row * stride] <= 4 for row in range(height))
    return width, height


def image_config(size: str | None = None, aspect: str | None = None, modalities: list[str] | None = None) -> Any:
    return types.GenerateContentConfig(
        image_config=types.ImageConfig(image_size=size, aspect_ratio=aspect), response_modalities=modalities
    )


def only(parts: list[types.Part] | None, attr: str) -> list[types.Part]:
    return [p for p in parts or [] if getattr(p, attr) is not None]


# ---- images -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "size", "aspect", "expected", "tokens"),
    [
        (G3_IMAGE, None, None, (1024, 1024), 1120),
        (G3_IMAGE, "1K", "16:9", (1024, 576), 1120),
        (G3_IMAGE, "2K", "16:9", (2048, 1152), 1120),
        (G3_IMAGE, "4K", "9:16", (2304, 4096), 2000),
        (G3_IMAGE, "4K", "1:1", (4096, 4096), 2000),
        (FLASH_IMAGE, "4K", None, (1024, 1024), 1290),  # one size only: imageSize is ignored
        (FLASH_IMAGE, None, "3:2", (1024, 683), 1290),
    ],
)
async def test_image_bytes_are_a_png_of_the_asked_size(
    client: genai.Client,
    sim: RunningSimulator,
    model: str,
    size: str | None,
    aspect: str | None,
    expected: tuple[int, int],
    tokens: int,
) -> None:
    response = await client.aio.models.generate_content(
        model=model, contents="a lighthouse", config=image_config(size, aspect)
    )
    parts = response.candidates[0].content.parts
    assert parts[0].text == "Here is the image you asked for: a lighthouse"  # TEXT+IMAGE: text first
    (image,) = only(parts, "inline_data")
    assert image.inline_data.mime_type == "image/png"
    assert decode_png(image.inline_data.data) == expected
    usage = response.usage_metadata
    text_tokens = usage.candidates_token_count - tokens
    assert text_tokens > 0
    details = {d.modality: d.token_count for d in usage.candidates_tokens_details}
    assert details == {types.MediaModality.IMAGE: tokens, types.MediaModality.TEXT: text_tokens}
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    assert stats(sim)["images_served"] == 1


async def test_gemini3_image_parts_are_signed_and_flash_image_parts_are_not(client: genai.Client) -> None:
    g3 = await client.aio.models.generate_content(model=G3_IMAGE, contents="a cat", config=image_config())
    text, image = g3.candidates[0].content.parts
    assert isinstance(image.thought_signature, bytes) and len(image.thought_signature) > 16
    assert isinstance(text.thought_signature, bytes)
    assert text.thought_signature != image.thought_signature
    flash = await client.aio.models.generate_content(model=FLASH_IMAGE, contents="a cat", config=image_config())
    assert [p.thought_signature for p in flash.candidates[0].content.parts] == [None, None]


async def test_image_only_modality_has_no_text_part(client: genai.Client) -> None:
    config = image_config("2K", modalities=["IMAGE"])
    response = await client.aio.models.generate_content(model=G3_IMAGE, contents="a boat", config=config)
    (part,) = response.candidates[0].content.parts
    assert part.text is None
    assert decode_png(part.inline_data.data) == (2048, 2048)
    details = response.usage_metadata.candidates_tokens_details
    assert [(d.modality, d.token_count) for d in details] == [(types.MediaModality.IMAGE, 1120)]
    assert response.usage_metadata.candidates_token_count == 1120


async def test_jpeg_is_asked_but_png_is_labelled(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    body = {
        "contents": [{"role": "user", "parts": [{"text": "a hill"}]}],
        "generationConfig": {"imageConfig": {"outputMimeType": "image/jpeg"}, "responseModalities": ["IMAGE"]},
    }
    target = f"{sim.base_url}/v1beta/models/{G3_IMAGE}:generateContent"
    async with http.post(target, json=body, headers={"x-goog-api-key": "k"}) as r:
        assert r.status == 200
        part = (await r.json())["candidates"][0]["content"]["parts"][0]
    assert part["inlineData"]["mimeType"] == "image/png"
    assert part["inlineData"]["data"].startswith("iVBORw0KGgo")  # base64 of the PNG signature


async def test_reference_images_up_to_14(client: genai.Client) -> None:
    reference = types.Part.from_bytes(data=b"\x89PNG\r\n\x1a\nfake", mime_type="image/png")
    ok = await client.aio.models.generate_content(model=G3_IMAGE, contents=["edit these", *[reference] * 14])
    assert ok.usage_metadata.prompt_token_count >= 14 * 258
    assert only(ok.candidates[0].content.parts, "inline_data")
    with pytest.raises(errors.ClientError) as info:
        await client.aio.models.generate_content(model=G3_IMAGE, contents=["edit these", *[reference] * 15])
    assert info.value.code == 400
    assert "at most 14" in str(info.value.message)


@pytest.mark.parametrize(("size", "aspect", "word"), [("3K", "1:1", "image size"), ("1K", "20:1", "aspect ratio")])
async def test_bad_image_config_is_400(client: genai.Client, size: str, aspect: str, word: str) -> None:
    with pytest.raises(errors.ClientError) as info:
        await client.aio.models.generate_content(model=G3_IMAGE, contents="x", config=image_config(size, aspect))
    assert info.value.status == "INVALID_ARGUMENT"
    assert word in str(info.value.message)


async def test_image_edit_thread_needs_the_image_signature(client: genai.Client, sim: RunningSimulator) -> None:
    first = await client.aio.models.generate_content(model=G3_IMAGE, contents="a red car", config=image_config())
    turn = first.candidates[0].content
    follow_up = types.Content(role="user", parts=[types.Part(text="make it blue")])
    edited = await client.aio.models.generate_content(model=G3_IMAGE, contents=["a red car", turn, follow_up])
    assert only(edited.candidates[0].content.parts, "inline_data")
    assert stats(sim)["signatures_checked"] == 1

    stripped = turn.model_copy(deep=True)
    stripped.parts[1].thought_signature = None
    with pytest.raises(errors.ClientError) as missing:
        await client.aio.models.generate_content(model=G3_IMAGE, contents=["a red car", stripped, follow_up])
    assert str(missing.value.message).startswith("Image part is missing a thought_signature")

    swapped = turn.model_copy(deep=True)
    swapped.parts[1].inline_data.data = swapped.parts[1].inline_data.data + b"x"  # other bytes, same signature
    with pytest.raises(errors.ClientError) as invalid:
        await client.aio.models.generate_content(model=G3_IMAGE, contents=["a red car", swapped, follow_up])
    assert "Thought signature is not valid" in str(invalid.value.message)
    assert stats(sim)["signatures_rejected"] == 2


async def test_stream_puts_the_image_in_the_last_chunk(client: genai.Client) -> None:
    stream = await client.aio.models.generate_content_stream(
        model=G3_IMAGE, contents="a long prompt about a castle on a hill", config=image_config()
    )
    chunks = [chunk async for chunk in stream]
    assert len(chunks) > 1
    assert "".join(c.text or "" for c in chunks[:-1]).startswith("Here is the image")
    assert all(not only(c.candidates[0].content.parts, "inline_data") for c in chunks[:-1])
    (image,) = only(chunks[-1].candidates[0].content.parts, "inline_data")
    assert decode_png(image.inline_data.data) == (1024, 1024)
    assert image.thought_signature
    assert chunks[0].candidates[0].content.parts[0].thought_signature  # the text signature, first chunk
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP
    assert chunks[-1].usage_metadata.candidates_token_count > 1120


# ---- directives ---------------------------------------------------------------------------------
async def test_text_only_directive(client: genai.Client, sim: RunningSimulator) -> None:
    response = await client.aio.models.generate_content(model=G3_IMAGE, contents="a dog [[fault:text_only]]")
    (part,) = response.candidates[0].content.parts
    assert part.text.startswith("I can't create that image, but here is a description")
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    assert stats(sim)["images_served"] == 0


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("no_image", types.FinishReason.NO_IMAGE),
        ("image_prohibited", types.FinishReason.IMAGE_PROHIBITED_CONTENT),
        ("image_other", types.FinishReason.IMAGE_OTHER),
        ("image_safety", types.FinishReason.IMAGE_SAFETY),
    ],
)
async def test_image_refusal_directives(client: genai.Client, spec: str, reason: types.FinishReason) -> None:
    prompt = f"a tree [[fault:{spec}x1]]"
    response = await client.aio.models.generate_content(model=G3_IMAGE, contents=prompt)
    cand = response.candidates[0]
    assert cand.finish_reason == reason
    assert not cand.content.parts
    again = await client.aio.models.generate_content(model=G3_IMAGE, contents=prompt)  # x1: now served
    assert only(again.candidates[0].content.parts, "inline_data")


@pytest.mark.parametrize(("spec", "message"), [("image_safety", BLOCKED_IMAGE_MESSAGE), ("no_image", None)])
async def test_image_refusal_wire_body(
    sim: RunningSimulator, http: aiohttp.ClientSession, spec: str, message: str | None
) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": f"x [[fault:{spec}]]"}]}]}
    target = f"{sim.base_url}/v1beta/models/{G3_IMAGE}:generateContent"
    async with http.post(target, json=body, headers={"x-goog-api-key": "k"}) as r:
        cand = (await r.json())["candidates"][0]
    assert cand["content"] == {}
    assert cand.get("finishMessage") == message  # the SDK drops finishMessage: read the wire
    assert stats(sim)["images_served"] == 0


async def test_malformed_call_directive(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "weather? [[fault:malformed_call]]"}]}], "tools": [LOOKUP]}
    target = f"{sim.base_url}/v1beta/models/{G3}:generateContent"
    async with http.post(target, json=body, headers={"x-goog-api-key": "k"}) as r:
        cand = (await r.json())["candidates"][0]
    assert cand["finishReason"] == "MALFORMED_FUNCTION_CALL"
    assert "content" not in cand
    assert stats(sim)["function_calls_served"] == 0


# ---- function calling ---------------------------------------------------------------------------
LOOKUP: dict[str, Any] = {
    "functionDeclarations": [
        {"name": "lookup", "parameters": {"type": "OBJECT", "properties": {"q": {"type": "STRING"}}, "required": ["q"]}}
    ]
}
WEATHER = types.FunctionDeclaration(
    name="get_weather",
    parameters=types.Schema(
        type=types.Type.OBJECT,
        properties={
            "city": types.Schema(type=types.Type.STRING),
            "days": types.Schema(type=types.Type.INTEGER, minimum=3),
            "unit": types.Schema(type=types.Type.STRING, enum=["celsius", "fahrenheit"]),
            "tags": types.Schema(type=types.Type.ARRAY, items=types.Schema(type=types.Type.STRING)),
            "where": types.Schema(
                type=types.Type.OBJECT,
                properties={"lat": types.Schema(type=types.Type.NUMBER), "ok": types.Schema(type=types.Type.BOOLEAN)},
                required=["lat", "ok"],
            ),
            "note": types.Schema(type=types.Type.STRING),
        },
        required=["city", "days", "unit", "tags", "where"],
    ),
)
BOOK = types.FunctionDeclaration(
    name="book_table",
    parameters_json_schema={
        "type": "object",
        "properties": {"guests": {"type": "integer", "minimum": 2}, "when": {"type": "string", "format": "date"}},
        "required": ["guests", "when"],
    },
)
TOOLS = types.GenerateContentConfig(tools=[types.Tool(function_declarations=[WEATHER, BOOK])])
PROMPT = types.Content(role="user", parts=[types.Part(text="plan my trip")])


def reply(name: str, result: dict[str, Any]) -> types.Content:
    return types.Content(role="user", parts=[types.Part.from_function_response(name=name, response=result)])


async def call(client: genai.Client, contents: list[types.Content], model: str = G3) -> types.GenerateContentResponse:
    return await client.aio.models.generate_content(model=model, contents=contents, config=TOOLS)


async def test_three_step_function_calling_thread(client: genai.Client, sim: RunningSimulator) -> None:
    first = await call(client, [PROMPT])
    (part,) = first.candidates[0].content.parts
    assert part.function_call.name == "get_weather"
    assert part.function_call.args == {
        "city": "example",
        "days": 3,
        "unit": "celsius",
        "tags": ["example"],
        "where": {"lat": 1.5, "ok": True},
    }
    assert part.function_call.id
    assert part.thought_signature
    thread = [PROMPT, first.candidates[0].content, reply("get_weather", {"sky": "clear"})]

    second = await call(client, thread)
    (part2,) = second.candidates[0].content.parts
    assert part2.function_call.name == "book_table"
    assert part2.function_call.args == {"guests": 2, "when": "2025-01-01"}
    assert part2.function_call.id != part.function_call.id
    thread += [second.candidates[0].content, reply("book_table", {"table": 7})]

    third = await call(client, thread)
    assert third.candidates[0].finish_reason == types.FinishReason.STOP
    assert third.function_calls is None
    assert "get_weather returned" in third.text and '"table": 7' in third.text
    counters = stats(sim)
    assert counters["function_calls_served"] == 2
    assert counters["signatures_checked"] == 3  # one in the second request, two in the third
    assert counters["signatures_rejected"] == 0


async def first_turn(client: genai.Client) -> types.Content:
    return (await call(client, [PROMPT])).candidates[0].content


async def test_stripped_signature_is_400(client: genai.Client, sim: RunningSimulator) -> None:
    turn = (await first_turn(client)).model_copy(deep=True)
    turn.parts[0].thought_signature = None
    with pytest.raises(errors.ClientError) as info:
        await call(client, [PROMPT, turn, reply("get_weather", {"sky": "clear"})])
    assert info.value.code == 400
    assert info.value.status == "INVALID_ARGUMENT"
    assert str(info.value.message).startswith("Function call is missing a thought_signature in functionCall parts.")
    violation = info.value.details["error"]["details"][0]["fieldViolations"][0]
    assert violation["field"] == "contents[1].parts[0].thought_signature"
    assert stats(sim)["signatures_rejected"] == 1


async def test_altered_signature_is_400(client: genai.Client) -> None:
    turn = (await first_turn(client)).model_copy(deep=True)
    signature = bytearray(turn.parts[0].thought_signature)
    signature[5] ^= 0x01
    turn.parts[0].thought_signature = bytes(signature)
    with pytest.raises(errors.ClientError) as info:
        await call(client, [PROMPT, turn, reply("get_weather", {"sky": "clear"})])
    assert info.value.code == 400
    assert "Thought signature is not valid" in str(info.value.message)


async def test_signature_of_another_call_or_other_args_is_400(client: genai.Client) -> None:
    turn = await first_turn(client)
    second = (await call(client, [PROMPT, turn, reply("get_weather", {})])).candidates[0].content
    moved = second.model_copy(deep=True)
    moved.parts[0].thought_signature = turn.parts[0].thought_signature
    with pytest.raises(errors.ClientError) as info:
        await call(client, [PROMPT, turn, reply("get_weather", {}), moved, reply("book_table", {})])
    assert "Thought signature is not valid" in str(info.value.message)
    edited = turn.model_copy(deep=True)
    edited.parts[0].function_call.args = {**edited.parts[0].function_call.args, "city": "Paris"}
    with pytest.raises(errors.ClientError):
        await call(client, [PROMPT, edited, reply("get_weather", {})])


async def test_gemini_25_neither_signs_nor_checks(client: genai.Client, sim: RunningSimulator) -> None:
    first = await call(client, [PROMPT], model=TEXT_MODEL)
    content = first.candidates[0].content
    assert content.parts[0].function_call.name == "get_weather"
    assert content.parts[0].thought_signature is None
    second = await call(client, [PROMPT, content, reply("get_weather", {})], model=TEXT_MODEL)
    assert second.function_calls[0].name == "book_table"
    assert stats(sim)["signatures_checked"] == 0


async def test_mode_none_answers_text(client: genai.Client) -> None:
    config = TOOLS.model_copy(
        update={"tool_config": types.ToolConfig(function_calling_config=types.FunctionCallingConfig(mode="NONE"))}
    )
    response = await client.aio.models.generate_content(model=G3, contents="hi", config=config)
    assert response.function_calls is None
    assert response.text == "Simulated answer to: hi"


async def test_snake_case_tools_and_json_schema_parameters(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    decl = {"name": "find", "parameters_json_schema": {"type": "object", "required": ["n"], "properties": {
        "n": {"type": "integer", "exclusiveMinimum": 4}, "opt": {"type": "string"}}}}  # fmt: skip
    body = {"contents": [{"role": "user", "parts": [{"text": "go"}]}], "tools": [{"function_declarations": [decl]}]}
    target = f"{sim.base_url}/v1beta/models/{TEXT_MODEL}:generateContent"
    async with http.post(target, json=body, headers={"x-goog-api-key": "k"}) as r:
        part = (await r.json())["candidates"][0]["content"]["parts"][0]
    assert part["functionCall"]["name"] == "find"
    assert part["functionCall"]["args"] == {"n": 5}
    assert "thoughtSignature" not in part


async def test_stream_puts_the_function_call_in_the_last_chunk(client: genai.Client) -> None:
    stream = await client.aio.models.generate_content_stream(model=G3, contents=[PROMPT], config=TOOLS)
    chunks = [chunk async for chunk in stream]
    last = chunks[-1]
    assert last.candidates[0].finish_reason == types.FinishReason.STOP
    (part,) = last.candidates[0].content.parts
    assert part.function_call.name == "get_weather"
    assert part.thought_signature


# ---- structured output --------------------------------------------------------------------------
class Colour(pydantic.BaseModel):
    name: str
    hex_code: str


class Palette(pydantic.BaseModel):
    title: str
    mood: str = pydantic.Field(json_schema_extra={"enum": ["calm", "bold"]})
    colours: list[Colour]
    size: int
    ratio: float
    public: bool


def json_config(**fields: Any) -> types.GenerateContentConfig:
    return types.GenerateContentConfig(response_mime_type="application/json", **fields)


async def test_json_answer_fits_a_gemini_schema(client: genai.Client, sim: RunningSimulator) -> None:
    response = await client.aio.models.generate_content(
        model=TEXT_MODEL, contents="a palette", config=json_config(response_schema=Palette)
    )
    value = json.loads(response.text)
    palette = Palette.model_validate(value)
    assert palette.colours == [Colour(name="example", hex_code="example")]
    assert (palette.size, palette.ratio, palette.public) == (1, 1.5, True)
    assert isinstance(response.parsed, Palette)
    assert stats(sim)["json_answers_served"] == 1


async def test_json_answer_fits_a_json_schema(client: genai.Client) -> None:
    schema = {
        "type": "object",
        "properties": {
            "level": {"type": "string", "enum": ["low", "high"]},
            "items": {"type": "array", "minItems": 3, "items": {"type": "integer", "minimum": 10}},
            "score": {"type": "number", "minimum": 2, "maximum": 4},
            "owner": {"$ref": "#/$defs/Owner"},
            "maybe": {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
        },
        "required": ["level"],
        "$defs": {"Owner": {"type": "object", "properties": {"id": {"type": "string", "minLength": 12}}}},
    }
    response = await client.aio.models.generate_content(
        model=TEXT_MODEL, contents="x", config=json_config(response_json_schema=schema)
    )
    assert json.loads(response.text) == {
        "level": "low",
        "items": [10, 10, 10],
        "score": 2.0,
        "owner": {"id": "exampleexamp"},
        "maybe": True,
    }


async def test_json_without_schema(client: genai.Client) -> None:
    response = await client.aio.models.generate_content(model=TEXT_MODEL, contents="hello", config=json_config())
    assert json.loads(response.text) == {"answer": "Simulated answer to: hello"}


async def test_bad_json_directive(client: genai.Client) -> None:
    config = json_config(response_schema=Palette)
    response = await client.aio.models.generate_content(
        model=TEXT_MODEL, contents="p [[fault:bad_json]]", config=config
    )
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    assert response.text.startswith('{"title": "example"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.text)


async def test_truncated_json_directive(client: genai.Client) -> None:
    config = json_config(response_schema=Palette)
    full = (await client.aio.models.generate_content(model=TEXT_MODEL, contents="p", config=config)).text
    response = await client.aio.models.generate_content(
        model=TEXT_MODEL, contents="p [[fault:truncated_jsonx1]]", config=config
    )
    assert response.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert full.startswith(response.text)
    assert 0 < len(response.text) < len(full)
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.text)


# ---- the schema filler on its own ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "INTEGER", "minimum": "3.0"}, 3),
        ({"type": "integer", "exclusiveMinimum": 4, "maximum": 9}, 5),
        ({"type": "number", "exclusiveMaximum": 1}, 0.5),
        ({"type": "string", "maxLength": 3}, "exa"),
        ({"type": ["string", "null"], "format": "email"}, "user@example.com"),
        ({"type": "ARRAY", "min_items": "2", "items": {"type": "BOOLEAN"}}, [True, True]),
        ({"type": "array", "maxItems": 0, "items": {"type": "string"}}, []),
        ({"const": "fixed"}, "fixed"),
        ({"type": "OBJECT", "properties": {"a": {"type": "STRING"}, "b": {"type": "STRING"}}, "required": ["b"]},
         {"b": "example"}),
    ],
)  # fmt: skip
def test_schema_fill(schema: dict[str, Any], expected: Any) -> None:
    assert schema_fill.instance(schema) == expected


def test_schema_fill_all_properties_follows_property_ordering() -> None:
    schema = {"type": "OBJECT", "properties": {"b": {"type": "STRING"}, "a": {"type": "INTEGER"}},
              "propertyOrdering": ["a", "b"]}  # fmt: skip
    assert list(schema_fill.instance(schema, all_properties=True)) == ["a", "b"]
