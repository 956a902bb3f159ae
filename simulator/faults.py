"""Fault directives written into prompt text: `[[fault:SPEC]]` and `[[latency:Xs]]`.

A counted directive such as `503x3` fires for the first 3 calls whose request text carries it;
calls are counted per (spec, full request text) so different prompts never share a counter.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

DIRECTIVE_RE = re.compile(r"\[\[(fault|latency):([^\[\]]*)\]\]")
_COUNTED_RE = re.compile(r"(?P<kind>.+?)(?:x(?P<times>\d+))?")
_SECONDS_RE = re.compile(r"(?P<value>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>ms|s)?")

ERROR_KINDS: frozenset[str] = frozenset(
    {"503", "500", "502", "504", "html500", "400", "403", "404"} | {"429", "429-daily", "429-billing", "429-legacy"}
)
# HTTP 200 answers that carry no usable text, keyed by directive kind -> finishReason
FINISH_KINDS: dict[str, str] = {
    "safety": "SAFETY",
    "recitation": "RECITATION",
    "prohibited": "PROHIBITED_CONTENT",
    "image_safety": "IMAGE_SAFETY",
    "image_prohibited": "IMAGE_PROHIBITED_CONTENT",
    "image_other": "IMAGE_OTHER",
    "no_image": "NO_IMAGE",
    "malformed_call": "MALFORMED_FUNCTION_CALL",
    "max_tokens": "MAX_TOKENS",
}
# HTTP 200 answers whose shape a directive changes, keyed by directive kind -> what outputs.plan is told
SHAPE_KINDS: dict[str, str] = {"text_only": "TEXT_ONLY", "bad_json": "BAD_JSON", "truncated_json": "TRUNCATED_JSON"}
CONNECTION_KINDS: frozenset[str] = frozenset({"reset", "hang"})
OTHER_KINDS: frozenset[str] = frozenset({"block"})
MODIFIER_KINDS: frozenset[str] = frozenset({"thinking"})  # change a success, never stop it
KNOWN_KINDS: frozenset[str] = (
    ERROR_KINDS | frozenset(FINISH_KINDS) | frozenset(SHAPE_KINDS) | CONNECTION_KINDS | OTHER_KINDS | MODIFIER_KINDS
)


@dataclass(frozen=True)
class Fault:
    """One parsed `[[fault:SPEC]]` directive."""

    spec: str  # the text between "fault:" and "]]", e.g. "429x2:retry=3s"
    kind: str  # e.g. "429", "safety", "reset"
    times: int | None  # None: fires on every call
    retry_delay_s: float | None = None  # only for "429...:retry=Ss"


@dataclass(frozen=True)
class Directives:
    """Everything the request text asks of the simulator."""

    faults: tuple[Fault, ...] = ()
    latency_s: float | None = None
    errors: tuple[str, ...] = ()  # directives that could not be parsed

    @property
    def has_fault(self) -> bool:
        """Requests carrying a fault directive skip capacity, rpm and random faults."""
        return bool(self.faults)


def parse_seconds(text: str) -> float | None:
    """'2.5s' -> 2.5, '250ms' -> 0.25, '3' -> 3.0; None if not a duration."""
    match = _SECONDS_RE.fullmatch(text.strip())
    if match is None:
        return None
    value = float(match["value"])
    return value / 1000.0 if match["unit"] == "ms" else value


def parse_fault(spec: str) -> Fault | None:
    """Parse one fault spec; None if it is not a known directive."""
    head, sep, option = spec.strip().partition(":")
    retry_delay_s: float | None = None
    if sep:
        name, eq, value = option.partition("=")
        retry_delay_s = parse_seconds(value) if eq and name.strip() == "retry" else None
        if retry_delay_s is None:
            return None
    match = _COUNTED_RE.fullmatch(head.strip().lower())
    if match is None or match["kind"] not in KNOWN_KINDS:
        return None
    if retry_delay_s is not None and not match["kind"].startswith("429"):
        return None
    times = int(match["times"]) if match["times"] is not None else None
    return Fault(spec=spec.strip(), kind=match["kind"], times=times, retry_delay_s=retry_delay_s)


def parse_directives(texts: list[str]) -> Directives:
    """Collect the directives of every text part, in order of appearance."""
    faults: list[Fault] = []
    errors: list[str] = []
    latency_s: float | None = None
    for text in texts:
        for match in DIRECTIVE_RE.finditer(text):
            name, spec = match[1], match[2]
            if name == "latency":
                parsed = parse_seconds(spec)
                if parsed is None:
                    errors.append(match[0])
                else:
                    latency_s = parsed
                continue
            fault = parse_fault(spec)
            if fault is None:
                errors.append(match[0])
            else:
                faults.append(fault)
    return Directives(faults=tuple(faults), latency_s=latency_s, errors=tuple(errors))


def directive_key(spec: str, full_text: str) -> str:
    """The `calls_by_directive_key` key of a directive spec carried by a given request text."""
    digest = hashlib.sha256(full_text.encode("utf-8")).hexdigest()[:16]
    return f"{spec}|{digest}"
