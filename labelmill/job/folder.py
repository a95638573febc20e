"""A job's folder in storage, ``<output>/<job>/``: every file's name, written and read.

::

    _job.json                 the spec (and enqueue options), written at enqueue,
                              so that ``reconcile`` works after Redis lost the job
    _inputs/NNNNNNNNN.jsonl   the input manifest: every batch's URIs and listed
                              ETags, in chunks, each written before its batches
                              are sent (``labelmill.job.inputs``)
    part-NNNNNNNNN.jsonl      one per batch: a result line per image
    _manifest.json            written once, when the last batch is counted
    _SUCCESS                  empty, after the manifest (Hadoop's convention)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from labelmill.errors import UsageError
from labelmill.job.model import JobSpec
from labelmill.job.record import SCHEMA, Record, dumps_lines, from_dict, loads_lines
from labelmill.storage import ObjectStore, join_uri

SPEC_FILE = "_job.json"
MANIFEST_FILE = "_manifest.json"
SUCCESS_FILE = "_SUCCESS"
_PART = "part-{:09d}.jsonl"
_PART_RE = re.compile(r"part-(\d{9})\.jsonl")


def part_name(batch_no: int) -> str:
    return _PART.format(batch_no)


def job_uri(spec: JobSpec) -> str:
    """Where a job's folder is."""
    return join_uri(spec.output, spec.job_id)


class JobFolder:
    """``<output>/<job_id>/`` on ``storage``; writes stay inside ``output``."""

    def __init__(self, storage: ObjectStore, output: str, job_id: str) -> None:
        self.storage = storage
        self.output = output
        self.uri = join_uri(output, job_id)

    @classmethod
    def of(cls, storage: ObjectStore, spec: JobSpec) -> JobFolder:
        return cls(storage, spec.output, spec.job_id)

    def put(self, name: str, body: bytes, content_type: str) -> None:
        """Write ``<folder>/<name>``; never outside the output root."""
        self.storage.put(
            join_uri(self.uri, name), body, content_type=content_type, root=self.output
        )

    # -- the spec ------------------------------------------------------------
    def write_spec(self, spec: JobSpec, extra: Mapping[str, Any]) -> None:
        body = {"schema": SCHEMA, **spec.as_dict(), **extra}
        self.put(SPEC_FILE, json.dumps(body, indent=2).encode() + b"\n", "application/json")

    def read_spec(self) -> JobSpec | None:
        data = self.storage.read(join_uri(self.uri, SPEC_FILE))
        return JobSpec.from_dict(json.loads(data)) if data else None

    def read_options(self) -> dict[str, Any]:
        """The enqueue options beside the spec in ``_job.json`` (none if it is missing)."""
        data = self.storage.read(join_uri(self.uri, SPEC_FILE))
        body = json.loads(data) if data else {}
        spec_keys = {"schema", *JobSpec.__dataclass_fields__}
        return {k: v for k, v in body.items() if k not in spec_keys}

    # -- part files ------------------------------------------------------------
    def part_uri(self, batch_no: int) -> str:
        return join_uri(self.uri, part_name(batch_no))

    def write_part(self, batch_no: int, records: Sequence[Record]) -> None:
        self.put(part_name(batch_no), dumps_lines(records), "application/x-ndjson")

    def parts(self) -> Iterator[tuple[int, str]]:
        """(batch number, URI) of each part file, in batch order."""
        base = self.uri.rstrip("/")
        for obj in self.storage.list(base + "/"):
            folder, _, name = obj.uri.rpartition("/")
            m = _PART_RE.fullmatch(name)
            if m and folder == base:
                yield int(m.group(1)), obj.uri

    def read_part(self, uri: str) -> list[dict[str, Any]]:
        """A part file's lines as written (none if it is missing); UsageError if corrupt."""
        return self.parse_part(uri, self.storage.read(uri))

    @staticmethod
    def parse_part(uri: str, data: bytes | None) -> list[dict[str, Any]]:
        """The lines of part file ``uri`` read as ``data`` (None: it is missing)."""
        if data is None:
            return []
        try:
            return loads_lines(data)
        except ValueError as exc:
            raise UsageError(f"{uri} is corrupt: {exc}") from None

    def part_records(self, uri: str) -> list[Record]:
        """A part file's lines as records; UsageError if one is not a record."""
        try:
            return [from_dict(d) for d in self.read_part(uri)]
        except ValueError as exc:
            raise UsageError(f"{uri}: {exc}") from None

    def lines(self) -> Iterator[dict[str, Any]]:
        """Every result line of the job, batch by batch."""
        for _no, uri in self.parts():
            yield from self.read_part(uri)

    # -- the end -----------------------------------------------------------------
    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        """``_manifest.json``, then ``_SUCCESS``."""
        body = json.dumps(manifest, indent=2).encode() + b"\n"
        self.put(MANIFEST_FILE, body, "application/json")
        self.put(SUCCESS_FILE, b"", "text/plain")
