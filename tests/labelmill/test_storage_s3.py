"""labelmill.storage against a real S3 server (SeaweedFS started by the fixtures)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from labelmill.errors import CredentialsError, ImageError, StorageUnavailable, UsageError
from labelmill.settings import Settings
from labelmill.storage import Storage, s3_get
from labelmill.storage.s3 import addressable
from tests.fixtures.procs import free_port
from tests.fixtures.servers import S3Server

pytestmark = pytest.mark.integration

WEIRD_KEYS = [
    "photos/a b/ü.jpg",
    "photos/a..b.jpg",
    "photos/" + "deep/" * 30 + "f.jpg",
    "photos/sp ace#hash?q=1&x.jpg",
    "photos/emoji 😀.png",
    "photos/plus+percent%20.jpg",
    "photos/control\x01char.jpg",  # obstore cannot address it: read through boto3
]


def storage(**overrides: Any) -> Storage:
    return Storage(Settings(**overrides, s3_connect_timeout_s=2, s3_read_timeout_s=10))


def test_weird_keys_round_trip(s3_bucket: str) -> None:
    s = storage()
    for key in WEIRD_KEYS:
        s.put(f"s3://{s3_bucket}/{key}", key.encode(), content_type="image/jpeg")
    listed = list(s.list(f"s3://{s3_bucket}/photos/"))
    assert [o.uri for o in listed] == sorted(f"s3://{s3_bucket}/{k}" for k in WEIRD_KEYS)
    for info in listed:
        data, etag = s.get(info.uri, max_bytes=1000)
        key = info.uri.split("/", 3)[3]
        assert data == key.encode()
        assert etag == info.etag == hashlib.md5(data).hexdigest()  # plain MD5, no quotes
        assert info.size == len(data)
        assert s.read(info.uri) == data
        assert s.exists(info.uri)


def test_listing_crosses_pages_and_resumes(s3_bucket: str) -> None:
    s = storage()
    keys = [f"many/{i:05d}.jpg" for i in range(1100)] + ["many/folder/", "other/x.jpg"]
    client = s.s3_client
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=s3_bucket, Key=k, Body=b"x"), keys))
    listed = [o.uri for o in s.list(f"s3://{s3_bucket}/many/")]
    expected = sorted(f"s3://{s3_bucket}/{k}" for k in keys if k.startswith("many/"))
    assert listed == expected  # 1101 keys: more than one page of 1000
    assert f"s3://{s3_bucket}/many/folder/" in listed  # folder markers are listed too
    resumed = [o.uri for o in s.list(f"s3://{s3_bucket}/many/", start_after=listed[998])]
    assert resumed == listed[999:]
    assert list(s.list(f"s3://{s3_bucket}/many/", start_after=listed[-1])) == []
    with pytest.raises(UsageError):
        s.list(f"s3://{s3_bucket}/many/", start_after="s3://elsewhere/many/00001.jpg")


def test_client_leaves_timestamps_unparsed(s3_bucket: str) -> None:
    """The listing's LastModified stays S3's text: parsing it is most of a page's CPU."""
    s = storage()
    s.put(f"s3://{s3_bucket}/ts/a.jpg", b"x", content_type="image/jpeg")
    page = s.s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="ts/")
    (item,) = page["Contents"]
    assert isinstance(item["LastModified"], str) and item["LastModified"].endswith("Z")
    assert [o.uri for o in s.list(f"s3://{s3_bucket}/ts/")] == [f"s3://{s3_bucket}/ts/a.jpg"]


