"""What a producer needs to know: where Redis is, which queue, and the limits of a request.

Precedence: explicit argument > environment variable > default. Environment variables are the field
names in capitals behind ``FLEXQ_`` (``FLEXQ_QUEUE``), except ``REDIS_URL``. Secrets are
``SecretStr``, so a repr, a log line or an exception never shows them. The worker's settings
(``worker.config.WorkerConfig``) extend these; docs/configuration.md lists both, generated from
the models.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.errors import database_of, first_error

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
ENV_PREFIX = "FLEXQ_"
REDACT_HOOK_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


class ProducerSettings(BaseSettings):
    """Settings of producers and the admin commands, read from the environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True, hide_input_in_errors=True,
        env_ignore_empty=True,
    )

    redis_url: SecretStr = Field(
        default=SecretStr(DEFAULT_REDIS_URL), validation_alias=AliasChoices("REDIS_URL", "redis_url"),
        description="the Redis that holds the jobs: `redis://`, `rediss://` (TLS) or `unix://`; a password in it is "
        "never shown",
    )
    queue: str = Field(
        default="flexq", pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="queue name, the prefix of flexq's Redis keys; producers and workers must agree on it",
    )
    max_request_bytes: int = Field(
        default=8 * 1024 * 1024, gt=0, description="largest request accepted at enqueue, as JSON, in bytes"
    )
    retention_s: int = Field(
        default=7 * 24 * 3600, gt=0, description="seconds an ended job's record is kept after its last change"
    )
    deadline_s: float = Field(
        default=24 * 3600.0, gt=0, allow_inf_nan=False,
        description="seconds from enqueue to a job's deadline (its retry budget) when the producer gives none",
    )
    batch_after_s: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="a job enqueued without a tier whose deadline is at least this many seconds away goes to the "
        "`batch` tier (the Gemini Batch API, half price, up to 24 h) instead of flex; unset: never (e.g. `172800`)",
    )

    blob_store: str = Field(
        default="redis",
        description="where image bytes and inline data live, apart from records: `redis`, or `file:///DIR` "
        "(a directory every producer and worker shares)",
    )
    max_blob_bytes: int = Field(
        default=20 * 1024 * 1024, gt=0, description="largest inline part (an image, a PDF) accepted, in bytes"
    )
    max_job_blob_bytes: int = Field(
        default=64 * 1024 * 1024, gt=0, description="largest total of distinct inline parts in one request, in bytes"
    )
    cache: bool = Field(
        default=False,
        description="every job this producer enqueues opts in to the response cache (a job's own `cache` wins)",
    )
    events_maxlen: int = Field(
        default=100_000, ge=0,
        description="job events kept in the queue's event stream (about; oldest trimmed first); 0: no events",
    )
    redact: str | None = Field(
        default=None,
        description="redact every request at enqueue, before it is stored or sent: `builtin` (e-mail addresses, "
        "phone and card numbers), or `module:function`, a callable `(text: str) -> str` imported once; unset: off "
        "([redaction](producer-api.md#redaction))",
    )

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr) -> SecretStr:
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in {"redis", "rediss", "unix"}:
            raise ValueError(f"REDIS_URL must start with redis://, rediss:// or unix:// (got {parts.scheme!r}://)")
        database = parts.path.strip("/") if parts.scheme != "unix" else ""
        if database and not database.isdigit():
            raise ValueError(f"the database must be a number such as /0 (got /{database})")
        return value

    @field_validator("redact")
    @classmethod
    def _check_redact(cls, value: str | None) -> str | None:
        value = (value or "").strip()
        if value and value != "builtin" and not REDACT_HOOK_RE.fullmatch(value):
            raise ValueError("must be unset, 'builtin', or 'module:function' naming a callable (text: str) -> str")
        return value or None

    @property
    def redis_url_redacted(self) -> str:
        """The Redis URL with any password replaced, safe for logs and error messages."""
        return redact_url(self.redis_url.get_secret_value())

    @property
    def redis_location(self) -> str:
        """The redacted Redis URL, with the database spelled out when the URL leaves it implicit (0)."""
        url = self.redis_url_redacted
        parts = urlsplit(url)
        if parts.scheme != "unix" and parts.path.strip("/").isdigit():
            return url
        return f"{url} (database {database_of(url)})"

    @property
    def searched(self) -> str:
        """Where this producer looks for jobs: ``queue 'flexq' on redis://host:6379/0`` (redacted)."""
        return f"queue {self.queue!r} on {self.redis_location}"


def env_name(model: type[BaseSettings], field: str) -> str:
    """The environment variable a settings field is read from (its first alias, else the prefix + name)."""
    info = model.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        return first if isinstance(first, str) else field
    prefix = str(model.model_config.get("env_prefix") or "")
    return (prefix + field).upper()


def settings_error(err: Exception, model: type[BaseSettings]) -> str:
    """A settings error (pydantic's, or pydantic-settings' for a value that is not JSON where JSON
    is expected) as one line that names the environment variable to fix."""
    if not isinstance(err, ValidationError):
        match = re.search(r'field "([^"]+)"', str(err))
        field = match.group(1) if match else ""
        name = env_name(model, field) if field in model.model_fields else field
        return f"bad configuration: {name}: not valid JSON" if name else f"bad configuration: {err}"
    loc, message, _ = first_error(err)
    field, _, rest = loc.partition(".")
    name = env_name(model, field) if field in model.model_fields else field
    where = f"{name}.{rest}" if rest else name
    return f"bad configuration: {where}: {message}" if where else f"bad configuration: {message}"


def redact_url(url: str) -> str:
    """Replace the user and password (in the authority or a ``password=`` query) with ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    base, qmark, query = rest.partition("?")
    authority, slash, path = base.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    if query:
        query = "&".join(
            f"{key}=***" if key.lower() in {"password", "username", "user"} else f"{key}{eq}{value}"
            for key, eq, value in (item.partition("=") for item in query.split("&"))
        )
    return f"{scheme}://{authority}{slash}{path}{qmark}{query}"
