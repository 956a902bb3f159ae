"""Thought signatures the simulator can check.

A signature is base64 of one version byte and an HMAC-SHA256, under a fixed server key, of a
canonical form of the part it rides on:

- a functionCall part: the JSON array [name, args, id], keys sorted, no spaces;
- an inlineData image part: the SHA-256 of the image bytes;
- a text part: the SHA-256 of the text.

Each form starts with its own label, so a signature moved to another part, or altered, no longer
verifies. On Gemini 3 models (name starting with ``gemini-3``) every model turn sent back must carry
a valid signature on its first functionCall part; on Gemini 3 image models, on every image part of a
model turn too (a deliberate strictness: the real API then only loses the editing context, but a
400 lets tests prove that signatures travel intact). Signatures on text parts are not checked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from simulator.images import is_gemini3, is_image_model
from simulator.request import BadRequest, field_of

SERVER_KEY = b"flexq-simulator/thought-signature/v1"
VERSION = b"\x01"
DOCS_URL = "https://ai.google.dev/gemini-api/docs/thought-signatures"


def _sign(label: bytes, payload: bytes) -> str:
    mac = hmac.new(SERVER_KEY, label + b"\x00" + payload, hashlib.sha256).digest()
    return base64.b64encode(VERSION + mac).decode("ascii")


def sign_function_call(name: Any, args: Any, call_id: Any) -> str:
    canonical = json.dumps([name, args, call_id], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _sign(b"functionCall", canonical.encode("utf-8"))


def sign_image(data: bytes) -> str:
    return _sign(b"inlineData", hashlib.sha256(data).digest())


def sign_text(text: str) -> str:
    return _sign(b"text", hashlib.sha256(text.encode("utf-8")).digest())


def decode_base64(raw: Any) -> bytes | None:
    """Standard or URL-safe base64 (the SDK sends URL-safe), padding optional; None if not base64."""
    if not isinstance(raw, str):
        return None
    text = raw.strip().replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def same_signature(sent: Any, expected: str) -> bool:
    got = decode_base64(sent)
    want = decode_base64(expected)
    return got is not None and want is not None and hmac.compare_digest(got, want)


@dataclass(frozen=True)
class SignatureCheck:
    """How many signatures one request had examined, and the 400 it earns, if any."""

    checked: int = 0
    error: BadRequest | None = None


def _missing_call(name: Any, where: str, position: int) -> BadRequest:
    message = (
        "Function call is missing a thought_signature in functionCall parts. This is required for tools to "
        "work correctly, and missing thought_signature may lead to degraded model performance. Additional "
        f"data, function call `default_api:{name}` , position {position}. Please refer to {DOCS_URL} for "
        "more details."
    )
    return BadRequest(message, field=f"{where}.thought_signature")


def _missing_image(where: str) -> BadRequest:
    message = (
        "Image part is missing a thought_signature in inlineData parts. The simulator requires every image a "
        "Gemini 3 image model returned to come back with its thought_signature unchanged "
        f"(at {where}). Please refer to {DOCS_URL} for more details."
    )
    return BadRequest(message, field=f"{where}.thought_signature")


def _invalid(where: str) -> BadRequest:
    message = (
        f"Thought signature is not valid: the thought_signature at {where} was altered or belongs to another "
        "part. Send every part of a model turn back unchanged."
    )
    return BadRequest(message, field=f"{where}.thought_signature")


def _expected(part: dict[str, Any], image_model: bool) -> tuple[str, str] | None:
    """("call" | "image", the signature this part must carry), or None if it needs none."""
    call = field_of(part, "functionCall", "function_call")
    if isinstance(call, dict):
        args = call.get("args")
        return "call", sign_function_call(call.get("name"), {} if args is None else args, call.get("id"))
    blob = field_of(part, "inlineData", "inline_data")
    if image_model and isinstance(blob, dict):
        data = decode_base64(blob.get("data"))
        return "image", sign_image(data if data is not None else b"")
    return None


def _check_turn(index: int, parts: list[Any], image_model: bool) -> tuple[int, BadRequest | None]:
    checked = 0
    calls = 0
    for position, part in enumerate(parts):
        expected = _expected(part, image_model) if isinstance(part, dict) else None
        if expected is None:
            continue
        kind, signature = expected
        calls += kind == "call"
        where = f"contents[{index}].parts[{position}]"
        sent = field_of(part, "thoughtSignature", "thought_signature")
        if sent is None:
            if kind == "image":
                return checked + 1, _missing_image(where)
            if calls == 1:  # only the first call of a turn must be signed (parallel calls share it)
                call = field_of(part, "functionCall", "function_call")
                return checked + 1, _missing_call(call.get("name"), where, position + 1)
            continue
        checked += 1
        if not same_signature(sent, signature):
            return checked, _invalid(where)
    return checked, None


def check_signatures(model: str, body: dict[str, Any]) -> SignatureCheck:
    """Check the signatures of every model turn in `contents` (Gemini 3 models only)."""
    if not is_gemini3(model):
        return SignatureCheck()
    contents = body.get("contents")
    contents = [contents] if isinstance(contents, dict) else contents
    checked = 0
    for index, content in enumerate(contents if isinstance(contents, list) else []):
        if not isinstance(content, dict) or content.get("role") != "model":
            continue
        parts = content.get("parts")
        turn_checked, error = _check_turn(index, parts if isinstance(parts, list) else [], is_image_model(model))
        checked += turn_checked
        if error is not None:
            return SignatureCheck(checked, error)
    return SignatureCheck(checked)
