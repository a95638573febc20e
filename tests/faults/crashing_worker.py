"""The worker app with one fault added, for the fault suite only.

``celery -A tests.faults.crashing_worker worker``: the real app
(``workers.app``), whose decoder exits the process at once (``os._exit``, no
cleanup, like a segfaulting native decoder) on an image that contains the
bytes of ``LABELMILL_TEST_CRASH_MARKER``. The fault suite builds a poison
batch with it; production code has no such hook.
"""

from __future__ import annotations

import os
from typing import Any

import workers
from workers import fetch

MARKER = os.environ["LABELMILL_TEST_CRASH_MARKER"].encode()
_decode = fetch.preprocess


def _crash_on_marker(data: bytes, **kwargs: Any) -> Any:
    if MARKER in data:
        os._exit(70)
    return _decode(data, **kwargs)


fetch.preprocess = _crash_on_marker  # type: ignore[assignment]
app = workers.celery_app()
