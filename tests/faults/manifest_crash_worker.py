"""The worker app, dying between claiming a job's manifest and writing it (fault suite only).

``celery -A tests.faults.manifest_crash_worker worker``: the real app, whose
batch that completes a job kills the whole worker (main process and pool,
as a node failure or an OOM kill of the container would) right after the
ledger handed it the manifest claim. Production code has no such hook.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import workers
from workers import batch


def _die_holding_the_claim(*_args: Any, **_kwargs: Any) -> Any:
    os.killpg(os.getpgrp(), signal.SIGKILL)


batch.write_manifest = _die_holding_the_claim
app = workers.celery_app()
