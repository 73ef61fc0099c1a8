"""Evaluating 3D segmentation by projection: each ground-truth object is prompted in one slice and followed
through the volume with :func:`micro_sam.multi_dimensional_segmentation.segment_mask_in_volume`.

:func:`segment_slices_from_ground_truth` segments and scores one setting; the grid search
(:func:`run_multi_dimensional_segmentation_grid_search`) scores combinations of the projection parameters
(``iou_threshold``, ``projection``, ``box_extension``) and stores the best one. The model, the embeddings and
the segmentation of each object's first slice are computed once and shared by all combinations.
"""
from __future__ import annotations

import os
import tempfile
from itertools import product
from math import floor
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import pandas as pd

from .._lazy import lazy_attributes
from .metrics import dice_score, mean_segmentation_accuracy

__all__ = [
    "default_grid_search_values_multi_dimensional_segmentation",
    "run_multi_dimensional_segmentation_grid_search",
    "segment_slices_from_ground_truth",
]

# Names micro_sam 1.8 exposes here (imported there from other modules), resolved on first use.
__getattr__, __dir__ = lazy_attributes(globals(), {
    "PointAndBoxPromptGenerator": "micro_sam.prompt_generators:PointAndBoxPromptGenerator",
    "batched_inference": "micro_sam.inference:batched_inference",
    "segment_mask_in_volume": "micro_sam.multi_dimensional_segmentation:segment_mask_in_volume",
    "evaluate_instance_segmentation_grid_search":
        "micro_sam.evaluation.instance_segmentation:evaluate_instance_segmentation_grid_search",
    "tqdm": "tqdm:tqdm",
})

_GRID_PARAMETERS = ("iou_threshold", "projection", "box_extension")
_METRICS = ("sa", "dice", "dice_per_class")
_PROMPT_MODES = ("box", "points")
_RESULTS_FILE = "all_grid_search_results.csv"
_BEST_FILE = "grid_search_params_multi_dimensional_segmentation.csv"


def _value_range(start: float, stop: float, step: float) -> List[float]:
    n_steps = int(round((stop - start) / step))
    return [round(start + i * step, 4) for i in range(n_steps + 1)]


def default_grid_search_values_multi_dimensional_segmentation(
    iou_threshold_values: Optional[List[float]] = None,
    projection_method_values: Optional[Union[str, dict]] = None,
    box_extension_values: Optional[Union[float, int]] = None,
) -> Dict[str, List]:
    """The default parameter values searched by :func:`run_multi_dimensional_segmentation_grid_search`.

    Args:
        iou_threshold_values: Values for ``iou_threshold``; default 0.5 to 0.9 in steps of 0.1.
        projection_method_values: Values for ``projection``; default "mask", "points", "box",
            "points_and_mask", "single_point".
        box_extension_values: Values for ``box_extension``; default 0 to 0.25 in steps of 0.025.

    Returns:
        ``{"iou_threshold": [...], "projection": [...], "box_extension": [...]}``.
    """
    return {
        "iou_threshold": _value_range(0.5, 0.9, 0.1) if iou_threshold_values is None else list(iou_threshold_values),
        "projection": (["mask", "points", "box", "points_and_mask", "single_point"]
                       if projection_method_values is None else list(projection_method_values)),
        "box_extension": _value_range(0.0, 0.25, 0.025) if box_extension_values is None else list(box_extension_values),
    }


# --- the pieces shared by all settings ------------------------------------------------------------------
def _validate(volume, ground_truth, interactive_seg_mode, evaluation_metric):
    volume, ground_truth = np.asarray(volume), np.asarray(ground_truth)
    if volume.ndim not in (3, 4):
        raise ValueError(f"volume must be 3D (Z, Y, X) or (Z, Y, X, C), got shape {volume.shape}.")
    if ground_truth.shape != volume.shape[:3]:
        raise ValueError(f"ground_truth (shape {ground_truth.shape}) must have the volume's shape {volume.shape[:3]}.")
    if interactive_seg_mode not in _PROMPT_MODES:
        raise ValueError(f"interactive_seg_mode must be one of {_PROMPT_MODES}, got {interactive_seg_mode!r}.")
    if evaluation_metric not in _METRICS:
        raise ValueError(f"evaluation_metric must be one of {_METRICS}, got {evaluation_metric!r}.")
    if not (ground_truth != 0).any():
        raise ValueError("ground_truth contains no objects: there is nothing to segment.")
    return volume, ground_truth