class CountingGets:
    """obstore's ``get``, counting calls and the bodies read (``GetResult.bytes``)."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.keys: list[str] = []
        self.bodies_read = 0

    def __call__(self, store: Any, key: str, **kwargs: Any) -> Any:
        self.keys.append(key)
        result = self.real(store, key, **kwargs)
        outer = self

        class Result:
            meta = result.meta

            def bytes(self) -> Any:
                outer.bodies_read += 1
                return result.bytes()

        return Result()


@pytest.fixture
def obstore_gets(monkeypatch: pytest.MonkeyPatch) -> CountingGets:
    counting = CountingGets(s3_get.obstore.get)
    monkeypatch.setattr(s3_get.obstore, "get", counting)
    return counting


def test_gets_go_through_obstore_unless_it_cannot_address_the_key(
    s3_bucket: str, obstore_gets: CountingGets
) -> None:
    s = storage()
    plain, control = "photos/a.jpg", "photos/control\x01char.jpg"
    for key in (plain, control):
        s.put(f"s3://{s3_bucket}/{key}", key.encode())
        assert s.get(f"s3://{s3_bucket}/{key}", max_bytes=100)[0] == key.encode()
    assert obstore_gets.keys == [plain]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("photos/a.jpg", True),
        ("photos/a b/ü 😀+%20#?.jpg", True),
        ("photos/a..b.jpg", True),
        ("a//b.jpg", False),  # object_store refuses empty segments
        ("/a.jpg", False),  # and would drop these
        ("photos/", False),
        ("", False),
        ("a\x01b.jpg", False),  # control characters
        ("a\nb.jpg", False),
    ],
)
def test_addressable_keys(key: str, expected: bool) -> None:
    assert addressable(key) is expected


@pytest.mark.parametrize("key", ["big.jpg", "big\x01.jpg"])  # through obstore, through boto3
def test_get_too_large_does_not_read_the_body(
    s3_bucket: str, key: str, obstore_gets: CountingGets
) -> None:
    s = storage()
    uri = f"s3://{s3_bucket}/{key}"
    s.put(uri, b"x" * 3_000_000)
    read: list[int] = []

    class Spy:
        """The real client, with GetObject bodies that count what is read."""

        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def get_object(self, **kwargs: Any) -> Any:
            response = self._inner.get_object(**kwargs)
            body = response["Body"]
            real_read = body.read

            def counting_read(amt: int | None = None) -> bytes:
                data: bytes = real_read(amt)
                read.append(len(data))
                return data

            body.read = counting_read
            return response

    spied = Storage(Settings(), s3_client=Spy(s.s3_client))
    with pytest.raises(ImageError) as info:
        spied.get(uri, max_bytes=1000)
    assert info.value.kind == "too_large"
    assert uri in str(info.value)
    assert sum(read) == 0 and obstore_gets.bodies_read == 0
    assert len(spied.get(uri, max_bytes=3_000_000)[0]) == 3_000_000
    assert sum(read) + obstore_gets.bodies_read > 0  # the spies see a body that is read


def test_missing_objects(s3_bucket: str) -> None:
    s = storage()
    for uri in (f"s3://{s3_bucket}/nope.jpg", "s3://lm-no-such-bucket-x/nope.jpg"):
        with pytest.raises(ImageError) as info:
            s.get(uri, max_bytes=10)
        assert info.value.kind == "not_found"
        assert uri in str(info.value)
        assert s.read(uri) is None
        assert not s.exists(uri)
    s.delete(f"s3://{s3_bucket}/nope.jpg")  # idempotent


def test_policy_is_checked_before_the_store(s3_bucket: str) -> None:
    s = storage(allowed_buckets=["lm-something-else"])
    s.s3_client.put_object(Bucket=s3_bucket, Key="x.jpg", Body=b"x")
    with pytest.raises(ImageError) as info:
        s.get(f"s3://{s3_bucket}/x.jpg", max_bytes=10)
    assert info.value.kind == "forbidden"
    with pytest.raises(UsageError):
        s.check_access(f"s3://{s3_bucket}/", write=False)
    s.put(f"s3://{s3_bucket}/out/_job.json", b"{}")  # outputs are not input-restricted


def test_wrong_credentials_are_refused(
    s3_bucket: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage().put(f"s3://{s3_bucket}/x.jpg", b"x")
    for key_id, secret in [(s3_server.access_key, "wrong"), ("nobody", "wrong")]:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        s = storage()
        with pytest.raises(CredentialsError, match="refused our credentials"):
            s.get(f"s3://{s3_bucket}/x.jpg", max_bytes=10)
        with pytest.raises(CredentialsError):
            list(s.list(f"s3://{s3_bucket}/"))
        with pytest.raises(CredentialsError):
            s.put(f"s3://{s3_bucket}/y.jpg", b"y")
        with pytest.raises(CredentialsError):
            s.check_access(f"s3://{s3_bucket}/", write=False)
        with pytest.raises(CredentialsError):
            s.check_access(f"s3://{s3_bucket}/", write=True)


def test_check_access(s3_bucket: str) -> None:
    s = storage()
    s.check_access(f"s3://{s3_bucket}/photos/", write=False)
    s.check_access(f"s3://{s3_bucket}/labels/", write=True)
    for write in (False, True):
        with pytest.raises(UsageError, match="bucket lm-no-such-bucket-y does not exist"):
            s.check_access("s3://lm-no-such-bucket-y/x/", write=write)


def test_unreachable_endpoint_is_transient(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    s = Storage(Settings(s3_connect_timeout_s=0.5, s3_read_timeout_s=0.5))
    with pytest.raises(StorageUnavailable) as info:
        s.get("s3://lm-bucket/x.jpg", max_bytes=10)
    assert "s3://lm-bucket/x.jpg" in str(info.value)
    with pytest.raises(StorageUnavailable) as info:
        s.check_access("s3://lm-bucket/", write=False)
    assert endpoint in str(info.value)
    assert "\n" not in str(info.value)


def test_server_down_then_back(
    s3_server_factory: Any, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server: S3Server = s3_server_factory()
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    bucket = server.create_bucket()
    s = Storage(Settings(s3_connect_timeout_s=0.5, s3_read_timeout_s=2))
    s.put(f"s3://{bucket}/x.jpg", b"before")
    server.stop()
    with pytest.raises(StorageUnavailable):
        s.get(f"s3://{bucket}/x.jpg", max_bytes=100)
    with pytest.raises(StorageUnavailable):
        s.put(f"s3://{bucket}/y.jpg", b"y")
    server.start()  # same ports, same data
    assert s.get(f"s3://{bucket}/x.jpg", max_bytes=100)[0] == b"before"


def test_a_read_on_the_listed_etag_tells_changed_and_deleted_objects_apart(s3_bucket: str) -> None:
    s = storage()
    for name in ("same", "changed", "deleted"):
        s.put(f"s3://{s3_bucket}/cond/{name}.jpg", b"v1 " + name.encode())
    listed = {o.uri.rsplit("/", 1)[1]: o for o in s.list(f"s3://{s3_bucket}/cond/")}
    s.put(f"s3://{s3_bucket}/cond/changed.jpg", b"v2, overwritten after listing")
    s.delete(f"s3://{s3_bucket}/cond/deleted.jpg")

    same = listed["same.jpg"]
    assert s.get(same.uri, max_bytes=1000, if_match=same.etag) == (b"v1 same", same.etag)

    changed = listed["changed.jpg"]
    with pytest.raises(ImageError) as caught:
        s.get(changed.uri, max_bytes=1000, if_match=changed.etag)
    now = hashlib.md5(b"v2, overwritten after listing").hexdigest()
    assert caught.value.kind == "changed"
    assert caught.value.detail == {"listed_etag": changed.etag, "etag": now}

    deleted = listed["deleted.jpg"]
    with pytest.raises(ImageError) as caught:
        s.get(deleted.uri, max_bytes=1000, if_match=deleted.etag)
    assert caught.value.kind == "not_found"


def test_folders_are_the_common_prefixes_directly_below(s3_bucket: str) -> None:
    s = storage()
    for key in ("out/j-1/part-0.jsonl", "out/j-1/_inputs/0.jsonl", "out/j-2/x", "out/top.json"):
        s.put(f"s3://{s3_bucket}/{key}", b"x", content_type="text/plain")
    assert list(s.folders(f"s3://{s3_bucket}/out")) == ["j-1", "j-2"]
    assert list(s.folders(f"s3://{s3_bucket}/out/j-1/")) == ["_inputs"]
    assert list(s.folders(f"s3://{s3_bucket}/nothing/")) == []
