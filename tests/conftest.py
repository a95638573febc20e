"""Session-wide fixtures: real Redis, real S3 (SeaweedFS) and a real model server.

Each is started once per test session on free ports and stopped at the end.
A missing server binary fails the run when CI is set, and skips locally.
"""

pytest_plugins = [
    "tests.fixtures.servers",
    "tests.fixtures.model_server",
    "tests.fixtures.stack",
]
