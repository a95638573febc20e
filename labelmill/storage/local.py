"""The local filesystem behind ``file://`` URIs.

Listing walks one directory at a time with :func:`os.scandir`, each
directory's entries sorted by name with directories compared as
``name + "/"``, so the order equals the sorted full paths (S3's order) and
memory holds one directory's names plus the current depth, never the
whole tree. Symlinked directories are not entered; symlinked files are
listed only when they resolve inside the listed directory.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Iterator

from labelmill.errors import ImageError, StorageUnavailable, UsageError
from labelmill.storage.uris import Location, ObjectInfo

logger = logging.getLogger(__name__)

_NOT_FOUND = (errno.ENOENT, errno.ENOTDIR)


def local_etag(st: os.stat_result) -> str:
    """Change marker for a local file: modification time and size, in hex."""
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"


def _uri(path: str) -> str:
    return "file://" + path


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


# Kinds of directory entries, from the entry's type (no stat on Linux).
_DIR, _LINK, _FILE, _OTHER = 0, 1, 2, 3


def _entry(e: os.DirEntry[str]) -> tuple[str, int]:
    """``(name, kind)``; a directory's name gets its "/" so that sorting gives path order."""
    if e.is_dir(follow_symlinks=False):
        return e.name + "/", _DIR
    if e.is_symlink():
        return e.name, _LINK
    return e.name, _FILE if e.is_file(follow_symlinks=False) else _OTHER


def _inside_root(path: str, real_root: str) -> bool:
    """Whether a symlink resolves inside the listed directory (else: warn, skip)."""
    try:
        if _inside(os.path.realpath(path), real_root):
            return True
    except OSError:
        return False
    logger.warning("skipping %s: symlink out of the listed directory", _uri(path))
    return False


