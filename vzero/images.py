"""Image bytes in, RGB Pillow images out: header probing, full decoding with mode normalisation, PNG encoding.

Every image that enters training goes through `decode_rgb`, so the student, the teacher and the view builders all
see the same 8-bit RGB pixels whatever the file stored (grayscale, palette, alpha, CMYK, 16-bit). `probe` reads only
the header, so callers can refuse oversized or unsupported images before paying for (or being attacked by) a full
decode. Knows nothing about Parquet, prompts or boxes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

SUPPORTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})  # what the VLM processors we target accept without surprises
_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, before any pixel is decoded."""

    format: str  # Pillow format name, e.g. "PNG", "JPEG", "WEBP", "GIF"
    width: int
    height: int
    mode: str  # Pillow mode, e.g. "RGB", "L", "I;16", "RGBA", "P", "CMYK"


def probe(data: bytes) -> ImageHeader:
    """Read format, size and mode from the header only (no pixel decode).

    Raises whatever Pillow raises on unreadable bytes (`PIL.UnidentifiedImageError`, `OSError`, ...), and
    `Image.DecompressionBombError` for headers above twice Pillow's own limit; callers map those to reason codes.
    """
    with Image.open(io.BytesIO(data)) as img:
        return ImageHeader(format=img.format or "", width=img.width, height=img.height, mode=img.mode)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header, without decoding pixels."""
    header = probe(data)
    return header.width, header.height


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decode `data` and return an 8-bit RGB image.

    Conversions: 16-bit / 32-bit integer grayscale is scaled to 8 bit (Pillow's own `convert` clips at 255, which turns
    a 16-bit image almost white); alpha (RGBA, LA, PA, P with transparency) is composited over white, because a
    transparent pixel's stored colour is arbitrary (often black) and would show up as garbage; everything else (L, 1,
    P, CMYK, YCbCr, ...) uses Pillow's converter. Multi-frame images (APNG, animated WebP) yield their first frame.
    Truncated or corrupt bytes raise (`OSError` and friends), since `load()` forces the whole decode.
    """
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an already decoded image to 8-bit RGB (see `decode_rgb` for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_bit_depth_to_rgb(img)
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        return to_rgb(img)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale a single-channel 16/32-bit or float image to 8 bit.

    I;16* and I (how Pillow opens 16-bit PNG grayscale) are taken as 16-bit samples: 65535 maps to 255. F is taken
    as [0, 1] floats. Values outside the range are clipped.
    """
    arr = np.asarray(img)
    if img.mode == "F":
        scaled = np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0
    else:
        scaled = np.clip(arr.astype(np.float64), 0.0, 65535.0) / 257.0  # 65535 / 257 == 255 exactly
    gray = Image.fromarray(np.rint(scaled).astype(np.uint8))  # 2-D uint8 -> mode L
    return gray.convert("RGB")


def encode_png(img: Image.Image) -> bytes:
    """Lossless PNG bytes of `img` (deterministic for the same pixels and Pillow/zlib build)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
