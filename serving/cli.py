"""The ``serving`` command: ``export`` a model version, run ``local`` TF Serving.

Exit codes: 0 ok, 1 unexpected failure, 2 bad arguments or unusable weights,
3 the server could not start (address in use).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

try:  # typer >= 0.22 vendors click
    from typer._click.exceptions import UsageError as CommandLineError
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import UsageError as CommandLineError  # type: ignore[assignment]

from labelmill.errors import ServiceError, UsageError
from labelmill.hardware import NO_BF16, bf16_instructions

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_SERVICE = 3

app = typer.Typer(
    name="serving",
    help="Export Inception-v3 for TF Serving, or serve it locally over TF Serving's gRPC API.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _quiet_tensorflow() -> None:
    # TensorFlow's C++ INFO/WARNING lines would bury our one line per event.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _configure_logging() -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("tensorflow", "absl", "h5py"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", help="Model base folder; writes OUT/VERSION/.")],
    version: Annotated[
        int | None, typer.Option(min=1, help="Version number [default: highest + 1].")
    ] = None,
    arch: Annotated[
        str, typer.Option(help="inception_v3, or tiny (a fast stand-in for tests).")
    ] = "inception_v3",
    weights: Annotated[
        str, typer.Option(help="imagenet (download), random (meaningless labels) or a file.")
    ] = "imagenet",
    seed: Annotated[int, typer.Option(help="Seed for random weights.")] = 1,
) -> None:
    """Write a SavedModel version folder that TF Serving loads unchanged."""
    if arch not in ("inception_v3", "tiny"):
        raise typer.BadParameter(f"{arch!r} is not one of inception_v3, tiny", param_hint="--arch")
    if weights not in ("imagenet", "random") and not Path(weights).is_file():
        raise UsageError(f"--weights {weights}: not imagenet, random, nor a weights file")
    # Checked before the model is built (a minute for Inception-v3).
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot make the folder ({exc.strerror})") from None
    _quiet_tensorflow()
    _configure_logging()
    from serving.export import export as write_export
    from serving.model import build, warn_random

    if version is not None and (out / str(version)).exists():
        raise UsageError(f"{out / str(version)} exists already; versions are immutable")
    if weights == "random":
        warn_random(seed)
    classifier = build(arch, weights, seed)  # type: ignore[arg-type]
    path = write_export(classifier, out, version)
    typer.echo(str(path))


def _tf_serving_flags() -> str:
    from serving.tfs import flags_help

    # "\b" keeps click from re-wrapping the list into one paragraph.
    return "\b\n" + flags_help()


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog=_tf_serving_flags(),
)
def local(
    ctx: typer.Context,
    model_base_path: Annotated[
        Path | None,
        typer.Option(
            "--model-base-path",
            help="Folder of integer version folders (or give TF Serving's flags instead).",
        ),
    ] = None,
    model_name: Annotated[str, typer.Option(help="Model name clients ask for.")] = "inception",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="gRPC port.")] = 8500,
    max_queue: Annotated[
        int,
        typer.Option(min=0, help="Predict requests in flight before UNAVAILABLE (0: refuse all)."),
    ] = 64,
    bf16: Annotated[
        bool,
        typer.Option(
            "--bf16",
            help="oneDNN bfloat16 auto mixed precision; refused on CPUs without "
            "AVX512_BF16 or AMX.",
        ),
    ] = False,
    poll_s: Annotated[
        float, typer.Option(min=0.05, help="Seconds between scans for new versions.")
    ] = 2.0,
) -> None:
    """Serve a model over TF Serving's gRPC API until SIGTERM.

    With --model-base-path: the two newest versions, listening at once and
    NOT_SERVING until one loads. Or with tensorflow_model_server's own flags
    (--model_config_file=..., --enable_batching, --batching_parameters_file=...,
    --rest_api_port=..., --enable_grpc_healthcheck_service, ...; see
    docs/serving.md): TF Serving's meaning, its checks and its start-up order.
    """
    if bf16 and bf16_instructions() is None:
        raise UsageError(NO_BF16)
    _quiet_tensorflow()
    _configure_logging()
    from serving.local import LocalConfig, serve
    from serving.tfs import parse_command_line

    tf_args = list(ctx.args)
    if tf_args or model_base_path is None:
        if model_base_path is not None:
            raise UsageError(
                "give either --model-base-path or TF Serving's --model_config_file / "
                "--model_base_path flags, not both"
            )
        # --port is both ours and TF Serving's, with the same meaning.
        tfs = parse_command_line([*tf_args, f"--port={port}"])
        config = LocalConfig.from_tfs(tfs, host=host, max_queue=max_queue, bf16=bf16)
    else:
        config = LocalConfig(
            model_base_path=model_base_path,
            model_name=model_name,
            host=host,
            port=port,
            max_queue=max_queue,
            bf16=bf16,
            poll_s=poll_s,
        )
    raise typer.Exit(serve(config))


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors, documented exit codes, no tracebacks for users."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="serving", standalone_mode=False)
    except CommandLineError as exc:
        print(f"serving: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except typer.Abort:
        sys.exit(130)
    except UsageError as exc:
        print(f"serving: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except ServiceError as exc:
        print(f"serving: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_SERVICE)
    sys.exit(code if isinstance(code, int) else EXIT_OK)
