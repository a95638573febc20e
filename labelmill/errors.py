"""One rooted exception hierarchy for labelmill.

::

    LabelmillError
    ├── UsageError              bad arguments or configuration (exit 2)
    │   └── JobNotFound         no such job in the ledger (exit 2)
    ├── ServiceError            a service is unreachable or refuses us (exit 3)
    │   ├── TransientError      worth retrying with backoff
    │   │   ├── ModelUnavailable    gRPC UNAVAILABLE / DEADLINE_EXCEEDED
    │   │   ├── VersionNotServedYet a pinned version one model server lacks, for a while
    │   │   ├── StorageUnavailable  S3 5xx, SlowDown, connection errors
    │   │   └── LedgerUnavailable   Redis connection errors
    │   ├── CredentialsError    the store refused our credentials
    │   └── ModelNotFound       the model server has no such model/version
    ├── InferenceError          the model server rejected a batch as invalid
    └── ImageError              one image cannot be classified (has a ``kind``)

Transient and permanent failures are different classes because the retry
policy is chosen by type: only :class:`TransientError` is retried.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

ErrorKind = Literal[
    "not_found",
    "changed",
    "forbidden",
    "empty",
    "too_large",
    "decompression_bomb",
    "unsupported",
    "decode",
    "inference",
    "dead",
]
ERROR_KINDS: tuple[str, ...] = get_args(ErrorKind)


class LabelmillError(Exception):
    """Root of every error labelmill raises on purpose."""


class UsageError(LabelmillError):
    """Bad arguments or configuration; the user must change the command."""


class JobNotFound(UsageError):
    """The job id names no job in the ledger."""


class ServiceError(LabelmillError):
    """A service (Redis, S3, the model server) is unreachable or refuses us."""


class TransientError(ServiceError):
    """A failure that may go away: retried with backoff on a time budget."""


class ModelUnavailable(TransientError):
    """The model server is down, loading, overloaded or too slow."""


class VersionNotServedYet(TransientError):
    """NOT_FOUND for a pinned version, within ``LABELMILL_VERSION_WAIT_S`` of the first."""


class StorageUnavailable(TransientError):
    """Object storage answered 5xx, throttled us, or could not be reached."""


class LedgerUnavailable(TransientError):
    """Redis could not be reached."""


class CredentialsError(ServiceError):
    """Object storage refused our credentials."""


class ModelNotFound(ServiceError):
    """The model server does not serve the requested model or version."""


class InferenceError(LabelmillError):
    """The model server rejected a batch as invalid (not retried)."""


class ImageError(LabelmillError):
    """One image cannot be classified; becomes an ``error`` result line."""

    def __init__(
        self, kind: ErrorKind, message: str, detail: Mapping[str, str | None] | None = None
    ) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message
        # Written into the line's ``error`` beside kind and message
        # (``changed``: the listed ETag and the one found).
        self.detail: dict[str, str | None] = dict(detail or {})

    @classmethod
    def changed(cls, uri: str, listed_etag: str, etag: str | None) -> ImageError:
        """The object is not what was listed: it was overwritten since."""
        return cls(
            "changed",
            f"{uri} changed since it was listed (ETag {listed_etag}, now {etag})",
            {"listed_etag": listed_etag, "etag": etag},
        )
