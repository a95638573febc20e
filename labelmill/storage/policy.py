"""Where labelmill may read and write: ``allow_local_files`` and ``allowed_buckets``.

``allow_local_files = False`` refuses every ``file://`` location (a pod must
not read its own filesystem). ``allowed_buckets``, when non-empty, limits
the buckets that *inputs* are read from (get, list, read preflight); the
output location is the operator's own choice and is not restricted by it.
"""

from __future__ import annotations

from labelmill.settings import Settings
from labelmill.storage.uris import split_s3


def refusal(settings: Settings, uri: str, *, input_read: bool) -> str | None:
    """Why policy refuses ``uri`` (a normalised URI), or None when it is allowed."""
    if uri.startswith("file://"):
        if not settings.allow_local_files:
            return f"{uri}: local files are disabled (LABELMILL_ALLOW_LOCAL_FILES=false)"
        return None
    if input_read and settings.allowed_buckets:
        bucket, _ = split_s3(uri)
        if bucket not in settings.allowed_buckets:
            allowed = ", ".join(settings.allowed_buckets)
            return f"{uri}: bucket {bucket} is not in LABELMILL_ALLOWED_BUCKETS ({allowed})"
    return None
