"""Grid search, inference and evaluation for automatic instance segmentation.

Works with any segmenter that follows the interface of `micro_sam.instance_segmentation`
(automatic mask generation "AMG" or instance segmentation with decoder "AIS"):
``segmenter.initialize(image, image_embeddings=None, ...)`` once per image, then
``segmenter.generate(**kwargs)`` returning a label image of the image's shape, as often as needed.
The segmenter's ``_predictor`` attribute (a `SamPredictor`) is only used to cache image embeddings.

File layout (identical to the published micro_sam, so that results can be exchanged):

* grid search results: one csv per image, ``<result_dir>/<image file stem>.csv``, with one row per parameter
  combination and the columns ``image_name, mSA, SA50, SA75, Precision, Recall, F1`` followed by the parameters,
* embeddings: ``<embedding_dir>/<image file stem>.zarr``,
* predictions: ``<prediction_dir>/<image file name>``,
* best parameters: ``<experiment_folder>/results/grid_search_params_amg.csv`` (AMG) or
  ``.../grid_search_params_instance_segmentation_with_decoder.csv`` (other segmenters).
"""

import ast
import importlib
import math
import numbers
import os
from glob import glob
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import imageio.v3 as imageio
from tqdm import tqdm

from .metrics import mean_segmentation_accuracy, matching
from .._lazy import lazy_attributes

if TYPE_CHECKING:  # only for the annotations; the segmenters need torch
    from ..instance_segmentation import AMGBase, InstanceSegmentationWithDecoder
    Segmenter = Union[AMGBase, InstanceSegmentationWithDecoder]
else:
    Segmenter = Any

__all__ = [
    "default_grid_search_values_amg",
    "default_grid_search_values_instance_segmentation_with_decoder",
    "default_grid_search_values_apg",
    "run_instance_segmentation_grid_search",
    "run_instance_segmentation_inference",
    "evaluate_instance_segmentation_grid_search",
    "save_grid_search_best_params",
    "run_instance_segmentation_grid_search_and_inference",
]


# Names micro_sam 1.8 exposes here (imported there from other modules), resolved on first use.
__getattr__, __dir__ = lazy_attributes(globals(), {
    "AMGBase": "micro_sam.instance_segmentation:AMGBase",
    "InstanceSegmentationWithDecoder": "micro_sam.instance_segmentation:InstanceSegmentationWithDecoder",
})

PathLike = Union[str, os.PathLike]

#: The metric columns of the per-image grid search csv files.
GRID_SEARCH_METRICS = ("mSA", "SA50", "SA75", "Precision", "Recall", "F1")


#
# Default grid search values.
#

def _value_range(start: float, stop: float, step: float) -> List[float]:
    """Values from start to stop (both included) with the given step, rounded to 3 decimals."""
    n_steps = int(round((stop - start) / step))
    return [round(start + i * step, 3) for i in range(n_steps + 1)]


def default_grid_search_values_amg(
    iou_thresh_values: Optional[List[float]] = None,
    stability_score_values: Optional[List[float]] = None,
) -> Dict[str, List[float]]:
    """Default grid search values for automatic mask generation (AMG).

    Searches the thresholds for filtering the masks by the IoU that the model predicts (`pred_iou_thresh`)
    and by their stability (`stability_score_thresh`).

    Args:
        iou_thresh_values: The values for `pred_iou_thresh`. By default 0.6 to 0.925 in steps of 0.025.
        stability_score_values: The values for `stability_score_thresh`. By default 0.6 to 0.95 in steps of 0.025.

    Returns:
        The grid search values, parameter name -> list of values.
    """
    return {
        "pred_iou_thresh": _value_range(0.6, 0.925, 0.025) if iou_thresh_values is None else iou_thresh_values,
        "stability_score_thresh":
            _value_range(0.6, 0.95, 0.025) if stability_score_values is None else stability_score_values,
    }


