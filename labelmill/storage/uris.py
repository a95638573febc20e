"""Object URIs: ``s3://bucket/key`` and ``file:///absolute/path``.

URIs are kept verbatim: an S3 key may hold spaces, unicode, ``#``, ``?`` or
``..`` and is never percent-encoded or URL-parsed, so ``"s3://b/" + key``
always names the object the listing returned. ``file://`` URIs hold a raw
absolute path; ``..`` segments are refused there, so a local path can only
name what it spells.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

from labelmill.errors import UsageError

Scheme = Literal["s3", "file"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# S3's rules for new buckets (general purpose): 3-63 chars, lower case,
# digits, dots and hyphens, starting and ending with a letter or digit.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_BUCKET_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


@dataclass(frozen=True)
class ObjectInfo:
    """One object found by a listing."""

    uri: str
    size: int
    etag: str | None


def normalise_uri(text: str) -> str:
    """Return the canonical URI for ``text`` or raise :class:`UsageError`.

    ``s3://bucket/key`` keeps its key verbatim; ``file:///abs`` loses
    repeated slashes and ``.`` segments; a plain path becomes
    ``file://`` + its absolute path. A trailing slash is kept.
    """
    if not text:
        raise UsageError("empty location: give s3://bucket/prefix, file:///path or a path")
    if "\x00" in text:
        raise UsageError(f"location {text!r} contains a NUL character")
    match = _SCHEME.match(text)
    if match is None:
        path = os.path.abspath(text)
        if text.endswith("/") and path != "/":
            path += "/"
        return "file://" + path
    scheme = match.group(1).lower()
    rest = text[match.end() :]
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        check_bucket_name(bucket, text)
        return f"s3://{bucket}/{key}"
    if scheme == "file":
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest.startswith("/"):
            raise UsageError(
                f"{text!r}: file URIs need an absolute path and no host, like file:///data/photos"
            )
        return "file://" + _clean_path(rest, text)
    raise UsageError(
        f"unsupported scheme {scheme!r} in {text!r}: use s3://bucket/prefix, file:///path or a path"
    )


def check_bucket_name(bucket: str, uri: str) -> None:
    """Raise :class:`UsageError` unless S3 would accept ``bucket`` as a bucket name."""
    if not bucket:
        raise UsageError(f"{uri!r} names no bucket: use s3://bucket/prefix")
    if (
        not _BUCKET.match(bucket)
        or ".." in bucket
        or ".-" in bucket
        or "-." in bucket
        or _IPV4.match(bucket)
        or bucket.startswith(_BUCKET_PREFIXES)
        or bucket.endswith(_BUCKET_SUFFIXES)
    ):
        raise UsageError(
            f"{bucket!r} in {uri!r} is not a valid S3 bucket name "
            "(3-63 characters: lower-case letters, digits, '.' and '-')"
        )


def _clean_path(path: str, uri: str) -> str:
    segments = path.split("/")
    if ".." in segments:
        raise UsageError(f"{uri!r}: '..' is not allowed in file URIs")
    kept = [s for s in segments if s not in ("", ".")]
    cleaned = "/" + "/".join(kept)
    if path.endswith(("/", "/.")) and cleaned != "/":
        cleaned += "/"
    return cleaned


def join_uri(base: str, *parts: str) -> str:
    """``base`` and ``parts`` joined with exactly one slash between each.

    Parts are labelmill's own names (job ids, part files): empty parts and
    ``.``/``..`` segments are refused, so a job id cannot climb out of the
    output location.
    """
    head = base.rstrip("/")
    if head.endswith(":"):  # "file:///" is the root directory
        head += "//"
    pieces = [head]
    for part in parts:
        stripped = part.strip("/")
        segments = stripped.split("/")
        if not stripped or any(s in ("", ".", "..") for s in segments) or "\x00" in part:
            raise UsageError(f"cannot join {part!r} onto {base!r}: not a plain relative name")
        pieces.append(stripped)
    return "/".join(pieces)


@dataclass(frozen=True)
class Location:
    """A URI, normalised and parsed once: what a storage backend is handed.

    ``key`` is the S3 key, or for ``file`` the absolute path (``bucket`` empty).
    """

    uri: str
    scheme: Scheme
    bucket: str
    key: str

    @classmethod
    def parse(cls, text: str) -> Location:
        """Raise :class:`UsageError` unless ``text`` is a location (see :func:`normalise_uri`)."""
        uri = normalise_uri(text)
        if uri.startswith("s3://"):
            bucket, key = split_s3(uri)
            return cls(uri, "s3", bucket, key)
        return cls(uri, "file", "", file_path(uri))

    def contains(self, other: Location) -> bool:
        """Whether ``other`` lies under this location (a folder, or a prefix ending in /)."""
        return other.scheme == self.scheme and other.uri.startswith(self.uri.rstrip("/") + "/")


def split_s3(uri: str) -> tuple[str, str]:
    """``(bucket, key)`` of a normalised ``s3://`` URI."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def file_path(uri: str) -> str:
    """The absolute path of a normalised ``file://`` URI."""
    return uri[len("file://") :]
