"""Write a classifier as a TF Serving SavedModel version folder: ``DIR/N/``.

The SavedModel holds everything a version needs (see docs/serving.md):
preprocessing, the network, top-5, the class names and the weights' name,
plus the warm-up requests TF Serving replays before it marks the version
AVAILABLE. The folder appears atomically: it is written under a temporary
name inside DIR (TF Serving ignores names that are not integers) and renamed.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from labelmill.errors import UsageError
from serving.labels import imagenet_class_names
from serving.model import IMAGE_SIZE, Classifier, preprocess

log = logging.getLogger(__name__)

TOP_K = 5
WARMUP_FILE = "tf_serving_warmup_requests"
MODEL_NAME = "inception"


class ServingModule(tf.Module):  # type: ignore[misc]
    """The exported object: two signatures over one Keras model."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.model = classifier.model
        self.class_names = tf.constant(imagenet_class_names())
        self.weights_name = tf.constant(classifier.weights)

    def _top_k(self, pixels: Any) -> dict[str, Any]:
        probs = self.model(preprocess(pixels), training=False)
        top = tf.math.top_k(probs, k=TOP_K, sorted=True)
        class_ids = tf.cast(top.indices, tf.int32)
        return {
            "classes": tf.gather(self.class_names, class_ids),
            "class_ids": class_ids,
            "scores": tf.cast(top.values, tf.float32),
            "weights": tf.fill(tf.shape(pixels)[:1], self.weights_name),
        }

    @tf.function(  # type: ignore[untyped-decorator]
        input_signature=[tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8, name="images")]
    )
    def serve(self, images: Any) -> dict[str, Any]:
        return self._top_k(images)

    @tf.function(  # type: ignore[untyped-decorator]
        input_signature=[tf.TensorSpec([None], tf.string, name="images")]
    )
    def predict_images(self, images: Any) -> dict[str, Any]:
        def decode(encoded: Any) -> Any:
            image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
            image.set_shape([None, None, 3])
            resized = tf.image.resize(image, [IMAGE_SIZE, IMAGE_SIZE], method="bilinear")
            return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)

        pixels = tf.map_fn(
            decode,
            images,
            fn_output_signature=tf.TensorSpec([IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8),
        )
        return self._top_k(pixels)


def next_version(base: Path) -> int:
    """One more than the highest integer version folder in ``base`` (1 if none)."""
    versions = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def _warmup_records() -> list[bytes]:
    pixels = np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels[0]).save(png, format="PNG")
    inputs = {
        "serving_default": tf.make_tensor_proto(pixels),
        "predict_images": tf.make_tensor_proto([png.getvalue()], dtype=tf.string),
    }
    records = []
    for signature, tensor in inputs.items():
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=MODEL_NAME, signature_name=signature)
        )
        request.inputs["images"].CopyFrom(tensor)
        entry = prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)
        )
        records.append(entry.SerializeToString())
    return records


def write_savedmodel(classifier: Classifier, path: Path) -> None:
    """Save ``classifier`` with both signatures and the warm-up file into ``path``."""
    module = ServingModule(classifier)
    signatures = {
        "serving_default": module.serve.get_concrete_function(),
        "predict_images": module.predict_images.get_concrete_function(),
    }
    tf.saved_model.save(module, str(path), signatures=signatures)
    extra = path / "assets.extra"
    extra.mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(extra / WARMUP_FILE)) as writer:
        for record in _warmup_records():
            writer.write(record)


def export(classifier: Classifier, base: Path, version: int | None = None) -> Path:
    """Export ``classifier`` as ``base/<version>`` atomically and return that path.

    ``version`` defaults to the next integer after the highest one present.
    Raises :class:`UsageError` if the version folder exists already.
    """
    base.mkdir(parents=True, exist_ok=True)
    version = next_version(base) if version is None else version
    if version < 1:
        raise UsageError(f"--version must be a positive integer, got {version}")
    final = base / str(version)
    if final.exists():
        raise UsageError(f"{final} exists already; versions are immutable, pick another")
    tmp = Path(tempfile.mkdtemp(prefix=f".export-{version}-", dir=base))
    try:
        write_savedmodel(classifier, tmp / "model")
        os.rename(tmp / "model", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s weights=%s to %s", classifier.model.name, classifier.weights, final)
    return final