def default_grid_search_values_instance_segmentation_with_decoder(
    center_distance_threshold_values: Optional[List[float]] = None,
    boundary_distance_threshold_values: Optional[List[float]] = None,
    distance_smoothing_values: Optional[List[float]] = None,
    min_size_values: Optional[List[float]] = None,
) -> Dict[str, List[float]]:
    """Default grid search values for instance segmentation with the decoder (AIS).

    Args:
        center_distance_threshold_values: The values for `center_distance_threshold`. By default 0.3 to 0.7
            in steps of 0.1.
        boundary_distance_threshold_values: The values for `boundary_distance_threshold`. By default 0.3 to 0.7
            in steps of 0.1.
        distance_smoothing_values: The values for `distance_smoothing`. By default 1.0 to 2.2 in steps of 0.2.
        min_size_values: The values for `min_size`. By default 50, 100 and 200.

    Returns:
        The grid search values, parameter name -> list of values.
    """
    def _default(values, default):
        return default if values is None else values

    return {
        "center_distance_threshold": _default(center_distance_threshold_values, _value_range(0.3, 0.7, 0.1)),
        "boundary_distance_threshold": _default(boundary_distance_threshold_values, _value_range(0.3, 0.7, 0.1)),
        "distance_smoothing": _default(distance_smoothing_values, _value_range(1.0, 2.2, 0.2)),
        "min_size": _default(min_size_values, [50, 100, 200]),
    }


def default_grid_search_values_apg(
    min_distance_values: Optional[List[float]] = None,
    threshold_abs_values: Optional[List[float]] = None,
    multimasking_values: Optional[List[float]] = None,
    prompt_selection_values: Optional[List[float]] = None,
    min_size_values: Optional[List[float]] = None,
    nms_threshold_values: Optional[List[float]] = None,
    intersection_over_min_values: Optional[List[bool]] = None,
    mask_threshold_values: Optional[List[Union[float, str]]] = None,
    center_distance_threshold_values: Optional[List[float]] = None,
    boundary_distance_threshold_values: Optional[List[float]] = None,
) -> Dict[str, List[float]]:
    """Default grid search values for automatic prompt generation (APG).

    As in the published micro_sam, only the parameters of the connected-component prompt selection and of the
    filtering are searched: `center_distance_threshold`, `boundary_distance_threshold`, `min_size`,
    `nms_threshold` and `intersection_over_min`. The other arguments are accepted for compatibility;
    a parameter given explicitly (not None) is added to the search.

    Args:
        min_distance_values: Values for `min_distance`; not searched by default.
        threshold_abs_values: Values for `threshold_abs`; not searched by default.
        multimasking_values: Values for `multimasking`; not searched by default.
        prompt_selection_values: Values for `prompt_selection`; not searched by default.
        min_size_values: Values for `min_size`. By default 50, 100 and 200.
        nms_threshold_values: Values for `nms_threshold`. By default 0.5 to 0.9 in steps of 0.1.
        intersection_over_min_values: Values for `intersection_over_min`. By default True and False.
        mask_threshold_values: Values for `mask_threshold`; not searched by default.
        center_distance_threshold_values: Values for `center_distance_threshold`. By default 0.3 to 0.7
            in steps of 0.1.
        boundary_distance_threshold_values: Values for `boundary_distance_threshold`. By default 0.3 to 0.7
            in steps of 0.1.

    Returns:
        The grid search values, parameter name -> list of values.
    """
    def _default(values, default):
        return default if values is None else values

    values = {
        "center_distance_threshold": _default(center_distance_threshold_values, _value_range(0.3, 0.7, 0.1)),
        "boundary_distance_threshold": _default(boundary_distance_threshold_values, _value_range(0.3, 0.7, 0.1)),
        "min_size": _default(min_size_values, [50, 100, 200]),
        "nms_threshold": _default(nms_threshold_values, _value_range(0.5, 0.9, 0.1)),
        "intersection_over_min": _default(intersection_over_min_values, [True, False]),
    }
    optional = {
        "min_distance": min_distance_values,
        "threshold_abs": threshold_abs_values,
        "multimasking": multimasking_values,
        "prompt_selection": prompt_selection_values,
        "mask_threshold": mask_threshold_values,
    }
    values.update({name: vals for name, vals in optional.items() if vals is not None})
    return values


#
# Helpers.
#

