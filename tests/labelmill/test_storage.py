"""Unit tests for labelmill.storage: URIs, policy, the local backend, the in-memory one."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from labelmill.errors import ImageError, StorageUnavailable, UsageError
from labelmill.settings import Settings
from labelmill.storage import ObjectStore, Storage, join_uri, normalise_uri
from labelmill.storage import local as local_module
from labelmill.storage.s3 import _read_capped
from tests.memory_storage import memory_storage

# ----------------------------------------------------------------------------- URIs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("s3://bucket/photos/2024/", "s3://bucket/photos/2024/"),
        ("s3://bucket", "s3://bucket/"),
        ("S3://bucket/p", "s3://bucket/p"),
        ("s3://my.bucket-1/a b/ü.jpg", "s3://my.bucket-1/a b/ü.jpg"),
        ("s3://bkt/x//y/../z#?.jpg", "s3://bkt/x//y/../z#?.jpg"),  # keys are verbatim
        ("file:///data/photos/x.jpg", "file:///data/photos/x.jpg"),
        ("file:///data//photos/./x.jpg", "file:///data/photos/x.jpg"),
        ("file:///data/photos/", "file:///data/photos/"),
        ("file://localhost/data/a..b.jpg", "file:///data/a..b.jpg"),
        ("/abs/path", "file:///abs/path"),
        ("/abs/dir/", "file:///abs/dir/"),
        ("/", "file:///"),
    ],
)
def test_normalise_uri(text: str, expected: str) -> None:
    assert normalise_uri(text) == expected


def test_normalise_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert normalise_uri("photos/a.jpg") == f"file://{tmp_path}/photos/a.jpg"
    assert normalise_uri("photos/") == f"file://{tmp_path}/photos/"
    assert normalise_uri("../x") == f"file://{tmp_path.parent}/x"  # the user's own path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("gs://bucket/x", "unsupported scheme 'gs'"),
        ("http://host/x", "unsupported scheme"),
        ("s3://", "names no bucket"),
        ("s3:///key", "names no bucket"),
        ("s3://ab/x", "not a valid S3 bucket name"),
        ("s3://Upper/x", "not a valid S3 bucket name"),
        ("s3://under_score/x", "not a valid S3 bucket name"),
        ("s3://a..b/x", "not a valid S3 bucket name"),
        ("s3://192.168.0.1/x", "not a valid S3 bucket name"),
        ("s3://-bucket/x", "not a valid S3 bucket name"),
        ("s3://" + "b" * 64 + "/x", "not a valid S3 bucket name"),
        ("file://host/data", "absolute path and no host"),
        ("file:///data/../etc/passwd", "'..' is not allowed"),
        ("file:///data/..", "'..' is not allowed"),
        ("/data/x\x00y", "NUL"),
    ],
)
def test_normalise_uri_refuses(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        normalise_uri(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        (
            "s3://b/labels",
            ("job1", "part-000000001.jsonl"),
            "s3://b/labels/job1/part-000000001.jsonl",
        ),
        ("s3://b/labels/", ("/job1/", "x"), "s3://b/labels/job1/x"),
        ("s3://bkt/", ("job1",), "s3://bkt/job1"),
        ("s3://bkt", ("job1",), "s3://bkt/job1"),
        ("file:///out//", ("j", "_SUCCESS"), "file:///out/j/_SUCCESS"),
        ("file:///", ("j",), "file:///j"),
        ("file:///out", ("a/b", "c"), "file:///out/a/b/c"),
    ],
)
def test_join_uri(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert join_uri(base, *parts) == expected


@pytest.mark.parametrize("part", ["", "/", "..", "../etc", "a/../b", ".", "a//b", "x\x00"])
def test_join_uri_refuses_climbing_or_empty_parts(part: str) -> None:
    with pytest.raises(UsageError):
        join_uri("file:///out", part)


def test_read_capped_stops_at_the_limit() -> None:
    class Endless:
        served = 0

        def read(self, n: int) -> bytes:
            self.served += n
            return b"x" * n

    body = Endless()
    assert len(_read_capped(body, 3_000_001)) == 3_000_001
    assert body.served == 3_000_001  # a body that lies about its size is cut off


# ----------------------------------------------------------------------------- local files


def local_storage(**overrides: object) -> Storage:
    return Storage(Settings(**overrides))  # type: ignore[arg-type]


def make_files(root: Path, names: list[str]) -> None:
    for name in names:
        path = root / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())


TRICKY = [
    "a-b",
    "a.b",
    "a/x.jpg",
    "a/y/z.jpg",
    "a0",
    "ab/c.png",
    "B.JPG",
    "sp ace/ü ñ.jpg",
    "😀/deep/" + "d/" * 20 + "f.jpg",
    "a..b.jpg",
    "z",
]


def relative(uris: Iterator[str] | list[str], root: Path) -> list[str]:
    prefix = f"file://{root}/"
    out = []
    for uri in uris:
        assert uri.startswith(prefix)
        out.append(uri[len(prefix) :])
    return out


def test_local_listing_order_equals_sorted_paths(tmp_path: Path) -> None:
    make_files(tmp_path, TRICKY)
    listed = [o.uri for o in local_storage().list(str(tmp_path))]
    assert relative(listed, tmp_path) == sorted(TRICKY)
    assert listed == sorted(listed)


def test_local_start_after_resumes_anywhere(tmp_path: Path) -> None:
    make_files(tmp_path, TRICKY)
    storage = local_storage()
    full = [o.uri for o in storage.list(f"file://{tmp_path}/")]
    for i, uri in enumerate(full):
        assert [o.uri for o in storage.list(str(tmp_path), start_after=uri)] == full[i + 1 :]
    # A resume point that is not itself an object (deleted since, or a directory name).
    resumed = [o.uri for o in storage.list(str(tmp_path), start_after=f"file://{tmp_path}/a/")]
    assert relative(resumed, tmp_path)[0] == "a/x.jpg"
    resumed = [o.uri for o in storage.list(str(tmp_path), start_after=f"file://{tmp_path}/a/xa")]
    assert relative(resumed, tmp_path)[0] == "a/y/z.jpg"


def test_local_prefix_that_is_a_partial_name(tmp_path: Path) -> None:
    make_files(tmp_path, TRICKY)
    listed = relative([o.uri for o in local_storage().list(f"{tmp_path}/a")], tmp_path)
    assert listed == ["a/x.jpg", "a/y/z.jpg"]  # a directory lists what is under it
    listed = relative([o.uri for o in local_storage().list(f"{tmp_path}/a.")], tmp_path)
    assert listed == ["a..b.jpg", "a.b"]
    assert list(local_storage().list(f"{tmp_path}/missing/")) == []


def test_local_object_info(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"12345")
    (info,) = local_storage().list(str(tmp_path))
    st = (tmp_path / "x.jpg").stat()
    assert info.size == 5
    assert info.etag == f"{st.st_mtime_ns:x}-{st.st_size:x}"
    assert local_storage().get(info.uri, max_bytes=10) == (b"12345", info.etag)


def test_local_listing_does_not_follow_symlinks_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    make_files(outside, ["secret.jpg", "dir/also.jpg"])
    root = tmp_path / "root"
    make_files(root, ["in.jpg", "sub/inner.jpg"])
    (root / "link-out.jpg").symlink_to(outside / "secret.jpg")
    (root / "dir-out").symlink_to(outside / "dir")
    (root / "link-in.jpg").symlink_to(root / "in.jpg")
    (root / "loop").symlink_to(root)
    (root / "dangling.jpg").symlink_to(tmp_path / "nothing")
    listed = relative([o.uri for o in local_storage().list(str(root))], root)
    assert listed == ["in.jpg", "link-in.jpg", "sub/inner.jpg"]


def test_local_listing_is_lazy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for d in range(30):
        make_files(tmp_path, [f"d{d:02}/sub/f{i}.jpg" for i in range(3)])
    calls: list[str] = []
    real_scandir = os.scandir

    def counting_scandir(path: str) -> object:
        calls.append(path)
        return real_scandir(path)

    monkeypatch.setattr(local_module.os, "scandir", counting_scandir)
    listing = local_storage().list(str(tmp_path))
    assert calls == []  # nothing walked before the first item is asked for
    first = next(listing)
    assert first.uri.endswith("d00/sub/f0.jpg")
    assert len(calls) == 3  # root, d00, d00/sub: not the 61 directories of the tree
    assert sum(1 for _ in listing) == 89


def test_local_get_errors(tmp_path: Path) -> None:
    storage = local_storage()
    with pytest.raises(ImageError) as info:
        storage.get(f"file://{tmp_path}/missing.jpg", max_bytes=10)
    assert info.value.kind == "not_found"
    assert f"file://{tmp_path}/missing.jpg" in str(info.value)
    with pytest.raises(ImageError) as info:
        storage.get(str(tmp_path), max_bytes=10)
    assert info.value.kind == "not_found"
    os.mkfifo(tmp_path / "fifo.jpg")
    with pytest.raises(ImageError) as info:  # and does not hang on the FIFO
        storage.get(str(tmp_path / "fifo.jpg"), max_bytes=10)
    assert info.value.kind == "forbidden"


def test_a_local_read_on_the_listed_etag_notices_a_changed_file(tmp_path: Path) -> None:
    storage = local_storage()
    (tmp_path / "same.jpg").write_bytes(b"same")
    (tmp_path / "changed.jpg").write_bytes(b"v1")
    listed = {o.uri.rsplit("/", 1)[1]: o for o in storage.list(str(tmp_path))}
    (tmp_path / "changed.jpg").write_bytes(b"v2, longer")
    same = listed["same.jpg"]
    assert storage.get(same.uri, max_bytes=100, if_match=same.etag) == (b"same", same.etag)
    changed = listed["changed.jpg"]
    with pytest.raises(ImageError) as info:
        storage.get(changed.uri, max_bytes=100, if_match=changed.etag)
    assert info.value.kind == "changed"
    assert info.value.detail["listed_etag"] == changed.etag
    assert info.value.detail["etag"] not in (None, changed.etag)


def test_local_get_too_large_without_reading(tmp_path: Path) -> None:
    big = tmp_path / "huge.jpg"
    with open(big, "wb") as f:
        f.truncate(50 * 1024**3)  # sparse: 50 GiB that would not fit in memory
    with pytest.raises(ImageError) as info:
        local_storage().get(str(big), max_bytes=1000)
    assert info.value.kind == "too_large"
    assert "huge.jpg" in str(info.value)
    (tmp_path / "ok.jpg").write_bytes(b"x" * 1000)
    assert len(local_storage().get(str(tmp_path / "ok.jpg"), max_bytes=1000)[0]) == 1000


def test_policy_refuses_local_files(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"x")
    storage = local_storage(allow_local_files=False)
    with pytest.raises(ImageError) as info:
        storage.get(str(tmp_path / "x.jpg"), max_bytes=10)
    assert info.value.kind == "forbidden"
    for call in (
        lambda: storage.list(str(tmp_path)),
        lambda: storage.read(str(tmp_path / "x.jpg")),
        lambda: storage.put(str(tmp_path / "y.json"), b"{}"),
        lambda: storage.check_access(str(tmp_path), write=False),
    ):
        with pytest.raises(UsageError, match="local files are disabled"):
            call()
    assert not (tmp_path / "y.json").exists()


def test_policy_refuses_buckets_off_the_list() -> None:
    storage = local_storage(allowed_buckets=["photos"])
    with pytest.raises(ImageError) as info:  # refused before any network call
        storage.get("s3://other/x.jpg", max_bytes=10)
    assert info.value.kind == "forbidden"
    assert "s3://other/x.jpg" in str(info.value)
    with pytest.raises(UsageError, match="not in LABELMILL_ALLOWED_BUCKETS"):
        storage.list("s3://other/")
    with pytest.raises(ImageError) as info:
        storage.get("gs://photos/x.jpg", max_bytes=10)
    assert info.value.kind == "forbidden"


def test_local_put_read_round_trip(tmp_path: Path) -> None:
    storage = local_storage()
    names = ["a b/ü ñ.json", "x/" * 25 + "deep.json", "a..b.jsonl", "sp ace#?.json"]
    for name in names:
        uri = join_uri(f"file://{tmp_path}/out", *name.split("/"))
        storage.put(uri, name.encode(), root=f"file://{tmp_path}/out")
        assert storage.read(uri) == name.encode()
        assert storage.exists(uri)
    listed = relative([o.uri for o in storage.list(f"{tmp_path}/out")], tmp_path / "out")
    assert listed == sorted(names)
    assert [p.name for p in (tmp_path / "out").rglob(".tmp-*")] == []  # no temporaries left
    storage.delete(join_uri(f"file://{tmp_path}/out", "a..b.jsonl"))
    storage.delete(join_uri(f"file://{tmp_path}/out", "a..b.jsonl"))  # missing: fine
    assert storage.read(join_uri(f"file://{tmp_path}/out", "a..b.jsonl")) is None
    assert not storage.exists(f"file://{tmp_path}/out/a..b.jsonl")


def test_local_put_replaces_atomically(tmp_path: Path) -> None:
    storage = local_storage()
    target = tmp_path / "part.jsonl"
    storage.put(str(target), b"old")
    inode = target.stat().st_ino
    storage.put(str(target), b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_ino != inode  # a new file renamed over, never a partial write


def test_local_put_never_writes_outside_the_root(tmp_path: Path) -> None:
    storage = local_storage()
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "job1").symlink_to(outside)
    root = f"file://{out}"
    with pytest.raises(UsageError, match="symlink leads out"):
        storage.put(f"{root}/job1/part.jsonl", b"x", root=root)
    with pytest.raises(UsageError, match="symlink leads out"):
        storage.put(f"{root}/job1/new/deeper/part.jsonl", b"x", root=root)
    with pytest.raises(UsageError, match="outside"):
        storage.put(f"file://{tmp_path}/elsewhere/part.jsonl", b"x", root=root)
    with pytest.raises(UsageError, match=r"'\.\.'"):
        storage.put(f"{root}/../outside/part.jsonl", b"x", root=root)
    with pytest.raises(UsageError):
        join_uri(root, "..", "outside", "part.jsonl")
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "elsewhere").exists()
    # A symlink as the file itself is replaced, not written through.
    (out / "own").mkdir()
    (out / "own" / "part.jsonl").symlink_to(outside / "victim")
    storage.put(f"{root}/own/part.jsonl", b"x", root=root)
    assert not (outside / "victim").exists()
    assert (out / "own" / "part.jsonl").read_bytes() == b"x"


def test_local_check_access(tmp_path: Path) -> None:
    storage = local_storage()
    storage.check_access(str(tmp_path), write=False)
    storage.check_access(str(tmp_path / "new" / "deeper"), write=True)
    with pytest.raises(UsageError, match="no such file or directory"):
        storage.check_access(str(tmp_path / "missing"), write=False)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UsageError, match="is a file"):
        storage.check_access(str(tmp_path / "file" / "out"), write=True)


def test_local_read_of_a_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises((UsageError, StorageUnavailable)):
        local_storage().read(str(tmp_path))


# ----------------------------------------------------------------------------- memory


def test_the_memory_backend_behind_storage_behaves_like_s3() -> None:
    store: ObjectStore = memory_storage(Settings(allowed_buckets=["photos", "labels"]))[0]
    keys = ["b.jpg", "a/ü.jpg", "a b.jpg", "a/", "c" * 300]
    for key in keys:
        store.put(f"s3://photos/{key}", key.encode())
    listed = [o.uri for o in store.list("s3://photos/")]
    assert listed == sorted(f"s3://photos/{k}" for k in keys)
    assert [o.uri for o in store.list("s3://photos", start_after=listed[1])] == listed[2:]
    assert store.get("s3://photos/b.jpg", max_bytes=10)[0] == b"b.jpg"
    for uri, kind in [
        ("s3://photos/missing.jpg", "not_found"),
        ("s3://other/b.jpg", "forbidden"),
        (listed[-1], "too_large"),
    ]:
        with pytest.raises(ImageError) as info:
            store.get(uri, max_bytes=10)
        assert info.value.kind == kind
    assert store.read("s3://labels/missing") is None
    assert store.exists("s3://photos/b.jpg")
    store.delete("s3://photos/b.jpg")
    assert not store.exists("s3://photos/b.jpg")


def test_memory_storage_injected_failures() -> None:
    store, memory = memory_storage()
    store.put("s3://photos/x.jpg", b"x")
    memory.fail("s3://photos/x.jpg", StorageUnavailable("s3://photos/x.jpg: boom"), times=2)
    for _ in range(2):
        with pytest.raises(StorageUnavailable):
            store.get("s3://photos/x.jpg", max_bytes=10)
    assert store.get("s3://photos/x.jpg", max_bytes=10)[0] == b"x"


def test_memory_storage_is_thread_safe() -> None:
    store, _memory = memory_storage()

    def writer(n: int) -> None:
        for i in range(200):
            store.put(f"s3://bkt/{n}/{i}", b"x")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(1 for _ in store.list("s3://bkt/")) == 1600


def test_the_local_listing_keeps_files_and_links_inside_only(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    make_files(outside, ["secret.jpg"])
    root = tmp_path / "root"
    make_files(root, ["a.jpg", "b/c.png", "b/d.txt", "e f#?.jpg", "z.jpg"])
    (root / "link-in.jpg").symlink_to(root / "a.jpg")
    (root / "link-out.jpg").symlink_to(outside / "secret.jpg")
    (root / "dangling.jpg").symlink_to(tmp_path / "nothing")
    (root / "dir-link").symlink_to(root / "b")
    os.mkfifo(root / "fifo.jpg")
    storage = local_storage()
    everything = [o.uri for o in storage.list(str(root))]
    assert relative(everything, root) == [
        "a.jpg", "b/c.png", "b/d.txt", "e f#?.jpg", "link-in.jpg", "z.jpg",
    ]  # fmt: skip
    for after in (f"file://{root}/b/", f"file://{root}/b/c.png", f"file://{root}/e"):
        resumed = [o.uri for o in storage.list(str(root), start_after=after)]
        assert resumed == [u for u in everything if u > after]
    with pytest.raises(UsageError, match="not in LABELMILL_ALLOWED_BUCKETS"):
        local_storage(allowed_buckets=["photos"]).list("s3://other/")


def test_local_folders_are_the_directories_directly_below(tmp_path: Path) -> None:
    (tmp_path / "out" / "j-1" / "_inputs").mkdir(parents=True)
    (tmp_path / "out" / "j-2").mkdir()
    (tmp_path / "out" / "top.json").write_text("{}")
    s = Storage(Settings())
    assert list(s.folders(f"file://{tmp_path}/out")) == ["j-1", "j-2"]
    assert list(s.folders(f"file://{tmp_path}/missing/")) == []
    mem, _objects = memory_storage()
    mem.put("s3://bkt/out/j-1/x", b"x", content_type="text/plain")
    mem.put("s3://bkt/out/y", b"x", content_type="text/plain")
    assert list(mem.folders("s3://bkt/out/")) == ["j-1"]
