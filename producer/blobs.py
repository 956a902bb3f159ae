"""Blobs (image bytes, inline data) stored apart from job records, content-addressed by sha256.

A record never holds inline bytes: a part's ``inline_data`` keeps its ``mime_type`` and a
``blob_sha256`` reference; the bytes live once per distinct content in the blob store, however many
jobs refer to them. ``fill`` puts the bytes back (``types.Content.model_validate`` then works).

The store is a setting (``FLEXQ_BLOB_STORE``): ``redis`` (the default: keys ``{queue}:blob:{sha256}``
whose TTL only ever grows, to cover the longest-lived job that refers to them) or ``file:///DIR``
(a directory shared by the fleet; a file's mtime is its expiry time, ``sweep`` deletes expired ones).
Any object with ``put``/``get``/``touch`` can stand in (an object store, say).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from producer.errors import BlobMissingError, ConfigError, InvalidRequestError

#: The key a stored part's ``inline_data`` carries instead of ``data``.
REF = "blob_sha256"
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_INLINE_KEYS = ("inline_data", "inlineData")


@dataclass(frozen=True)
class Blob:
    sha256: str
    data: bytes
    mime_type: str

    @classmethod
    def of(cls, data: bytes, mime_type: str) -> Blob:
        return cls(hashlib.sha256(data).hexdigest(), data, mime_type)


class BlobStore(Protocol):
    async def put(self, blobs: Iterable[Blob], *, ttl_s: int) -> None:
        """Store each blob (once per sha256) and make it live at least ``ttl_s`` more seconds."""

    async def get(self, sha256: str) -> bytes | None:
        """The bytes, or None when the blob is gone (expired or never stored)."""

    async def touch(self, shas: Iterable[str], *, ttl_s: int) -> None:
        """Make each blob live at least ``ttl_s`` more seconds (never shortens a life)."""


# -- pure: take inline bytes out of contents, list references, put bytes back ------------------------


def _decode(data: Any, where: str) -> bytes:
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    if not isinstance(data, str):
        raise InvalidRequestError(f"{where}.data: must be base64 text", field=where)
    try:
        padded = data + "=" * (-len(data) % 4)
        if "-" in data or "_" in data:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{where}.data: is not valid base64", field=where) from None


def strip_inline(
    contents: list[dict[str, Any]], *, where: str = "contents", max_part_bytes: int | None = None,
    max_total_bytes: int | None = None,
) -> tuple[list[dict[str, Any]], list[Blob]]:
    """Contents with every inline ``data`` replaced by a ``blob_sha256`` reference, and the blobs.

    Raises ``InvalidRequestError`` naming the part when one is over ``max_part_bytes`` or all of
    them together are over ``max_total_bytes``.
    """
    out: list[dict[str, Any]] = []
    blobs: dict[str, Blob] = {}
    total = 0
    for c_index, content in enumerate(contents):
        parts = content.get("parts")
        if not isinstance(parts, list):
            out.append(content)
            continue
        new_parts: list[Any] = []
        for p_index, part in enumerate(parts):
            key = next((k for k in _INLINE_KEYS if isinstance(part, dict) and isinstance(part.get(k), dict)), None)
            if key is None or part[key].get("data") is None:
                new_parts.append(part)
                continue
            here = f"{where}[{c_index}].parts[{p_index}].inline_data"
            inline = part[key]
            mime = str(inline.get("mime_type") or inline.get("mimeType") or "application/octet-stream")
            data = _decode(inline["data"], here)
            if max_part_bytes is not None and len(data) > max_part_bytes:
                raise InvalidRequestError(
                    f"{here}: {len(data)} bytes is over the {max_part_bytes}-byte limit per part "
                    "(FLEXQ_MAX_BLOB_BYTES)", field=here,
                )
            blob = Blob.of(data, mime)
            if blob.sha256 not in blobs:
                total += len(data)
            blobs[blob.sha256] = blob
            if max_total_bytes is not None and total > max_total_bytes:
                raise InvalidRequestError(
                    f"{where}: inline data of {total} bytes is over the {max_total_bytes}-byte limit per job "
                    "(FLEXQ_MAX_JOB_BLOB_BYTES)", field=where,
                )
            ref = {k: v for k, v in inline.items() if k not in ("data", "mimeType")}
            ref["mime_type"] = mime
            ref[REF] = blob.sha256
            new_parts.append({**{k: v for k, v in part.items() if k != key}, "inline_data": ref})
        out.append({**content, "parts": new_parts})
    return out, list(blobs.values())


def _refs_in(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        ref = value.get(REF)
        if isinstance(ref, str) and _SHA_RE.fullmatch(ref):
            yield ref
        for item in value.values():
            yield from _refs_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from _refs_in(item)


def refs(*values: Any) -> set[str]:
    """Every blob reference anywhere in ``values`` (contents, a request dict, a result dict)."""
    return {sha for value in values for sha in _refs_in(value)}


def fill_with(value: Any, found: dict[str, bytes]) -> Any:
    """A copy of ``value`` with every reference replaced by its bytes (``found``: sha256 -> bytes)."""
    if isinstance(value, dict):
        ref = value.get(REF)
        if isinstance(ref, str) and ref in found:
            return {**{k: v for k, v in value.items() if k != REF}, "data": found[ref]}
        return {k: fill_with(v, found) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_with(item, found) for item in value]
    return value


async def fill(value: Any, store: BlobStore) -> Any:
    """``value`` with its blobs' bytes put back; ``BlobMissingError`` if one is gone."""
    found: dict[str, bytes] = {}
    for sha in sorted(refs(value)):
        data = await store.get(sha)
        if data is None:
            raise BlobMissingError(sha)
        found[sha] = data
    return fill_with(value, found) if found else value