def _load_image(path: PathLike, key: Optional[str], roi: Optional[Tuple[slice, ...]]) -> np.ndarray:
    """Load an image from a simple image file (key None) or from a dataset in hdf5 / zarr / n5 (key given)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"The file '{path}' does not exist.")
    if key is None:
        data = imageio.imread(path)
        return data if roi is None else data[roi]

    suffix = Path(path).suffix.lower()
    if suffix in (".h5", ".hdf5", ".hdf"):
        try:
            import h5py
        except ImportError as e:
            raise ValueError(f"Reading '{path}' needs h5py, which is not installed.") from e
        with h5py.File(path, "r") as f:
            if key not in f:
                raise ValueError(f"The key '{key}' does not exist in '{path}'.")
            return f[key][()] if roi is None else f[key][roi]
    if suffix in (".zarr", ".n5") or os.path.isdir(path):
        import zarr
        group = zarr.open(str(path), mode="r")
        try:
            dataset = group[key]
        except KeyError as e:
            raise ValueError(f"The key '{key}' does not exist in '{path}'.") from e
        return dataset[:] if roi is None else dataset[roi]
    raise ValueError(
        f"Cannot read the key '{key}' from '{path}': keys are supported for hdf5 (.h5, .hdf5, .hdf), zarr and n5; "
        "pass key=None for other image formats."
    )


def _grid_combinations(grid_search_values: Dict[str, Sequence]) -> List[Dict[str, Any]]:
    if not grid_search_values:
        raise ValueError("The grid search values are empty; pass at least one parameter with a list of values.")
    empty = [name for name, values in grid_search_values.items() if len(values) == 0]
    if empty:
        raise ValueError(f"The grid search parameters {empty} have no values.")
    reserved = [name for name in grid_search_values if name in GRID_SEARCH_METRICS or name == "image_name"]
    if reserved:
        raise ValueError(f"The grid search parameters {reserved} clash with the result columns {GRID_SEARCH_METRICS}.")
    names = list(grid_search_values.keys())
    return [dict(zip(names, values)) for values in product(*grid_search_values.values())]


def _normalize_value(value: Any) -> Any:
    """Normalize a parameter value so that values read back from a csv compare equal to the original ones."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Number):
        value = float(value)
        return None if math.isnan(value) else round(value, 9)
    if isinstance(value, str) and value in ("True", "False"):
        return value == "True"
    return str(value)


def _combination_key(combination: Dict[str, Any], names: Sequence[str]) -> Tuple:
    return tuple(_normalize_value(combination[name]) for name in names)


def _finished_combinations(result_path: str, names: Sequence[str]) -> Tuple[Optional[pd.DataFrame], set]:
    """Load the results stored for one image and return them with the keys of the finished combinations."""
    if not os.path.exists(result_path):
        return None, set()
    stored = pd.read_csv(result_path)
    if any(name not in stored.columns for name in names) or "mSA" not in stored.columns:
        return stored, set()
    stored_params = stored[list(names)].astype(object).where(stored[list(names)].notna(), None)
    return stored, {_combination_key(row, names) for row in stored_params.to_dict("records")}


def _write_csv_atomic(df: pd.DataFrame, path: str) -> None:
    # The temporary name does not end in '.csv', so it is never picked up as a result file.
    tmp_path = f"{path}.tmp"
    df.to_csv(tmp_path, index=False)
    os.replace(tmp_path, path)


def _as_label_image(output: Any, shape: Tuple[int, ...], image_path: PathLike) -> np.ndarray:
    if isinstance(output, list):
        raise ValueError(
            f"The segmenter returned a list of masks for '{image_path}'; the evaluation needs a label image: "
            "do not pass output_mode=None to generate."
        )
    labels = np.asarray(output)
    if labels.shape != shape:
        raise ValueError(
            f"The segmentation of '{image_path}' has shape {labels.shape}, "
            f"but its ground truth has shape {shape}."
        )
    return labels


def _initialize(segmenter, image, image_name, embedding_dir, tiling_window_params) -> None:
    tiling_window_params = {} if tiling_window_params is None else tiling_window_params
    if embedding_dir is None:
        segmenter.initialize(image, **tiling_window_params)
        return
    predictor = getattr(segmenter, "_predictor", None)
    if predictor is None:
        raise ValueError(
            "Caching embeddings in 'embedding_dir' needs a segmenter with a '_predictor' attribute; "
            "pass embedding_dir=None to let the segmenter compute the embeddings itself."
        )
    util = importlib.import_module("micro_sam.util")  # imported lazily: it needs torch
    os.makedirs(embedding_dir, exist_ok=True)
    embedding_path = os.path.join(embedding_dir, f"{image_name}.zarr")
    image_embeddings = util.precompute_image_embeddings(
        predictor, image, save_path=embedding_path, ndim=2, verbose=False, **tiling_window_params
    )
    segmenter.initialize(image, image_embeddings=image_embeddings, **tiling_window_params)


def _evaluate(labels: np.ndarray, gt: np.ndarray) -> Dict[str, float]:
    msa, accuracies = mean_segmentation_accuracy(labels, gt, return_accuracies=True)
    stats = matching(labels, gt)
    return {
        "mSA": msa, "SA50": accuracies[0], "SA75": accuracies[5],
        "Precision": stats["precision"], "Recall": stats["recall"], "F1": stats["f1"],
    }


