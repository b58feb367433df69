"""Recognition: classifiers trained on the stored feature vectors (scikit-learn).

``train`` fits a logistic regression (``logreg``) or a multi-layer perceptron (``mlp``) on the
catalog's vectors and their labels, choosing hyper-parameters by cross-validated grid search on
a training split and reporting accuracy, macro precision / recall / F1 and the confusion
matrix on a stratified held-out split (the seed's "MLP on features, grid search with a
validation split"). The fitted model is saved in the catalog (``CATALOG/models``) together
with the extractor it expects, refit on all labelled vectors; ``Catalog.predict`` and the stream
consumer use it.

The model file is a joblib pickle written by lookalike itself: load catalogs you trust.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..catalog import Catalog, Classifier
from ..errors import LookalikeError, SourceError
from ..types import Key

MODELS = ("logreg", "mlp")
#: Hyper-parameter grids (``--grid``); without it, the first value of each is used.
GRIDS: dict[str, dict[str, list[Any]]] = {
    "logreg": {"clf__C": [1.0, 10.0, 100.0]},
    "mlp": {"clf__hidden_layer_sizes": [(256,), (512,)], "clf__alpha": [1e-4, 1e-3]},
}


@dataclass
class TrainReport:
    """Held-out quality of a trained classifier (macro averages over classes)."""

    model: str
    params: dict[str, Any]
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    labels: list[str]
    confusion: list[list[int]]
    n_train: int
    n_test: int
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["params"] = {
            k.removeprefix("clf__"): (list(v) if isinstance(v, tuple) else v)
            for k, v in self.params.items()
        }
        return d


def labels_from(cat: Catalog, source: str) -> dict[Key, str]:
    """Labels for every stored image: ``listing`` (the listing id), ``parent`` (the folder
    above the image in its image_id, else the listing id), or a CSV path with columns
    ``image_id,label`` (and optionally ``listing_id``).

    Raises:
        SourceError: the CSV is missing columns or names images that are not stored.
    """
    cache = cat.vector_cache()
    keys = [cache.keys[r] for r in np.flatnonzero(cache.alive)]
    if source == "listing":
        return {k: k[0] for k in keys}
    if source == "parent":
        return {k: (k[1].rsplit("/", 2)[-2] if k[1].count("/") >= 1 else k[0]) for k in keys}
    path = Path(source)
    if not path.exists():
        raise SourceError(f"{path}: no such labels file (or use --label-from listing|parent)")
    by_image: dict[str, list[Key]] = {}
    for k in keys:
        by_image.setdefault(k[1], []).append(k)
    out: dict[Key, str] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not {"image_id", "label"} <= set(reader.fieldnames or []):
            raise SourceError(f"{path}: needs columns image_id,label")
        for i, row in enumerate(reader, start=1):
            iid, label = (row.get("image_id") or "").strip(), (row.get("label") or "").strip()
            if not iid or not label:
                raise SourceError(f"{path}: row {i}: empty image_id or label")
            lid = (row.get("listing_id") or "").strip()
            matches = [(lid, iid)] if lid else by_image.get(iid, [])
            if not matches or (lid and (lid, iid) not in cache.row_of):
                raise SourceError(f"{path}: row {i}: image {iid!r} is not in the catalog")
            for key in matches:
                out[key] = label
    return out


def train(
    cat: Catalog,
    labels: dict[Key, str],
    model: str = "logreg",
    grid: bool = False,
    test_size: float = 0.25,
    seed: int = 0,
    save: bool = True,
) -> tuple[Classifier, TrainReport]:
    """Train a classifier on the labelled stored vectors (see the module docstring).

    Args:
        labels: label per stored image (from :func:`labels_from`); keys not stored are skipped.
        model: ``logreg`` or ``mlp`` (:data:`MODELS`).
        grid: choose hyper-parameters by cross-validated grid search (:data:`GRIDS`).
        test_size: fraction of the labelled images held out (at least one per class).
        seed: seed of the split, the folds and the MLP.
        save: attach the classifier to the catalog (``Catalog.set_classifier``).

    Returns:
        ``(classifier refit on every labelled image, held-out report)``.

    Raises:
        LookalikeError: unknown model, fewer than 2 classes, or a class with fewer than 2
            images (the stratified split needs 2).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline

    if model not in MODELS:
        raise LookalikeError(f"unknown model {model!r}; use one of {', '.join(MODELS)}")
    t0 = time.perf_counter()
    cache = cat.vector_cache()
    keys = [k for k in labels if k in cache.row_of]
    if not keys:
        raise LookalikeError("no labelled images in the catalog")
    x = np.ascontiguousarray(cache.vectors[[cache.row_of[k] for k in keys]])
    y = np.array([labels[k] for k in keys])
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise LookalikeError("training needs at least 2 labels")
    if counts.min() < 2:
        raise LookalikeError(f"label {classes[counts.argmin()]!r} has 1 image; need >= 2 each")
    n_test = max(len(classes), round(test_size * len(y)))
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=n_test, stratify=y, random_state=seed)
    if model == "logreg":
        clf: Any = LogisticRegression(max_iter=2000, C=GRIDS["logreg"]["clf__C"][1])
    else:
        clf = MLPClassifier(
            hidden_layer_sizes=(256,),
            alpha=1e-4,
            max_iter=500,
            early_stopping=False,
            random_state=seed,
        )
    pipe = Pipeline([("clf", clf)])
    params: dict[str, Any] = {}
    folds = int(min(3, np.unique(y_tr, return_counts=True)[1].min()))
    if grid and folds >= 2:
        search = GridSearchCV(
            pipe,
            GRIDS[model],
            cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
            scoring="f1_macro",
            n_jobs=1,
        )
        search.fit(x_tr, y_tr)
        pipe, params = search.best_estimator_, dict(search.best_params_)
    else:
        pipe.fit(x_tr, y_tr)
    pred = pipe.predict(x_te)
    p, r, f1, _ = precision_recall_fscore_support(y_te, pred, average="macro", zero_division=0)
    report = TrainReport(
        model=model,
        params=params,
        accuracy=float(np.mean(pred == y_te)),
        macro_precision=float(p),
        macro_recall=float(r),
        macro_f1=float(f1),
        labels=[str(c) for c in classes],
        confusion=confusion_matrix(y_te, pred, labels=classes).tolist(),
        n_train=len(y_tr),
        n_test=len(y_te),
    )
    pipe.fit(x, y)  # the saved model learns from every labelled image
    report.seconds = time.perf_counter() - t0
    info = cat.model
    assert info is not None
    classifier = Classifier(pipe, [str(c) for c in classes], info, model, report.to_dict())
    if save:
        cat.set_classifier(classifier)
    return classifier, report