def _prepare(volume, model_type, checkpoint_path, embedding_path, device, predictor, verbose):
    from .. import util

    if predictor is None:
        predictor = util.get_sam_model(model_type=model_type, checkpoint_path=checkpoint_path, device=device)
    embeddings = util.precompute_image_embeddings(predictor, volume, save_path=embedding_path, ndim=3,
                                                  verbose=verbose)
    return predictor, embeddings


def _objects(ground_truth: np.ndarray, min_size: int):
    """(label, middle slice) of each object whose middle slice holds at least min_size pixels, and the skipped
    labels. The middle slice is floor of the mean of the object's first and last slice."""
    from scipy import ndimage

    labels = np.unique(ground_truth)
    labels = labels[labels != 0]
    extents = ndimage.find_objects(ground_truth.astype("int64"))
    objects, skipped = [], []
    for label in labels.tolist():
        z_slice = extents[label - 1][0]
        z = floor((z_slice.start + z_slice.stop - 1) / 2)
        if min_size > 0 and int((ground_truth[z] == label).sum()) < min_size:
            skipped.append(label)
        else:
            objects.append((label, z))
    return objects, skipped


def _segment_first_slice(predictor, embeddings, mask: np.ndarray, z: int, mode: str) -> np.ndarray:
    """The model's mask for an object in slice z, prompted with its box or with a point inside and outside."""
    from ..prompt_based_segmentation import segment_from_box, segment_from_points
    from ..util import get_centers_and_bounding_boxes

    centers, boxes = get_centers_and_bounding_boxes(mask.astype("uint8"))
    if mode == "box":
        result = segment_from_box(predictor, np.array(boxes[1]), image_embeddings=embeddings, i=z)
    else:
        import torch

        from ..prompt_generators import PointAndBoxPromptGenerator

        generator = PointAndBoxPromptGenerator(n_positive_points=1, n_negative_points=1, dilation_strength=10)
        points_xy, labels, _, _ = generator(torch.from_numpy(mask[None, None].astype("float32")),
                                            bbox_coordinates=[boxes[1]], center_coordinates=[centers[1]])
        points = points_xy[0].numpy()[:, ::-1]  # (x, y) -> (y, x)
        result = segment_from_points(predictor, points, labels[0].numpy(), image_embeddings=embeddings, i=z)
    return np.asarray(result).reshape(mask.shape) != 0


def _first_slices(predictor, embeddings, ground_truth, objects, mode, verbose):
    from tqdm import tqdm

    return {label: _segment_first_slice(predictor, embeddings, ground_truth[z] == label, z, mode)
            for label, z in tqdm(objects, desc="Segment the first slice of each object", disable=not verbose)}


def _project_all(predictor, embeddings, shape, objects, first_slices, iou_threshold, projection, box_extension,
                 dtype, verbose):
    from tqdm import tqdm

    from ..multi_dimensional_segmentation import segment_mask_in_volume

    segmentation = np.zeros(shape, dtype=dtype)
    for label, z in tqdm(objects, desc="Segment each object in the volume", disable=not verbose):
        seed = np.zeros(shape, dtype="uint8")
        seed[z] = first_slices[label]
        if not seed[z].any():
            continue  # the model found nothing in the first slice: nothing to project
        mask, _ = segment_mask_in_volume(
            seed, predictor, embeddings, segmented_slices=np.array([z]), stop_lower=False, stop_upper=False,
            iou_threshold=iou_threshold, projection=projection, box_extension=box_extension,
        )
        segmentation[mask != 0] = label
    return segmentation


def _evaluate(segmentation, ground_truth, skipped, evaluation_metric) -> Dict[str, float]:
    if skipped:
        ground_truth = np.where(np.isin(ground_truth, skipped), 0, ground_truth)
    if evaluation_metric == "sa":
        msa, accuracies = mean_segmentation_accuracy(segmentation, ground_truth, return_accuracies=True)
        return {"mSA": msa, "SA50": accuracies[0], "SA75": accuracies[5]}
    if evaluation_metric == "dice":
        return {"Dice": dice_score(segmentation, ground_truth)}
    labels = np.unique(ground_truth)
    labels = labels[labels != 0]
    return {"Dice": float(np.mean([dice_score(segmentation == label, ground_truth == label, None, None)
                                   for label in labels]))}


