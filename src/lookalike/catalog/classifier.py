"""The catalog's classifier at run time: the saved model file, loading it, predicting with it.

Training lives in :mod:`lookalike.recognize` (a service); it hands a fitted
:class:`Classifier` to :meth:`lookalike.catalog.Catalog.set_classifier`, which writes it here.
The catalog reads it back for ``Catalog.predict`` and for recognition in the write path
(predictions stored with each new image), re-reading it when the file changes.

Files, in ``<catalog>/models``: ``classifier.joblib`` (the scikit-learn estimator, a joblib
pickle written by lookalike itself: load catalogs you trust) and ``classifier.json`` (labels,
the extractor's :class:`~lookalike.types.ModelInfo`, the training report).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LookalikeError
from ..files import atomic_path, atomic_write
from ..types import ModelInfo

MODEL_FILE = "classifier.joblib"
META_FILE = "classifier.json"


@dataclass
class Classifier:
    """A fitted classifier over feature vectors of one extractor.

    Attributes:
        estimator: a fitted scikit-learn estimator with ``predict_proba`` and ``classes_``.
        labels: the class labels it was trained on.
        model_info: the extractor whose vectors it expects.
        kind: ``logreg`` or ``mlp``.
        report: held-out quality (``TrainReport.to_dict()``).
    """

    estimator: Any
    labels: list[str]
    model_info: ModelInfo
    kind: str
    report: dict[str, Any] = field(default_factory=dict)

    def predict(self, vectors: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(label, probability)`` per row of ``(n, d) float32`` vectors, best first
        (ties in probability keep the estimator's class order)."""
        proba = self.estimator.predict_proba(np.atleast_2d(vectors))
        classes = [str(c) for c in self.estimator.classes_]
        out = []
        for row in proba:
            order = np.argsort(-row, kind="stable")[:k]
            out.append([(classes[i], float(row[i])) for i in order])
        return out


def save_classifier(folder: Path, classifier: Classifier) -> Path:
    """Write ``classifier`` into ``folder`` (atomically, model first); returns the model path.

    Raises:
        OSError: the folder cannot be written.
    """
    import joblib

    with atomic_path(folder / MODEL_FILE) as tmp:
        joblib.dump(classifier.estimator, tmp)
    meta = {
        "kind": classifier.kind,
        "labels": classifier.labels,
        "model": asdict(classifier.model_info),
        "report": classifier.report,
        "trained_at": time.time(),
    }
    atomic_write(folder / META_FILE, json.dumps(meta, indent=1))
    return folder / MODEL_FILE


def load_classifier(folder: Path, model: ModelInfo | None) -> Classifier | None:
    """The classifier saved in ``folder``, or None when there is none.

    Args:
        model: the catalog's model; the classifier must have been trained on its vectors.

    Raises:
        LookalikeError: it was trained on vectors of another model.
    """
    import joblib

    if not (folder / MODEL_FILE).exists():
        return None
    meta = json.loads((folder / META_FILE).read_text())
    info = ModelInfo(**meta["model"])
    if model is not None and info != model:
        raise LookalikeError(
            f"the catalog's classifier expects {info.tag} vectors; the catalog holds "
            f"{model.tag}. Train it again."
        )
    return Classifier(
        joblib.load(folder / MODEL_FILE), meta["labels"], info, meta["kind"], meta.get("report", {})
    )