#
# Grid search.
#

def run_instance_segmentation_grid_search(
    segmenter: Segmenter,
    grid_search_values: Dict[str, List],
    image_paths: List[PathLike],
    gt_paths: List[PathLike],
    result_dir: PathLike,
    embedding_dir: Optional[PathLike],
    fixed_generate_kwargs: Optional[Dict[str, Any]] = None,
    verbose_gs: bool = False,
    image_key: Optional[str] = None,
    gt_key: Optional[str] = None,
    rois: Optional[Tuple[slice, ...]] = None,
    tiling_window_params: Optional[Dict[str, Tuple[int, int]]] = None,
) -> None:
    """Run a grid search over the parameters of `segmenter.generate` and store the scores per image.

    All combinations of the values in `grid_search_values` are evaluated, e.g.
    ``{"pred_iou_thresh": [0.6, 0.8], "stability_score_thresh": [0.7, 0.9]}`` gives four combinations.
    See `default_grid_search_values_amg` and `default_grid_search_values_instance_segmentation_with_decoder`.

    For every image the segmenter is initialized once, then `generate` is called for every combination and the
    result is scored against the ground truth (mSA, SA50, SA75, and precision, recall, F1 at IoU 0.5).
    The scores are written to ``<result_dir>/<image stem>.csv`` after every combination. The search is resumable:
    combinations already stored for an image are not computed again, and an image whose combinations are all
    stored is skipped without loading or initializing it.

    Args:
        segmenter: The instance segmenter (AMG or AIS, see `micro_sam.instance_segmentation`).
        grid_search_values: Parameter name of `generate` -> list of values to search.
        image_paths: The images for the grid search.
        gt_paths: The ground-truth label images, one per image.
        result_dir: The folder for the per-image result csv files.
        embedding_dir: Folder to cache the image embeddings as ``<image stem>.zarr``. If None, the embeddings are
            computed by `segmenter.initialize` and not cached.
        fixed_generate_kwargs: Further keyword arguments for `generate`, the same for all combinations.
            They must not contain a grid search parameter.
        verbose_gs: Whether to show a progress bar over the combinations of each image.
        image_key: Dataset key for reading the images from hdf5 / zarr / n5. None for simple image formats (tif, png).
        gt_key: Dataset key for reading the ground truth, like `image_key`.
        rois: One region of interest (tuple of slices) per image, applied to image and ground truth.
        tiling_window_params: `tile_shape` and `halo` for tiled embeddings, passed to `initialize`
            (and to the embedding computation).

    Raises:
        ValueError: For inconsistent inputs: different numbers of images / ground truths / rois, a parameter both
            in the grid and in `fixed_generate_kwargs`, duplicate image names, or a segmentation whose shape
            differs from its ground truth.
        FileNotFoundError: If an image or ground-truth file does not exist.
    """
    if len(image_paths) != len(gt_paths):
        raise ValueError(
            f"The number of images ({len(image_paths)}) does not match the number of ground truths ({len(gt_paths)})."
        )
    if rois is not None and len(rois) != len(image_paths):
        raise ValueError(f"The number of rois ({len(rois)}) does not match the number of images ({len(image_paths)}).")
    fixed_generate_kwargs = {} if fixed_generate_kwargs is None else dict(fixed_generate_kwargs)
    duplicates = [name for name in grid_search_values if name in fixed_generate_kwargs]
    if duplicates:
        raise ValueError(
            f"The parameters {duplicates} are given both in 'grid_search_values' and in 'fixed_generate_kwargs'."
        )
    combinations = _grid_combinations(grid_search_values)
    names = list(grid_search_values.keys())

    image_names = [Path(path).stem for path in image_paths]
    repeated = sorted({name for name in image_names if image_names.count(name) > 1})
    if repeated:
        raise ValueError(f"The image names {repeated} occur more than once; the results are stored per image name.")

    os.makedirs(result_dir, exist_ok=True)
    for i, (image_path, gt_path, image_name) in tqdm(
        enumerate(zip(image_paths, gt_paths, image_names)), total=len(image_paths),
        desc="Run instance segmentation grid-search",
    ):
        result_path = os.path.join(result_dir, f"{image_name}.csv")
        stored, finished = _finished_combinations(result_path, names)
        todo = [comb for comb in combinations if _combination_key(comb, names) not in finished]
        if not todo:
            continue

        roi = None if rois is None else rois[i]
        image = _load_image(image_path, image_key, roi)
        gt = _load_image(gt_path, gt_key, roi)
        _initialize(segmenter, image, image_name, embedding_dir, tiling_window_params)

        rows = []
        for combination in tqdm(todo, disable=not verbose_gs, desc=f"Grid search for {image_name}"):
            output = segmenter.generate(**combination, **fixed_generate_kwargs)
            labels = _as_label_image(output, gt.shape, image_path)
            rows.append({"image_name": image_name, **_evaluate(labels, gt), **combination})
            new = pd.DataFrame(rows)
            _write_csv_atomic(new if stored is None else pd.concat([stored, new], ignore_index=True), result_path)


