"""Classify segmented objects with a random forest on SAM image embeddings.

The workflow (also what the napari object classifier runs):

1. :func:`compute_object_features`: one feature vector per object of a label image, from the image
   embeddings of :func:`micro_sam.util.precompute_image_embeddings` (2D, 3D, tiled);
2. :func:`object_labels_from_annotations`: the class of each annotated object, from a class-label image
   (scribbles or painted objects: the most frequent class inside the object);
3. :func:`train_object_classifier`: a scikit-learn random forest on the annotated objects;
4. ``classifier.predict(features)`` and :func:`project_prediction_to_segmentation`: a semantic image with the
   predicted class of each object;
5. :func:`save_object_classifier` / :func:`load_object_classifier` store the forest as arrays (no pickle), and
   :func:`run_prediction_with_object_classifier` applies a stored forest to a series of images.

Features: column 0 is the object's area in pixels (voxels for 3D), columns 1..C the mean of the SAM embedding
over the object's pixels, with the embedding interpolated bilinearly to the image resolution (so every object,
however small, gets features). scikit-learn is an optional dependency (``pip install micro_sam[classification]``).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _tiling
from ._embeddings import ImageEmbeddings
from ._lazy import lazy_attributes

__all__ = [
    "compute_object_features", "load_object_classifier", "object_labels_from_annotations",
    "project_prediction_to_segmentation", "run_prediction_with_object_classifier", "save_object_classifier",
    "train_object_classifier",
]

# Names micro_sam 1.8 exposes here (imported there from other packages), resolved on first use.
__getattr__, __dir__ = lazy_attributes(globals(), {
    "regionprops_table": "skimage.measure:regionprops_table",
    "resize": "skimage.transform:resize",
    "tqdm": "tqdm:tqdm",
})

FEATURE_DEFINITION = "area + mean bilinear SAM embedding, v1"
"""Stored with saved classifiers; a classifier is only applied to features of the same definition."""

_PIXELS_PER_CHUNK = 1 << 20  # bounds the memory of the sparse interpolation weights


# --- features --------------------------------------------------------------------------------------------
def _axis_weights(n_pixels: int, scale: float, n_cells: int):
    """Bilinear interpolation (half-pixel centres, edges clamped) of n_pixels positions on a grid of n_cells:
    for each pixel the two cells and their weights."""
    coords = (np.arange(n_pixels) + 0.5) * scale - 0.5
    low = np.floor(coords)
    frac = coords - low
    low = low.astype("int64")
    return np.clip(low, 0, n_cells - 1), np.clip(low + 1, 0, n_cells - 1), 1.0 - frac, frac


def _accumulate(sums, areas, index, embedding, input_size, original_size):
    """Add the embedding sums and pixel counts of the objects in one 2D image (or tile) to ``sums`` / ``areas``.

    ``index`` is the (H, W) object index image (-1 for background) in the frame of the embedding's
    ``original_size``; ``embedding`` is (C, gh, gw) and covers the resized input padded to a square.
    """
    from scipy import sparse

    channels, gh, gw = embedding.shape
    height, width = index.shape
    patch = max(input_size) / gh  # encoder input pixels per embedding cell
    rows = _axis_weights(height, input_size[0] / original_size[0] / patch, gh)
    cols = _axis_weights(width, input_size[1] / original_size[1] / patch, gw)
    flat = embedding.reshape(channels, gh * gw).T.astype("float64")
    n_objects = len(areas)
    chunk = max(1, _PIXELS_PER_CHUNK // max(width, 1))
    for start in range(0, height, chunk):
        ys, xs = np.nonzero(index[start:start + chunk] >= 0)
        if len(ys) == 0:
            continue
        ys = ys + start
        objects = index[ys, xs]
        np.add.at(areas, objects, 1)
        entries_obj, entries_cell, entries_weight = [], [], []
        for y_cell, y_weight in ((rows[0], rows[2]), (rows[1], rows[3])):
            for x_cell, x_weight in ((cols[0], cols[2]), (cols[1], cols[3])):
                entries_obj.append(objects)
                entries_cell.append(y_cell[ys] * gw + x_cell[xs])
                entries_weight.append(y_weight[ys] * x_weight[xs])
        weights = sparse.coo_matrix(
            (np.concatenate(entries_weight), (np.concatenate(entries_obj), np.concatenate(entries_cell))),
            shape=(n_objects, gh * gw),
        ).tocsr()
        sums += weights @ flat


def _as_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _embedding_slices(image_embeddings: ImageEmbeddings, segmentation: np.ndarray):
    """Yield (object index part, embedding (C, gh, gw), input_size, original_size) for every slice / tile.

    ``segmentation`` here is the object index image (-1 = background)."""
    features = image_embeddings["features"]
    tiled = hasattr(features, "keys") and not hasattr(features, "shape")
    is_3d = segmentation.ndim == 3
    spatial = segmentation.shape[-2:]
    if not tiled:
        expected = tuple(int(s) for s in image_embeddings["original_size"])
        if tuple(spatial) != expected:
            raise ValueError(f"The segmentation (shape {segmentation.shape}) does not match the embeddings, which "
                             f"were computed for images of shape {expected}.")
        if is_3d != (len(features.shape) == 5) or (is_3d and features.shape[0] != segmentation.shape[0]):
            raise ValueError(f"The segmentation (shape {segmentation.shape}) does not match the embeddings of "
                             f"shape {tuple(features.shape)}.")
        input_size = tuple(int(s) for s in image_embeddings["input_size"])
        for z in range(segmentation.shape[0] if is_3d else 1):
            data = features[z] if is_3d else features
            yield (segmentation[z] if is_3d else segmentation), _as_numpy(data)[0], input_size, expected
        return
    shape = tuple(int(s) for s in features.attrs["shape"])
    if tuple(spatial) != shape:
        raise ValueError(f"The segmentation (shape {segmentation.shape}) does not match the tiled embeddings, "
                         f"which were computed for images of shape {shape}.")
    tile_shape, halo = features.attrs["tile_shape"], features.attrs["halo"]
    for tile in _tiling.iterate_tiles(shape, tile_shape, halo):
        for z in range(segmentation.shape[0] if is_3d else 1):
            part = (segmentation[z] if is_3d else segmentation)[tile.outer]
            # each pixel counts once: the pixels of the inner block, in the outer block's frame
            owned = np.zeros(part.shape, dtype=bool)
            owned[tile.local] = True
            part = np.where(owned, part, -1)
            if not (part >= 0).any():
                continue
            if str(tile.tile_id) not in features:
                raise ValueError(f"Objects lie in tile {tile.tile_id}, which has no embeddings (the embeddings "
                                 "were computed with a mask); compute them for the whole image.")
            array = features[str(tile.tile_id)]
            data = _as_numpy(array[z] if is_3d else array[...])[0]
            yield (part, data, tuple(int(s) for s in array.attrs["input_size"]),
                   tuple(int(s) for s in array.attrs["original_size"]))


def compute_object_features(
    image_embeddings: ImageEmbeddings,
    segmentation: np.ndarray,
    resize_embedding_shape: Tuple[int, int] = (256, 256),
    verbose: bool = True,
) -> Tuple[np.ndarray, np.ndarray]:
    """One feature vector per object: its size and its mean SAM embedding.

    Args:
        image_embeddings: Embeddings from :func:`micro_sam.util.precompute_image_embeddings` for the image the
            segmentation belongs to (2D, 3D or tiled).
        segmentation: (Y, X) or (Z, Y, X) label image; 0 is background, objects have positive ids.
        resize_embedding_shape: Kept for compatibility with micro_sam 1.8, where the embeddings were resized
            to this shape; here they are interpolated to the full image resolution, so it has no effect.
        verbose: Show a progress bar over slices / tiles.

    Returns:
        ``seg_ids``: (N,) sorted object ids; ``features``: (N, 1 + C) float32, column 0 the object's area in
        pixels, columns 1..C (C = 256 for SAM) the object's mean embedding.

    Raises:
        ValueError: For a segmentation without objects, with negative ids, or that does not match the
            embeddings' image shape.
    """
    from tqdm import tqdm

    segmentation = np.asarray(segmentation)
    if segmentation.ndim not in (2, 3):
        raise ValueError(f"segmentation must be 2D or 3D, got shape {segmentation.shape}.")
    if segmentation.dtype.kind not in "iub":
        raise ValueError(f"segmentation must be an integer label image, got dtype {segmentation.dtype}.")
    if len(resize_embedding_shape) != 2:
        raise ValueError(f"resize_embedding_shape must have two values, got {resize_embedding_shape}.")
    seg_ids = np.unique(segmentation)
    if seg_ids[0] < 0:
        raise ValueError(f"segmentation ids must be >= 0, found {seg_ids[0]}.")
    seg_ids = seg_ids[seg_ids != 0]
    if len(seg_ids) == 0:
        raise ValueError("The segmentation contains no objects (all pixels are 0): there is nothing to compute "
                         "features for.")
    index = np.searchsorted(seg_ids, segmentation).astype("int64")
    index[segmentation == 0] = -1

    sums, areas = None, np.zeros(len(seg_ids), dtype="int64")
    parts = _embedding_slices(image_embeddings, index)
    for part, embedding, input_size, original_size in tqdm(parts, desc="Compute object features",
                                                           disable=not verbose):
        if sums is None:
            sums = np.zeros((len(seg_ids), embedding.shape[0]), dtype="float64")
        _accumulate(sums, areas, part if part.dtype == np.int64 else part.astype("int64"), embedding, input_size,
                    original_size)
    features = np.concatenate([areas[:, None], sums / np.maximum(areas, 1)[:, None]], axis=1)
    return seg_ids, features.astype("float32")


# --- labels, training, prediction ------------------------------------------------------------------------
def object_labels_from_annotations(segmentation: np.ndarray, annotations: np.ndarray,
                                   seg_ids: Optional[np.ndarray] = None) -> np.ndarray:
    """The annotated class of each object: the most frequent nonzero class of ``annotations`` inside it.

    Args:
        segmentation: Label image of the objects (0 = background).
        annotations: Class image of the same shape; 0 = not annotated, classes 1, 2, ...
        seg_ids: The object ids to return labels for (default: all ids of ``segmentation`` except 0), e.g.
            the ``seg_ids`` of :func:`compute_object_features`.

    Returns:
        (N,) int64 class per object, 0 for objects without annotation. Ties go to the smaller class.
    """
    segmentation, annotations = np.asarray(segmentation), np.asarray(annotations)
    if segmentation.shape != annotations.shape:
        raise ValueError(f"annotations (shape {annotations.shape}) must have the segmentation's shape "
                         f"{segmentation.shape}.")
    if seg_ids is None:
        seg_ids = np.unique(segmentation)
        seg_ids = seg_ids[seg_ids != 0]
    seg_ids = np.asarray(seg_ids)
    labels = np.zeros(len(seg_ids), dtype="int64")
    annotated = (annotations != 0) & (segmentation != 0)
    if not annotated.any():
        return labels
    pairs, counts = np.unique(np.stack([segmentation[annotated], annotations[annotated]]), axis=1,
                              return_counts=True)
    # sort by object, then by count (descending), then by class: the first entry per object is the winner
    order = np.lexsort((pairs[1], -counts, pairs[0]))
    objects, classes = pairs[0][order], pairs[1][order]
    first = np.concatenate([[True], objects[1:] != objects[:-1]])
    winners = dict(zip(objects[first].tolist(), classes[first].tolist()))
    return np.array([winners.get(int(s), 0) for s in seg_ids], dtype="int64")


def train_object_classifier(
    features: np.ndarray,
    labels: np.ndarray,
    previous_features: Optional[np.ndarray] = None,
    previous_labels: Optional[np.ndarray] = None,
    **rf_kwargs,
):
    """Fit a scikit-learn random forest on the annotated objects (label 0 = not annotated, left out).

    Args:
        features: (N, F) object features from :func:`compute_object_features`.
        labels: (N,) class per object (:func:`object_labels_from_annotations`); 0 means not annotated.
        previous_features: Optional (M, F) features of objects annotated earlier (e.g. on other images).
        previous_labels: (M,) their classes.
        rf_kwargs: Arguments for ``sklearn.ensemble.RandomForestClassifier``; default ``n_estimators=200``,
            ``max_depth=10``, ``n_jobs=-1``, ``random_state=0``.

    Returns:
        The fitted ``RandomForestClassifier``.

    Raises:
        ValueError: Mismatching lengths or feature counts, or no annotated object.
        ImportError: When scikit-learn is not installed.
    """
    RandomForestClassifier = _require_sklearn()
    features, labels = np.asarray(features), np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features (shape {features.shape}) must be 2D with one row per label "
                         f"({len(labels)} labels).")
    keep = labels != 0
    x, y = features[keep], labels[keep]
    if previous_features is not None or previous_labels is not None:
        if previous_features is None or previous_labels is None:
            raise ValueError("Pass previous_features and previous_labels together.")
        previous_features, previous_labels = np.asarray(previous_features), np.asarray(previous_labels)
        if previous_features.ndim != 2 or previous_features.shape[1] != features.shape[1] or (
                len(previous_features) != len(previous_labels)):
            raise ValueError(f"previous_features (shape {previous_features.shape}) must have {features.shape[1]} "
                             f"columns and one row per previous label ({len(previous_labels)}).")
        x, y = np.concatenate([previous_features, x]), np.concatenate([previous_labels, y])
    if len(y) == 0:
        raise ValueError("No object is annotated (all labels are 0): annotate objects of at least one class.")
    kwargs = {"n_estimators": 200, "max_depth": 10, "n_jobs": -1, "random_state": 0}
    kwargs.update(rf_kwargs)
    return RandomForestClassifier(**kwargs).fit(x, y)


def _require_sklearn():
    try:
        from sklearn.ensemble import RandomForestClassifier
    except ImportError:
        raise ImportError("Object classification needs scikit-learn: pip install 'micro_sam[classification]' "
                          "(or pip install scikit-learn).") from None
    return RandomForestClassifier


def save_object_classifier(classifier, path: Union[str, os.PathLike]) -> None:
    """Save a fitted random forest as arrays in an ``.npz`` file (no pickle; see :func:`load_object_classifier`).

    Raises:
        ValueError: If the classifier is not a fitted single-output forest with numeric classes.
    """
    from ._forest import save_forest

    save_forest(classifier, path, metadata={"features": FEATURE_DEFINITION})


def load_object_classifier(path: Union[str, os.PathLike]):
    """Load a classifier written by :func:`save_object_classifier`.

    Only arrays are read, so loading cannot run code (unlike joblib / pickle files). The result has
    ``predict(features)``, ``predict_proba(features)`` and ``classes_``, and predicts exactly what the saved
    scikit-learn forest predicts.

    Raises:
        ValueError: If the file does not exist, is not such a classifier, or was made for other features.
    """
    from ._forest import load_forest

    forest = load_forest(path)
    definition = forest.metadata.get("features")
    if definition != FEATURE_DEFINITION:
        raise ValueError(f"The classifier {os.fspath(path)!r} was trained on other features ({definition!r}); "
                         f"this version computes {FEATURE_DEFINITION!r}. Train it again.")
    return forest


def _resolve_classifier(rf_path):
    if hasattr(rf_path, "predict"):
        return rf_path
    path = os.fspath(rf_path)
    if path.endswith((".joblib", ".pkl", ".pickle")):
        raise ValueError(
            f"{path!r} is a pickled classifier; loading it would run code stored in the file. If you trust it, "
            "load it yourself (joblib.load) and pass the classifier object as rf_path, or save it with "
            "save_object_classifier."
        )
    return load_object_classifier(path)


def project_prediction_to_segmentation(
    segmentation: np.ndarray, object_prediction: np.ndarray, seg_ids: np.ndarray
) -> np.ndarray:
    """Paint each object of a label image with its predicted class.

    Args:
        segmentation: Label image (any dimensionality), 0 = background.
        object_prediction: (N,) the class of each object in ``seg_ids``.
        seg_ids: (N,) the object ids the predictions belong to.

    Returns:
        An image of ``segmentation``'s shape with each object's class; background and objects not in
        ``seg_ids`` are 0. The dtype is that of ``object_prediction``.

    Raises:
        ValueError: If ``object_prediction`` and ``seg_ids`` differ in length or ``seg_ids`` has duplicates.
    """
    segmentation = np.asarray(segmentation)
    object_prediction, seg_ids = np.asarray(object_prediction), np.asarray(seg_ids)
    if object_prediction.ndim != 1 or object_prediction.shape != seg_ids.shape:
        raise ValueError(f"object_prediction ({object_prediction.shape}) and seg_ids ({seg_ids.shape}) must be "
                         "1D arrays of the same length.")
    order = np.argsort(seg_ids, kind="stable")
    ids, classes = seg_ids[order], object_prediction[order]
    if len(ids) > 1 and (ids[1:] == ids[:-1]).any():
        raise ValueError("seg_ids contains duplicate ids.")
    out = np.zeros(segmentation.shape, dtype=object_prediction.dtype)
    if len(ids) == 0:
        return out
    position = np.clip(np.searchsorted(ids, segmentation), 0, len(ids) - 1)
    found = (ids[position] == segmentation) & (segmentation != 0)
    out[found] = classes[position[found]]
    return out


def _load(data, key):
    if isinstance(data, np.ndarray):
        return data
    from .util import load_image_data

    return load_image_data(os.fspath(data), key=key)


def run_prediction_with_object_classifier(
    images: Sequence[Union[str, os.PathLike, np.ndarray]],
    segmentations: Sequence[Union[str, os.PathLike, np.ndarray]],
    predictor,
    rf_path,
    image_key: Optional[str] = None,
    segmentation_key: Optional[str] = None,
    project_prediction: bool = True,
    ndim: Optional[int] = None,
    tile_shape: Optional[Tuple[int, int]] = None,
    halo: Optional[Tuple[int, int]] = None,
    verbose: bool = True,
) -> List[np.ndarray]:
    """Classify the objects of a series of segmented images with a trained classifier.

    Args:
        images: Images (arrays, or files read with :func:`micro_sam.util.load_image_data`).
        segmentations: The label image of each image (arrays or files).
        predictor: The SAM predictor the classifier's features were computed with.
        rf_path: A classifier file from :func:`save_object_classifier`, or a fitted classifier object
            (anything with ``predict``). Pickled files (.joblib / .pkl) are refused: loading them runs code.
        image_key: Dataset key inside container image files (zarr, n5, hdf5).
        segmentation_key: Dataset key inside container segmentation files.
        project_prediction: Return per-pixel class images; otherwise the per-object classes (ordered by id).
        ndim: 2 or 3; inferred from the images when None.
        tile_shape: Tile shape for tiled embeddings of large images; None for no tiling.
        halo: Halo for tiled embeddings.
        verbose: Show a progress bar over the images.

    Returns:
        One prediction per image: a class image of the segmentation's shape (0 = background), or the (N,)
        classes of its objects.

    Raises:
        ValueError: Different numbers of images and segmentations, a pickled or missing classifier file, or
            features that do not fit the classifier.
    """
    from tqdm import tqdm

    from .util import precompute_image_embeddings

    if len(images) != len(segmentations):
        raise ValueError(f"Got {len(images)} images but {len(segmentations)} segmentations.")
    classifier = _resolve_classifier(rf_path)
    predictions = []
    for image, segmentation in tqdm(list(zip(images, segmentations)), desc="Object classification",
                                    disable=not verbose):
        image = _load(image, image_key)
        segmentation = _load(segmentation, segmentation_key)
        embeddings = precompute_image_embeddings(predictor, image, ndim=ndim, tile_shape=tile_shape, halo=halo,
                                                 verbose=False)
        seg_ids, features = compute_object_features(embeddings, segmentation, verbose=False)
        expected = getattr(classifier, "n_features_in_", features.shape[1])
        if expected != features.shape[1]:
            raise ValueError(f"The classifier expects {expected} features per object, the predictor gives "
                             f"{features.shape[1]}: was it trained with another model?")
        prediction = np.asarray(classifier.predict(features))
        predictions.append(
            project_prediction_to_segmentation(segmentation, prediction, seg_ids) if project_prediction
            else prediction
        )
    return predictions
