"""``serving export``: the SavedModel layout, its signatures, weights and CLI errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.model_server import serving_env


def run_serving(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serving", *args],
        capture_output=True,
        text=True,
        env=env or serving_env(),
        timeout=300,
        check=False,
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("serving: error:")]
    assert len(errors) == 1, done.stderr
    for word in words:
        assert word in errors[0]
    return errors[0]


def test_layout_is_what_tf_serving_loads(tiny_model_base: Path) -> None:
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    assert sorted(p.name for p in tiny_model_base.iterdir()) == ["1"]  # no temporaries left
    version = tiny_model_base / "1"
    assert (version / "saved_model.pb").is_file()
    assert (version / "variables" / "variables.index").is_file()
    warmup = version / "assets.extra" / "tf_serving_warmup_requests"
    records = [
        prediction_log_pb2.PredictionLog.FromString(r.numpy())
        for r in tf.data.TFRecordDataset(str(warmup))
    ]
    signatures = {r.predict_log.request.model_spec.signature_name for r in records}
    assert signatures == {"serving_default", "predict_images"}


def test_class_names_and_weights_are_inside(tiny_model_base: Path) -> None:
    import tensorflow as tf

    from serving.labels import imagenet_class_names

    loaded = tf.saved_model.load(str(tiny_model_base / "1"))
    images = np.full((2, 299, 299, 3), 128, np.uint8)
    out = loaded.signatures["serving_default"](images=tf.constant(images))
    names = imagenet_class_names()
    assert len(names) == 1000 and names[207] == "golden retriever"
    ids = out["class_ids"].numpy()
    assert [[c.decode() for c in row] for row in out["classes"].numpy()] == [
        [names[i] for i in row] for row in ids
    ]
    assert list(out["weights"].numpy()) == [b"random:seed=1"] * 2
    assert out["scores"].dtype == tf.float32 and out["class_ids"].dtype == tf.int32


def test_weights_file_and_next_version(tiny_model_base: Path, tmp_path: Path) -> None:
    from serving.export import export
    from serving.model import build

    weights = tmp_path / "tiny.weights.h5"
    build("tiny", "random", seed=5).model.save_weights(weights)
    base = tmp_path / "inception"
    export(build("tiny", "random", seed=1), base)
    path = export(build("tiny", str(weights), seed=1), base)
    assert path == base / "2"

    import tensorflow as tf

    out = tf.saved_model.load(str(path)).signatures["serving_default"](
        images=tf.zeros((1, 299, 299, 3), tf.uint8)
    )
    assert out["weights"].numpy()[0] == b"file:tiny.weights.h5"


def test_random_weights_warn(tmp_path: Path) -> None:
    done = run_serving("export", "--out", str(tmp_path), "--arch", "tiny", "--weights", "random")
    assert done.returncode == 0, done.stderr
    assert "RANDOM weights" in done.stderr
    assert done.stdout.strip() == str(tmp_path / "1")
    again = run_serving(
        "export", "--out", str(tmp_path), "--arch", "tiny", "--version", "1", "--weights", "random"
    )
    assert_one_line_error(again, "exists")


def test_offline_imagenet_is_one_line(tmp_path: Path) -> None:
    env = serving_env()
    env["KERAS_HOME"] = str(tmp_path / "keras")  # no cached weights
    env["HTTPS_PROXY"] = env["https_proxy"] = "http://127.0.0.1:9"  # refused at once
    env["HTTP_PROXY"] = env["http_proxy"] = "http://127.0.0.1:9"
    done = run_serving("export", "--out", str(tmp_path / "m"), "--weights", "imagenet", env=env)
    assert_one_line_error(done, "random", "file")
    assert not (tmp_path / "m" / "1").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["export", "--arch", "tiny"],  # --out missing
        ["export", "--out", "x", "--arch", "resnet"],
        ["export", "--out", "x", "--version", "0"],
        ["local", "--model-base-path", "x", "--port", "99999"],
        ["frobnicate"],
    ],
)
def test_bad_command_lines_exit_2(args: list[str]) -> None:
    assert_one_line_error(run_serving(*args))


def test_missing_weights_file_exits_2(tmp_path: Path) -> None:
    done = run_serving("export", "--out", str(tmp_path), "--weights", str(tmp_path / "nope.h5"))
    assert_one_line_error(done, "nope.h5")


def test_an_out_folder_that_cannot_exist_is_refused_before_the_model_is_built(
    tmp_path: Path,
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    done = run_serving("export", "--out", str(a_file / "models"), "--weights", "random")
    assert_one_line_error(done, str(a_file / "models"))
    # Refused before the build, which starts by warning of random weights.
    assert "RANDOM weights" not in done.stderr
    assert a_file.read_text() == "not a folder"
