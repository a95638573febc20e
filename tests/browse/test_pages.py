"""``producer browse`` on the real servers, driven in headless Chromium (Debian's) by Playwright."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import images
from tests.fixtures.procs import Proc, free_port, need_binary
from tests.fixtures.stack import REPO, Pipeline

pytestmark = pytest.mark.integration

try:
    from playwright import sync_api as playwright_api
except ImportError:  # `make install` installs it (the dev extra)
    if os.environ.get("CI"):
        raise
    pytest.skip("playwright is not installed", allow_module_level=True)


def start_browse(p: Pipeline, *args: str, env: dict[str, str] | None = None) -> tuple[Proc, str]:
    """``producer browse`` as its own process; returns it and its base URL once it serves."""
    port = free_port()
    log = p.tmp / f"browse-{port}.log"
    proc = Proc(
        [sys.executable, "-m", "producer", "browse", "--port", str(port), *args],
        log=log,
        env={**p.env, **(env or {})},
        cwd=REPO,
    )
    proc.wait_ready(lambda: "http://" in log.read_text(), timeout=30, what="producer browse")
    return proc, f"http://127.0.0.1:{port}"


def status_of(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    chromium = need_binary(shutil.which("chromium"), "chromium")
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 1600})
        finally:
            browser.close()


def test_the_job_page_shows_what_the_job_decided(pipeline: Pipeline, page: Any) -> None:
    p = pipeline
    for i in range(24):
        p.put(f"photos/img-{i:02d}.jpg", images.jpeg(64, 48, seed=i))
    p.put("photos/broken.jpg", images.truncated_jpeg())
    p.start_worker()
    job = p.enqueue(f"s3://{p.bucket}/photos/", f"s3://{p.bucket}/labels/", "--batch-size", "8")
    job_id = job["job_id"]
    p.wait_done(job_id)
    proc, base = start_browse(p, job_id)
    try:
        expect = playwright_api.expect
        page.goto(f"{base}/")
        page.get_by_role("link", name=job_id).click()
        expect(page.locator("#state")).to_have_text("done")

        # The summary is what `producer status --json` says.
        status = json.loads(p.producer("status", job_id, "--json").stdout)
        for key in ("total", "ok", "error", "skipped"):
            expect(page.locator(f"#count-{key}")).to_have_text(str(status["images"][key]))
        expect(page.locator("#model")).to_contain_text(f"version {status['model']['version']}")
        expect(page.locator("#random-weights")).to_be_visible()  # the tiny model's weights
        manifest = json.loads(
            p.s3.get_object(Bucket=p.bucket, Key=f"labels/{job_id}/_manifest.json")["Body"].read()
        )
        expect(page.locator("#started")).to_have_text(manifest["started_at"])
        expect(page.locator("#finished")).to_have_text(manifest["finished_at"])

        # The label chart's bars are the part files' top-1 counts.
        lines = p.part_lines(job_id)
        top1 = Counter(r["labels"][0]["label"] for r in lines if r["status"] == "ok")
        page.wait_for_function("document.querySelectorAll('#labels-chart .bars path').length > 0")
        bars = page.evaluate(
            "() => { const d = document.getElementById('labels-chart').data[0];"
            " return Object.fromEntries(d.y.map((label, i) => [label, d.x[i]])); }"
        )
        assert bars == dict(top1.most_common(30))

        # The error list shows the broken file with its kind.
        broken = page.locator(".error-kind[data-kind='decode']")
        expect(broken).to_contain_text("decode (1)")
        expect(broken).to_contain_text(f"s3://{p.bucket}/photos/broken.jpg")

        # A bar opens its label's gallery, whose thumbnails load.
        label, count = top1.most_common(1)[0]
        # The most frequent is on top; a person's click (Plotly's drag layer
        # lies over the bars, so the mouse clicks where the bar is drawn).
        bar = page.locator("#labels-chart .bars path").last.bounding_box()
        page.mouse.click(bar["x"] + bar["width"] / 2, bar["y"] + bar["height"] / 2)
        expect(page.locator("h1")).to_have_text(label)
        thumbs = page.locator("#gallery img")
        expect(thumbs).to_have_count(count)
        page.wait_for_function(
            "() => [...document.querySelectorAll('#gallery img')]"
            ".every(img => img.complete && img.naturalWidth > 0)"
        )
        first = page.locator("#gallery .thumb").first
        expect(first.locator(".top5 li")).to_have_count(5)
        expect(first.locator(".top5")).to_be_hidden()
        first.click()
        expect(first.locator(".top5")).to_be_visible()
        expect(page.locator(".warning")).to_be_visible()
        page.screenshot(path=str(p.tmp / "gallery.png"), full_page=True)
    finally:
        proc.stop()


def test_a_running_job_moves_on_screen_without_a_reload(pipeline: Pipeline, page: Any) -> None:
    p = pipeline
    for i in range(12):
        p.put(f"photos/img-{i:02d}.jpg", images.jpeg(40, 30, seed=i))
    job = p.enqueue(f"s3://{p.bucket}/photos/", f"s3://{p.bucket}/labels/", "--batch-size", "4")
    job_id = job["job_id"]
    proc, base = start_browse(p)
    try:
        page.goto(f"{base}/jobs/{job_id}")
        expect = playwright_api.expect
        expect(page.locator("#state")).to_have_text("running")
        expect(page.locator("#count-ok")).to_have_text("0")
        page.evaluate("window.__same_page = true")  # gone if the page reloads
        p.start_worker()
        expect(page.locator("#count-ok")).to_have_text("12", timeout=60_000)
        expect(page.locator("#state")).to_have_text("done")
        assert page.evaluate("window.__same_page") is True
        bars = page.evaluate("document.getElementById('labels-chart').data[0].x")
        assert sum(bars) == 12
    finally:
        proc.stop()


def test_requests_outside_the_job_get_a_4xx_and_a_login_guards_other_addresses(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    p.put("photos/a.jpg", images.jpeg(40, 30, seed=1))
    p.start_worker()
    job_id = p.enqueue(f"s3://{p.bucket}/photos/", f"s3://{p.bucket}/labels/")["job_id"]
    p.wait_done(job_id)
    proc, base = start_browse(p)
    try:
        assert status_of(f"{base}/jobs/{job_id}/thumbs/0/0") == 200
        assert status_of(f"{base}/jobs/{job_id}/thumbs/0/1") == 404  # no such line
        assert status_of(f"{base}/jobs/{job_id}/thumbs/9/0") == 404  # no such part
        assert status_of(f"{base}/jobs/no-such-job") == 404
        assert status_of(f"{base}/api/jobs/no-such-job") == 404
        assert status_of(f"{base}/jobs/..%2F..%2Fetc%2Fpasswd") == 404
        assert status_of(f"{base}/static/..%2F..%2Fserver.py") in (403, 404)
    finally:
        proc.stop()

    # Beyond loopback, a login is required: refused without one, asked for with one.
    res = p.producer("browse", "--host", "0.0.0.0", "--port", str(free_port()), check=False)
    assert res.returncode == 2 and "LABELMILL_BROWSE_AUTH" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    proc, base = start_browse(p, "--host", "0.0.0.0", env={"LABELMILL_BROWSE_AUTH": "ann:s3cret"})
    try:
        assert status_of(f"{base}/api/jobs/{job_id}") == 401
        assert status_of(f"{base}/plotly/plotly.min.js") == 401
        wrong = {"Authorization": "Basic " + base64.b64encode(b"ann:nope").decode()}
        assert status_of(f"{base}/api/jobs/{job_id}", wrong) == 401
        right = {"Authorization": "Basic " + base64.b64encode(b"ann:s3cret").decode()}
        assert status_of(f"{base}/api/jobs/{job_id}", right) == 200
    finally:
        proc.stop()
