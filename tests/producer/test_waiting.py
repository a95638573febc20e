"""How `producer enqueue` pins a version: waiting on a model tier that is not there yet.

The model server is an in-memory stand-in answering what TF Serving's
GetModelStatus would; the ledger is a real Redis.
"""

from __future__ import annotations

import pytest

from labelmill.errors import ModelNotFound, ModelUnavailable
from labelmill.ledger import Ledger
from producer import waiting

pytestmark = pytest.mark.integration


class Tier:
    """Answers model_versions() from a script, one answer per call (the last repeats)."""

    def __init__(self, ledger: Ledger, *answers: dict[int, str] | Exception) -> None:
        self.answers = list(answers)
        self.ledger = ledger
        self.waiters_seen: list[int] = []

    def model_versions(self) -> dict[int, str]:
        self.waiters_seen.append(int(self.ledger.r.zcard(self.ledger.waiting_key)))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def ledger(redis_url: str) -> Ledger:
    return Ledger.from_url(redis_url, prefix="t")


def test_a_serving_tier_is_asked_once_and_nobody_waits(ledger: Ledger) -> None:
    notes: list[str] = []
    tier = Tier(ledger, {1: "AVAILABLE", 2: "AVAILABLE", 3: "LOADING"})
    assert waiting.newest_version(tier, ledger, wait_s=5, say=notes.append) == 2
    assert notes == [] and tier.waiters_seen == [0]


def test_waits_through_down_and_loading_as_a_registered_waiter(ledger: Ledger) -> None:
    notes: list[str] = []
    tier = Tier(
        ledger,
        ModelUnavailable("127.0.0.1:1: UNAVAILABLE: connection refused"),
        ModelUnavailable("127.0.0.1:1: UNAVAILABLE: connection refused"),
        {3: "LOADING"},
        {3: "AVAILABLE"},
    )
    got = waiting.newest_version(tier, ledger, wait_s=30, say=notes.append, poll_s=0.01)
    assert got == 3
    # Registered from the first retry on, and gone once the version is known.
    assert tier.waiters_seen == [0, 1, 1, 1]
    assert ledger.r.exists(ledger.waiting_key) == 0
    assert notes[0].startswith("waiting up to 30s for a model version: model server not answering")
    assert notes[1] == "still waiting: model server is loading (versions: 3 LOADING)"
    assert notes[-1] == "model version 3 is AVAILABLE"


def test_an_unknown_model_fails_at_once(ledger: Ledger) -> None:
    tier = Tier(ledger, ModelNotFound("servable not found for request: inceptoin"))
    with pytest.raises(ModelNotFound):
        waiting.newest_version(tier, ledger, wait_s=30, say=lambda _: None)
    assert ledger.r.exists(ledger.waiting_key) == 0


def test_gives_up_after_the_wait_and_deregisters(ledger: Ledger) -> None:
    tier = Tier(ledger, {})
    with pytest.raises(ModelUnavailable, match=r"within 0.2s \(model server has no version"):
        waiting.newest_version(tier, ledger, wait_s=0.2, say=lambda _: None, poll_s=0.01)
    assert ledger.r.exists(ledger.waiting_key) == 0
