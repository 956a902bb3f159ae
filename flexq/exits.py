"""The one place a command's failure becomes a line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A command-line argument is wrong; exit code 2."""


def say(message: str) -> None:
    print(f"flexq: {clean(message)}", file=sys.stderr)


def run(body: Callable[[], int], *, interrupted: str = "interrupted", after_progress: bool = False) -> int:
    """Run a command; report what went wrong in one line with the exit code it deserves.

    ``after_progress``: a progress line may be unfinished on the terminal: start on a new line.
    Imports happen inside, so that a command pays only for what it uses."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from producer.errors import ConfigError, FlexqError, InvalidRequestError, StoreUnavailableError, explain_unavailable

    try:
        return body()
    except UsageError as err:
        say(str(err))
        return EXIT_USAGE
    except InvalidRequestError as err:
        say(str(err))
        return EXIT_USAGE
    except StoreUnavailableError as err:
        say(explain_unavailable(err))
        return EXIT_ERROR
    except (ConfigError, FlexqError) as err:
        say(str(err))
        return EXIT_ERROR
    except (ValidationError, SettingsError) as err:  # settings read from the environment
        say(_settings_line(err))
        return EXIT_USAGE
    except OSError as err:
        say(f"{err.strerror or err}: {getattr(err, 'filename', '') or ''}".rstrip(": "))
        return EXIT_ERROR
    except KeyboardInterrupt:
        if after_progress:
            print(file=sys.stderr)
        say(interrupted)
        return EXIT_INTERRUPTED


def _settings_line(err: Exception) -> str:
    from producer.settings import settings_error
    from worker.config import WorkerConfig

    return settings_error(err, WorkerConfig)


# -- argument types: a bad number is a one-line usage error, never a traceback ------------------------


#: Characters that would drive the operator's terminal (ANSI escapes, carriage returns, bidi overrides).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def clean(text: str) -> str:
    """``text`` with control characters shown as escapes (``\\x1b``); newlines and tabs kept."""
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class Parser(argparse.ArgumentParser):
    """argparse, with control characters in what the user typed escaped in its error message."""

    def error(self, message: str) -> NoReturn:
        super().error(clean(message).replace("\n", "\\n").replace("\t", "\\t"))  # one line, always


def seconds(text: str) -> float:
    """A positive, finite number of seconds (``nan``, ``inf``, ``0`` and ``-1`` are refused)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def count(minimum: int) -> Callable[[str], int]:
    """A whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text!r}")
        return value

    parse.__name__ = f"count_from_{minimum}"
    return parse


def duration(text: str) -> float:
    """``90s``, ``10m``, ``2h``, ``1d`` or plain seconds, as seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    unit = text[-1:].lower()
    return seconds(text[:-1]) * units[unit] if unit in units else seconds(text)
