"""Generated sections of the docs: the job record schema and the settings table, read from the code.

A page holds a generated section between two markers::

    <!-- generated:job-record -->
    ...
    <!-- /generated:job-record -->

``python -m flexq.gendocs`` rewrites every such section in README.md and docs/*.md from the models
(``producer.models.JobRecord`` and the models it nests; ``producer.settings.ProducerSettings`` and
``worker.config.WorkerConfig``); ``--check`` changes nothing and exits 1 if a page is stale. Every
field must carry a ``description``. Secrets (``SecretStr`` fields) never show a value or a default.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import AliasChoices, BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "python -m flexq.gendocs"
MARKER_RE = re.compile(
    r"(?P<open><!-- generated:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(?P<close><!-- /generated:(?P=name) -->)",
    re.DOTALL,
)


class GenDocsError(Exception):
    """A page or a model cannot be turned into docs (unknown section, field without description)."""


# -- types -----------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _values(kind: Any) -> list[str] | None:
    """The allowed values of a Literal or an Enum, else None."""
    if typing.get_origin(kind) is typing.Literal:
        return [str(v) for v in typing.get_args(kind)]
    if isinstance(kind, type) and issubclass(kind, Enum):
        return [str(member.value) for member in kind]
    return None


def _split_optional(kind: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (it, False)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) < len(typing.get_args(kind)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True  # noqa: UP007
    return kind, False


def type_name(kind: Any, *, optional_word: str = " or null") -> str:
    """A JSON-ish name for a Python annotation: string, integer, number, object of strings, ...

    ``X | None`` adds ``optional_word`` (before the allowed values of an enum or Literal)."""
    kind, optional = _split_optional(kind)
    name = _base_type_name(kind)
    if not optional:
        return name
    head, colon, values = name.partition(": ")
    return f"{head}{optional_word}{colon}{values}"


def _base_type_name(kind: Any) -> str:
    values = _values(kind)
    if values is not None:
        return "string: " + ", ".join(f"`{v}`" for v in values)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_base_type_name(a) for a in args)
    if origin is list:
        inner = args[0] if args else Any
        return "array of objects" if _is_object(inner) else f"array of {_base_type_name(inner)}s"
    if origin is dict:
        value = args[1] if len(args) == 2 else Any
        if isinstance(value, type) and issubclass(value, BaseModel):
            return "JSON object of {" + ", ".join(value.model_fields) + "} objects"
        return "object of strings" if value is str else "object"
    simple: dict[Any, str] = {
        str: "string", int: "integer", float: "number", bool: "boolean", SecretStr: "string (secret)",
        datetime: "string (UTC time, ISO 8601)", Any: "any",
    }
    if kind in simple:
        return simple[kind]
    if _is_object(kind):
        return "object"
    raise GenDocsError(f"no docs name for the type {kind!r}")


def _is_object(kind: Any) -> bool:
    return (isinstance(kind, type) and issubclass(kind, BaseModel)) or typing.get_origin(kind) is dict


def _model_of(kind: Any) -> tuple[type[BaseModel] | None, bool]:
    """The nested model of a field (``Attempt`` of ``list[Attempt]``), and whether it is a list."""
    kind, _ = _split_optional(kind)
    if typing.get_origin(kind) is list:
        inner = typing.get_args(kind)[0]
        return (inner, True) if isinstance(inner, type) and issubclass(inner, BaseModel) else (None, True)
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return kind, False
    return None, False


def _description(model: type[BaseModel], name: str, info: FieldInfo) -> str:
    if not info.description:
        raise GenDocsError(f"{model.__module__}.{model.__name__}.{name} has no description=")
    return info.description


# -- the job record --------------------------------------------------------------------------------


def job_record_table() -> str:
    """Every field of ``JobRecord``, nested models flattened as ``attempts[].number``, ``result.text``."""
    from producer.models import JobRecord

    rows = ["| field | type | meaning |", "|---|---|---|"]
    seen: dict[type[BaseModel], str] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            path = f"{prefix}{name}"
            nested, is_list = _model_of(info.annotation)
            text = _description(model, name, info)
            if nested is not None and nested in seen:
                text += f" (fields as in `{seen[nested]}`)"
            rows.append(f"| `{path}` | {_cell(type_name(info.annotation))} | {_cell(text)} |")
            if nested is not None and nested not in seen:
                seen[nested] = path + ("[]" if is_list else "")
                walk(nested, path + ("[]." if is_list else "."))

    walk(JobRecord, "")
    return "\n".join(rows) + "\n"


# -- settings --------------------------------------------------------------------------------------


def env_names(model: type[BaseModel], name: str, info: FieldInfo) -> list[str]:
    """The environment variables a settings field is read from, the preferred one first."""
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        names = [c for c in alias.choices if isinstance(c, str) and c.isupper()]
        if names:
            return names
    prefix = str(model.model_config.get("env_prefix") or "")
    return [(prefix + name).upper()]


def _constraints(info: FieldInfo) -> str:
    parts = []
    for item in info.metadata:
        if isinstance(item, annotated_types.Gt):
            parts.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Ge):
            parts.append(f"≥ {item.ge}")
        elif isinstance(item, annotated_types.Lt):
            parts.append(f"< {item.lt}")
        elif isinstance(item, annotated_types.Le):
            parts.append(f"≤ {item.le}")
        elif getattr(item, "pattern", None):
            parts.append(f"matching `{item.pattern}`")
    return ", ".join(parts)


def _is_secret(kind: Any) -> bool:
    base, _ = _split_optional(kind)
    return base is SecretStr


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _human(name: str, value: Any) -> str:
    """``86400`` seconds -> ``24 h``; ``8388608`` bytes -> ``8 MiB``; else empty."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    if name.endswith("_s"):
        for unit, size, least in (("d", 86400, 2 * 86400), ("h", 3600, 3600), ("min", 60, 300)):
            if value >= least and value % size == 0:
                return f"{value / size:g} {unit}"
    if name.endswith("_bytes") and value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        return f"{value / (1024 * 1024):g} MiB"
    return ""


