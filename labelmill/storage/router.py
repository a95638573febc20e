"""``Storage``: policy once, in front, then one backend per scheme (S3, local files).

``Storage`` normalises and parses each URI into a :class:`Location`, applies
the policy (``labelmill.storage.policy``), and hands the location to the
backend of its scheme. A backend (:class:`Backend`) only stores: S3 through
boto3 (``s3.py``), files (``local.py``); the tests add an in-memory one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

from labelmill.errors import ImageError, UsageError
from labelmill.settings import Settings
from labelmill.storage import policy
from labelmill.storage.local import LocalFiles
from labelmill.storage.uris import Location, ObjectInfo, Scheme

if TYPE_CHECKING:
    from labelmill.storage.s3 import S3Objects


class Backend(Protocol):
    """One kind of storage, addressed by parsed locations; policy is not its business."""

    def list(self, prefix: Location, after: Location | None) -> Iterator[ObjectInfo]: ...

    def folders(self, parent: Location) -> Iterator[str]: ...

    def get(
        self,
        loc: Location,
        max_bytes: int,
        admit: Callable[[int], None] | None = None,
        if_match: str | None = None,
    ) -> tuple[bytes, str | None]: ...

    def read(self, loc: Location) -> bytes | None: ...

    def put(self, loc: Location, data: bytes, content_type: str, root: Location | None) -> None: ...

    def exists(self, loc: Location) -> bool: ...

    def delete(self, loc: Location) -> None: ...

    def check_access(self, loc: Location, write: bool) -> None: ...


class ObjectStore(Protocol):
    """What the producer and workers need from object storage (``Storage`` gives it)."""

    def list(self, prefix_uri: str, *, start_after: str | None = None) -> Iterator[ObjectInfo]: ...

    def folders(self, parent_uri: str) -> Iterator[str]: ...

    def get(
        self,
        uri: str,
        *,
        max_bytes: int,
        admit: Callable[[int], None] | None = None,
        if_match: str | None = None,
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
    """Routes URIs to their scheme's backend, enforcing policy in front of all of them.

    Thread-safe: one boto3 client, created on first S3 use, serves every
    thread. ``backends`` replaces a scheme's backend (the tests' in-memory one).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        s3_client: Any | None = None,
        backends: Mapping[Scheme, Backend] | None = None,
    ) -> None:
        self.settings = settings
        self._s3_client = s3_client
        self._local = LocalFiles()
        self._backends = dict(backends or {})

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

    def _backend(self, loc: Location) -> Backend:
        chosen = self._backends.get(loc.scheme)
        if chosen is not None:
            return chosen
        return self._s3 if loc.scheme == "s3" else self._local

    def _at(self, uri: str, *, input_read: bool) -> Location:
        """``uri`` parsed, or UsageError when it is malformed or policy refuses it."""
        loc = Location.parse(uri)
        reason = policy.refusal(self.settings, loc.uri, input_read=input_read)
        if reason is not None:
            raise UsageError(reason)
        return loc

    def list(self, prefix_uri: str, *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Every object under ``prefix_uri`` in key order, after ``start_after`` (a full URI).

        Streams: pages of 1000 keys from S3, one directory at a time locally.
        Errors about the location itself are raised here, before iteration.
        """
        prefix, after = self._listed(prefix_uri, start_after)
        return self._backend(prefix).list(prefix, after)

    def folders(self, parent_uri: str) -> Iterator[str]:
        """The names of the folders directly under ``parent_uri`` (S3: its common prefixes)."""
        parent = self._at(parent_uri.rstrip("/") + "/", input_read=True)
        return self._backend(parent).folders(parent)

    def _listed(self, prefix_uri: str, start_after: str | None) -> tuple[Location, Location | None]:
        prefix = self._at(prefix_uri, input_read=True)
        after = Location.parse(start_after) if start_after else None
        if after is not None and (after.scheme, after.bucket) != (prefix.scheme, prefix.bucket):
            raise UsageError(f"start_after {start_after!r} is not in {prefix_uri!r}")
        return prefix, after

    def get(
        self,
        uri: str,
        *,
        max_bytes: int,
        admit: Callable[[int], None] | None = None,
        if_match: str | None = None,
    ) -> tuple[bytes, str | None]:
        """An input object's bytes and etag, at most ``max_bytes`` of them.

        Per-object failures raise :class:`ImageError` (``not_found``,
        ``forbidden``, ``too_large``, and ``changed`` when ``if_match``, the
        ETag the listing saw, is no longer the object's); outages raise
        ``StorageUnavailable``. ``admit(size)`` is called once the size is
        known and before the body is read (a memory budget may make it wait).
        """
        try:
            loc = self._at(uri, input_read=True)
        except UsageError as exc:  # one image's problem, not the job's
            raise ImageError("forbidden", str(exc)) from None
        return self._backend(loc).get(loc, max_bytes, admit, if_match)

    def read(self, uri: str) -> bytes | None:
        """One of labelmill's own files (job spec, part file), or None when missing."""
        loc = self._at(uri, input_read=False)
        return self._backend(loc).read(loc)

    def put(
        self,
        uri: str,
        data: bytes,
        *,
        content_type: str = "application/json",
        root: str | None = None,
    ) -> None:
        """Write ``data`` whole (local: atomically). ``root``: a location it must stay in.

        Locally, with ``root`` given, the file's directory must also resolve
        (symlinks included) inside ``root``'s resolved path.
        """
        loc = self._at(uri, input_read=False)
        root_loc = Location.parse(root) if root is not None else None
        if root_loc is not None and not root_loc.contains(loc):
            raise UsageError(f"refusing to write {loc.uri}: outside {root_loc.uri}")
        self._backend(loc).put(loc, data, content_type, root_loc)

    def exists(self, uri: str) -> bool:
        """Whether an object (a regular file, locally) exists at ``uri``."""
        loc = self._at(uri, input_read=False)
        return self._backend(loc).exists(loc)

    def delete(self, uri: str) -> None:
        """Remove the object at ``uri``; a missing one is not an error."""
        loc = self._at(uri, input_read=False)
        self._backend(loc).delete(loc)

    def check_access(self, uri: str, *, write: bool) -> None:
        """Cheap preflight: raise UsageError, CredentialsError or StorageUnavailable."""
        loc = self._at(uri, input_read=not write)
        self._backend(loc).check_access(loc, write)
