"""``Storage``: one object that routes URIs to S3 or the local filesystem under policy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

from labelmill.errors import ImageError, UsageError
from labelmill.settings import Settings
from labelmill.storage import policy
from labelmill.storage.local import LocalFiles
from labelmill.storage.uris import ObjectInfo, file_path, normalise_uri, split_s3

if TYPE_CHECKING:
    from labelmill.storage.s3 import S3Objects


class ObjectStore(Protocol):
    """What the producer and workers need from object storage (real or in memory)."""

    def list(self, prefix_uri: str, *, start_after: str | None = None) -> Iterator[ObjectInfo]: ...

    def list_uris(self, prefix_uri: str, *, start_after: str | None = None) -> Iterator[str]: ...

    def get(
        self, uri: str, *, max_bytes: int, admit: Callable[[int], None] | None = None
    ) -> tuple[bytes, str | None]: ...

    def read(self, uri: str) -> bytes | None: ...

    def put(
        self,
        uri: str,
        data: bytes,
        *,
        content_type: str = "application/json",
        root: str | None = None,
    ) -> None: ...

    def exists(self, uri: str) -> bool: ...

    def delete(self, uri: str) -> None: ...

    def check_access(self, uri: str, *, write: bool) -> None: ...


class Storage:
    """Routes URIs to S3 (boto3) or the local filesystem, enforcing policy.

    Thread-safe: one boto3 client, created on first S3 use, serves every thread.
    """

    def __init__(self, settings: Settings, *, s3_client: Any | None = None) -> None:
        self.settings = settings
        self._s3_client = s3_client
        self._local = LocalFiles()

    @cached_property
    def _s3(self) -> S3Objects:
        # Imported on first S3 use: boto3 takes a tenth of a second to import,
        # which a producer or worker on local files does not need to pay.
        from labelmill.storage.s3 import S3Objects

        return S3Objects(self.settings, self._s3_client)

    @property
    def s3_client(self) -> Any:
        """The boto3 S3 client (created on first use)."""
        return self._s3.client

    def _allowed(self, uri: str, *, input_read: bool) -> str:
        normal = normalise_uri(uri)
        reason = policy.refusal(self.settings, normal, input_read=input_read)
        if reason is not None:
            raise UsageError(reason)
        return normal

    def list(self, prefix_uri: str, *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Every object under ``prefix_uri`` in key order, after ``start_after`` (a full URI).

        Streams: pages of 1000 keys from S3, one directory at a time locally.
        Errors about the location itself are raised here, before iteration.
        """
        where, after = self._listed(prefix_uri, start_after)
        if isinstance(where, tuple):
            return self._s3.list(*where, after)
        return self._local.list(where, after)

    def list_uris(self, prefix_uri: str, *, start_after: str | None = None) -> Iterator[str]:
        """The URIs :meth:`list` lists, in the same order, without size or etag.

        For callers that need names only (the producer): locally that saves
        a ``stat`` per file, on S3 an :class:`ObjectInfo` per key.
        """
        where, after = self._listed(prefix_uri, start_after)
        if isinstance(where, tuple):
            return self._s3.list_uris(*where, after)
        return map("file://".__add__, self._local.list_paths(where, after))

    def _listed(
        self, prefix_uri: str, start_after: str | None
    ) -> tuple[tuple[str, str] | str, str | None]:
        """``((bucket, key), after_key)`` for S3, ``(path, after_path)`` locally."""
        prefix = self._allowed(prefix_uri, input_read=True)
        after = normalise_uri(start_after) if start_after else None
        if prefix.startswith("s3://"):
            bucket, key = split_s3(prefix)
            after_key = None
            if after is not None:
                after_bucket, after_key = split_s3(after) if after.startswith("s3://") else ("", "")
                if after_bucket != bucket:
                    raise UsageError(f"start_after {start_after!r} is not in {prefix_uri!r}")
            return (bucket, key), after_key
        if after is not None and not after.startswith("file://"):
            raise UsageError(f"start_after {start_after!r} is not in {prefix_uri!r}")
        return file_path(prefix), file_path(after) if after else None

    def get(
        self, uri: str, *, max_bytes: int, admit: Callable[[int], None] | None = None
    ) -> tuple[bytes, str | None]:
        """An input object's bytes and etag, at most ``max_bytes`` of them.

        Per-object failures raise :class:`ImageError` (``not_found``,
        ``forbidden``, ``too_large``); outages raise ``StorageUnavailable``.
        ``admit(size)`` is called once the size is known and before the body
        is read (a memory budget may make it wait).
        """
        try:
            normal = normalise_uri(uri)
        except UsageError as exc:
            raise ImageError("forbidden", str(exc)) from None
        reason = policy.refusal(self.settings, normal, input_read=True)
        if reason is not None:
            raise ImageError("forbidden", reason)
        if normal.startswith("s3://"):
            bucket, key = split_s3(normal)
            return self._s3.get(bucket, key, max_bytes, admit)
        return self._local.get(file_path(normal), max_bytes, admit)

    def read(self, uri: str) -> bytes | None:
        """One of labelmill's own files (job spec, part file), or None when missing."""
        normal = self._allowed(uri, input_read=False)
        if normal.startswith("s3://"):
            return self._s3.read(*split_s3(normal))
        return self._local.read(file_path(normal))

    def put(
        self,
        uri: str,
        data: bytes,
        *,
        content_type: str = "application/json",
        root: str | None = None,
    ) -> None:
        """Write ``data`` whole (local: atomically). ``root``: a location it must stay in.

        Locally, with ``root`` given, the file's directory must resolve
        (symlinks included) inside ``root``'s resolved path.
        """
        normal = self._allowed(uri, input_read=False)
        if normal.startswith("s3://"):
            bucket, key = split_s3(normal)
            self._s3.put(bucket, key, data, content_type)
            return
        root_path = None
        if root is not None:
            normal_root = normalise_uri(root)
            if not normal_root.startswith("file://"):
                raise UsageError(f"root {root!r} is not a local location like {uri!r}")
            root_path = file_path(normal_root)
        self._local.put(file_path(normal), data, root_path)

    def exists(self, uri: str) -> bool:
        """Whether an object (a regular file, locally) exists at ``uri``."""
        normal = self._allowed(uri, input_read=False)
        if normal.startswith("s3://"):
            return self._s3.exists(*split_s3(normal))
        return self._local.exists(file_path(normal))

    def delete(self, uri: str) -> None:
        """Remove the object at ``uri``; a missing one is not an error."""
        normal = self._allowed(uri, input_read=False)
        if normal.startswith("s3://"):
            self._s3.delete(*split_s3(normal))
            return
        self._local.delete(file_path(normal))

    def check_access(self, uri: str, *, write: bool) -> None:
        """Cheap preflight: raise UsageError, CredentialsError or StorageUnavailable."""
        normal = self._allowed(uri, input_read=not write)
        if normal.startswith("s3://"):
            bucket, key = split_s3(normal)
            self._s3.check_access(bucket, key, write)
            return
        self._local.check_access(file_path(normal), write)