def evaluate_instance_segmentation_grid_search(
    result_dir: PathLike,
    grid_search_parameters: List[str],
    criterion: str = "mSA",
) -> Tuple[Dict[str, Any], float]:
    """Find the best parameters from the stored grid search results.

    The criterion is averaged over all images (all csv files in `result_dir`) per parameter combination,
    and the combination with the highest mean is returned.

    Args:
        result_dir: The folder with the per-image grid search csv files.
        grid_search_parameters: The names of the grid search parameters.
        criterion: The score to maximize, one of the result columns ("mSA", "SA50", "SA75", "Precision",
            "Recall", "F1").

    Returns:
        The best parameters, name -> value (Python scalars; values stored as list strings are parsed back).
        The mean criterion score of the best parameters.

    Raises:
        FileNotFoundError: If `result_dir` contains no csv file.
        ValueError: If a parameter or the criterion is missing in the results.
    """
    files = sorted(glob(os.path.join(result_dir, "*.csv")))
    if not files:
        raise FileNotFoundError(f"No grid search results (*.csv) were found in '{result_dir}'.")
    results = pd.concat([pd.read_csv(path) for path in files], ignore_index=True)
    names = list(grid_search_parameters)
    missing = [col for col in names + [criterion] if col not in results.columns]
    if missing:
        raise ValueError(
            f"The columns {missing} are not in the grid search results in '{result_dir}'; "
            f"available columns: {list(results.columns)}."
        )

    grouped = results.groupby(names, dropna=False, sort=True)[criterion].mean().reset_index()
    best = int(grouped[criterion].to_numpy().argmax())
    best_kwargs = {name: _to_python(grouped[name].iloc[best]) for name in names}
    return best_kwargs, float(grouped[criterion].iloc[best])


def _to_python(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return value
            if isinstance(parsed, list):
                return parsed
    return value


def save_grid_search_best_params(
    best_kwargs: Dict[str, Any], best_msa: float, grid_search_result_dir: Optional[PathLike] = None,
) -> None:
    """Save the best grid search parameters and their score as csv.

    The file is `grid_search_params_amg.csv` if the parameters contain `stability_score_thresh`, otherwise
    `grid_search_params_instance_segmentation_with_decoder.csv`, with the columns `best_msa` and the parameters.

    Args:
        best_kwargs: The best parameters.
        best_msa: Their score.
        grid_search_result_dir: The file is written to `<grid_search_result_dir>/results/`;
            if None, to the current working directory.
    """
    table = pd.DataFrame([{"best_msa": best_msa, **best_kwargs}])
    file_name = "grid_search_params_amg.csv" if "stability_score_thresh" in best_kwargs \
        else "grid_search_params_instance_segmentation_with_decoder.csv"
    if grid_search_result_dir is None:
        path = file_name
    else:
        folder = os.path.join(grid_search_result_dir, "results")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, file_name)
    table.to_csv(path)


#
# Inference.
#

def _write_prediction(path: str, labels: np.ndarray) -> None:
    folder, name = os.path.split(path)
    tmp_path = os.path.join(folder, f".tmp-{name}")  # keeps the extension, so imageio picks the same format
    if Path(path).suffix.lower() in (".tif", ".tiff"):
        imageio.imwrite(tmp_path, labels, compression="zlib")  # label images compress very well
    else:
        imageio.imwrite(tmp_path, labels)
    os.replace(tmp_path, path)


