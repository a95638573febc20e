"""Object GETs through obstore (Rust's ``object_store``): a quarter of botocore's CPU.

A worker GETs every image once; through botocore each GET costs about 1 ms
of CPU (request signing, event hooks, header parsing), through obstore 0.26
ms (docs/performance.md), and the request runs without the GIL.

Everything else about S3 stays with boto3 (``labelmill.storage.s3``), and so
does what configures it: the endpoint, region and credentials obstore uses
are the ones the boto3 client resolved, credentials through boto3's own
chain (refreshed as boto3 refreshes them). ``object_store`` parses keys into
a ``Path`` of non-empty segments without control characters; keys it could
not address exactly (``a//b.jpg``, ``/a.jpg``, ``a/``) are left to boto3
(``labelmill.storage.s3.addressable``), so no key is ever read as another.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import obstore
from obstore.auth.boto3 import Boto3CredentialProvider
from obstore.exceptions import BaseError
from obstore.store import S3Store

from labelmill.errors import CredentialsError, ImageError, StorageUnavailable
from labelmill.settings import Settings
from labelmill.storage.uris import Location

# A frozen copy of boto3's credentials is used for this long: botocore
# refreshes temporary credentials 15 minutes before they expire (10 at the
# latest), so a copy younger than 5 minutes is always still valid.
_CREDENTIALS_TTL = timedelta(minutes=5)
_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([^<]+)</Code>")

# What a failed GET means, from S3's error code and HTTP status:
# (code, status) -> the exception to raise. labelmill.storage.s3 gives one.
Classify = Callable[[str, int], Exception]


class ObstoreGets:
    """GETs of one S3 endpoint through obstore, one store per bucket and process."""

    def __init__(self, settings: Settings, client: Any, session: Any) -> None:
        self._settings = settings
        self._client = client
        self._session = session
        self._stores: dict[tuple[int, str], S3Store] = {}
        self._lock = threading.Lock()

    def _store(self, uri: str, bucket: str) -> S3Store:
        # Per process: obstore's runtime does not survive a fork, and Celery's
        # pool processes are forked.
        slot = (os.getpid(), bucket)
        with self._lock:
            store = self._stores.get(slot)
            if store is None:
                store = self._stores[slot] = self._new_store(uri, bucket)
            return store

    def _new_store(self, uri: str, bucket: str) -> S3Store:
        try:
            credentials = Boto3CredentialProvider(self._session, ttl=_CREDENTIALS_TTL)
        except ValueError as exc:  # boto3's chain found none
            raise CredentialsError(f"{uri}: no usable S3 credentials ({exc})") from None
        meta = self._client.meta
        endpoint = str(meta.endpoint_url)
        s = self._settings
        options: dict[str, Any] = {
            "connect_timeout": timedelta(seconds=s.s3_connect_timeout_s),
            "read_timeout": timedelta(seconds=s.s3_read_timeout_s),
            # Whole request, body included; a 100 MB object at 10 MB/s takes 10 s.
            "timeout": timedelta(seconds=s.s3_connect_timeout_s + 4 * s.s3_read_timeout_s),
            "allow_http": endpoint.startswith("http://"),
        }
        config: dict[str, Any] = {"region": meta.region_name or "us-east-1"}
        if (urlsplit(endpoint).hostname or "").endswith(".amazonaws.com"):
            config["virtual_hosted_style_request"] = True  # AWS's own endpoints
        else:  # SeaweedFS, MinIO and the like address buckets by path
            config["endpoint"] = endpoint
        return S3Store(
            bucket,
            config=config,  # type: ignore[arg-type]
            client_options=options,  # type: ignore[arg-type]
            retry_config={"max_retries": 0},  # retrying is labelmill.retry's business
            credential_provider=credentials,
        )

    def get(
        self,
        loc: Location,
        max_bytes: int,
        admit: Callable[[int], None] | None,
        if_match: str | None,
        classify: Classify,
    ) -> tuple[bytes, str | None]:
        """The object's bytes and ETag; ``loc.key`` must be ``addressable``.

        The body is read only once its size is known to be within
        ``max_bytes`` and ``admit`` has reserved it.
        """
        uri = loc.uri
        store = self._store(uri, loc.bucket)
        options = {"if_match": f'"{if_match}"'} if if_match else {}
        try:
            result = obstore.get(store, loc.key, options=options)  # type: ignore[arg-type]
            size = int(result.meta["size"])
            if size > max_bytes:
                raise ImageError("too_large", f"{uri} has {size} bytes, over the cap {max_bytes}")
            if admit is not None:
                admit(size)
            data = result.bytes().to_bytes()
        except (BaseError, OSError) as exc:  # a missing object is a FileNotFoundError
            raise self._failure(exc, uri, classify) from None
        etag = result.meta.get("e_tag")
        return data, etag.strip('"') if etag else None

    def _failure(self, exc: Exception, uri: str, classify: Classify) -> Exception:
        text = str(exc)
        status = _STATUS.search(text)
        if status is None:  # no answer: refused, reset, timed out
            first = text.splitlines()[0] if text else type(exc).__name__
            return StorageUnavailable(
                f"{uri}: cannot reach S3 at {self._client.meta.endpoint_url}: {first}"
            )
        code = _CODE.search(text)
        return classify(code.group(1) if code else status.group(1), int(status.group(1)))
