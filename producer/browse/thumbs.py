"""Thumbnails of a job's inputs, made on demand from storage, bounded and cached."""

from __future__ import annotations

import threading
from collections import OrderedDict
from io import BytesIO

from PIL import Image, ImageOps, UnidentifiedImageError

from labelmill.errors import LabelmillError
from labelmill.storage import ObjectStore

SIZE = 256  # the longest side, in pixels
CACHED = 2048  # thumbnails kept (about 15 kB each)


class Thumbnails:
    """JPEG thumbnails by URI, the newest ``CACHED`` kept in memory."""

    def __init__(self, storage: ObjectStore, *, max_bytes: int, max_pixels: int) -> None:
        self.storage = storage
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self._cache: OrderedDict[str, bytes | None] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, uri: str) -> bytes | None:
        """The thumbnail of ``uri``; None when it cannot be read or is no image."""
        with self._lock:
            if uri in self._cache:
                self._cache.move_to_end(uri)
                return self._cache[uri]
        made = self._make(uri)
        with self._lock:
            self._cache[uri] = made
            while len(self._cache) > CACHED:
                self._cache.popitem(last=False)
        return made

    def _make(self, uri: str) -> bytes | None:
        try:
            data, _etag = self.storage.get(uri, max_bytes=self.max_bytes)
        except LabelmillError:
            return None
        try:
            with Image.open(BytesIO(data)) as im:
                if im.width * im.height > self.max_pixels:  # read from the header only
                    return None
                im.draft("RGB", (SIZE, SIZE))  # JPEG: decode at 1/2 to 1/8 scale
                small = ImageOps.exif_transpose(im).convert("RGB")
                small.thumbnail((SIZE, SIZE))
                out = BytesIO()
                small.save(out, "JPEG", quality=80)
                return out.getvalue()
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            return None
