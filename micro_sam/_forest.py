"""A random forest stored as plain arrays: saved and loaded without pickle, predicted with numpy.

scikit-learn models are usually saved with pickle / joblib, and loading such a file runs code stored in it.
Here a fitted ``RandomForestClassifier`` (or ``ExtraTreesClassifier``) is reduced to the arrays that define
its trees (children, split feature and threshold, class fractions at the leaves) and written to an ``.npz`` file
that ``numpy.load(allow_pickle=False)`` reads back. :class:`SavedForest` predicts from those arrays exactly as
scikit-learn does: features are compared in float32 against float64 thresholds (``x <= threshold`` goes left),
each tree gives the class fractions of its leaf, and the forest averages them.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, Union

import numpy as np

_FORMAT = "micro_sam.random_forest.v1"
_ARRAYS = ("children_left", "children_right", "feature", "threshold", "value")


class SavedForest:
    """A random forest classifier restored from :func:`save_forest`'s arrays.

    Attributes:
        classes_: (n_classes,) the class labels, as the fitted classifier's ``classes_``.
        n_features_in_: The number of features the forest was trained on.
        metadata: Free-form string entries stored with the forest (e.g. the feature definition).
    """

    def __init__(self, arrays: Dict[str, np.ndarray], classes: np.ndarray, n_features: int,
                 metadata: Dict[str, str]):
        self._arrays = arrays
        self._roots = np.asarray(arrays["roots"], dtype="int64")
        self.classes_ = classes
        self.n_features_in_ = int(n_features)
        self.metadata = dict(metadata)

    @property
    def n_estimators(self) -> int:
        """The number of trees."""
        return len(self._roots)

    def _check_features(self, features) -> np.ndarray:
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.n_features_in_:
            raise ValueError(f"features must have shape (n_objects, {self.n_features_in_}), got {features.shape}.")
        features = features.astype("float32")  # the precision scikit-learn's trees compare in
        if not np.isfinite(features).all():
            raise ValueError("features contain NaN or infinite values.")
        return features

    def predict_proba(self, features) -> np.ndarray:
        """Class probabilities: the mean over the trees of the class fractions in the leaf each sample reaches.

        Args:
            features: (n_samples, n_features_in_) array.

        Returns:
            (n_samples, n_classes) float64 array; columns follow ``classes_``.
        """
        features = self._check_features(features)
        a = self._arrays
        rows = np.arange(len(features))
        proba = np.zeros((len(features), len(self.classes_)), dtype="float64")
        for root in self._roots:
            node = np.full(len(features), root, dtype="int64")
            while True:
                inner = a["children_left"][node] >= 0
                if not inner.any():
                    break
                go_left = features[rows, np.maximum(a["feature"][node], 0)] <= a["threshold"][node]
                child = np.where(go_left, a["children_left"][node], a["children_right"][node])
                node = np.where(inner, child + root, node)  # children are stored relative to the tree's root
            proba += a["value"][node]
        return proba / self.n_estimators

    def predict(self, features) -> np.ndarray:
        """The most probable class of each sample, as a value of ``classes_`` (ties go to the first class)."""
        return self.classes_[np.argmax(self.predict_proba(features), axis=1)]


def _tree_arrays(tree) -> Dict[str, np.ndarray]:
    value = np.asarray(tree.value)
    if value.ndim != 3 or value.shape[1] != 1:
        raise ValueError("Only single-output classifiers can be saved.")
    value = value[:, 0, :].astype("float64")
    total = value.sum(axis=1, keepdims=True)
    total[total == 0] = 1.0
    return {
        "children_left": np.asarray(tree.children_left, dtype="int64"),
        "children_right": np.asarray(tree.children_right, dtype="int64"),
        "feature": np.asarray(tree.feature, dtype="int64"),
        "threshold": np.asarray(tree.threshold, dtype="float64"),
        "value": value / total,
    }


def forest_arrays(classifier) -> Dict[str, Any]:
    """The arrays that define a fitted forest classifier (see the module docstring).

    Raises:
        ValueError: If the classifier is not a fitted single-output forest of decision trees.
    """
    estimators = getattr(classifier, "estimators_", None)
    classes = getattr(classifier, "classes_", None)
    if estimators is None or classes is None or not hasattr(classifier, "n_features_in_"):
        raise ValueError(
            f"Expected a fitted scikit-learn forest classifier (e.g. RandomForestClassifier), got "
            f"{type(classifier).__name__}; fit it before saving."
        )
    if isinstance(classes, list) or np.asarray(classes).ndim != 1:
        raise ValueError("Only single-output classifiers can be saved.")
    trees = [_tree_arrays(estimator.tree_) for estimator in estimators]
    sizes = [len(t["children_left"]) for t in trees]
    roots = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype("int64")
    arrays = {name: np.concatenate([t[name] for t in trees]) for name in _ARRAYS}
    arrays["roots"] = roots
    return {"arrays": arrays, "classes": np.asarray(classes), "n_features": int(classifier.n_features_in_)}


def save_forest(classifier, path: Union[str, os.PathLike], metadata: Dict[str, str]) -> None:
    """Write a fitted forest classifier to ``path`` (an ``.npz`` file), atomically."""
    data = forest_arrays(classifier)
    if data["classes"].dtype.kind not in "biuf":
        raise ValueError(f"Class labels must be numbers to be saved, got {data['classes'].dtype} labels.")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    entries = {f"tree_{name}": value for name, value in data["arrays"].items()}
    entries["classes"] = data["classes"]
    entries["n_features"] = np.asarray(data["n_features"])
    entries["format"] = np.asarray(_FORMAT)
    for key, value in metadata.items():
        entries[f"meta_{key}"] = np.asarray(str(value))
    handle, tmp_path = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            np.savez_compressed(f, **entries)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def load_forest(path: Union[str, os.PathLike]) -> SavedForest:
    """Read a forest written by :func:`save_forest` (no pickle: only arrays are read).

    Raises:
        ValueError: If the file does not exist or is not such a forest.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"The classifier file {path!r} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as f:
            entries = {key: f[key] for key in f.files}
    except (ValueError, OSError) as error:
        raise ValueError(f"{path!r} is not a classifier saved by micro_sam ({error}).") from None
    if str(entries.get("format", "")) != _FORMAT:
        raise ValueError(f"{path!r} is not a classifier saved by micro_sam (no {_FORMAT!r} format tag).")
    arrays = {name: entries[f"tree_{name}"] for name in _ARRAYS + ("roots",)}
    metadata = {key[5:]: str(value) for key, value in entries.items() if key.startswith("meta_")}
    return SavedForest(arrays, entries["classes"], int(entries["n_features"]), metadata)
