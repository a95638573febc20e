"""Build the Keras classifier that an export wraps: Inception-v3 or a tiny stand-in.

Both take uint8-range pixels already scaled to [-1, 1] (Inception's
preprocessing, :func:`preprocess`) and return softmax probabilities over the
1000 ImageNet classes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import keras
import tensorflow as tf

from labelmill.errors import UsageError
from serving.labels import NUM_CLASSES

Arch = Literal["inception_v3", "tiny"]
ARCHES: tuple[Arch, ...] = ("inception_v3", "tiny")
IMAGE_SIZE = 299


class WeightsUnavailable(UsageError):
    """The requested weights cannot be had (offline, missing file, wrong shape)."""


@dataclass(frozen=True)
class Classifier:
    """A Keras model and the name of the weights it carries (``weights`` output)."""

    model: keras.Model
    weights: str


def preprocess(images: Any) -> Any:
    """uint8 pixels -> float32 in [-1, 1] (keras.applications.inception_v3 'tf' mode)."""
    return tf.cast(images, tf.float32) / 127.5 - 1.0


def _tiny() -> keras.Model:
    # A few strided convolutions: same input and output shapes as
    # Inception-v3, exports and runs in milliseconds.
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="pixels")
    x = keras.layers.Conv2D(8, 5, strides=4, activation="relu")(inputs)
    x = keras.layers.Conv2D(16, 3, strides=4, activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="tiny")


def _inception(weights: str | None) -> keras.Model:
    return keras.applications.InceptionV3(
        include_top=True, weights=weights, classes=NUM_CLASSES, classifier_activation="softmax"
    )


def build(arch: Arch, weights: str, seed: int) -> Classifier:
    """Build ``arch`` with ``weights``: ``imagenet``, ``random`` or a local weights file.

    Raises :class:`WeightsUnavailable` with a one-line message when the weights
    cannot be had. Random weights are reproducible: same arch and seed, same model.
    """
    keras.utils.set_random_seed(seed)
    if arch not in ARCHES:
        raise UsageError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHES)}")
    if weights == "random":
        model = _tiny() if arch == "tiny" else _inception(None)
        return Classifier(model, f"random:seed={seed}")
    if weights == "imagenet":
        if arch == "tiny":
            raise WeightsUnavailable(
                "there are no imagenet weights for --arch tiny; use --weights random or a file"
            )
        try:
            return Classifier(_inception("imagenet"), "imagenet")
        except Exception as exc:  # offline: URL or HTTP error, wrapped by Keras
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise WeightsUnavailable(
                f"cannot download the imagenet weights ({reason}); use --weights random "
                "(meaningless labels, for tests) or --weights FILE (a local Keras weights "
                "file such as inception_v3_weights_tf_dim_ordering_tf_kernels.h5)"
            ) from None
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailable(
            f"--weights {weights!r} is neither 'imagenet', 'random' nor an existing file"
        )
    model = _tiny() if arch == "tiny" else _inception(None)
    try:
        model.load_weights(path)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsUnavailable(f"cannot load weights from {path} into {arch}: {first}") from None
    return Classifier(model, f"file:{path.name}")


def warn_random(seed: int) -> None:
    """Say on stderr that labels from random weights mean nothing."""
    print(
        f"warning: exporting RANDOM weights (seed={seed}): labels are meaningless; "
        f"every prediction says weights=random:seed={seed}",
        file=sys.stderr,
    )
