"""The image forms of verl / Qwen-VL datasets, resolved to encoded bytes, locally only (used by `import-vzero`).

Accepted forms of one image entry (the authors' loader hands them to qwen-vl-utils' `fetch_image`):
- raw bytes (a `binary` column);
- a string: a local path (relative to the data root), `file://PATH` / `file:PATH`, or a
  `data:image/...;base64,...` URI;
- a dict / struct: the HF `Image` feature `{bytes, path}` (bytes win when non-empty), or `{"image": <any string form
  or bytes>}` / `{"image_url": ...}`, optionally with the image's own `min_pixels` / `max_pixels`.

Refused, each with a reason code (`<f>` = the source column): a remote URL (`http://`, `https://`, `s3://`, any
`scheme://` but `file://`) is never fetched (`import_remote_image:<f>`: this system reads no network); a path that
resolves (symlinks followed) outside the data root (`import_path_outside_root:<f>`); a path that cannot be read or
an entry of another shape (`import_image_unreadable:<f>`); a per-image budget that is not 1 <= min <= max with min
below the import's pixel guard (`import_bad_pixel_budget:<f>`).

A per-image budget is applied here, once: an image outside its own [min_pixels, max_pixels] is resized into it
(bicubic, aspect kept; `vzero.views.resize_to_budget`) and stored as PNG, as the authors' loader resizes it before the
processor; the model's own budget then applies on top at training time, as in theirs. Images whose header cannot be
read, or that exceed the pixel guard, are passed through untouched for `validate_row` to name.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vzero.images import decode_rgb, encode_png, probe
from vzero.views import resize_to_budget

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
RESIZED_NOTE = "image_resized_to_own_budget"


class ImageSourceError(Exception):
    """An image entry that cannot become bytes; carries the reason code."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class ImageSources:
    """The data root (relative paths start there; no path may leave it) and the import's pixel guard."""

    root: Path
    max_pixels: int
    notes: list[str] = field(default_factory=list)  # what was done to accepted images (e.g. resized)

    def __post_init__(self) -> None:
        self.root = self.root.resolve()

    def images(self, value: Any, column: str) -> list[bytes]:
        """Every image of a column value (a list of entries or a single one) as bytes; [] for null / empty."""
        if value is None:
            return []
        items = list(value) if isinstance(value, list | tuple) else [value]
        return [self.image(item, column) for item in items]

    def image(self, item: Any, column: str) -> bytes:
        if isinstance(item, bytes | bytearray | memoryview):
            return bytes(item)
        if isinstance(item, str):
            return self._from_string(item, column)
        if isinstance(item, Mapping):
            data = self._from_dict(item, column)
            return self._own_budget(data, item.get("min_pixels"), item.get("max_pixels"), column)
        raise ImageSourceError(f"import_image_unreadable:{column}")

    def _from_dict(self, item: Mapping[str, Any], column: str) -> bytes:
        data = item.get("bytes")
        if isinstance(data, bytes | bytearray | memoryview) and len(data) > 0:
            return bytes(data)
        for key in ("image", "image_url", "path"):
            value = item.get(key)
            if isinstance(value, bytes | bytearray | memoryview) and len(value) > 0:
                return bytes(value)
            if isinstance(value, str) and value:
                return self._from_string(value, column)
        raise ImageSourceError(f"import_image_unreadable:{column}")

    def _from_string(self, text: str, column: str) -> bytes:
        if text.startswith("data:"):
            _, sep, payload = text.partition("base64,")
            try:
                if not sep:
                    raise ValueError("not base64")
                return base64.b64decode(payload, validate=True)
            except (ValueError, binascii.Error) as e:
                raise ImageSourceError(f"import_image_unreadable:{column}") from e
        if text.startswith("file://"):
            return self._read(text[len("file://") :], column)
        if text.startswith("file:"):
            return self._read(text[len("file:") :], column)
        if _URL.match(text):
            raise ImageSourceError(f"import_remote_image:{column}")
        return self._read(text, column)

    def _read(self, path: str, column: str) -> bytes:
        full = (self.root / path).resolve()  # an absolute `path` replaces the root, then must lie inside it
        if not full.is_relative_to(self.root):
            raise ImageSourceError(f"import_path_outside_root:{column}")
        try:
            return full.read_bytes()
        except OSError as e:
            raise ImageSourceError(f"import_image_unreadable:{column}") from e

    def _own_budget(self, data: bytes, min_pixels: Any, max_pixels: Any, column: str) -> bytes:
        if min_pixels is None and max_pixels is None:
            return data
        lo = 0 if min_pixels is None else min_pixels
        hi = max(self.max_pixels, lo) if max_pixels is None else max_pixels
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi))
        if not ints or lo < 0 or hi < 1 or lo > hi or lo > self.max_pixels:
            raise ImageSourceError(f"import_bad_pixel_budget:{column}")
        try:
            header = probe(data)
        except Exception:  # unreadable: validate_row names it
            return data
        if header.width * header.height > self.max_pixels:  # refused before decoding by validate_row
            return data
        img = decode_rgb(data)
        resized = resize_to_budget(img, min_pixels=lo, max_pixels=hi)
        if resized.size == img.size:
            return data
        self.notes.append(RESIZED_NOTE)
        return encode_png(resized)
