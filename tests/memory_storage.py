"""An in-memory storage backend, for unit tests only, behind the real :class:`Storage`.

``memory_storage()`` gives a ``Storage`` whose S3 and file backends are one
:class:`MemoryObjects`: the policy, URI parsing and error mapping in front
are the real ones; only the bytes live in a dict. ``fail(uri, exc)`` makes
the next calls on ``uri`` raise ``exc``, to exercise retries without a
server.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from collections.abc import Callable, Iterator

from labelmill.errors import ImageError
from labelmill.settings import Settings
from labelmill.storage import Location, ObjectInfo, Storage, normalise_uri


class MemoryObjects:
    """Objects in a dict keyed by normalised URI."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.content_types: dict[str, str] = {}
        self._failures: dict[str, list[BaseException]] = {}
        self._lock = threading.Lock()

    def fail(self, uri: str, exc: BaseException, *, times: int = 1) -> None:
        """Make the next ``times`` get/read/put calls on ``uri`` raise ``exc``."""
        with self._lock:
            self._failures.setdefault(normalise_uri(uri), []).extend([exc] * times)

    def _maybe_fail(self, uri: str) -> None:
        with self._lock:
            pending = self._failures.get(uri)
            exc = pending.pop(0) if pending else None
        if exc is not None:
            raise exc

    @staticmethod
    def _etag(data: bytes) -> str:
        return hashlib.md5(data, usedforsecurity=False).hexdigest()

    def list(self, prefix: Location, after: Location | None) -> Iterator[ObjectInfo]:
        """Objects whose URI starts with the prefix, in order (a snapshot)."""
        start = prefix.uri
        with self._lock:
            is_dir = any(k.startswith(start + "/") for k in self.objects)
            if prefix.scheme == "file" and not start.endswith("/") and is_dir:
                start += "/"  # a directory, as the local backend treats it
            keys = sorted(k for k in self.objects if k.startswith(start))
            snapshot = [(k, self.objects[k]) for k in keys]
        first = bisect.bisect_right(keys, after.uri) if after is not None else 0
        return iter([ObjectInfo(k, len(v), self._etag(v)) for k, v in snapshot[first:]])

    def folders(self, parent: Location) -> Iterator[str]:
        with self._lock:
            below = [k[len(parent.uri) :] for k in self.objects if k.startswith(parent.uri)]
        return iter(sorted({rest.split("/")[0] for rest in below if "/" in rest}))

    def get(
        self,
        loc: Location,
        max_bytes: int,
        admit: Callable[[int], None] | None = None,
        if_match: str | None = None,
    ) -> tuple[bytes, str | None]:
        self._maybe_fail(loc.uri)
        with self._lock:
            data = self.objects.get(loc.uri)
        if data is None:
            raise ImageError("not_found", f"{loc.uri} does not exist")
        if if_match is not None and self._etag(data) != if_match:
            raise ImageError.changed(loc.uri, if_match, self._etag(data))
        if len(data) > max_bytes:
            raise ImageError(
                "too_large", f"{loc.uri} has {len(data)} bytes, over the cap {max_bytes}"
            )
        if admit is not None:
            admit(len(data))
        return data, self._etag(data)

    def read(self, loc: Location) -> bytes | None:
        self._maybe_fail(loc.uri)
        with self._lock:
            return self.objects.get(loc.uri)

    def put(self, loc: Location, data: bytes, content_type: str, root: Location | None) -> None:
        self._maybe_fail(loc.uri)
        with self._lock:
            self.objects[loc.uri] = bytes(data)
            self.content_types[loc.uri] = content_type

    def exists(self, loc: Location) -> bool:
        with self._lock:
            return loc.uri in self.objects

    def delete(self, loc: Location) -> None:
        with self._lock:
            self.objects.pop(loc.uri, None)

    def check_access(self, loc: Location, write: bool) -> None:
        return None


def memory_storage(settings: Settings | None = None) -> tuple[Storage, MemoryObjects]:
    """A real ``Storage`` (policy and all) whose objects live in memory."""
    memory = MemoryObjects()
    return Storage(settings or Settings(), backends={"s3": memory, "file": memory}), memory
