"""The ``producer`` command: enqueue jobs and follow them.

Exit codes: 0 success; 1 the job finished with error lines (``watch``);
2 bad usage or unknown job; 3 a service unreachable or refusing
credentials; 4 the job was cancelled.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated

import typer
from celery import Celery
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from labelmill.errors import (
    LabelmillError,
    ModelNotFound,
    ModelUnavailable,
    ServiceError,
    UsageError,
)
from labelmill.job import Batch, Ledger
from labelmill.job.folder import JobFolder
from labelmill.job.picture import complete_lines
from labelmill.job.status import is_valid_job_id, status_dict
from labelmill.queue import make_celery
from labelmill.settings import Settings
from labelmill.storage import Storage
from producer import enqueue as enq
from producer import ops
from producer.results import format_records
from producer.sending import Cancelled
from producer.watch import exit_code, summary, watch_json, watch_live

try:  # typer bundles its own click
    from typer._click.exceptions import ClickException as _ClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import ClickException as _ClickException  # type: ignore[assignment]

EXIT_OK, EXIT_ERRORS, EXIT_USAGE, EXIT_SERVICE, EXIT_CANCELLED = 0, 1, 2, 3, 4

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Enqueue image-classification jobs and follow their progress.",
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)
out = Console()


@dataclass
class Env:
    """Services built lazily from one settings object."""

    settings: Settings

    @cached_property
    def storage(self) -> Storage:
        return Storage(self.settings)

    @cached_property
    def ledger(self) -> Ledger:
        s = self.settings
        return Ledger.from_settings(s)

    @cached_property
    def celery(self) -> Celery:
        return make_celery(self.settings)

    def version_now(self) -> int | None:
        """The version to pin at enqueue: the one asked for, else the newest AVAILABLE now.

        None when no model server serves a version yet (the tier is at zero
        or loading): the producer does not wait for one. Its batches are
        outstanding at once, which is what scales the tiers up, and the job's
        first batch to meet an AVAILABLE server pins the newest version.
        """
        s = self.settings
        if s.model_version is not None:
            return s.model_version
        # Imported here: grpc and numpy take a tenth of a second, and a job
        # with a pinned version (or resumed) never talks to the model server.
        from labelmill.model_client import ModelClient

        try:
            with ModelClient(s.model_server, s.model_name, timeout_s=5.0) as client:
                return client.newest_available_version()
        except (ModelUnavailable, ModelNotFound) as exc:
            _note(
                f"no model version is AVAILABLE yet ({exc}); the job's first batch to reach "
                f"an AVAILABLE model server pins the newest version, and workers wait up to "
                f"LABELMILL_RETRY_BUDGET_S ({s.retry_budget_s:g}s) per batch for one"
            )
            return None


def _note(message: str) -> None:
    """A progress line on stderr, kept apart from --json output on stdout."""
    err.print(f"producer: {message}", markup=False, highlight=False)


def _override(settings: Settings | None, **flags: object) -> Settings:
    """Settings from the environment (or ``settings``) with the flags given: flag beats env."""
    try:
        return (settings or Settings()).with_overrides(**flags)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UsageError(f"bad setting {where}: {first['msg']}") from None


def env(ctx: typer.Context) -> Env:
    obj = ctx.obj
    assert isinstance(obj, Env)
    return obj


@app.callback()
def main_options(
    ctx: typer.Context,
    redis_url: Annotated[
        str | None, typer.Option(help="Broker and ledger (env LABELMILL_REDIS_URL).")
    ] = None,
    model_server: Annotated[
        str | None, typer.Option(help="gRPC target (env LABELMILL_MODEL_SERVER).")
    ] = None,
    key_prefix: Annotated[
        str | None, typer.Option(help="Redis key prefix (env LABELMILL_KEY_PREFIX).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Options shared by every subcommand (flag beats environment beats default)."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    ctx.obj = Env(
        _override(None, redis_url=redis_url, model_server=model_server, key_prefix=key_prefix)
    )


@app.command()
def enqueue(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="s3://bucket/prefix/ or a local folder")],
    output: Annotated[str, typer.Option("--output", "-o", help="Where labels go.")],
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, max=1024, help="Images per batch (env LABELMILL_BATCH_SIZE)."),
    ] = None,
    max_outstanding: Annotated[
        int | None,
        typer.Option(
            min=1, help="Batches queued or running at once (env LABELMILL_MAX_OUTSTANDING)."
        ),
    ] = None,
    job_id: Annotated[
        str | None, typer.Option(help="Name the job; the same id resumes it.")
    ] = None,
    model_version: Annotated[
        int | None,
        typer.Option(min=1, help="Pin this model version (env LABELMILL_MODEL_VERSION)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="List and count; enqueue nothing.")] = False,
    incremental: Annotated[
        bool,
        typer.Option(
            help="Label only what is new or changed since the newest finished job "
            "over SOURCE in OUTPUT with the same model version."
        ),
    ] = False,
    base: Annotated[
        str | None,
        typer.Option(help="Label only what is new or changed since this finished job."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """List images under SOURCE and enqueue them in batches."""
    e = env(ctx)
    s = e.settings = _override(
        e.settings,
        batch_size=batch_size,
        max_outstanding=max_outstanding,
        model_version=model_version,
    )
    for name in (job_id, base):
        if name is not None:
            _check_job_id(name)
    if dry_run and (incremental or base is not None):
        raise UsageError("--dry-run lists and counts everything; it does not compare with a base")
    if dry_run:
        result = enq.dry_run(e.storage, source, s.batch_size, retry_budget_s=s.retry_budget_s)
    else:
        show = not as_json and out.is_terminal
        with _enqueue_progress(show) as progress:
            result = enq.enqueue(
                storage=e.storage,
                ledger=e.ledger,
                app=e.celery,
                source=source,
                output=output,
                batch_size=s.batch_size,
                max_outstanding=s.max_outstanding,
                model_name=s.model_name,
                resolve_version=e.version_now,
                job_id=job_id,
                progress=progress,
                # Workers wait this long for a version or an outage; so does the producer.
                retry_budget_s=s.retry_budget_s,
                incremental=incremental,
                base=base,
            )
    if as_json:
        print(json.dumps(result.as_dict()))
        return
    if result.dry_run:
        out.print(
            f"dry run: {result.images_total} images in {result.batches_total} batches; "
            f"skipped {sum(result.skipped.values())} (not images)"
        )
        return
    verb = "resumed" if result.resumed else "created"
    out.print(
        f"job [bold]{result.job_id}[/] {verb}: {result.new_batches} batches sent now, "
        f"{result.images_total} images in {result.batches_total} batches, "
        "model version " + (str(result.model_version) if result.model_version else "not pinned yet")
    )
    if result.incremental is not None:
        found = ", ".join(f"{n} {what}" for what, n in result.incremental.items())
        out.print(f"compared with base job {result.base}: {found}")
    elif incremental:
        _note(
            "no finished job to compare with (same input, output and model version): "
            "this job labels everything"
        )
    out.print(f"follow it with: producer watch {result.job_id}")
    # A plain, parseable last line for scripts.
    print(result.job_id)


@app.command()
def status(
    ctx: typer.Context,
    job_id: str,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print a job's state and counts."""
    st = status_dict(env(ctx).ledger.counts(job_id))
    if as_json:
        print(json.dumps(st))
        return
    table = Table(title=f"{job_id} [{st['state']}]", show_header=False)
    for key in ("images", "batches", "errors", "skipped", "model"):
        table.add_row(key, json.dumps(st[key]))
    table.add_row("images/s", str(st["images_per_s"]))
    table.add_row("eta_s", str(st["eta_s"]))
    table.add_row("output", st["output"])
    out.print(table)


