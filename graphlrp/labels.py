"""Class names: checked once, for the compiler (names from the model's attributes or the user) and the exporter
(names given at export)."""
from __future__ import annotations

from .errors import GraphLRPError


def check_labels(labels, num_classes: int | None, strict: bool) -> list[str] | None:
    """Class names, one per class. A wrong count is an error when the user gave them, and dropped when they came
    from the model's attributes (they would label the wrong classes)."""
    if labels is None:
        return None
    labels = [str(v) for v in labels]
    if num_classes is not None and len(labels) != num_classes:
        if strict:
            raise GraphLRPError(f"{len(labels)} labels given for a model with {num_classes} classes")
        return None
    return labels
