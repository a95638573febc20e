"""labelmill.dev.cluster.plot: events.jsonl to a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelmill.dev.cluster.plot import NoEvents, _steps, plot, read_events


def _write(path: Path, events: list[dict[str, object]], torn: bool = False) -> None:
    text = "".join(json.dumps(e) + "\n" for e in events)
    path.write_text(text + ('{"t": 9' if torn else ""))


def test_steps_hold_each_value_until_the_next_change() -> None:
    xs, ys = _steps([(0.0, 0.0), (2.0, 3.0), (5.0, 1.0)], end=8.0)
    assert list(zip(xs, ys, strict=True)) == [
        (0.0, 0.0),
        (2.0, 0.0),
        (2.0, 3.0),
        (5.0, 3.0),
        (5.0, 1.0),
        (8.0, 1.0),
    ]


def test_read_events_sorts_and_ignores_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    _write(
        path,
        [
            {"t": 3, "deployment": "workers", "replicas": 1, "ready": 0, "outstanding": 4},
            {"t": 1, "deployment": "workers", "replicas": 0, "ready": 0, "outstanding": 0},
        ],
        torn=True,
    )
    assert [e["t"] for e in read_events(path)] == [1, 3]


def test_no_events_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NoEvents, match="no such file"):
        read_events(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(NoEvents, match="no events"):
        read_events(tmp_path / "empty.jsonl")


def test_plot_draws_each_tier_and_the_outstanding_line(tmp_path: Path) -> None:
    events = [
        {"t": 0, "deployment": "workers", "replicas": 0, "ready": 0, "outstanding": 0},
        {"t": 0, "deployment": "tf-serving", "replicas": 0, "ready": 0, "outstanding": 0},
        {"t": 5, "deployment": "workers", "replicas": 2, "ready": 0, "outstanding": 30},
        {"t": 9, "deployment": "workers", "replicas": 2, "ready": 2, "outstanding": 30},
        {"t": 40, "deployment": "workers", "replicas": 0, "ready": 0, "outstanding": 0},
    ]
    _write(tmp_path / "events.jsonl", events)
    out = tmp_path / "plot" / "scaling.png"
    plot(tmp_path / "events.jsonl", out)
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[0] > 400 and image.shape[1] > 800
    # Something besides white background and black axes/text was drawn: the tiers' colours.
    coloured = (image.max(axis=2).astype(int) - image.min(axis=2)) > 60
    assert coloured.sum() > 500
