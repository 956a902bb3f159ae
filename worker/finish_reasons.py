"""What each candidate finish reason means to the queue: one table, no I/O (``worker.classify`` reads it)."""

from __future__ import annotations

from producer.status import Outcome

#: Every finish reason google-genai 3.6 knows, each classified on purpose (tests check the SDK's list
#: against this table). ``None``: an answer (what it holds is judged apart: images, JSON).
FINISH_REASONS: dict[str, tuple[Outcome, str] | None] = {
    "FINISH_REASON_UNSPECIFIED": None,
    "STOP": None,
    "MAX_TOKENS": None,  # an answer cut at max_output_tokens: text may be short or None; JSON is checked
    "CONTINUATION": None,
    "SAFETY": (Outcome.BLOCKED, "the answer was blocked for safety"),
    "RECITATION": (Outcome.BLOCKED, "the answer was stopped for reciting training data"),
    "PROHIBITED_CONTENT": (Outcome.BLOCKED, "the answer was blocked for prohibited content"),
    "SPII": (Outcome.BLOCKED, "the answer was blocked for sensitive personal information"),
    "BLOCKLIST": (Outcome.BLOCKED, "the answer hit a blocklisted term"),
    "IMAGE_SAFETY": (Outcome.BLOCKED, "the image was blocked for safety"),
    "IMAGE_PROHIBITED_CONTENT": (Outcome.BLOCKED, "the image was blocked for prohibited content"),
    "IMAGE_RECITATION": (Outcome.BLOCKED, "the image was stopped for recitation"),
    "MODEL_ARMOR": (Outcome.BLOCKED, "the answer was blocked by a Model Armor policy"),
    "NO_IMAGE": (Outcome.NO_IMAGE, "the model made no image"),
    "IMAGE_OTHER": (Outcome.NO_IMAGE, "the image was stopped for another reason"),
    "MALFORMED_FUNCTION_CALL": (
        Outcome.CLIENT_ERROR,
        "the model wrote a function call that does not parse: check the function declarations' parameter schemas",
    ),
    "UNEXPECTED_TOOL_CALL": (
        Outcome.CLIENT_ERROR, "the model called a tool the request does not offer: check `tools` and `tool_config`"
    ),
    "TOO_MANY_TOOL_CALLS": (
        Outcome.CLIENT_ERROR, "the model made too many tool calls in one turn: offer fewer tools or split the task"
    ),
    "MISSING_THOUGHT_SIGNATURE": (
        Outcome.CLIENT_ERROR,
        "an earlier model turn lost its thought_signature: continue a thread with `continue_from`, "
        "or send model turns back exactly as returned",
    ),
    "LANGUAGE": (Outcome.CLIENT_ERROR, "the prompt's language is not supported by this model"),
    "PUP_LIMITED_DISABLED": (Outcome.CLIENT_ERROR, "the project's provisioned throughput does not allow this call"),
    "ESCALATION": (Outcome.CLIENT_ERROR, "the API ended the answer with ESCALATION: see the finish message"),
    "OTHER": (Outcome.SERVER_ERROR, "the answer stopped for an unspecified reason"),
    "MALFORMED_RESPONSE": (Outcome.SERVER_ERROR, "the API produced a malformed response"),
}
