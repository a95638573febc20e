"""S3 (and S3-compatible stores such as SeaweedFS) through boto3.

Endpoint, region and credentials come from the AWS SDK's own chain
(``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, profiles...). S3's errors
are mapped onto labelmill's hierarchy here, in one place. An object's GET
goes through obstore, configured from the boto3 client, where obstore can
address the key (``labelmill.storage.s3_get``): it costs a quarter of the CPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from labelmill.errors import (
    CredentialsError,
    ImageError,
    LabelmillError,
    ServiceError,
    StorageUnavailable,
    UsageError,
)
from labelmill.settings import Settings
from labelmill.storage.uris import Location, ObjectInfo

if TYPE_CHECKING:
    from labelmill.storage.s3_get import ObstoreGets

_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
        "AuthorizationHeaderMalformed",
    }
)
_FORBIDDEN_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "InvalidObjectState", "403"})
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
    }
)
# Bytes read per call while streaming a body, so the cap is checked as we go.
_CHUNK = 1 << 20


def make_client(settings: Settings, from_session: boto3.session.Session | None = None) -> Any:
    """A boto3 S3 client with deadlines and a pool sized for the fetch concurrency."""
    config = Config(
        connect_timeout=settings.s3_connect_timeout_s,
        read_timeout=settings.s3_read_timeout_s,
        # One attempt per call: retrying is labelmill.retry's business (the
        # worker's batch deadline, the producer's budget, a resumed listing),
        # which sees StorageUnavailable as transient.
        retries={"mode": "standard", "total_max_attempts": 1},
        max_pool_connections=max(10, settings.fetch_concurrency * 2),
    )
    return (from_session or session()).client("s3", config=config)


def session() -> boto3.session.Session:
    """A private boto3 session whose S3 responses keep timestamps as S3 sent them.

    labelmill never reads a timestamp from S3: a listing needs the keys, a GET
    the body and ETag. botocore would turn every ``LastModified`` of a listing
    into a ``datetime``, which is two thirds of the CPU a 1000-key page costs
    (bench/enqueue.py). The session is private because boto3's default one is
    not thread-safe to build clients from.
    """
    core = botocore.session.get_session()
    core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    return boto3.session.Session(botocore_session=core)


def addressable(key: str) -> bool:
    """Whether obstore reads exactly ``key``: it has no empty segment and no control character.

    ``object_store`` parses keys into a Path that refuses those (``a//b``)
    or drops them (``/a``, ``a/``); S3 keys may have them, boto3 reads them.
    """
    return bool(key) and "" not in key.split("/") and key.isprintable()


def _code(exc: ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {})
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return str(error.get("Code") or status), status


class S3Objects:
    """The S3 side of :class:`labelmill.storage.Storage`; takes bucket and key apart."""

    def __init__(self, settings: Settings, client: Any | None) -> None:
        self._settings = settings
        self._client = client
        self._session: boto3.session.Session | None = None
        self._gets: ObstoreGets | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The one client, built on first use (boto3 clients are thread-safe)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._session = session()
                    self._client = make_client(self._settings, self._session)
        return self._client

    @property
    def gets(self) -> ObstoreGets:
        """Object GETs through obstore, configured from the boto3 client (built on first use)."""
        if self._gets is None:  # once per process: not every GET takes the lock
            client = self.client
            with self._lock:
                if self._gets is None:
                    # Imported here: the producer, which reads no images, never pays for it.
                    from labelmill.storage.s3_get import ObstoreGets

                    self._gets = ObstoreGets(self._settings, client, self._session or session())
        return self._gets

    def _endpoint(self) -> str:
        try:
            return str(self.client.meta.endpoint_url)
        except Exception:  # the endpoint is only for the message
            return "the S3 endpoint"

    def _call(self, uri: str, op: Callable[[], Any]) -> Any:
        try:
            return op()
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise CredentialsError(f"{uri}: no usable S3 credentials ({exc})") from None
        except HTTPClientError as exc:  # connection refused/reset, timeouts
            raise StorageUnavailable(
                f"{uri}: cannot reach S3 at {self._endpoint()}: {exc}"
            ) from None
        except BotoCoreError as exc:
            raise StorageUnavailable(f"{uri}: S3 client error: {exc}") from None

    def _mapped(self, exc: ClientError, uri: str) -> LabelmillError:
        """Errors common to every operation; None-like cases are handled by callers."""
        return self._classified(*_code(exc), uri)

    def _classified(self, code: str, status: int, uri: str) -> LabelmillError:
        """What S3's error ``code`` (or, lacking one, the HTTP ``status``) means."""
        if code in _CREDENTIAL_CODES:
            return CredentialsError(
                f"{uri}: S3 at {self._endpoint()} refused our credentials ({code})"
            )
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return StorageUnavailable(f"{uri}: S3 answered {code} (HTTP {status})")
        if code == "NoSuchBucket":
            bucket = uri[len("s3://") :].partition("/")[0]
            return UsageError(f"{uri}: bucket {bucket} does not exist")
        if code in _FORBIDDEN_CODES or status == 403:
            return CredentialsError(f"{uri}: S3 denied access ({code})")
        return ServiceError(f"{uri}: S3 answered {code} (HTTP {status})")

    def list(self, prefix: Location, after: Location | None) -> Iterator[ObjectInfo]:
        bucket = prefix.bucket
        for page in self._pages(prefix, after):
            for item in page.get("Contents", ()):
                etag = item.get("ETag")
                yield ObjectInfo(
                    uri=f"s3://{bucket}/{item['Key']}",
                    size=int(item.get("Size", 0)),
                    etag=etag.strip('"') if etag else None,
                )

    def folders(self, parent: Location) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=parent.bucket, Prefix=parent.key, Delimiter="/"
        )
        try:
            listed = self._call(parent.uri, lambda: list(pages))
        except ClientError as exc:
            raise self._mapped(exc, parent.uri) from None
        for page in listed:
            for common in page.get("CommonPrefixes", ()):
                yield common["Prefix"][len(parent.key) :].rstrip("/")

    def _pages(self, prefix: Location, after: Location | None) -> Iterator[Any]:
        kwargs: dict[str, Any] = {"Bucket": prefix.bucket, "Prefix": prefix.key}
        if after is not None and after.key:
            kwargs["StartAfter"] = after.key
        uri = prefix.uri
        pages = iter(self.client.get_paginator("list_objects_v2").paginate(**kwargs))

        def fetch() -> Any:
            return self._call(uri, lambda: next(pages, None))

        # The next page is requested while the caller works through this one,
        # so the store's latency overlaps the producer's work (one page ahead:
        # memory stays at two pages of 1000 keys). bench/enqueue.py.
        with ThreadPoolExecutor(1, thread_name_prefix="s3-list") as ahead:
            upcoming = ahead.submit(fetch)
            while True:
                try:
                    page = upcoming.result()
                except ClientError as exc:
                    raise self._mapped(exc, uri) from None
                if page is None:
                    return
                upcoming = ahead.submit(fetch)
                yield page

    def get(
        self,
        loc: Location,
        max_bytes: int,
        admit: Callable[[int], None] | None = None,
        if_match: str | None = None,
    ) -> tuple[bytes, str | None]:
        if addressable(loc.key):
            return self.gets.get(
                loc,
                max_bytes,
                admit,
                if_match,
                lambda code, status: self._get_error(loc, code, status, if_match),
            )
        uri, bucket, key = loc.uri, loc.bucket, loc.key
        condition = {"IfMatch": if_match} if if_match else {}
        try:
            response = self._call(
                uri, lambda: self.client.get_object(Bucket=bucket, Key=key, **condition)
            )
        except ClientError as exc:
            raise self._get_error(loc, *_code(exc), if_match) from None
        body = response["Body"]
        try:
            length = int(response.get("ContentLength") or 0)
            if length > max_bytes:
                raise ImageError("too_large", f"{uri} has {length} bytes, over the cap {max_bytes}")
            if admit is not None:
                admit(length or max_bytes)
            data = self._call(uri, lambda: _read_capped(body, max_bytes + 1))
        finally:
            body.close()  # an unread body must not keep its pooled connection
        if len(data) > max_bytes:
            raise ImageError("too_large", f"{uri} has more than {max_bytes} bytes (the cap)")
        etag = response.get("ETag")
        return data, etag.strip('"') if etag else None

    def _get_error(
        self, loc: Location, code: str, status: int, if_match: str | None
    ) -> LabelmillError:
        """What a failed GET of ``loc`` means (through boto3 or obstore alike)."""
        uri = loc.uri
        if code in _MISSING_CODES or code == "NoSuchBucket":
            return ImageError("not_found", f"{uri} does not exist ({code})")
        if code in ("PreconditionFailed", "412") and if_match:
            return self._not_as_listed(loc, if_match)
        mapped = self._classified(code, status, uri)
        if isinstance(mapped, CredentialsError) and code not in _CREDENTIAL_CODES:
            return ImageError("forbidden", f"{uri}: S3 denied access ({code})")
        return mapped

    def _not_as_listed(self, loc: Location, listed_etag: str) -> ImageError:
        """Why a read on the listed ETag failed: the object changed, or is gone.

        S3 answers a missing object with NoSuchKey whatever the condition;
        some servers (SeaweedFS up to 4.44, seaweedfs/seaweedfs#10984) say
        412 instead, so the HEAD tells the two apart.
        """
        head = self._unless_missing(
            loc.uri, lambda: self.client.head_object(Bucket=loc.bucket, Key=loc.key)
        )
        if head is None:
            return ImageError("not_found", f"{loc.uri} does not exist (deleted since listing)")
        etag = head.get("ETag")
        return ImageError.changed(loc.uri, listed_etag, etag.strip('"') if etag else None)

    def _unless_missing(self, uri: str, op: Callable[[], Any]) -> Any | None:
        """``op()``'s response, or None when the object or its bucket does not exist."""
        try:
            return self._call(uri, op)
        except ClientError as exc:
            code, _ = _code(exc)
            if code in _MISSING_CODES or code == "NoSuchBucket":
                return None
            raise self._mapped(exc, uri) from None

    def read(self, loc: Location) -> bytes | None:
        uri, bucket, key = loc.uri, loc.bucket, loc.key
        response = self._unless_missing(uri, lambda: self.client.get_object(Bucket=bucket, Key=key))
        if response is None:
            return None
        return bytes(self._call(uri, lambda: response["Body"].read()))

    def put(self, loc: Location, data: bytes, content_type: str, root: Location | None) -> None:
        uri, bucket, key = loc.uri, loc.bucket, loc.key
        try:
            self._call(
                uri,
                lambda: self.client.put_object(
                    Bucket=bucket, Key=key, Body=data, ContentType=content_type
                ),
            )
        except ClientError as exc:
            raise self._mapped(exc, uri) from None

    def exists(self, loc: Location) -> bool:
        uri, bucket, key = loc.uri, loc.bucket, loc.key
        head = self._unless_missing(uri, lambda: self.client.head_object(Bucket=bucket, Key=key))
        return head is not None

    def delete(self, loc: Location) -> None:
        uri, bucket, key = loc.uri, loc.bucket, loc.key
        self._unless_missing(uri, lambda: self.client.delete_object(Bucket=bucket, Key=key))

    def check_access(self, loc: Location, write: bool) -> None:
        uri, bucket, key = loc.uri, loc.bucket, loc.key
        try:
            if write:
                self._call(uri, lambda: self.client.head_bucket(Bucket=bucket))
            else:  # listing is what the producer needs, and its errors carry codes
                self._call(
                    uri,
                    lambda: self.client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1),
                )
        except ClientError as exc:
            code, _ = _code(exc)
            if code in ("NoSuchBucket", "404", "NotFound"):
                raise UsageError(f"{uri}: bucket {bucket} does not exist") from None
            mapped = self._mapped(exc, uri)
            if isinstance(mapped, ServiceError) and not isinstance(
                mapped, (StorageUnavailable, CredentialsError)
            ):
                raise UsageError(str(mapped)) from None
            raise mapped from None


def _read_capped(body: Any, limit: int) -> bytes:
    """At most ``limit`` bytes of ``body``: a lying Content-Length cannot blow memory."""
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        chunk = body.read(min(_CHUNK, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)
