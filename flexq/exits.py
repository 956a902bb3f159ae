"""The one place a command's failure becomes a line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A command-line argument is wrong; exit code 2."""


def say(message: str) -> None:
    print(f"flexq: {message}", file=sys.stderr)


def run(body: Callable[[], int], *, interrupted: str = "interrupted", after_progress: bool = False) -> int:
    """Run a command; report what went wrong in one line with the exit code it deserves.

    ``after_progress``: a progress line may be unfinished on the terminal: start on a new line.
    Imports happen inside, so that a command pays only for what it uses."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from producer.errors import ConfigError, FlexqError, InvalidRequestError

    try:
        return body()
    except UsageError as err:
        say(str(err))
        return EXIT_USAGE
    except InvalidRequestError as err:
        say(str(err))
        return EXIT_USAGE
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
