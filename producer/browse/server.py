"""``producer browse``: web pages that show what a job decided, served by Tornado.

Routes::

    /                                 recent jobs (the ledger's), each linking to its page
    /jobs/<job>                       summary, label chart, confidence, errors; live
    /jobs/<job>/labels/<label>        the gallery of a top-1 label, by score
    /api/jobs/<job>                   the page's data: status (as ``status --json``) + aggregates
    /jobs/<job>/thumbs/<batch>/<i>    a thumbnail of line i of part file <batch>
    /static/...                       the page's script and style; Plotly from its package

Charts are Plotly's, served from the ``plotly`` package's own copy (no
network at install or run time). Storage and the ledger are called in a
thread pool, so a slow read never stalls other requests. On an address
other than loopback every request needs the login in ``LABELMILL_BROWSE_AUTH``
(``user:password``, HTTP basic auth, as Flower's ``FLOWER_BASIC_AUTH``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import importlib.util
import json
import os
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import tornado.web
from tornado.ioloop import IOLoop

from labelmill.errors import JobNotFound
from labelmill.job import Ledger
from labelmill.job.record import random_weights
from labelmill.job.status import is_valid_job_id, status_dict, times_dict
from labelmill.storage import ObjectStore
from producer.browse.thumbs import Thumbnails
from producer.browse.view import JobView

HERE = os.path.dirname(__file__)
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
VIEWS = 16  # jobs whose aggregates are kept

T = TypeVar("T")


def plotly_js_dir() -> str:
    """The folder of the ``plotly`` package's bundled ``plotly.min.js``."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("No module named 'plotly'", name="plotly")
    return os.path.join(os.path.dirname(spec.origin), "package_data")


class Browser:
    """What the handlers share: storage, the ledger, job views, thumbnails."""

    def __init__(self, storage: ObjectStore, ledger: Ledger, thumbs: Thumbnails) -> None:
        self.storage = storage
        self.ledger = ledger
        self.thumbs = thumbs
        self.pool = ThreadPoolExecutor(8, thread_name_prefix="browse")
        self._views: OrderedDict[str, JobView] = OrderedDict()

    async def run(self, fn: Callable[[], T]) -> T:
        return await IOLoop.current().run_in_executor(self.pool, fn)

    def view(self, job_id: str) -> JobView:
        """The job's view, refreshed; JobNotFound for a job the ledger does not know."""
        if not is_valid_job_id(job_id):
            raise JobNotFound(job_id)
        spec = self.ledger.counts(job_id).spec
        view = self._views.get(job_id)
        if view is None:
            view = self._views[job_id] = JobView(self.storage, spec)
            while len(self._views) > VIEWS:
                self._views.popitem(last=False)
        self._views.move_to_end(job_id)
        view.refresh()
        return view

    def page_data(self, job_id: str) -> dict[str, Any]:
        view = self.view(job_id)
        counts = self.ledger.counts(job_id)
        return {
            "status": status_dict(counts),
            "times": times_dict(counts),
            "summary": view.summary(),
        }


def require_login(handler: tornado.web.RequestHandler) -> None:
    """401 unless the request carries the app's login (when it has one)."""
    login: str | None = handler.application.settings.get("login")
    if login is None:
        return
    header = handler.request.headers.get("Authorization", "")
    given = ""
    if header.startswith("Basic "):
        try:
            given = base64.b64decode(header[6:], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            given = ""
    if not hmac.compare_digest(given.encode(), login.encode()):
        handler.set_header("WWW-Authenticate", 'Basic realm="labelmill"')
        raise tornado.web.HTTPError(401)


class Static(tornado.web.StaticFileHandler):
    def prepare(self) -> None:
        require_login(self)


class Handler(tornado.web.RequestHandler):
    @property
    def browser(self) -> Browser:
        browser: Browser = self.application.settings["browser"]
        return browser

    def prepare(self) -> None:
        require_login(self)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(f"{status_code} {self._reason}\n")

    async def job_data(self, job_id: str) -> dict[str, Any]:
        try:
            return await self.browser.run(lambda: self.browser.page_data(job_id))
        except JobNotFound:
            raise tornado.web.HTTPError(404, reason="unknown job") from None


class JobsPage(Handler):
    async def get(self) -> None:
        def rows() -> list[dict[str, Any]]:
            out = []
            for job_id in self.browser.ledger.recent_jobs(50):
                try:
                    out.append(status_dict(self.browser.ledger.counts(job_id)))
                except JobNotFound:
                    continue  # expired between the two reads
            return out

        self.render("jobs.html", jobs=await self.browser.run(rows))


class JobPage(Handler):
    async def get(self, job_id: str) -> None:
        data = await self.job_data(job_id)
        model = data["status"]["model"]
        self.render(
            "job.html",
            job_id=job_id,
            data=json.dumps(data),
            random=random_weights(model.get("weights")),
        )


class JobApi(Handler):
    async def get(self, job_id: str) -> None:
        self.set_header("Cache-Control", "no-store")
        self.write(await self.job_data(job_id))


class GalleryPage(Handler):
    async def get(self, job_id: str, label: str) -> None:
        def gallery() -> tuple[int, list[dict[str, Any]], bool]:
            count, images = self.browser.view(job_id).gallery(label)
            weights = self.browser.ledger.counts(job_id).model_weights
            return count, images, random_weights(weights)

        try:
            count, images, random = await self.browser.run(gallery)
        except JobNotFound:
            raise tornado.web.HTTPError(404, reason="unknown job") from None
        if not count:
            raise tornado.web.HTTPError(404, reason="no image has this label")
        self.render(
            "gallery.html", job_id=job_id, label=label, count=count, images=images, random=random
        )


class Thumbnail(Handler):
    async def get(self, job_id: str, batch: str, index: str) -> None:
        def make() -> bytes | None:
            uri = self.browser.view(job_id).uri_of(int(batch), int(index))
            return None if uri is None else self.browser.thumbs.get(uri)

        try:
            data = await self.browser.run(make)
        except JobNotFound:
            raise tornado.web.HTTPError(404, reason="unknown job") from None
        if data is None:
            raise tornado.web.HTTPError(404, reason="no thumbnail")
        self.set_header("Content-Type", "image/jpeg")
        self.set_header("Cache-Control", "max-age=3600")
        self.write(data)


def make_app(browser: Browser, *, login: str | None) -> tornado.web.Application:
    """The web application; ``login`` (``user:password``) guards every route when given."""
    job = r"([A-Za-z0-9_.-]{1,128})"
    return tornado.web.Application(
        [
            (r"/", JobsPage),
            (rf"/jobs/{job}", JobPage),
            (rf"/jobs/{job}/labels/([^/]+)", GalleryPage),
            (rf"/jobs/{job}/thumbs/(\d{{1,9}})/(\d{{1,6}})", Thumbnail),
            (rf"/api/jobs/{job}", JobApi),
            (r"/plotly/(plotly\.min\.js)", Static, {"path": plotly_js_dir()}),
        ],
        template_path=os.path.join(HERE, "templates"),
        static_path=os.path.join(HERE, "static"),
        static_handler_class=Static,
        browser=browser,
        login=login,
        autoescape="xhtml_escape",
        compress_response=True,
    )
