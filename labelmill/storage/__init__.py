"""Object storage behind URIs: ``s3://bucket/key`` and ``file:///path``.

``Storage`` is the real thing (boto3 and the local filesystem);
``MemoryStorage`` is for unit tests. Both satisfy ``ObjectStore``.
"""

from labelmill.storage.memory import MemoryStorage
from labelmill.storage.router import ObjectStore, Storage
from labelmill.storage.uris import ObjectInfo, join_uri, normalise_uri

__all__ = ["MemoryStorage", "ObjectInfo", "ObjectStore", "Storage", "join_uri", "normalise_uri"]
