"""The loaded versions of one model, kept in step with its base folder.

Like TF Serving's file system source: a version policy (by default
``latest { num_versions: 2 }``) picks integer version folders to load, a
poller loads new ones without a restart and unloads those the policy drops.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

log = logging.getLogger(__name__)

KEEP_VERSIONS = 2
WARMUP_PATH = Path("assets.extra") / "tf_serving_warmup_requests"


@dataclass
class LoadedVersion:
    """One version in memory: its callable signatures and their SignatureDefs."""

    version: int
    path: Path
    loaded: Any = None  # the object tf.saved_model.load returns
    signature_defs: dict[str, meta_graph_pb2.SignatureDef] = field(default_factory=dict)
    state: str = "LOADING"
    error: str = ""

    def signature(self, name: str) -> Any:
        return self.loaded.signatures[name]


def version_folders(base: Path) -> list[int]:
    """Integer-named folders holding a saved_model.pb, ascending."""
    if not base.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in base.iterdir()
        if p.is_dir() and p.name.isdigit() and (p / "saved_model.pb").is_file()
    )


def read_signature_defs(path: Path) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The serving SignatureDefs of a SavedModel (``__saved_model_init_op`` excluded)."""
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((path / "saved_model.pb").read_bytes())
    defs = saved.meta_graphs[0].signature_def
    return {name: defs[name] for name in defs if not name.startswith("__")}


def replay_warmup(loaded: LoadedVersion) -> int:
    """Run the version's warm-up requests, as TF Serving does before AVAILABLE."""
    from tensorflow_serving.apis import prediction_log_pb2

    path = loaded.path / WARMUP_PATH
    if not path.is_file():
        return 0
    count = 0
    for record in tf.data.TFRecordDataset(str(path)):
        entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = entry.predict_log.request
        name = request.model_spec.signature_name or "serving_default"
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        loaded.signature(name)(**inputs)
        count += 1
    return count


def latest(count: int) -> Callable[[list[int]], list[int]]:
    """The version policy ``latest { num_versions: count }``."""
    return lambda versions: versions[-count:]


class Registry:
    """Thread-safe map of version -> LoadedVersion for one model."""

    def __init__(
        self,
        name: str,
        base: Path,
        choose: Callable[[list[int]], list[int]] | None = None,
        *,
        load_retries: int = 0,
        retry_interval_s: float = 0.0,
        load_error: str | None = None,
    ) -> None:
        self.name = name
        self.base = base
        self.choose = choose or latest(KEEP_VERSIONS)
        self.load_retries = load_retries
        self.retry_interval_s = retry_interval_s
        self.load_error = load_error
        self._versions: dict[int, LoadedVersion] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def snapshot(self) -> dict[int, LoadedVersion]:
        with self._lock:
            return dict(self._versions)

    def available(self, version: int | None) -> LoadedVersion | None:
        """The requested version, or the newest AVAILABLE one; None if not served."""
        with self._lock:
            ready = {v: lv for v, lv in self._versions.items() if lv.state == "AVAILABLE"}
        if version is None:
            return ready[max(ready)] if ready else None
        return ready.get(version)

    def sync(self) -> bool:
        """Load the versions the policy picks and unload the rest; True if anything changed.

        In the order of TF Serving's default version transitions,
        core/availability_preserving_policy.cc
        AvailabilityPreservingPolicy::GetNextAction, one action at a time: a
        version no longer wanted is unloaded only while a wanted one is
        AVAILABLE (or nothing is wanted, or more than one unwanted version
        serves), lowest first; otherwise the highest new wanted version loads
        first. So a model never goes unavailable between two versions.
        """
        wanted = set(self.choose(version_folders(self.base)))
        changed = False
        while True:
            now = self.snapshot()
            unwanted = sorted(v for v in now if v not in wanted)
            for version in unwanted:
                if now[version].state != "AVAILABLE":  # failed loads just go
                    self._unload(version)
                    changed = True
            serving_unwanted = [v for v in unwanted if now[v].state == "AVAILABLE"]
            wanted_serving = any(now[v].state == "AVAILABLE" for v in wanted if v in now)
            if serving_unwanted and (not wanted or wanted_serving or len(serving_unwanted) > 1):
                self._unload(serving_unwanted[0])
                changed = True
                continue
            new = sorted(v for v in wanted if v not in now)
            if not new:
                return changed
            self._load(new[-1])
            changed = True

    def _unload(self, version: int) -> None:
        with self._lock:
            self._versions.pop(version, None)
        log.info("model %s version %d unloaded", self.name, version)

    def _load(self, version: int) -> None:
        path = self.base / str(version)
        entry = LoadedVersion(version, path)
        with self._lock:
            self._versions[version] = entry
        # core/loader_harness.cc LoaderHarness::Load through util/retrier.cc
        # Retry: a failed load is tried max_num_load_retries more times,
        # load_retry_interval_micros apart, then the version ends.
        attempt = 0
        while True:
            try:
                if self.load_error is not None:
                    raise ValueError(self.load_error)
                entry.signature_defs = read_signature_defs(path)
                entry.loaded = tf.saved_model.load(str(path))
                warmed = replay_warmup(entry)
                break
            except Exception as exc:  # a broken export must not take the server down
                log.error(
                    "Loading servable: {name: %s version: %d} failed: %s", self.name, version, exc
                )
                if attempt >= self.load_retries or self._stop.wait(self.retry_interval_s):
                    with self._lock:
                        entry.state = "END"
                        entry.error = str(exc)
                    return
                attempt += 1
                log.info(
                    "Retrying of Loading servable: {name: %s version: %d} retry: %d",
                    self.name,
                    version,
                    attempt,
                )
        with self._lock:
            entry.state = "AVAILABLE"
        log.info(
            "model %s version %d AVAILABLE from %s (%d warm-up requests)",
            self.name,
            version,
            path,
            warmed,
        )

    def start_polling(self, interval_s: float) -> None:
        """Re-scan the base folder every ``interval_s`` seconds in a daemon thread."""

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.sync()
                except Exception:  # keep polling: the next scan may succeed
                    log.exception("model %s: polling %s failed", self.name, self.base)

        self._thread = threading.Thread(target=loop, name="version-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
