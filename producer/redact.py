"""Redaction at enqueue: personal data is replaced before a request is stored or sent (``FLEXQ_REDACT``).

``redact_text`` is the built-in redactor, a pure function over text: e-mail addresses become
``[EMAIL]``, payment card numbers ``[CARD]``, phone numbers ``[PHONE]``. It is conservative: a
number that could as well be a year, a price, a date, a version or an id is left alone.

- **E-mail**: ``local@domain.tld``, the top-level domain made of letters.
- **Card**: 13-19 digits, written together or in the usual groups (4-4-4-4, 4-4-4-4-3, 4-6-5,
  4-6-4, 4-4-4-1..4) separated by single spaces or dashes; the number must pass the Luhn check
  and start like a card network's number (3, 4, 5, 6, or 2221-2720), so epoch timestamps,
  all-zero runs and most ids stay.
- **Phone**: international (``+`` then 8-15 digits in groups: ``+44 20 7946 0958``,
  ``+1 (415) 555-2671``, ``+14155552671``); North American ``(415) 555-2671``, ``415-555-2671``,
  ``415.555.2671``, ``1-800-555-0199`` (area code and exchange start with 2-9); and national
  numbers with a trunk ``0`` and 9-12 digits in groups (``020 7946 0958``, ``01 23 45 67 89``,
  ``030/12345678``, ``(020) 7946 0958``). A bare run of digits without ``+`` is never a phone
  number, and a number that continues a longer dotted or dashed one (an IP address, a date) is not.

``apply`` runs a redactor over a request's texts: the ``prompt``, the text parts of every turn of
``contents`` except the model's own (a thread's earlier answers are sent back untouched, thought
signatures and all), and the ``system_instruction`` (a string, or its text parts). Inline or file
data, function calls and responses, and ``config`` are never changed.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from producer.errors import ConfigError, FlexqError, InvalidRequestError
from producer.models import Redaction
from producer.request import GenerateRequest

#: The setting that names the redactor (``ProducerSettings.redact``).
SETTING = "FLEXQ_REDACT"
BUILTIN = "builtin"
EMAIL, CARD, PHONE = "[EMAIL]", "[CARD]", "[PHONE]"

# -- the built-in redactor ---------------------------------------------------------------------------

_EMAIL_RE = re.compile(
    r"(?<![\w.%+-])[\w.%+-]+@(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+[^\W\d_]{2,63}(?![\w-])"
)
#: A maximal run of digit groups joined by single spaces or dashes (not inside a word, not after
#: ``+``, not the decimals of a number); possessive, so a long run costs one pass.
_DIGIT_RUN_RE = re.compile(r"(?<![\w+])(?<!\d[ .-])\d++(?:[ -]\d++)*+(?!\w)")
_GROUP_RE = re.compile(r"\d+")
#: How a card number is written: one group, or groups of four and a last one of 1-4 digits (or 4-6-4/5).
_CARD_SHAPES = ((4, 4, 4), (4, 4, 4, 4))

#: Not inside a word, not after ``+``, not continuing a number with a separator (IP addresses, dates).
_LEFT = r"(?<![\w+])(?<!\d[ .,/-])"
_RIGHT = r"(?!\w)(?![ .,/-]\d)"
_INTL_RE = re.compile(r"(?<![\w+])\+[1-9]\d{0,2}+(?:[ .-]?+(?:\(\d{1,4}+\)|\d++))*+")
_NANP_RE = re.compile(
    _LEFT + r"(?:1[ .-]?)?(?:\([2-9]\d\d\) ?[2-9]\d\d[ .-]\d{4}|[2-9]\d\d(?P<s>[ .-])[2-9]\d\d(?P=s)\d{4})" + _RIGHT
)
_TRUNK_RE = re.compile(
    _LEFT + r"(?:\(0[1-9]\d{0,4}\) ?\d{2,8}+(?:(?P<p>[ .-])\d{2,8}+(?:(?P=p)\d{2,8}+){0,2})?"
    r"|0[1-9]\d{0,4}[ ./-]\d{2,8}+(?:(?P<t>[ ./-])\d{2,8}+(?:(?P=t)\d{2,8}+){0,3})?)" + _RIGHT
)
_INTL_DIGITS = (8, 15)
_TRUNK_DIGITS = (9, 12)


_DOUBLED = str.maketrans("0123456789", "0246813579")  # a digit doubled, its two digits summed


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a string of digits holds (every payment card number passes it)."""
    kept, doubled = digits[-1::-2], digits[-2::-2].translate(_DOUBLED)
    return bool(digits) and (sum(map(int, kept)) + sum(map(int, doubled))) % 10 == 0


