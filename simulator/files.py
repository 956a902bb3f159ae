"""The Files API of the Gemini API, as google-genai 3.6.1 calls it: a resumable upload, get, list, delete
and download. Batch jobs read their JSONL source from here and write their responses file here.

Files live in memory, per simulator, until deleted or ``POST /_sim/reset``. What is copied from the real
service and what is only modelled is in docs/gemini-wire.md ("Batch API and Files API").
"""

from __future__ import annotations

import base64
import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from simulator import wire
from simulator.config import SimStats
from simulator.request import field_of

UPLOADED = "UPLOADED"
GENERATED = "GENERATED"
FILE_TTL_S = 48 * 3600.0  # uploaded and generated files are kept 48 h
UPLOAD_GRANULARITY = 8 * 1024 * 1024  # the SDK uploads in 8 MiB chunks
DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 100
ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
UPLOAD_STATUS = "X-Goog-Upload-Status"

#: A request's credential check: True if it carries an API key (counted by the simulator).
Authorize = Callable[[web.Request], bool]


def rfc3339(epoch_s: float) -> str:
    """``2026-12-03T10:15:02.123456Z``, as the API writes timestamps."""
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id(rng: random.Random, length: int = 12) -> str:
    return "".join(rng.choice(ID_ALPHABET) for _ in range(length))


@dataclass
class StoredFile:
    file_id: str
    mime_type: str
    data: bytes
    source: str  # UPLOADED or GENERATED
    display_name: str | None = None
    created_s: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return f"files/{self.file_id}"

    def resource(self, origin: str, version: str) -> dict[str, Any]:
        """The File resource as files.get answers it (sizeBytes is an int64, so a string)."""
        digest = hashlib.sha256(self.data).hexdigest()
        out: dict[str, Any] = {
            "name": self.name,
            "mimeType": self.mime_type,
            "sizeBytes": str(len(self.data)),
            "createTime": rfc3339(self.created_s),
            "updateTime": rfc3339(self.created_s),
            "expirationTime": rfc3339(self.created_s + FILE_TTL_S),
            "sha256Hash": base64.b64encode(digest.encode("ascii")).decode("ascii"),
            "uri": f"{origin}/{version}/{self.name}",
            "state": "ACTIVE",
            "source": self.source,
        }
        if self.display_name is not None:
            out["displayName"] = self.display_name
        if self.source == GENERATED:
            out["downloadUri"] = f"{origin}/download/{version}/{self.name}:download?alt=media"
        return out


@dataclass
class _Upload:
    file_id: str
    mime_type: str
    display_name: str | None
    declared_size: int | None
    data: bytearray = field(default_factory=bytearray)


def _file_not_found(file_id: str) -> dict[str, Any]:
    message = f"You do not have permission to access the File {file_id} or it may not exist."
    return wire.error_body(403, "PERMISSION_DENIED", message)


