"""``make screenshot``: a picture of a job's page, as a person sees it, for the README.

Drives Debian's headless ``chromium`` with Playwright (the dev extra), like
the browser tests. Run it against the local stack after ``make demo``::

    python -m labelmill.dev.screenshot [--url http://127.0.0.1:8080/] [--job JOB]
        [--out docs/images/browse.png]

Without ``--job`` it takes the newest job on the job list. It waits for the
charts to be drawn and every thumbnail in view to load before it shoots.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labelmill.dev.screenshot")
    parser.add_argument("--url", default="http://127.0.0.1:8080/", help="producer browse")
    parser.add_argument("--job", default=None)
    parser.add_argument("--out", type=Path, default=Path("docs/images/browse.png"))
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium")
    if chromium is None:
        print("screenshot: chromium is not installed (make system-deps)", file=sys.stderr)
        return 2
    from playwright.sync_api import Error, sync_playwright

    base = args.url.rstrip("/")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            try:
                if args.job:
                    page.goto(f"{base}/jobs/{args.job}")
                else:
                    page.goto(f"{base}/")
                    page.locator("#jobs a").first.click()
            except Error as exc:
                print(f"screenshot: {base}: {exc.message.splitlines()[0]}", file=sys.stderr)
                return 2
            page.wait_for_function(
                "document.querySelectorAll('#labels-chart .bars path').length > 0"
            )
            page.wait_for_function(
                "() => [...document.querySelectorAll('#least img')].every(img => img.complete)"
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
        finally:
            browser.close()
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