@app.command()
def watch(
    ctx: typer.Context,
    job_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="One status object per line.")] = False,
    interval: Annotated[float, typer.Option(min=0.05)] = 1.0,
) -> None:
    """Follow a job until it ends. Exit 0 done, 1 done with errors, 4 cancelled."""
    e = env(ctx)
    spec = e.ledger.counts(job_id).spec  # unknown job -> exit 2 before anything is printed
    if as_json:
        st = watch_json(e.ledger, job_id, interval_s=interval)
    else:
        st = watch_live(e.ledger, job_id, out, interval_s=interval)
        summary(out, st, JobFolder.of(e.storage, spec).lines())
    raise typer.Exit(exit_code(st))


@app.command()
def jobs(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1)] = 20,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Recent jobs, newest first."""
    e = env(ctx)
    rows = []
    for job in e.ledger.recent_jobs(limit):
        try:
            rows.append(status_dict(e.ledger.counts(job)))
        except UsageError:
            continue  # expired between the two reads
    if as_json:
        for r in rows:
            print(json.dumps(r))
        return
    table = Table(title="jobs")
    for col in ("job", "state", "ok", "error", "total", "output"):
        table.add_column(col)
    for r in rows:
        i = r["images"]
        table.add_row(
            r["job_id"], r["state"], str(i["ok"]), str(i["error"]), str(i["total"]), r["output"]
        )
    out.print(table)


@app.command()
def results(
    ctx: typer.Context,
    job_id: str,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv")] = "jsonl",
    errors_only: Annotated[bool, typer.Option("--errors-only")] = False,
    with_base: Annotated[
        bool,
        typer.Option(
            help="An incremental job's complete picture: its lines and those it carried "
            "from its base, one per object, in key order."
        ),
    ] = False,
) -> None:
    """Stream a job's result lines from storage to stdout."""
    if fmt not in ("jsonl", "csv"):
        raise UsageError(f"--format must be jsonl or csv, not {fmt!r}")
    e = env(ctx)
    spec = e.ledger.counts(job_id).spec
    lines = complete_lines(e.storage, spec) if with_base else JobFolder.of(e.storage, spec).lines()
    for chunk in format_records(lines, fmt, errors_only=errors_only):
        sys.stdout.write(chunk)