def _write_atomic(write, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(dir=folder, suffix=".tmp" + os.path.splitext(path)[1])
    os.close(handle)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


# --- public functions ----------------------------------------------------------------------------------
def segment_slices_from_ground_truth(
    volume: np.ndarray,
    ground_truth: np.ndarray,
    model_type: str,
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    embedding_path: Optional[Union[str, os.PathLike]] = None,
    save_path: Optional[Union[str, os.PathLike]] = None,
    iou_threshold: float = 0.8,
    projection: Union[str, dict] = "mask",
    box_extension: Union[float, int] = 0.025,
    device: Optional[str] = None,
    interactive_seg_mode: str = "box",
    verbose: bool = False,
    return_segmentation: bool = False,
    min_size: int = 0,
    evaluation_metric: str = "sa",
    predictor=None,
) -> Union[Dict[str, float], Tuple[Dict[str, float], np.ndarray]]:
    """Segment every ground-truth object in 3D from a prompt in its middle slice, and score the result.

    For each object, its middle slice (floor of the mean of its first and last slice) is segmented from a
    prompt derived from the ground truth (its box, or one point inside and one outside); the mask is then
    projected slice by slice up and down the volume until the IoU of adjacent masks drops below
    ``iou_threshold`` (:func:`micro_sam.multi_dimensional_segmentation.segment_mask_in_volume`).

    Args:
        volume: (Z, Y, X) volume (or (Z, Y, X, C)).
        ground_truth: (Z, Y, X) label volume, 0 = background.
        model_type: The model to load (see :func:`micro_sam.util.get_sam_model`); unused with ``predictor``.
        checkpoint_path: A checkpoint for ``model_type``.
        embedding_path: A zarr file to cache the volume's embeddings in.
        save_path: A tif file for the segmentation. If it exists, it is loaded and scored instead of segmenting.
        iou_threshold: Minimal IoU of the masks in adjacent slices to continue the projection.
        projection: How a mask prompts the next slice: "mask", "box", "points", "points_and_mask",
            "single_point" (or a dict, see ``segment_mask_in_volume``).
        box_extension: Relative enlargement of the box prompt derived from a mask.
        device: The device for the model.
        interactive_seg_mode: The prompt in the middle slice: "box" or "points".
        verbose: Show progress.
        return_segmentation: Also return the segmentation.
        min_size: Objects with fewer pixels than this in their middle slice are neither segmented nor scored.
        evaluation_metric: "sa" (mSA, SA50, SA75), "dice" (Dice of the foregrounds) or "dice_per_class"
            (mean Dice over the ground-truth objects).
        predictor: A loaded predictor to use instead of loading ``model_type``.

    Returns:
        The scores (``{"mSA", "SA50", "SA75"}`` or ``{"Dice"}``), and with ``return_segmentation`` the (Z, Y, X)
        segmentation (object ids of the ground truth).

    Raises:
        ValueError: Shapes that do not match, a ground truth without objects, an unknown prompt mode or metric.
    """
    import imageio.v3 as imageio

    volume, ground_truth = _validate(volume, ground_truth, interactive_seg_mode, evaluation_metric)
    objects, skipped = _objects(ground_truth, min_size)
    if save_path is not None and os.path.exists(save_path):
        segmentation = imageio.imread(save_path)
    else:
        predictor, embeddings = _prepare(volume, model_type, checkpoint_path, embedding_path, device, predictor,
                                         verbose)
        first = _first_slices(predictor, embeddings, ground_truth, objects, interactive_seg_mode, verbose)
        segmentation = _project_all(predictor, embeddings, ground_truth.shape, objects, first, iou_threshold,
                                    projection, box_extension, ground_truth.dtype, verbose)
        if save_path is not None:
            _write_atomic(lambda path: imageio.imwrite(path, segmentation, compression="zlib"), os.fspath(save_path))
    results = _evaluate(segmentation, ground_truth, skipped, evaluation_metric)
    return (results, segmentation) if return_segmentation else results


def _best_parameters(results: pd.DataFrame, names: List[str], criterion: str) -> Dict[str, Any]:
    grouped = results.groupby(names, sort=False)[criterion].mean().reset_index()
    best = grouped.iloc[int(grouped[criterion].to_numpy().argmax())]
    params = {name: (best[name].item() if isinstance(best[name], np.generic) else best[name]) for name in names}
    params[criterion] = float(best[criterion])
    return params


def run_multi_dimensional_segmentation_grid_search(
    volume: np.ndarray,
    ground_truth: np.ndarray,
    model_type: str,
    checkpoint_path: Optional[Union[str, os.PathLike]],
    embedding_path: Optional[Union[str, os.PathLike]],
    result_dir: Union[str, os.PathLike],
    interactive_seg_mode: str = "box",
    verbose: bool = False,
    grid_search_values: Optional[Dict[str, List]] = None,
    min_size: int = 0,
    evaluation_metric: str = "sa",
    store_segmentation: bool = False,
    predictor=None,
) -> str:
    """Score all combinations of projection parameters and store the best one.

    Args:
        volume: (Z, Y, X) volume.
        ground_truth: (Z, Y, X) label volume.
        model_type: The model to load; unused with ``predictor``.
        checkpoint_path: A checkpoint for ``model_type`` (or None).
        embedding_path: A zarr file to cache the embeddings in (or None).
        result_dir: Folder for the results: ``all_grid_search_results.csv`` (one row per combination),
            ``grid_search_params_multi_dimensional_segmentation.csv`` (the best combination and its score) and,
            with ``store_segmentation``, ``predictions/grid_search_result_00000.tif``, ... If the results file
            exists, only the best combination is (re)computed from it.
        interactive_seg_mode: The prompt in each object's middle slice: "box" or "points".
        verbose: Show the progress of each setting, not only over the combinations.
        grid_search_values: Parameter name -> values, for any of "iou_threshold", "projection" and
            "box_extension" (the others keep the defaults of :func:`segment_slices_from_ground_truth`); default
            :func:`default_grid_search_values_multi_dimensional_segmentation`.
        min_size: See :func:`segment_slices_from_ground_truth`.
        evaluation_metric: See :func:`segment_slices_from_ground_truth`; the best combination maximises mSA for
            "sa", Dice otherwise.
        store_segmentation: Store the segmentation of each combination.
        predictor: A loaded predictor to use instead of loading ``model_type``.

    Returns:
        The path of the csv file with the best parameters.

    Raises:
        ValueError: Unknown grid parameters or empty value lists, and see :func:`segment_slices_from_ground_truth`.
    """
    import imageio.v3 as imageio
    from tqdm import tqdm

    grid = default_grid_search_values_multi_dimensional_segmentation() if grid_search_values is None else dict(
        grid_search_values)
    unknown = sorted(set(grid) - set(_GRID_PARAMETERS))
    if unknown or not grid or any(len(values) == 0 for values in grid.values()):
        raise ValueError(f"grid_search_values must map some of {_GRID_PARAMETERS} to non-empty lists of values; got "
                         f"{ {k: v for k, v in grid.items()} }.")
    volume, ground_truth = _validate(volume, ground_truth, interactive_seg_mode, evaluation_metric)
    criterion = "mSA" if evaluation_metric == "sa" else "Dice"
    result_dir = os.fspath(result_dir)
    os.makedirs(result_dir, exist_ok=True)
    result_path = os.path.join(result_dir, _RESULTS_FILE)
    best_path = os.path.join(result_dir, _BEST_FILE)

    if not os.path.exists(result_path):
        objects, skipped = _objects(ground_truth, min_size)
        predictor, embeddings = _prepare(volume, model_type, checkpoint_path, embedding_path, None, predictor,
                                         verbose)
        first = _first_slices(predictor, embeddings, ground_truth, objects, interactive_seg_mode, verbose)
        defaults = {"iou_threshold": 0.8, "projection": "mask", "box_extension": 0.025}
        combinations = [dict(zip(grid, values)) for values in product(*grid.values())]
        rows = []
        for index, setting in enumerate(tqdm(combinations, desc="Grid search for 3D segmentation by projection")):
            kwargs = {**defaults, **setting}
            segmentation = _project_all(predictor, embeddings, ground_truth.shape, objects, first,
                                        kwargs["iou_threshold"], kwargs["projection"], kwargs["box_extension"],
                                        ground_truth.dtype, verbose)
            if store_segmentation:
                path = os.path.join(result_dir, "predictions", f"grid_search_result_{index:05}.tif")
                _write_atomic(lambda p: imageio.imwrite(p, segmentation, compression="zlib"), path)
            rows.append({**_evaluate(segmentation, ground_truth, skipped, evaluation_metric), **setting})
        _write_atomic(lambda p: pd.DataFrame(rows).to_csv(p), result_path)

    results = pd.read_csv(result_path, index_col=0)
    best = _best_parameters(results, [name for name in grid if name in results.columns], criterion)
    _write_atomic(lambda p: pd.DataFrame([best]).to_csv(p), best_path)
    if verbose:
        print(f"Best {criterion} {best[criterion]:.4f} with", ", ".join(f"{k}={v}" for k, v in best.items()
                                                                         if k != criterion))
    return best_path
