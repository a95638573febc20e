"""``producer browse``: a job's results as web pages (see ``producer.browse.server``)."""

from __future__ import annotations

import asyncio
import webbrowser
from collections.abc import Callable

from labelmill.errors import UsageError
from labelmill.job import Ledger
from labelmill.settings import Settings
from labelmill.storage import ObjectStore


def serve(
    settings: Settings,
    storage: ObjectStore,
    ledger: Ledger,
    *,
    host: str,
    port: int,
    job_id: str | None,
    open_browser: bool,
    announce: Callable[[str], None],
) -> None:
    """Serve until interrupted; refuse a non-loopback address without a login."""
    # Imported here: Tornado and Plotly are the `browse` extra, not every producer's.
    try:
        from producer.browse.server import LOOPBACK, Browser, make_app, plotly_js_dir
        from producer.browse.thumbs import Thumbnails

        plotly_js_dir()
    except ImportError as exc:
        raise UsageError(
            f"producer browse needs the browse extra ({exc.name} is missing): "
            "pip install 'labelmill[browse]'"
        ) from None
    login = settings.browse_auth.get_secret_value() if settings.browse_auth else None
    if host not in LOOPBACK and login is None:
        raise UsageError(
            f"--host {host} serves beyond this machine: set LABELMILL_BROWSE_AUTH=user:password"
        )
    thumbs = Thumbnails(
        storage, max_bytes=settings.max_object_bytes, max_pixels=settings.max_pixels
    )
    app = make_app(Browser(storage, ledger, thumbs), login=login)

    async def main() -> None:
        try:
            app.listen(port, address=host)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        where = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
        if job_id:
            where += f"jobs/{job_id}"
        announce(where)
        if open_browser:
            webbrowser.open(where)
        await asyncio.Event().wait()

    asyncio.run(main())