def _declared_size(raw: str | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


class FileStore:
    """The files and the upload sessions in progress; also serves the Files API routes."""

    def __init__(self, authorize: Authorize, stats: SimStats, rng: random.Random) -> None:
        self._authorize = authorize
        self._stats = stats
        self._rng = rng
        self.files: dict[str, StoredFile] = {}
        self._uploads: dict[str, _Upload] = {}

    def clear(self) -> None:
        self.files.clear()
        self._uploads.clear()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/upload/{version}/files", self._upload)
        # the SDK downloads from /{version}/files/{id}:download; a File's downloadUri says /download/{version}/...
        app.router.add_get("/download/{version}/files/{file_id}:download", self._download)
        app.router.add_get("/{version}/files/{file_id}:download", self._download)
        app.router.add_get("/{version}/files/{file_id}", self._get)
        app.router.add_delete("/{version}/files/{file_id}", self._delete)
        app.router.add_get("/{version}/files", self._list)

    def add(self, data: bytes, mime_type: str, source: str, display_name: str | None = None) -> StoredFile:
        stored = StoredFile(self._fresh_id(), mime_type, data, source, display_name)
        self.files[stored.file_id] = stored
        return stored

    def lookup(self, name: str) -> StoredFile | None:
        """The file named ``files/ID`` (or ``ID``)."""
        return self.files.get(name.removeprefix("files/"))

    def _fresh_id(self) -> str:
        while True:
            file_id = new_id(self._rng)
            if file_id not in self.files and file_id not in {u.file_id for u in self._uploads.values()}:
                return file_id

    # ---- upload --------------------------------------------------------------------------------
    async def _upload(self, request: web.Request) -> web.Response:
        upload_id = request.query.get("upload_id")
        if upload_id is not None:
            return await self._upload_chunk(request, upload_id)
        if not self._authorize(request):
            return web.json_response(wire.permission_denied(), status=403)
        protocol = request.headers.get("X-Goog-Upload-Protocol", "").lower()
        command = request.headers.get("X-Goog-Upload-Command", "").lower()
        if protocol != "resumable" or command != "start":
            message = "Simulator: only the resumable upload protocol is served (X-Goog-Upload-Command: start)."
            return web.json_response(wire.invalid_argument(message), status=400)
        try:
            body = await request.json() if await request.read() else {}
        except ValueError:
            return web.json_response(wire.invalid_argument("Invalid JSON payload received."), status=400)
        meta = body.get("file") if isinstance(body, dict) else None
        meta = meta if isinstance(meta, dict) else {}
        # google-genai 3.6.1 sends the File's fields in snake_case (mime_type, display_name); accept both
        mime = field_of(meta, "mimeType", "mime_type") or request.headers.get("X-Goog-Upload-Header-Content-Type")
        if not isinstance(mime, str) or not mime:
            return web.json_response(wire.invalid_argument("Simulator: the file has no mime type."), status=400)
        file_id = self._fresh_id()
        wanted = meta.get("name")
        if isinstance(wanted, str) and wanted.removeprefix("files/"):
            file_id = wanted.removeprefix("files/")
            if file_id in self.files:
                message = f"File {file_id} already exists."
                return web.json_response(wire.error_body(409, "ALREADY_EXISTS", message), status=409)
        display = field_of(meta, "displayName", "display_name")
        size = _declared_size(request.headers.get("X-Goog-Upload-Header-Content-Length"))
        upload_id = new_id(self._rng, 32)
        self._uploads[upload_id] = _Upload(file_id, mime, display if isinstance(display, str) else None, size)
        version = request.match_info["version"]
        url = f"{request.url.origin()}/upload/{version}/files?upload_id={upload_id}&upload_protocol=resumable"
        headers = {"X-Goog-Upload-URL": url, UPLOAD_STATUS: "active",
                   "X-Goog-Upload-Chunk-Granularity": str(UPLOAD_GRANULARITY)}
        return web.Response(status=200, headers=headers)

    async def _upload_chunk(self, request: web.Request, upload_id: str) -> web.Response:
        """``X-Goog-Upload-Command: upload`` (more to come) or ``upload, finalize`` (the last chunk)."""
        final = {UPLOAD_STATUS: "final"}  # an error ends the session: the SDK stops and raises
        upload = self._uploads.get(upload_id)
        if upload is None:
            body = wire.error_body(404, "NOT_FOUND", "Simulator: no upload session with this upload_id.")
            return web.json_response(body, status=404, headers=final)
        commands = {part.strip() for part in request.headers.get("X-Goog-Upload-Command", "").lower().split(",")}
        offset = _declared_size(request.headers.get("X-Goog-Upload-Offset"))
        chunk = await request.read()
        if "upload" not in commands or offset != len(upload.data):
            del self._uploads[upload_id]
            message = f"Simulator: expected X-Goog-Upload-Command: upload at X-Goog-Upload-Offset {len(upload.data)}."
            return web.json_response(wire.invalid_argument(message), status=400, headers=final)
        upload.data.extend(chunk)
        if "finalize" not in commands:
            return web.Response(status=200, headers={UPLOAD_STATUS: "active"})
        del self._uploads[upload_id]
        if upload.declared_size is not None and upload.declared_size != len(upload.data):
            message = f"Simulator: {len(upload.data)} bytes uploaded, {upload.declared_size} declared."
            return web.json_response(wire.invalid_argument(message), status=400, headers=final)
        stored = StoredFile(upload.file_id, upload.mime_type, bytes(upload.data), UPLOADED, upload.display_name)
        self.files[stored.file_id] = stored
        self._stats.files_uploaded += 1
        resource = stored.resource(str(request.url.origin()), request.match_info["version"])
        return web.json_response({"file": resource}, headers=final)

    # ---- get, list, delete, download -------------------------------------------------------------
    async def _get(self, request: web.Request) -> web.Response:
        if not self._authorize(request):
            return web.json_response(wire.permission_denied(), status=403)
        stored = self.files.get(request.match_info["file_id"])
        if stored is None:
            return web.json_response(_file_not_found(request.match_info["file_id"]), status=403)
        return web.json_response(stored.resource(str(request.url.origin()), request.match_info["version"]))

    async def _delete(self, request: web.Request) -> web.Response:
        if not self._authorize(request):
            return web.json_response(wire.permission_denied(), status=403)
        if self.files.pop(request.match_info["file_id"], None) is None:
            return web.json_response(_file_not_found(request.match_info["file_id"]), status=403)
        return web.json_response({})

    async def _list(self, request: web.Request) -> web.Response:
        if not self._authorize(request):
            return web.json_response(wire.permission_denied(), status=403)
        origin, version = str(request.url.origin()), request.match_info["version"]
        newest_first = sorted(self.files.values(), key=lambda f: f.created_s, reverse=True)
        page, token = page_of([f.file_id for f in newest_first], request.query)
        if page is None:
            return web.json_response(wire.invalid_argument("Invalid page token."), status=400)
        body: dict[str, Any] = {"files": [self.files[file_id].resource(origin, version) for file_id in page]}
        if token is not None:
            body["nextPageToken"] = token
        return web.json_response(body)

    async def _download(self, request: web.Request) -> web.Response:
        """The bytes of a GENERATED file (a batch's responses); an uploaded one cannot be downloaded."""
        if not self._authorize(request):
            return web.json_response(wire.permission_denied(), status=403)
        file_id = request.match_info["file_id"]
        stored = self.files.get(file_id)
        if stored is None:
            return web.json_response(_file_not_found(file_id), status=403)
        if stored.source != GENERATED:
            message = "Only generated files can be downloaded; files created by upload cannot."
            return web.json_response(wire.invalid_argument(message), status=400)
        return web.Response(body=stored.data, content_type=stored.mime_type)


def page_of(ids: list[str], query: Any) -> tuple[list[str] | None, str | None]:
    """(the page of `ids` that ``pageSize``/``pageToken`` ask for, the next page token); (None, None) for a
    token that names nothing. The token is the id the next page starts at."""
    try:
        size = int(query.get("pageSize", DEFAULT_PAGE_SIZE))
    except ValueError:
        size = DEFAULT_PAGE_SIZE
    size = min(MAX_PAGE_SIZE, size) if size > 0 else DEFAULT_PAGE_SIZE
    start = 0
    token = query.get("pageToken")
    if token:
        if token not in ids:
            return None, None
        start = ids.index(token)
    page = ids[start : start + size]
    after = start + size
    return page, ids[after] if after < len(ids) else None
