"""Every bad `producer` command line: one line on stderr, exit 2 or 3, no traceback.

Exit 2 is a usage error, 3 a service that fails. Each is checked before any
expensive work starts: the commands run against a real Redis, and none of
them writes anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PRODUCER = str(Path(sys.executable).parent / "producer")

pytestmark = pytest.mark.integration

# (arguments, exit code, words the line must hold); {redis} is a live Redis.
BAD = [
    (["--redis-url", "notaurl", "status", "x"], 2, ["redis_url", "notaurl"]),
    (["--redis-url", "redis://127.0.0.1:1/0", "status", "x"], 3, ["Redis"]),
    (["no-such-command"], 2, ["no-such-command"]),
    (["status", "bad/id"], 2, ["bad/id"]),
    (["status", "no-such-job"], 2, ["unknown job"]),
    (["watch", "no-such-job"], 2, ["unknown job"]),
    (["watch", "x", "--interval", "0"], 2, ["--interval"]),
    (["jobs", "--limit", "0"], 2, ["--limit"]),
    (["results", "no-such-job"], 2, ["no-such-job"]),
    (["results", "x", "--format", "xml"], 2, ["xml"]),
    (["cancel", "no-such-job"], 2, ["no-such-job"]),
    (["retry", "no-such-job"], 2, ["no-such-job"]),
    (["reconcile", "no-such-job"], 2, ["--output"]),
    (["reconcile", "no-such-job", "--output", "ftp://x/y"], 2, ["ftp://x/y"]),
    (["enqueue", "in/"], 2, ["--output"]),
    (["enqueue", "ftp://x/y", "--output", "s3://abc/o"], 2, ["ftp://x/y"]),
    (["enqueue", "in/", "--output", "out/", "--batch-size", "0"], 2, ["--batch-size"]),
    (["enqueue", "in/", "--output", "out/", "--job-id", "../x"], 2, ["../x"]),
]


@pytest.mark.parametrize(("args", "code", "words"), BAD, ids=[" ".join(a) for a, _c, _w in BAD])
def test_a_bad_command_line_is_one_line_and_an_exit_code(
    args: list[str], code: int, words: list[str], redis_url: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABELMILL_")}
    res = subprocess.run(
        [PRODUCER, *args],
        env={**env, "LABELMILL_REDIS_URL": redis_url},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("producer: "), res.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert res.stdout == ""
