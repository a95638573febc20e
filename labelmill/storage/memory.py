"""An in-memory :class:`~labelmill.storage.router.ObjectStore` for unit tests only."""

from __future__ import annotations

import bisect
import hashlib
import threading
from collections.abc import Callable, Iterator

from labelmill.errors import ImageError, UsageError
from labelmill.settings import Settings
from labelmill.storage import policy
from labelmill.storage.uris import ObjectInfo, normalise_uri


class MemoryStorage:
    """Objects in a dict keyed by normalised URI; same policy and errors as ``Storage``.

    ``fail(uri, exc)`` makes the next operations on ``uri`` raise ``exc``,
    to exercise retries without a server.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
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

    def _allowed(self, uri: str, *, input_read: bool) -> str:
        normal = normalise_uri(uri)
        reason = policy.refusal(self.settings, normal, input_read=input_read)
        if reason is not None:
            raise UsageError(reason)
        return normal

    @staticmethod
    def _etag(data: bytes) -> str:
        return hashlib.md5(data, usedforsecurity=False).hexdigest()

    def list(self, prefix_uri: str, *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Objects whose URI starts with the prefix, in order (a snapshot)."""
        prefix = self._allowed(prefix_uri, input_read=True)
        with self._lock:
            is_dir = any(k.startswith(prefix + "/") for k in self.objects)
            if prefix.startswith("file://") and not prefix.endswith("/") and is_dir:
                prefix += "/"  # a directory, as the local backend treats it
            keys = sorted(k for k in self.objects if k.startswith(prefix))
            snapshot = [(k, self.objects[k]) for k in keys]
        after = normalise_uri(start_after) if start_after else None
        start = bisect.bisect_right(keys, after) if after is not None else 0
        return iter(
            [ObjectInfo(uri=k, size=len(v), etag=self._etag(v)) for k, v in snapshot[start:]]
        )

    def list_uris(self, prefix_uri: str, *, start_after: str | None = None) -> Iterator[str]:
        """Like :meth:`Storage.list_uris`: the URIs of :meth:`list`."""
        listing = self.list(prefix_uri, start_after=start_after)
        return (info.uri for info in listing)

    def get(
        self, uri: str, *, max_bytes: int, admit: Callable[[int], None] | None = None
    ) -> tuple[bytes, str | None]:
        """Like :meth:`Storage.get`: ImageError for missing, refused or oversized objects."""
        try:
            normal = normalise_uri(uri)
        except UsageError as exc:
            raise ImageError("forbidden", str(exc)) from None
        reason = policy.refusal(self.settings, normal, input_read=True)
        if reason is not None:
            raise ImageError("forbidden", reason)
        self._maybe_fail(normal)
        with self._lock:
            data = self.objects.get(normal)
        if data is None:
            raise ImageError("not_found", f"{normal} does not exist")
        if len(data) > max_bytes:
            raise ImageError(
                "too_large", f"{normal} has {len(data)} bytes, over the cap {max_bytes}"
            )
        if admit is not None:
            admit(len(data))
        return data, self._etag(data)

    def read(self, uri: str) -> bytes | None:
        normal = self._allowed(uri, input_read=False)
        self._maybe_fail(normal)
        with self._lock:
            return self.objects.get(normal)

    def put(
        self,
        uri: str,
        data: bytes,
        *,
        content_type: str = "application/json",
        root: str | None = None,
    ) -> None:
        normal = self._allowed(uri, input_read=False)
        if root is not None and not normal.startswith(normalise_uri(root).rstrip("/") + "/"):
            raise UsageError(f"refusing to write {normal}: outside {root}")
        self._maybe_fail(normal)
        with self._lock:
            self.objects[normal] = bytes(data)
            self.content_types[normal] = content_type

    def exists(self, uri: str) -> bool:
        normal = self._allowed(uri, input_read=False)
        with self._lock:
            return normal in self.objects

    def delete(self, uri: str) -> None:
        normal = self._allowed(uri, input_read=False)
        with self._lock:
            self.objects.pop(normal, None)

    def check_access(self, uri: str, *, write: bool) -> None:
        self._allowed(uri, input_read=not write)
