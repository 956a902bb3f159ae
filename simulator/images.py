"""Images for image models: real PNG bytes (stdlib only), sized the way `imageConfig` asks.

The picture is a vertical gradient, the same for every request of one size: each row is one
colour, written with PNG's "Sub" filter, so even a 4096 x 4096 image compresses to a few tens of
kilobytes and is built once per size (cached).
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from simulator.request import BadRequest, ParsedRequest, field_of

IMAGE_SIZES: dict[str, int] = {"1K": 1024, "2K": 2048, "4K": 4096}
DEFAULT_SIZE = "1K"
DEFAULT_ASPECT = "1:1"
MAX_REFERENCE_IMAGES = 14
MAX_RATIO = 8.0  # the widest the simulator accepts, 8:1 or 1:8
FLASH_IMAGE_TOKENS = 1290  # gemini-2.5-flash-image (and older image models): one image
GEMINI3_IMAGE_TOKENS: dict[str, int] = {"1K": 1120, "2K": 1120, "4K": 2000}
MIME_TYPE = "image/png"  # always PNG bytes, whatever imageConfig.outputMimeType asks
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ASPECT_RE = re.compile(r"\s*(\d{1,3})\s*:\s*(\d{1,3})\s*")


def is_image_model(model: str) -> bool:
    return "-image" in model


def is_gemini3(model: str) -> bool:
    return model.startswith("gemini-3")


@dataclass(frozen=True)
class ImageSpec:
    """What an image request asks for."""

    width: int
    height: int
    size: str  # "1K" | "2K" | "4K"
    tokens: int  # output tokens billed for one image
    wants_text: bool  # responseModalities absent or holding TEXT: a short text part comes first
    wants_image: bool  # responseModalities absent or holding IMAGE


def _generation_config(req: ParsedRequest) -> dict[str, Any]:
    gen = field_of(req.body, "generationConfig", "generation_config")
    return gen if isinstance(gen, dict) else {}


def _image_config(gen: dict[str, Any]) -> dict[str, Any]:
    config = field_of(gen, "imageConfig", "image_config")
    return config if isinstance(config, dict) else {}


def modalities(req: ParsedRequest) -> set[str]:
    """The upper-cased `responseModalities` of a request (empty: not given)."""
    raw = field_of(_generation_config(req), "responseModalities", "response_modalities")
    if not isinstance(raw, list):
        return set()
    return {str(item).upper() for item in raw}


def _size_label(model: str, config: dict[str, Any]) -> str:
    raw = field_of(config, "imageSize", "image_size")
    if raw is None or not is_gemini3(model):
        return DEFAULT_SIZE  # gemini-2.5-flash-image has one size
    label = str(raw).strip().upper()
    if label not in IMAGE_SIZES:
        choices = ", ".join(IMAGE_SIZES)
        raise BadRequest(
            f"Invalid image size {raw!r}: supported sizes are {choices}.",
            field="generation_config.image_config.image_size",
        )
    return label


def _dimensions(long_side: int, aspect: str) -> tuple[int, int]:
    match = _ASPECT_RE.fullmatch(aspect)
    across, down = (int(match[1]), int(match[2])) if match else (0, 0)
    if not across or not down or max(across / down, down / across) > MAX_RATIO:
        raise BadRequest(
            f"Invalid aspect ratio {aspect!r}: use W:H such as 1:1, 16:9 or 9:16 (at most {MAX_RATIO:g}:1).",
            field="generation_config.image_config.aspect_ratio",
        )
    if across >= down:
        return long_side, max(1, round(long_side * down / across))
    return max(1, round(long_side * across / down)), long_side


def reference_images(req: ParsedRequest) -> int:
    """Inline images sent by the user (model turns' own images are not references)."""
    contents = req.body.get("contents")
    contents = [contents] if isinstance(contents, dict) else contents
    count = 0
    for content in contents if isinstance(contents, list) else []:
        if not isinstance(content, dict) or content.get("role", "user") == "model":
            continue
        parts = content.get("parts")
        for part in parts if isinstance(parts, list) else []:
            if isinstance(part, dict) and field_of(part, "inlineData", "inline_data") is not None:
                count += 1
    return count


def image_spec(model: str, req: ParsedRequest) -> ImageSpec:
    """Read imageConfig and responseModalities; BadRequest for a size or ratio the API would refuse."""
    references = reference_images(req)
    if references > MAX_REFERENCE_IMAGES:
        raise BadRequest(f"Too many input images: {references}; an image model takes at most {MAX_REFERENCE_IMAGES}.")
    config = _image_config(_generation_config(req))
    size = _size_label(model, config)
    aspect = field_of(config, "aspectRatio", "aspect_ratio")
    width, height = _dimensions(IMAGE_SIZES[size], DEFAULT_ASPECT if aspect is None else str(aspect))
    tokens = GEMINI3_IMAGE_TOKENS[size] if is_gemini3(model) else FLASH_IMAGE_TOKENS
    wanted = modalities(req)
    return ImageSpec(
        width=width,
        height=height,
        size=size,
        tokens=tokens,
        wants_text=not wanted or "TEXT" in wanted,
        wants_image=not wanted or "IMAGE" in wanted,
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@lru_cache(maxsize=32)
def png_bytes(width: int, height: int) -> bytes:
    """A valid RGB PNG of width x height: a top-to-bottom gradient from blue to orange."""
    compressor = zlib.compressobj(6)
    tail = bytes(3 * (width - 1))  # Sub filter: every pixel after the first equals its left neighbour
    idat = bytearray()
    for row in range(height):
        t = row / max(1, height - 1)
        colour = bytes((round(30 + 220 * t), round(90 + 60 * t), round(200 - 170 * t)))
        idat += compressor.compress(b"\x01" + colour + tail)
    idat += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", bytes(idat)) + _chunk(b"IEND", b"")