def default_text(name: str, info: FieldInfo) -> str:
    """The default as it would be written in the environment; secrets are never shown."""
    if _is_secret(info.annotation):
        return "*secret*"
    if info.default_factory is not None:
        value: Any = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        text = "`true`" if value else "`false`"
    elif isinstance(value, dict | list) and not value:
        text = "empty"
    elif isinstance(value, Enum):
        text = f"`{value.value}`"
    elif isinstance(value, int | float):
        text = f"`{_number(value)}`"
    else:
        text = f"`{value}`"
    human = _human(name, value)
    return f"{text} ({human})" if human else text


def _settings_rows(model: type[BaseModel], names: Sequence[str]) -> list[str]:
    rows = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for name in names:
        info = model.model_fields[name]
        variables = env_names(model, name, info)
        variable = f"`{variables[0]}`" + "".join(f" (or `{v}`)" for v in variables[1:])
        kind = type_name(info.annotation, optional_word=", optional")
        limits = _constraints(info)
        kind = f"{kind}, {limits}" if limits else kind
        text = _description(model, name, info)
        rows.append(f"| {variable} | {_cell(kind)} | {_cell(default_text(name, info))} | {_cell(text)} |")
    return rows


def settings_table() -> str:
    """Producers' settings, then the ones only workers read."""
    from producer.settings import ProducerSettings
    from worker.config import WorkerConfig

    producer = list(ProducerSettings.model_fields)
    worker = [name for name in WorkerConfig.model_fields if name not in ProducerSettings.model_fields]
    lines = [
        "Read by producers, the admin commands and workers (`producer.settings.ProducerSettings`):",
        "",
        *_settings_rows(ProducerSettings, producer),
        "",
        "Read by workers, `flexq batch` and `flexq stats` as well (`worker.config.WorkerConfig`):",
        "",
        *_settings_rows(WorkerConfig, worker),
    ]
    return "\n".join(lines) + "\n"


SECTIONS: dict[str, Callable[[], str]] = {"job-record": job_record_table, "settings": settings_table}


# -- pages -----------------------------------------------------------------------------------------


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def render(text: str, where: str = "page") -> str:
    """``text`` with every generated section rewritten."""

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in SECTIONS:
            raise GenDocsError(f"{where}: unknown generated section {name!r} (known: {', '.join(SECTIONS)})")
        return f"{match['open']}{SECTIONS[name]()}{match['close']}"

    return MARKER_RE.sub(replace, text)


def stale_pages(root: Path = ROOT) -> list[Path]:
    """Pages whose generated sections differ from what the code says now."""
    out = []
    for page in pages(root):
        text = page.read_text(encoding="utf-8")
        if render(text, str(page.relative_to(root))) != text:
            out.append(page)
    return out


def sections_in(root: Path = ROOT) -> dict[str, list[Path]]:
    """Which pages hold each generated section."""
    found: dict[str, list[Path]] = {}
    for page in pages(root):
        for match in MARKER_RE.finditer(page.read_text(encoding="utf-8")):
            found.setdefault(match["name"], []).append(page)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page is stale")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this checkout)")
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()
    try:
        stale = stale_pages(root)
        if args.check:
            for page in stale:
                print(f"{page.relative_to(root)}: generated sections are stale; run `{COMMAND}`", file=sys.stderr)
            return 1 if stale else 0
        for page in stale:
            page.write_text(render(page.read_text(encoding="utf-8")), encoding="utf-8")
            print(f"rewrote {page.relative_to(root)}")
    except GenDocsError as err:
        print(f"gendocs: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