def extension(mime_type: str) -> str:
    """A file extension for a MIME type: ``.png``, ``.jpg``...; ``.bin`` when unknown."""
    known = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/gif": ".gif"}
    if mime_type in known:
        return known[mime_type]
    import mimetypes

    return mimetypes.guess_extension(mime_type) or ".bin"


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, JPEG, GIF or WebP image from its header; None if unknown."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and data[12:16] == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
        i += 2 + length
    return None


# -- stores ------------------------------------------------------------------------------------------


class RedisBlobStore:
    """Blobs as Redis strings ``{queue}:blob:{sha256}``; a TTL is only ever extended (``EXPIRE GT``)."""

    def __init__(self, redis: Any, *, queue: str) -> None:
        self.redis = redis
        self.prefix = f"{queue}:blob:"

    async def put(self, blobs: Iterable[Blob], *, ttl_s: int) -> None:
        items = list(blobs)
        if not items:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for blob in items:
                pipe.set(self.prefix + blob.sha256, blob.data, nx=True, ex=ttl_s)
                pipe.expire(self.prefix + blob.sha256, ttl_s, gt=True)
            await pipe.execute()

    async def get(self, sha256: str) -> bytes | None:
        data = await self.redis.get(self.prefix + sha256)
        return bytes(data) if data is not None else None

    async def touch(self, shas: Iterable[str], *, ttl_s: int) -> None:
        keys = sorted(set(shas))
        if not keys:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for sha in keys:
                pipe.expire(self.prefix + sha, ttl_s, gt=True)
            await pipe.execute()


class FileBlobStore:
    """Blobs as files ``DIR/ab/abcdef…`` (written atomically); a file's mtime is when it expires."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, sha256: str) -> Path:
        if not _SHA_RE.fullmatch(sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def _extend(self, path: Path, expires_s: float) -> None:
        try:
            if path.stat().st_mtime < expires_s:
                os.utime(path, (expires_s, expires_s))
        except FileNotFoundError:
            pass

    def _put(self, blobs: list[Blob], ttl_s: int) -> None:
        expires_s = time.time() + ttl_s
        for blob in blobs:
            path = self._path(blob.sha256)
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
                with os.fdopen(fd, "wb") as out:
                    out.write(blob.data)
                os.utime(tmp, (expires_s, expires_s))
                os.replace(tmp, path)
            self._extend(path, expires_s)

    def _get(self, sha256: str) -> bytes | None:
        path = self._path(sha256)
        try:
            if path.stat().st_mtime < time.time():
                return None
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def _touch(self, shas: set[str], ttl_s: int) -> None:
        expires_s = time.time() + ttl_s
        for sha in shas:
            self._extend(self._path(sha), expires_s)

    async def put(self, blobs: Iterable[Blob], *, ttl_s: int) -> None:
        await asyncio.to_thread(self._put, list(blobs), ttl_s)

    async def get(self, sha256: str) -> bytes | None:
        return await asyncio.to_thread(self._get, sha256)

    async def touch(self, shas: Iterable[str], *, ttl_s: int) -> None:
        await asyncio.to_thread(self._touch, set(shas), ttl_s)

    def sweep(self) -> int:
        """Delete expired blobs; the number deleted."""
        now = time.time()
        gone = 0
        for path in self.root.glob("??/*"):
            try:
                if path.stat().st_mtime < now:
                    path.unlink()
                    gone += 1
            except FileNotFoundError:
                continue
        return gone


def open_blob_store(spec: str, *, redis: Any, queue: str) -> BlobStore:
    """The store named by ``FLEXQ_BLOB_STORE``: ``redis`` or ``file:///DIR``."""
    if spec == "redis":
        return RedisBlobStore(redis, queue=queue)
    if spec.startswith("file://"):
        root = Path(spec.removeprefix("file://"))
        if not root.is_absolute():
            raise ConfigError(f"FLEXQ_BLOB_STORE: {spec!r} must be file:///an/absolute/path")
        return FileBlobStore(root)
    raise ConfigError(f"FLEXQ_BLOB_STORE: {spec!r} is neither 'redis' nor 'file:///DIR'")