def run_instance_segmentation_inference(
    segmenter: Segmenter,
    image_paths: List[PathLike],
    embedding_dir: Optional[PathLike],
    prediction_dir: PathLike,
    generate_kwargs: Optional[Dict[str, Any]] = None,
    tiling_window_params: Optional[Dict[str, Tuple[int, int]]] = None,
) -> None:
    """Segment images automatically and save the label images.

    The prediction for an image is saved as ``<prediction_dir>/<image file name>``; images whose prediction
    exists already are skipped, so an interrupted run can be resumed.

    Args:
        segmenter: The instance segmenter (AMG or AIS, see `micro_sam.instance_segmentation`).
        image_paths: The images to segment.
        embedding_dir: Folder to cache the image embeddings as ``<image stem>.zarr``; None to not cache them.
        prediction_dir: The folder for the predictions.
        generate_kwargs: Keyword arguments for `segmenter.generate`.
        tiling_window_params: `tile_shape` and `halo` for tiled embeddings, passed to `initialize`.

    Raises:
        FileNotFoundError: If an image does not exist.
        ValueError: If the segmenter does not return a label image of the image's spatial shape.
    """
    generate_kwargs = {} if generate_kwargs is None else dict(generate_kwargs)
    os.makedirs(prediction_dir, exist_ok=True)
    for image_path in tqdm(image_paths, desc="Run inference for automatic mask generation"):
        image_name = os.path.basename(image_path)
        prediction_path = os.path.join(prediction_dir, image_name)
        if os.path.exists(prediction_path):
            continue
        image = _load_image(image_path, None, None)
        _initialize(segmenter, image, os.path.splitext(image_name)[0], embedding_dir, tiling_window_params)
        output = segmenter.generate(**generate_kwargs)
        spatial_shape = image.shape[:2] if image.ndim == 3 and image.shape[-1] in (3, 4) else image.shape
        labels = _as_label_image(output, spatial_shape, image_path)
        _write_prediction(prediction_path, labels)


def run_instance_segmentation_grid_search_and_inference(
    segmenter: Segmenter,
    grid_search_values: Dict[str, List],
    val_image_paths: List[PathLike],
    val_gt_paths: List[PathLike],
    test_image_paths: List[PathLike],
    embedding_dir: Optional[PathLike],
    prediction_dir: PathLike,
    experiment_folder: PathLike,
    result_dir: PathLike,
    fixed_generate_kwargs: Optional[Dict[str, Any]] = None,
    verbose_gs: bool = True,
    tiling_window_params: Optional[Dict[str, Tuple[int, int]]] = None,
) -> None:
    """Run the grid search on validation images, then segment the test images with the best parameters.

    See `run_instance_segmentation_grid_search` for the grid search; the best parameters (by mSA) are printed
    and saved with `save_grid_search_best_params` in `<experiment_folder>/results/`, and the test predictions are
    written by `run_instance_segmentation_inference`.

    Args:
        segmenter: The instance segmenter (AMG or AIS).
        grid_search_values: Parameter name of `generate` -> list of values to search.
        val_image_paths: The images for the grid search.
        val_gt_paths: The ground truth for the grid search images.
        test_image_paths: The images to segment with the best parameters.
        embedding_dir: Folder to cache the image embeddings; None to not cache them.
        prediction_dir: The folder for the test predictions.
        experiment_folder: The folder in which the best parameters are saved (under `results/`).
        result_dir: The folder for the per-image grid search results.
        fixed_generate_kwargs: Further keyword arguments for `generate`, used in grid search and inference.
        verbose_gs: Whether to show a progress bar over the combinations of each image.
        tiling_window_params: `tile_shape` and `halo` for tiled embeddings.
    """
    run_instance_segmentation_grid_search(
        segmenter=segmenter,
        grid_search_values=grid_search_values,
        image_paths=val_image_paths,
        gt_paths=val_gt_paths,
        result_dir=result_dir,
        embedding_dir=embedding_dir,
        fixed_generate_kwargs=fixed_generate_kwargs,
        verbose_gs=verbose_gs,
        tiling_window_params=tiling_window_params,
    )
    best_kwargs, best_msa = evaluate_instance_segmentation_grid_search(result_dir, list(grid_search_values.keys()))
    best_param_str = ", ".join(f"{k} = {v}" for k, v in best_kwargs.items())
    print("Best grid-search result:", best_msa, "with parameters:\n", best_param_str)
    save_grid_search_best_params(best_kwargs, best_msa, experiment_folder)

    generate_kwargs = {} if fixed_generate_kwargs is None else dict(fixed_generate_kwargs)
    generate_kwargs.update(best_kwargs)
    run_instance_segmentation_inference(
        segmenter=segmenter,
        image_paths=test_image_paths,
        embedding_dir=embedding_dir,
        prediction_dir=prediction_dir,
        generate_kwargs=generate_kwargs,
        tiling_window_params=tiling_window_params,
    )