class LocalFiles:
    """Reads and writes files under absolute paths taken from ``file://`` URIs."""

    def list(self, prefix: Location, after: Location | None) -> Iterator[ObjectInfo]:
        """Regular files whose path starts with ``prefix``, in sorted path order."""
        files = self._files(prefix.key, after.key if after else None)
        infos = (self._file_info(path) for path in files)
        return (info for info in infos if info is not None)

    def folders(self, parent: Location) -> Iterator[str]:
        try:
            with os.scandir(parent.key) as it:
                names = sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return iter(())
        except OSError as exc:
            raise _service_error(exc, parent.uri) from None
        return iter(names)

    def _files(self, prefix: str, start_after: str | None) -> Iterator[str]:
        """Paths of regular files and of symlinks resolving inside the directory."""
        if not prefix.endswith("/") and os.path.isdir(prefix):
            prefix += "/"
        directory, _, name_prefix = prefix.rpartition("/")
        directory += "/"
        return self._walk(directory, name_prefix, start_after, os.path.realpath(directory))

    def _walk(
        self, directory: str, name_prefix: str, start_after: str | None, real_root: str
    ) -> Iterator[str]:
        try:
            with os.scandir(directory) as it:
                entries = sorted(_entry(e) for e in it if e.name.startswith(name_prefix))
        except FileNotFoundError:
            return
        except OSError as exc:  # unreadable subdirectory: say so, list the rest
            logger.warning("cannot list %s: %s", _uri(directory), exc.strerror)
            return
        for name, kind in entries:
            path = directory + name
            # A directory still matters when the resume point lies inside it.
            if (
                start_after is not None
                and path <= start_after
                and not (kind == _DIR and start_after.startswith(path))
            ):
                continue
            if kind == _DIR:
                yield from self._walk(path, "", start_after, real_root)
            elif kind == _FILE or (kind == _LINK and _inside_root(path, real_root)):
                yield path

    @staticmethod
    def _file_info(path: str) -> ObjectInfo | None:
        try:
            st = os.stat(path)
        except OSError:  # removed while listing, or a dangling link
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(uri=_uri(path), size=st.st_size, etag=local_etag(st))

    def get(
        self,
        loc: Location,
        max_bytes: int,
        admit: Callable[[int], None] | None = None,
        if_match: str | None = None,
    ) -> tuple[bytes, str | None]:
        """The file's bytes and etag; :class:`ImageError` for per-file failures.

        ``if_match``: the etag (mtime and size) the listing saw; a file
        rewritten since is ``changed``.
        """
        uri, path = loc.uri, loc.key
        try:
            # O_NONBLOCK: opening a FIFO must not hang the worker.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise _image_error(exc, uri) from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise ImageError("not_found", f"{uri} is a directory, not a file")
            if not stat.S_ISREG(st.st_mode):
                raise ImageError("forbidden", f"{uri} is not a regular file")
            if if_match is not None and local_etag(st) != if_match:
                raise ImageError.changed(uri, if_match, local_etag(st))
            if st.st_size > max_bytes:
                raise ImageError(
                    "too_large", f"{uri} has {st.st_size} bytes, over the cap {max_bytes}"
                )
            if admit is not None:
                admit(st.st_size)
            data = _read_fd(fd, max_bytes + 1)  # the file may have grown since fstat
        except OSError as exc:
            raise _image_error(exc, uri) from None
        finally:
            os.close(fd)
        if len(data) > max_bytes:
            raise ImageError("too_large", f"{uri} has more than {max_bytes} bytes (the cap)")
        return data, local_etag(st)

    def read(self, loc: Location) -> bytes | None:
        path = loc.key
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            if exc.errno in _NOT_FOUND:
                return None
            raise _service_error(exc, _uri(path)) from None

    def put(self, loc: Location, data: bytes, content_type: str, root: Location | None) -> None:
        """Write atomically (temp file + rename) without leaving ``root`` (symlinks included)."""
        uri, path = loc.uri, loc.key
        root_path = root.key if root is not None else None
        if path.endswith("/"):
            raise UsageError(f"cannot write {uri}: it names a directory")
        parent = os.path.dirname(path)
        if root_path is not None and not _inside(path, root_path.rstrip("/") or "/"):
            raise UsageError(f"refusing to write {uri}: outside {_uri(root_path)}")
        try:
            if root_path is not None:
                existing = parent
                while not os.path.lexists(existing):
                    existing = os.path.dirname(existing)
                self._check_contained(existing, root_path, uri)  # before creating anything
            os.makedirs(parent, exist_ok=True)
            if root_path is not None:
                self._check_contained(parent, root_path, uri)
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)  # replaces a symlink at ``path``, never follows it
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise _service_error(exc, uri) from None

    @staticmethod
    def _check_contained(directory: str, root: str, uri: str) -> None:
        if not _inside(directory, root.rstrip("/") or "/") and not _inside(root, directory):
            raise UsageError(f"refusing to write {uri}: outside {_uri(root)}")
        real_dir = os.path.realpath(directory)
        real_root = os.path.realpath(root)
        if _inside(directory, root.rstrip("/") or "/") and not _inside(real_dir, real_root):
            raise UsageError(
                f"refusing to write {uri}: a symlink leads out of {_uri(root)} (to {real_dir})"
            )

    def exists(self, loc: Location) -> bool:
        return os.path.isfile(loc.key)

    def delete(self, loc: Location) -> None:
        path = loc.key
        try:
            os.unlink(path)
        except OSError as exc:
            if exc.errno not in _NOT_FOUND:
                raise _service_error(exc, _uri(path)) from None

    def check_access(self, loc: Location, write: bool) -> None:
        uri, path = loc.uri, loc.key
        directory = path if path.endswith("/") or os.path.isdir(path) else os.path.dirname(path)
        if not write:
            if not os.path.exists(path):
                raise UsageError(f"{uri}: no such file or directory")
            if not os.access(directory, os.R_OK | os.X_OK):
                raise UsageError(f"{uri}: directory is not readable")
            return
        existing = directory.rstrip("/") or "/"
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise UsageError(f"{uri}: {existing} is a file, not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"{uri}: cannot create files under {existing} (permission denied)")


def _read_fd(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        chunk = os.read(fd, min(1 << 20, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _image_error(exc: OSError, uri: str) -> Exception:
    if exc.errno in _NOT_FOUND:
        return ImageError("not_found", f"{uri} does not exist")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.ELOOP):
        return ImageError("forbidden", f"{uri}: {exc.strerror}")
    if exc.errno == errno.EISDIR:
        return ImageError("not_found", f"{uri} is a directory, not a file")
    return StorageUnavailable(f"cannot read {uri}: {exc.strerror}")


def _service_error(exc: OSError, uri: str) -> Exception:
    if exc.errno in (
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.EEXIST,
    ):
        return UsageError(f"{uri}: {exc.strerror}")
    return StorageUnavailable(f"{uri}: {exc.strerror}")
