"""``make demo``: start the local stack, classify real photographs, show the labels.

Steps: export the model once (ImageNet weights where the internet allows,
random weights otherwise, and then it says so), start the stack detached,
upload sample photographs (scikit-image's, a 12-megapixel upscale and one
broken file) to ``s3://demo/photos/``, run ``producer enqueue`` and
``producer watch``, and print a table of image, top label and score.
``--source FOLDER`` classifies your own folder instead; ``--model-base``,
``--port-base`` and ``--workers`` are the stack's (``labelmill.dev.stack``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from labelmill.dev import stack

console = Console()
SAMPLES = [
    "astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field",
    "camera", "coins", "moon", "brick", "grass", "retina", "immunohistochemistry",
]  # fmt: skip


def make_photos(folder: Path) -> Path:
    """Sample photographs, a 12 MP upscale and one broken file, written once."""
    if (folder / "broken.jpg").exists():
        return folder
    import skimage.data as data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in SAMPLES:
        pixels = getattr(data, name)()
        if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity)
            pixels = pixels[0]
        img = Image.fromarray(pixels)
        img.convert("RGB").save(folder / f"{name}.jpg", quality=92)
    big = Image.fromarray(_sample(data, "chelsea")).resize((4032, 3024), Image.Resampling.BICUBIC)
    big.save(folder / "chelsea-12mp.jpg", quality=90)
    Image.fromarray(_sample(data, "astronaut")).save(folder / "astronaut.png")
    buf = io.BytesIO()
    Image.fromarray(_sample(data, "coffee")).save(buf, "JPEG")
    (folder / "broken.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    return folder


def _sample(module: Any, name: str) -> Any:
    return getattr(module, name)()


def upload(folder: Path, bucket: str, prefix: str) -> int:
    import boto3

    s3 = boto3.client("s3")
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    except s3.exceptions.ClientError as exc:
        if "BucketAlreadyExists" not in str(exc):
            raise
    n = 0
    for path in sorted(folder.iterdir()):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}{path.name}")
            n += 1
    return n


def producer(*args: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer", *args], capture_output=capture, text=True, check=False
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labelmill.dev.demo", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path(".stack"))
    parser.add_argument("--source", type=Path, default=None, help="classify this folder")
    stack.add_stack_options(parser)
    args = parser.parse_args(argv)
    root: Path = args.dir.resolve()
    ports = stack.Ports.from_base(args.port_base) if args.port_base else stack.Ports()
    base: Path = args.model_base or root / "models" / "inception"
    # A model of your own says what weights it has in its answers (checked below).
    weights = "" if args.model_base else stack.ensure_model(base, log=console.print)

    os.environ.update(stack.env_for(ports))
    pidfile = root / "stack.pid"
    if not (pidfile.exists() and stack._alive(int(pidfile.read_text()))):
        console.print("starting the local stack...")
        try:
            stack.up(root, ports, workers=args.workers, model_base=base, detach=True)
        except stack.StackError as exc:
            console.print(f"[red]stack: {exc}[/]")
            return 2

    if args.source:
        source = str(args.source.resolve())
        if not args.source.is_dir():
            console.print(f"[red]{source} is not a folder[/]")
            return 2
    else:
        photos = make_photos(root / "photos")
        n = upload(photos, "demo", "photos/")
        console.print(f"uploaded {n} files to s3://demo/photos/")
        source = "s3://demo/photos/"
    output = "s3://demo/labels/"
    console.print(f"$ producer enqueue {source} --output {output}")
    res = producer("enqueue", source, "--output", output, "--json", capture=True)
    if res.returncode != 0:
        console.print(f"[red]{res.stderr.strip()}[/]")
        return res.returncode
    job = json.loads(res.stdout)["job_id"]
    console.print(f"$ producer watch {job}")
    producer("watch", job)

    rows = producer("results", job, capture=True).stdout.splitlines()
    table = Table(title=f"labels for {job}")
    for col in ("image", "top label", "score"):
        table.add_column(col)
    for line in rows:
        r = json.loads(line)
        name = r["uri"].rsplit("/", 1)[-1]
        if r["status"] == "ok":
            top = r["labels"][0]
            table.add_row(name, top["label"], f"{top['score']:.3f}")
        else:
            table.add_row(name, f"[red]error: {r['error']['kind']}[/]", "")
    console.print(table)
    served = {
        json.loads(line)["model"]["weights"] for line in rows if json.loads(line)["status"] == "ok"
    }
    if any(w.startswith("random") for w in served | {weights}):
        console.print(
            "[bold yellow]These labels come from RANDOM weights and are meaningless.[/] "
            "For real labels, export with internet access: "
            "`serving export --out .stack/models/inception --version 2 --weights imagenet` "
            "(or --weights /path/to/inception_v3_weights.h5), then run `make demo` again."
        )
    console.print(f"results: {output}{job}/  (producer results {job})")
    console.print(f"browse:  http://127.0.0.1:{ports.browse}/jobs/{job}")
    console.print(f"Flower:  http://127.0.0.1:{ports.flower}    stop the stack: make down")
    console.print(f"commands in a new shell: source {root / 'env'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
