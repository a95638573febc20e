"""The one typed settings object.

Read once from ``LABELMILL_*`` environment variables in an entry point, then
passed down explicitly. CLI flags override fields (validated like the rest). S3 is
configured through the AWS SDK's own variables (``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``..., ``AWS_REGION``), not through these settings.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_FORMATS = ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]


class Settings(BaseSettings):
    """Every labelmill setting; environment variable = ``LABELMILL_`` + upper name."""

    model_config = SettingsConfigDict(env_prefix="LABELMILL_", extra="ignore")

    # Broker and ledger share one Redis.
    redis_url: str = "redis://localhost:6379/0"
    key_prefix: str = "labelmill"
    ledger_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)

    # Model server (TF Serving or `serving local`).
    model_server: str = "localhost:8500"
    model_name: str = "inception"
    model_version: int | None = None
    model_timeout_s: float = Field(default=60.0, gt=0)

    # Jobs.
    batch_size: int = Field(default=32, ge=1, le=1024)
    max_outstanding: int = Field(default=10_000, ge=1)

    # Input limits and policy.
    max_object_bytes: int = Field(default=50_000_000, ge=1)
    max_pixels: int = Field(default=100_000_000, ge=1)
    allowed_formats: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_FORMATS)
    )
    allow_local_files: bool = True
    allowed_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Worker behaviour.
    # Bytes in flight per worker process are bounded by
    # fetch_concurrency * max_object_bytes: each fetch thread holds one object
    # at most and decodes it before taking the next.
    fetch_concurrency: int = Field(default=8, ge=1)
    # Fetched bytes and decoding pixels one worker (all its pool processes)
    # holds at once, in MiB; None: half the container's memory limit (cgroup),
    # or 1024 without one (workers/budget.py).
    memory_budget_mb: int | None = Field(default=None, ge=16)
    retry_budget_s: float = Field(default=900.0, gt=0)
    # How long a batch waits for a pinned model version that the model
    # server it reached does not serve (yet): a tier's pods fetch a new version
    # each on its own clock, so for a while one pod serves it and another not.
    version_wait_s: float = Field(default=120.0, ge=0)
    max_deliveries: int = Field(default=5, ge=1)
    # A message held by no live worker (its container died) goes back to the
    # queue this long after its worker last refreshed it; live workers refresh
    # what they hold every quarter of it (workers/visibility.py), so a long
    # batch is never run twice while its worker lives.
    visibility_timeout_s: int = Field(default=60, ge=10)
    # How often each worker sweeps Redis for unacknowledged messages older
    # than the visibility timeout (those of a worker that died) and puts them
    # back on the queue. kombu's own default is one sweep per ~100 s
    # (interval 10 s x throttle 10); we sweep every interval.
    restore_interval_s: int = Field(default=10, ge=1)
    # How often the workers clean up after the dead, one worker per round:
    # what a dead producer marked and never sent (labelmill/orphans.py),
    # manifests a dead worker claimed (labelmill/job/status.py), and batches
    # whose message a dead worker took with it, sent again once two rounds
    # found them without one (labelmill/lost.py).
    sweep_interval_s: float = Field(default=30.0, gt=0)
    metrics_port: int | None = None

    # Object storage deadlines (boto3).
    s3_connect_timeout_s: float = Field(default=5.0, gt=0)
    s3_read_timeout_s: float = Field(default=30.0, gt=0)

    # `producer browse` beyond loopback: "user:password" (HTTP basic auth).
    browse_auth: SecretStr | None = None

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        scheme, sep, _rest = value.partition("://")
        if not sep or scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"{value!r} is not a redis://, rediss:// or unix:// URL")
        return value

    def with_overrides(self, **given: object) -> Settings:
        """These settings with the values ``given`` (None: not given), validated."""
        update = {k: v for k, v in given.items() if v is not None}
        # model_validate, not model_copy (which skips validation) nor the
        # constructor (which would read the environment again).
        return type(self).model_validate({**self.model_dump(), **update})

    @field_validator("allowed_formats", "allowed_buckets", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("allowed_formats")
    @classmethod
    def _known_formats(cls, value: list[str]) -> list[str]:
        names = [v.upper() for v in value]
        if set(names) <= set(DEFAULT_FORMATS):
            # Known names (a test checks them against Pillow): every process
            # that reads settings is spared Pillow's plugins (~30 ms).
            return names
        from PIL import Image

        Image.init()
        unknown = [n for n in names if n not in Image.OPEN]
        if unknown:
            raise ValueError(f"unknown image formats {unknown}; Pillow names such as JPEG, PNG")
        return names