def card_prefix_ok(digits: str) -> bool:
    """Starts like a card network's number: Amex, Diners, JCB (3), Visa (4), Mastercard (51-55,
    2221-2720), Discover, UnionPay, Maestro (5, 6)."""
    return digits[:1] in ("3", "4", "5", "6") or 2221 <= int(digits[:4] or 0) <= 2720


def _card_shape(lengths: tuple[int, ...]) -> bool:
    if len(lengths) == 1:
        return 13 <= lengths[0] <= 19
    head, last = lengths[:-1], lengths[-1]
    if head == (4, 6):  # Amex 4-6-5, Diners 4-6-4
        return last in (4, 5)
    return head in _CARD_SHAPES and 1 <= last <= 4 and 13 <= sum(lengths) <= 19


def is_card(digit_groups: list[str]) -> bool:
    """Digit groups, as written, that make a payment card number: shape, network prefix and Luhn."""
    if not digit_groups or not _card_shape(tuple(len(group) for group in digit_groups)):
        return False
    return _card_digits("".join(digit_groups))


def _card_digits(digits: str) -> bool:
    return card_prefix_ok(digits) and luhn_ok(digits)


def _cards(match: re.Match[str]) -> str:
    """A run of digit groups with each card number in it replaced (the longest one from each start)."""
    run = match.group()
    spans = [group.span() for group in _GROUP_RE.finditer(run)]
    texts = [run[a:b] for a, b in spans]
    lengths = tuple(map(len, texts))
    out, cut, start = [], 0, 0
    while start < len(texts):
        end = None
        if lengths[start] == 4 or 13 <= lengths[start] <= 19:  # a card starts with four digits, or is one group
            for stop in range(min(len(texts), start + 5), start, -1):
                if _card_shape(lengths[start:stop]) and _card_digits("".join(texts[start:stop])):
                    end = stop
                    break
        if end is None:
            start += 1
            continue
        out += [run[cut : spans[start][0]], CARD]
        cut, start = spans[end - 1][1], end
    return "".join(out) + run[cut:]


def _count_digits(text: str) -> int:
    return sum(char.isdigit() for char in text)


def _intl(match: re.Match[str]) -> str:
    """``+`` and digit groups: a phone number of up to 15 digits (a longer run keeps its tail)."""
    text, after = match.group(), match.string[match.end() : match.end() + 1]
    if len(text) <= _INTL_DIGITS[0] or (after and (after.isalnum() or after == "_")):
        return text
    cut = 0
    for group in re.finditer(r"\(\d+\)|\d+", text):
        if _count_digits(text[: group.end()]) > _INTL_DIGITS[1]:
            break
        cut = group.end()
    if _count_digits(text[:cut]) < _INTL_DIGITS[0]:
        return text
    return PHONE + text[cut:]


def _trunk(match: re.Match[str]) -> str:
    low, high = _TRUNK_DIGITS
    return PHONE if low <= _count_digits(match.group()) <= high else match.group()


def redact_text(text: str) -> str:
    """``text`` with e-mail addresses, payment card numbers and phone numbers replaced by
    ``[EMAIL]``, ``[CARD]`` and ``[PHONE]`` (in that order). Redacting twice changes nothing more."""
    text = _EMAIL_RE.sub(EMAIL, text)
    text = _DIGIT_RUN_RE.sub(_cards, text)
    text = _INTL_RE.sub(_intl, text)
    text = _NANP_RE.sub(PHONE, text)
    return _TRUNK_RE.sub(_trunk, text)