@app.command()
def browse(
    ctx: typer.Context,
    job_id: Annotated[str | None, typer.Argument(help="The job whose page opens first.")] = None,
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8080,
    host: Annotated[
        str,
        typer.Option(help="Address to serve on; beyond loopback, needs LABELMILL_BROWSE_AUTH."),
    ] = "127.0.0.1",
    open_browser: Annotated[
        bool, typer.Option("--open", help="Open the page in a web browser.")
    ] = False,
) -> None:
    """Serve web pages of jobs' results: labels, confidence, errors, thumbnails (live)."""
    from producer.browse import serve

    if job_id is not None:
        _check_job_id(job_id)
    e = env(ctx)
    serve(
        e.settings,
        e.storage,
        e.ledger,
        host=host,
        port=port,
        job_id=job_id,
        open_browser=open_browser,
        announce=lambda url: _note(f"serving {url} (Ctrl-C stops)"),
    )


@app.command()
def cancel(ctx: typer.Context, job_id: str) -> None:
    """Cancel a job: batches not yet started are dropped, not run."""
    dropped = ops.cancel(env(ctx).ledger, job_id)
    out.print(f"cancelled {job_id}: {dropped} outstanding batches dropped")


@app.command()
def retry(
    ctx: typer.Context, job_id: str, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """Re-run a job's dead batches and batches that have no part file."""
    e = env(ctx)
    res = ops.retry(
        e.storage,
        e.ledger,
        e.celery,
        job_id,
        max_outstanding=e.settings.max_outstanding,
        retry_budget_s=e.settings.retry_budget_s,
    )
    _print_resent(res, as_json)


@app.command()
def reconcile(
    ctx: typer.Context,
    job_id: str,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Needed when Redis lost the job.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Rebuild a job's ledger from storage and enqueue whatever is missing."""
    e = env(ctx)
    res = ops.reconcile(
        e.storage,
        e.ledger,
        e.celery,
        job_id,
        output=output,
        max_outstanding=e.settings.max_outstanding,
        retry_budget_s=e.settings.retry_budget_s,
    )
    _print_resent(res, as_json)


def _print_resent(res: ops.Resent, as_json: bool) -> None:
    if as_json:
        print(json.dumps(res.as_dict()))
        return
    out.print(
        f"{res.job_id}: re-sent {len(res.dead)} dead and {len(res.missing)} missing batches"
        + ("; job complete, manifest rewritten" if res.finished else "")
    )


def _check_job_id(job_id: str) -> None:
    if not is_valid_job_id(job_id):
        raise UsageError(f"bad job id {job_id!r}: use 1-128 letters, digits, '-', '_' and '.'")


@contextmanager
def _enqueue_progress(show: bool) -> Iterator[enq.Progress | None]:
    """A live line on a terminal: objects listed, batches and images sent."""
    if not show:
        yield None
        return
    # Only on a terminal: scripts (--json, pipes) do not import it.
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("listed {task.fields[listed]:,}"),
        TextColumn("sent {task.completed:,.0f} batches / {task.fields[images]:,} images"),
        TimeElapsedColumn(),
        console=out,
        transient=False,
    ) as bar:
        task = bar.add_task("enqueuing", total=None, listed=0, images=0)
        images = 0

        def update(b: Batch) -> None:
            nonlocal images
            images += len(b.uris)
            bar.update(task, completed=b.batch_no + 1, listed=b.listed, images=images)

        yield update


def _fail(exc: BaseException) -> None:
    # One plain line, whatever the terminal width.
    print(f"producer: {exc}".replace("\n", " "), file=sys.stderr)


def main() -> None:
    """Entry point: one-line errors and documented exit codes, never a traceback."""
    try:
        rv = app(standalone_mode=False)
        if isinstance(rv, int):
            sys.exit(rv)
    except Cancelled as exc:
        err.print(f"producer: job {exc} was cancelled")
        sys.exit(EXIT_CANCELLED)
    except UsageError as exc:
        _fail(exc)
        sys.exit(EXIT_USAGE)
    except ServiceError as exc:
        _fail(exc)
        sys.exit(EXIT_SERVICE)
    except LabelmillError as exc:
        _fail(exc)
        sys.exit(EXIT_USAGE)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("producer: aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("producer: interrupted; run the same command again to resume")
        sys.exit(130)
    except _ClickException as exc:  # usage errors: missing option, bad value
        print(f"producer: {exc.format_message()} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)
