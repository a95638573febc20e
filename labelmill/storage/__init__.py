"""Object storage behind URIs: ``s3://bucket/key`` and ``file:///path``.

``Storage`` applies the policy, then hands each location to its scheme's
backend: boto3 for S3, the local filesystem for files (unit tests add an
in-memory one). It satisfies ``ObjectStore``, what the tiers need.
"""

from labelmill.storage.router import Backend, ObjectStore, Storage
from labelmill.storage.uris import Location, ObjectInfo, join_uri, normalise_uri

__all__ = [
    "Backend",
    "Location",
    "ObjectInfo",
    "ObjectStore",
    "Storage",
    "join_uri",
    "normalise_uri",
]