# -- loading a redactor --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Redactor:
    """A text redactor and the name the record gives it (``builtin``, ``module:function``)."""

    name: str
    function: Callable[[str], str]

    def __call__(self, text: str) -> str:
        try:
            out = self.function(text)
        except FlexqError:
            raise  # e.g. InvalidRequestError: a hook may refuse a request on purpose
        except Exception as err:  # the message may quote the text: only the type is shown
            raise ConfigError(
                f"the redactor {self.name} raised {type(err).__name__}; nothing was enqueued"
            ) from err
        if not isinstance(out, str):
            raise ConfigError(f"the redactor {self.name} returned a {type(out).__name__}, not a str")
        return out


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())[:200]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_redactor(spec: str | None) -> Redactor | None:
    """The redactor ``FLEXQ_REDACT`` names: None for ``""``, the built-in one for ``builtin``, or the
    callable ``module:function`` (imported now); ``ConfigError`` naming the setting if it cannot be."""
    spec = (spec or "").strip()
    if not spec:
        return None
    if spec == BUILTIN:
        return Redactor(BUILTIN, redact_text)
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise ConfigError(f"{SETTING}: {spec!r} is neither {BUILTIN!r} nor 'module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as err:  # a module that fails to import raises anything
        raise ConfigError(f"{SETTING}: cannot import {module_name!r} ({_one_line(err)})") from None
    for name in attr.split("."):
        if not hasattr(target, name):
            raise ConfigError(f"{SETTING}: {spec!r}: {module_name!r} has no {attr!r}")
        target = getattr(target, name)
    if not callable(target):
        raise ConfigError(f"{SETTING}: {spec!r} is a {type(target).__name__}, not a function (text: str) -> str")
    return Redactor(spec, target)


def as_redactor(function: Callable[[str], str] | Redactor) -> Redactor:
    """A callable given to ``FlexQueue.connect(redactor=...)``, named ``module:qualname`` in records."""
    if isinstance(function, Redactor):
        return function
    if not callable(function):
        raise ConfigError(f"redactor: a {type(function).__name__} is not a function (text: str) -> str")
    module = getattr(function, "__module__", None) or "?"
    name = getattr(function, "__qualname__", None) or type(function).__name__
    return Redactor(f"{module}:{name}", function)


def choose(function: Callable[[str], str] | None, setting: str | None) -> Redactor | None:
    """The redactor a queue runs: ``function`` if given, else the one ``FLEXQ_REDACT`` names (or None)."""
    return as_redactor(function) if function is not None else load_redactor(setting)


# -- applying one to a request -------------------------------------------------------------------------


class _Counter:
    """Runs the redactor and counts the texts it changed."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self.changed = 0

    def text(self, text: str) -> str:
        out = self.redactor(text)
        self.changed += out != text
        return out

    def parts(self, content: Any) -> Any:
        """A Content with its text parts redacted (a new dict when one changed; the input is never mutated)."""
        if not isinstance(content, dict) or not isinstance(content.get("parts"), list):
            return content
        before = self.changed
        parts = [
            {**part, "text": self.text(part["text"])} if isinstance(part, dict) and isinstance(part.get("text"), str)
            else part
            for part in content["parts"]
        ]
        return {**content, "parts": parts} if self.changed > before else content


def apply(request: GenerateRequest, redactor: Redactor) -> tuple[GenerateRequest, Redaction]:
    """``request`` with its texts redacted (see the module's doc), and what the record says of it.

    Inline data already moved to the blob store stays pending with the copy. ``InvalidRequestError``
    if a redacted prompt is empty; ``ConfigError`` if the redactor fails."""
    counter = _Counter(redactor)
    update: dict[str, Any] = {}
    if request.prompt is not None:
        update["prompt"] = counter.text(request.prompt)
        if not update["prompt"].strip():
            raise InvalidRequestError(f"prompt: is empty after redaction by {redactor.name}", field="prompt")
    if request.contents is not None:
        update["contents"] = [
            content if isinstance(content, dict) and content.get("role") == "model" else counter.parts(content)
            for content in request.contents
        ]
    if isinstance(request.system_instruction, str):
        update["system_instruction"] = counter.text(request.system_instruction)
    elif request.system_instruction is not None:
        update["system_instruction"] = counter.parts(request.system_instruction)
    redaction = Redaction(by=redactor.name, changed=counter.changed)
    return (request.model_copy(update=update) if counter.changed else request), redaction
