"""Draw a local cluster's ``events.jsonl``: replicas of each tier and outstanding work."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any


class NoEvents(ValueError):
    """The events file is missing or holds no event."""


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events in time order; a torn last line (the writer was killed) is ignored."""
    if not path.is_file():
        raise NoEvents(f"{path}: no such file (was `up` run with this --dir?)")
    events = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and {"t", "deployment", "replicas", "ready"} <= event.keys():
            events.append(event)
    if not events:
        raise NoEvents(f"{path}: no events yet")
    return sorted(events, key=lambda e: float(e["t"]))


def _steps(points: list[tuple[float, float]], end: float) -> tuple[list[float], list[float]]:
    """A step function's corners: each value holds until the next change, the last until ``end``."""
    xs: list[float] = []
    ys: list[float] = []
    for i, (t, v) in enumerate(points):
        xs.append(t)
        ys.append(v)
        xs.append(points[i + 1][0] if i + 1 < len(points) else end)
        ys.append(v)
    return xs, ys


def plot(events: Path, out: Path) -> None:
    """Write a PNG: replicas (solid), ready (dashed) and pending pods (dotted) per scaled
    workload, and the outstanding batches below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = read_events(events)
    end = float(rows[-1]["t"])
    replicas: dict[str, list[tuple[float, float]]] = defaultdict(list)
    ready: dict[str, list[tuple[float, float]]] = defaultdict(list)
    pending: dict[str, list[tuple[float, float]]] = defaultdict(list)
    outstanding: list[tuple[float, float]] = []
    for e in rows:
        t = float(e["t"])
        replicas[e["deployment"]].append((t, float(e["replicas"])))
        ready[e["deployment"]].append((t, float(e["ready"])))
        pending[e["deployment"]].append((t, float(e.get("pending") or 0)))
        if e.get("outstanding") is not None:
            outstanding.append((t, float(e["outstanding"])))

    fig, (top, bottom) = plt.subplots(
        2, 1, sharex=True, figsize=(10, 5.5), height_ratios=(3, 2), constrained_layout=True
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # The tiers the autoscaler moves; a workload that keeps one count is left out.
    moving = [n for n in sorted(replicas) if len({v for _, v in replicas[n]}) > 1]
    for i, name in enumerate(moving or sorted(replicas)):
        colour = colours[i % len(colours)]
        top.plot(*_steps(replicas[name], end), color=colour, label=f"{name} replicas")
        top.plot(*_steps(ready[name], end), color=colour, linestyle="--", label=f"{name} ready")
        if any(v for _, v in pending[name]):
            top.plot(
                *_steps(pending[name], end), color=colour, linestyle=":",
                label=f"{name} pending",
            )  # fmt: skip
    top.set_ylabel("pods")
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    top.grid(alpha=0.3)
    top.set_title("labelmill on the local cluster: replicas set by KEDA/HPA, and ready pods")
    if outstanding:
        bottom.plot(*_steps(outstanding, end), color="black")
    bottom.set_ylabel("outstanding batches")
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel("seconds since `up`")
    bottom.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
