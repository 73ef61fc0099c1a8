"""Prompt-based inference for evaluation: prompts derived from the ground truth, run over folders of images.

Predictions are written as label images named like the input images. All functions skip work that is
already saved, so an interrupted run continues where it stopped:
- embeddings are cached as ``<embedding_dir>/<image stem>.zarr``;
- prompts are cached in ``<prompt_save_dir>/points-p{n_positives}-n{n_negatives}.pkl`` and
  ``<prompt_save_dir>/boxes.pkl``, dicts from the ground-truth file name to ``(points, labels)`` or ``boxes``
  (SAM conventions: points (N, P, 2) as (x, y), boxes (N, 4) as XYXY);
- iterative prompting writes ``<prediction_dir>/iterationXX/<image name>`` per iteration, and keeps the
  prompts of a partly processed image in ``<prediction_dir>/.iterative_prompting_state/``.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
from tqdm import tqdm

from .. import util
from .instance_segmentation import _write_prediction
from .._lazy import lazy_attributes

PathLike = Union[str, os.PathLike]

__all__ = [
    "precompute_all_embeddings", "precompute_all_prompts", "run_amg", "run_apg",
    "run_inference_with_iterative_prompting", "run_inference_with_prompts", "run_instance_segmentation_with_decoder",
]


# Names micro_sam 1.8 exposes here (imported there from other modules), resolved on first use.
__getattr__, __dir__ = lazy_attributes(globals(), {
    "AutomaticMaskGenerator": "micro_sam.instance_segmentation:AutomaticMaskGenerator",
    "AutomaticPromptGenerator": "micro_sam.instance_segmentation:AutomaticPromptGenerator",
    "InstanceSegmentationWithDecoder": "micro_sam.instance_segmentation:InstanceSegmentationWithDecoder",
    "TiledAutomaticMaskGenerator": "micro_sam.instance_segmentation:TiledAutomaticMaskGenerator",
    "TiledInstanceSegmentationWithDecoder": "micro_sam.instance_segmentation:TiledInstanceSegmentationWithDecoder",
    "get_predictor_and_decoder": "micro_sam.instance_segmentation:get_predictor_and_decoder",
    "IterativePromptGenerator": "micro_sam.prompt_generators:IterativePromptGenerator",
    "PointAndBoxPromptGenerator": "micro_sam.prompt_generators:PointAndBoxPromptGenerator",
    "SamPredictor": "segment_anything:SamPredictor",
    "batched_inference": "micro_sam.inference:batched_inference",
})

_STATE_FOLDER = ".iterative_prompting_state"


# --- helpers -----------------------------------------------------------------------------------------------
def _read_image(path: PathLike) -> np.ndarray:
    import imageio.v3 as imageio

    if not os.path.exists(path):
        raise ValueError(f"The file {os.fspath(path)!r} does not exist.")
    return imageio.imread(path)


def _read_groundtruth(path: PathLike) -> np.ndarray:
    """The label image with ids relabelled to 1..N (in order of their values)."""
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(_read_image(path).astype("uint32"))[0]


def _embedding_path(embedding_dir: Optional[PathLike], image_path: PathLike) -> Optional[str]:
    if embedding_dir is None:
        return None
    return os.path.join(embedding_dir, f"{os.path.splitext(os.path.basename(image_path))[0]}.zarr")


def _check_paths(image_paths, gt_paths) -> None:
    if len(image_paths) != len(gt_paths):
        raise ValueError(f"Expected as many ground-truth files as images, got {len(image_paths)} images and "
                         f"{len(gt_paths)} ground-truth files.")


def _prompts_from_groundtruth(gt, gt_ids, use_points, use_boxes, n_positives, n_negatives, dilation):
    """Points (N, P, 2) (x, y), labels (N, P) and boxes (N, 4) XYXY as numpy arrays (None where not requested)."""
    from ..prompt_generators import PointAndBoxPromptGenerator

    generator = PointAndBoxPromptGenerator(
        n_positive_points=n_positives, n_negative_points=n_negatives, dilation_strength=dilation,
        get_point_prompts=use_points, get_box_prompts=use_boxes,
    )
    centers, boxes = util.get_centers_and_bounding_boxes(gt)
    masks = util.segmentation_to_one_hot(gt.astype("int64"), gt_ids)
    points, labels, boxes, _ = generator(masks, [boxes[i] for i in gt_ids], [centers[i] for i in gt_ids])
    return tuple(None if x is None else x.numpy() for x in (points, labels, boxes))


def _prompt_file_names(n_positives: int, n_negatives: int) -> Tuple[str, str]:
    return f"points-p{n_positives}-n{n_negatives}.pkl", "boxes.pkl"


def _load_cache(path: Optional[str]) -> Dict[str, Any]:
    if path is None or not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        return pickle.load(f)


def _save_cache(path: str, cache: Dict[str, Any]) -> None:
    tmp_path = path + ".tmp"
    with open(tmp_path, "wb") as f:
        pickle.dump(cache, f)
    os.replace(tmp_path, path)


# --- precomputation --------------------------------------------------------------------------------------
def precompute_all_embeddings(predictor, image_paths: List[PathLike], embedding_dir: PathLike) -> None:
    """Compute and cache the embeddings of all images (``<embedding_dir>/<image stem>.zarr``).

    Args:
        predictor: The SAM predictor.
        image_paths: The 2D images.
        embedding_dir: The folder for the embeddings; existing embeddings are reused.
    """
    os.makedirs(embedding_dir, exist_ok=True)
    for image_path in tqdm(image_paths, desc="Precompute embeddings"):
        util.precompute_image_embeddings(predictor, _read_image(image_path), _embedding_path(embedding_dir, image_path),
                                         ndim=2, verbose=False)


def precompute_all_prompts(
    gt_paths: List[PathLike], prompt_save_dir: PathLike, prompt_settings: List[Dict[str, Any]],
) -> None:
    """Derive and cache prompts from the ground truth for several prompt settings.

    Args:
        gt_paths: The ground-truth label images.
        prompt_save_dir: Folder of the prompt files (see the module docstring).
        prompt_settings: Dicts with ``use_points``, ``use_boxes``, ``n_positives``, ``n_negatives`` and optionally
            ``dilation`` (default 5), e.g. from :func:`micro_sam.evaluation.experiments.default_experiment_settings`.
            Box-only settings are stored in ``boxes.pkl``, all others as points.
    """
    os.makedirs(prompt_save_dir, exist_ok=True)
    for settings in tqdm(prompt_settings, desc="Precompute prompts"):
        use_points, use_boxes = settings["use_points"], settings["use_boxes"]
        n_positives, n_negatives = settings["n_positives"], settings["n_negatives"]
        points_only = use_points or not use_boxes
        point_name, box_name = _prompt_file_names(n_positives, n_negatives)
        path = os.path.join(prompt_save_dir, point_name if points_only else box_name)
        cache = _load_cache(path)
        missing = [p for p in gt_paths if os.path.basename(p) not in cache]
        for gt_path in missing:
            gt = _read_groundtruth(gt_path)
            points, labels, boxes = _prompts_from_groundtruth(
                gt, np.unique(gt)[1:], use_points=points_only, use_boxes=not points_only, n_positives=n_positives,
                n_negatives=n_negatives, dilation=settings.get("dilation", 5),
            )
            cache[os.path.basename(gt_path)] = (points, labels) if points_only else boxes
        if missing or not os.path.exists(path):
            _save_cache(path, cache)


# --- inference with prompts ------------------------------------------------------------------------------
def run_inference_with_prompts(
    predictor,
    image_paths: List[PathLike],
    gt_paths: List[PathLike],
    embedding_dir: PathLike,
    prediction_dir: PathLike,
    use_points: bool,
    use_boxes: bool,
    n_positives: int,
    n_negatives: int,
    dilation: int = 5,
    prompt_save_dir: Optional[PathLike] = None,
    batch_size: int = 512,
) -> None:
    """Segment every ground-truth object of every image from points and / or a box derived from it.

    A single positive point without box uses SAM's best multimask output. Images with a saved prediction are
    skipped. With ``prompt_save_dir`` the prompts are read from / added to the prompt cache, so that several
    experiments (or reruns) use the same prompts.

    Args:
        predictor: The SAM predictor.
        image_paths: The 2D images.
        gt_paths: Their ground-truth label images.
        embedding_dir: Folder for the embedding cache; None computes the embeddings without caching.
        prediction_dir: Folder for the predicted label images.
        use_points: Use point prompts.
        use_boxes: Use box prompts.
        n_positives: Positive points per object.
        n_negatives: Negative points per object.
        dilation: Margin around the object kept free of negative points (see PointAndBoxPromptGenerator).
        prompt_save_dir: Folder of the prompt cache, or None.
        batch_size: Prompts per decoder call.
    """
    from ..inference import batched_inference

    if not (use_points or use_boxes):
        raise ValueError("Use point prompts, box prompts or both (use_points / use_boxes).")
    _check_paths(image_paths, gt_paths)
    os.makedirs(prediction_dir, exist_ok=True)

    point_path = box_path = None
    if prompt_save_dir is not None:
        os.makedirs(prompt_save_dir, exist_ok=True)
        point_name, box_name = _prompt_file_names(n_positives, n_negatives)
        point_path = os.path.join(prompt_save_dir, point_name) if use_points else None
        box_path = os.path.join(prompt_save_dir, box_name) if use_boxes else None
    point_cache, box_cache = _load_cache(point_path), _load_cache(box_path)
    multimasking = not use_boxes and n_positives == 1 and n_negatives == 0

    for image_path, gt_path in tqdm(list(zip(image_paths, gt_paths)), desc="Run inference with prompts"):
        prediction_path = os.path.join(prediction_dir, os.path.basename(image_path))
        if os.path.exists(prediction_path):
            continue
        image, gt = _read_image(image_path), _read_groundtruth(gt_path)
        gt_ids, gt_name = np.unique(gt)[1:], os.path.basename(gt_path)
        if len(gt_ids) == 0:
            _write_prediction(prediction_path, np.zeros(gt.shape, dtype="uint32"))
            continue

        points = labels = boxes = None
        if use_points:
            if gt_name not in point_cache:
                point_cache[gt_name] = _prompts_from_groundtruth(
                    gt, gt_ids, True, False, n_positives, n_negatives, dilation)[:2]
                if point_path is not None:
                    _save_cache(point_path, point_cache)
            points, labels = point_cache[gt_name]
        if use_boxes:
            if gt_name not in box_cache:
                box_cache[gt_name] = _prompts_from_groundtruth(gt, gt_ids, False, True, 0, 0, dilation)[2]
                if box_path is not None:
                    _save_cache(box_path, box_cache)
            boxes = box_cache[gt_name]

        segmentation = batched_inference(
            predictor, image, batch_size, boxes=boxes, points=points, point_labels=labels,
            multimasking=multimasking, embedding_path=_embedding_path(embedding_dir, image_path),
            return_instance_segmentation=True, verbose_embeddings=False,
        )
        _write_prediction(prediction_path, segmentation)


# --- iterative prompting ---------------------------------------------------------------------------------
def _state_path(prediction_dir: PathLike, image_name: str) -> str:
    return os.path.join(prediction_dir, _STATE_FOLDER, f"{image_name}.npz")


def _save_state(path: str, completed: int, settings: np.ndarray, points, labels, boxes, logits) -> None:
    arrays = {"completed": np.array(completed), "settings": settings}
    for name, value in (("points", points), ("labels", labels), ("boxes", boxes), ("logits", logits)):
        if value is not None:
            arrays[name] = value
    tmp_path = path[:-len(".npz")] + ".tmp.npz"
    np.savez(tmp_path, **arrays)
    os.replace(tmp_path, path)


def _load_state(path: str, settings: np.ndarray, n_done: int):
    """The saved prompts after ``completed`` iterations, if they belong to these settings and the
    predictions up to that iteration exist; else None."""
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        if not np.array_equal(f["settings"], settings) or int(f["completed"]) > n_done:
            return None
        saved = (f[name] if name in f else None for name in ("points", "labels", "boxes", "logits"))
        return (int(f["completed"]), *saved)


def _iterative_prompting_for_image(predictor, image, gt, start_with_box_prompt, dilation, batch_size,
                                   embedding_path, prediction_paths, use_masks, state_path) -> None:
    import torch

    from ..inference import batched_inference
    from ..prompt_generators import IterativePromptGenerator

    gt_ids = np.unique(gt)[1:]
    n_iterations = len(prediction_paths)
    if len(gt_ids) == 0:
        for path in prediction_paths:
            _write_prediction(path, np.zeros(gt.shape, dtype="uint32"))
        return

    # settings that must agree with a saved state to resume from it
    settings = np.array([int(start_with_box_prompt), int(use_masks), len(gt_ids), *gt.shape, dilation])
    n_done = next((k for k, path in enumerate(prediction_paths) if not os.path.exists(path)), n_iterations)
    state = _load_state(state_path, settings, n_done)
    if state is not None:
        start, points, labels, boxes, logits = state
    else:
        start, logits = 0, None
        if start_with_box_prompt:
            points, labels, boxes = _prompts_from_groundtruth(gt, gt_ids, False, True, 0, 0, dilation)
        else:
            points, labels, boxes = _prompts_from_groundtruth(gt, gt_ids, True, False, 1, 0, dilation)

    embeddings = util.precompute_image_embeddings(predictor, image, embedding_path, ndim=2, verbose=False)
    util.set_precomputed(predictor, embeddings)
    generator = IterativePromptGenerator()
    for iteration in range(start, n_iterations):
        records = batched_inference(
            predictor, None, batch_size, boxes=boxes, points=points, point_labels=labels,
            multimasking=iteration == 0 and not start_with_box_prompt, return_instance_segmentation=False,
            logits_masks=None if (logits is None or not use_masks) else torch.from_numpy(logits),
        )
        # corrective points from the error of each object's prediction, in batches of objects
        new_points, new_labels = [], []
        for begin in range(0, len(gt_ids), batch_size):
            ids = gt_ids[begin:begin + batch_size]
            truth = util.segmentation_to_one_hot(gt.astype("int64"), ids)
            prediction = torch.stack([r["segmentation"][None] for r in records[begin:begin + batch_size]])
            coords, coord_labels, _, _ = generator(truth, prediction.to(torch.float32).cpu())
            new_points.append(coords.numpy())
            new_labels.append(coord_labels.numpy())
        new_points, new_labels = np.concatenate(new_points), np.concatenate(new_labels)
        points = new_points if points is None else np.concatenate([points, new_points], axis=1)
        labels = new_labels if labels is None else np.concatenate([labels, new_labels], axis=1)
        if use_masks:
            logits = torch.stack([r["logits"] for r in records]).cpu().numpy()

        _write_prediction(prediction_paths[iteration], util.mask_data_to_segmentation(records, shape=gt.shape))
        _save_state(state_path, iteration + 1, settings, points, labels, boxes, logits)
    if os.path.exists(state_path):
        os.remove(state_path)


def run_inference_with_iterative_prompting(
    predictor,
    image_paths: List[PathLike],
    gt_paths: List[PathLike],
    embedding_dir: Optional[PathLike],
    prediction_dir: PathLike,
    start_with_box_prompt: bool = True,
    dilation: int = 5,
    batch_size: int = 32,
    n_iterations: int = 8,
    use_masks: bool = False,
) -> None:
    """Segment every ground-truth object with iterative prompting, saving the prediction of every iteration.

    Iteration 0 uses a box (``start_with_box_prompt``) or a single positive point (best multimask output) per
    object. After each iteration one positive point in the object's missed pixels and one negative point in
    its falsely predicted pixels (see IterativePromptGenerator) are added to the object's prompts. The
    prediction of iteration ``k`` is written to ``<prediction_dir>/iteration{k:02}/<image name>``.

    The run is resumable: images with all iterations saved are skipped; an image interrupted during its
    iterations continues after the last saved iteration, with the prompts saved for it.

    Args:
        predictor: The SAM predictor.
        image_paths: The 2D images.
        gt_paths: Their ground-truth label images.
        embedding_dir: Folder for the embedding cache, or None.
        prediction_dir: Root folder of the per-iteration prediction folders.
        start_with_box_prompt: Start with a box instead of a point.
        dilation: Margin for the negative points of the first prompt (unused for the box and single point).
        batch_size: Prompts per decoder call.
        n_iterations: Number of iterations (>= 1).
        use_masks: Also pass the logits of the previous iteration as mask prompt.
    """
    _check_paths(image_paths, gt_paths)
    if int(n_iterations) != n_iterations or n_iterations < 1:
        raise ValueError(f"n_iterations must be a positive integer, got {n_iterations!r}.")
    for k in range(n_iterations):
        os.makedirs(os.path.join(prediction_dir, f"iteration{k:02}"), exist_ok=True)
    os.makedirs(os.path.join(prediction_dir, _STATE_FOLDER), exist_ok=True)

    for image_path, gt_path in tqdm(list(zip(image_paths, gt_paths)), desc="Run inference with iterative prompting"):
        image_name = os.path.basename(image_path)
        prediction_paths = [os.path.join(prediction_dir, f"iteration{k:02}", image_name) for k in range(n_iterations)]
        if all(os.path.exists(path) for path in prediction_paths):
            continue
        _iterative_prompting_for_image(
            predictor, _read_image(image_path), _read_groundtruth(gt_path), start_with_box_prompt, dilation,
            batch_size, _embedding_path(embedding_dir, image_path), prediction_paths, use_masks,
            _state_path(prediction_dir, image_name),
        )


# --- automatic instance segmentation ----------------------------------------------------------------------
def _run_automatic_segmentation(segmenter, prefix, grid_search_values, experiment_folder, val_image_paths,
                                val_gt_paths, test_image_paths, cache_embeddings, tiling_window_params) -> str:
    from . import instance_segmentation

    embedding_folder = None
    if cache_embeddings:
        embedding_folder = os.path.join(experiment_folder, "embeddings")
        os.makedirs(embedding_folder, exist_ok=True)
    prediction_folder = os.path.join(experiment_folder, prefix, "inference")
    result_folder = os.path.join(experiment_folder, prefix, "grid_search")
    os.makedirs(prediction_folder, exist_ok=True)
    os.makedirs(result_folder, exist_ok=True)
    instance_segmentation.run_instance_segmentation_grid_search_and_inference(
        segmenter=segmenter, grid_search_values=grid_search_values, val_image_paths=val_image_paths,
        val_gt_paths=val_gt_paths, test_image_paths=test_image_paths, embedding_dir=embedding_folder,
        prediction_dir=prediction_folder, result_dir=result_folder, experiment_folder=experiment_folder,
        tiling_window_params=tiling_window_params,
    )
    return prediction_folder


def _check_tiling_window_params(tiling_window_params) -> bool:
    if not tiling_window_params:
        return False
    if not isinstance(tiling_window_params, dict) or not {"tile_shape", "halo"} <= set(tiling_window_params):
        raise ValueError("tiling_window_params must be a dict with 'tile_shape' and 'halo', got "
                         f"{tiling_window_params!r}.")
    return True


def run_amg(
    checkpoint: Optional[PathLike],
    model_type: str,
    experiment_folder: PathLike,
    val_image_paths: List[PathLike],
    val_gt_paths: List[PathLike],
    test_image_paths: List[PathLike],
    iou_thresh_values: Optional[List[float]] = None,
    stability_score_values: Optional[List[float]] = None,
    peft_kwargs: Optional[Dict] = None,
    cache_embeddings: bool = False,
    tiling_window_params: Optional[Dict[str, Tuple[int, int]]] = None,
) -> str:
    """Grid search and inference for automatic mask generation (AMG).

    Predictions go to ``<experiment_folder>/amg/inference``, grid search results to ``.../amg/grid_search``.

    Args:
        checkpoint: The model checkpoint (None for the registered weights of ``model_type``).
        model_type: The model type / name.
        experiment_folder: The folder for all outputs.
        val_image_paths: Images for the grid search.
        val_gt_paths: Their ground truth.
        test_image_paths: Images to segment with the best parameters.
        iou_thresh_values: Grid values of ``pred_iou_thresh``.
        stability_score_values: Grid values of ``stability_score_thresh``.
        peft_kwargs: PEFT settings of the model.
        cache_embeddings: Cache the embeddings in ``<experiment_folder>/embeddings``.
        tiling_window_params: ``{"tile_shape": ..., "halo": ...}`` for tiled segmentation.

    Returns:
        The prediction folder.
    """
    from .. import instance_segmentation as segmentation
    from .instance_segmentation import default_grid_search_values_amg

    tiled = _check_tiling_window_params(tiling_window_params)
    predictor = util.get_sam_model(model_type=model_type, checkpoint_path=checkpoint, peft_kwargs=peft_kwargs)
    segmenter = (segmentation.TiledAutomaticMaskGenerator if tiled else segmentation.AutomaticMaskGenerator)(predictor)
    grid = default_grid_search_values_amg(iou_thresh_values=iou_thresh_values,
                                          stability_score_values=stability_score_values)
    return _run_automatic_segmentation(segmenter, "amg", grid, experiment_folder, val_image_paths, val_gt_paths,
                                       test_image_paths, cache_embeddings, tiling_window_params)


def run_apg(
    checkpoint: Optional[PathLike],
    model_type: str,
    experiment_folder: PathLike,
    val_image_paths: List[PathLike],
    val_gt_paths: List[PathLike],
    test_image_paths: List[PathLike],
    peft_kwargs: Optional[Dict] = None,
    cache_embeddings: bool = False,
    tiling_window_params: Optional[Dict[str, Tuple[int, int]]] = None,
) -> str:
    """Grid search and inference for automatic prompt generation (APG); outputs under ``<experiment_folder>/apg``.

    Args: as :func:`run_instance_segmentation_with_decoder`; tiling is not supported.

    Returns:
        The prediction folder.
    """
    from .. import instance_segmentation as segmentation
    from .instance_segmentation import default_grid_search_values_apg

    if _check_tiling_window_params(tiling_window_params):
        raise NotImplementedError("Automatic prompt generation does not support tiling yet.")
    predictor, decoder = segmentation.get_predictor_and_decoder(
        model_type=model_type, checkpoint_path=checkpoint, peft_kwargs=peft_kwargs)
    segmenter = segmentation.AutomaticPromptGenerator(predictor, decoder)
    return _run_automatic_segmentation(segmenter, "apg", default_grid_search_values_apg(), experiment_folder,
                                       val_image_paths, val_gt_paths, test_image_paths, cache_embeddings, None)


def run_instance_segmentation_with_decoder(
    checkpoint: Optional[PathLike],
    model_type: str,
    experiment_folder: PathLike,
    val_image_paths: List[PathLike],
    val_gt_paths: List[PathLike],
    test_image_paths: List[PathLike],
    peft_kwargs: Optional[Dict] = None,
    cache_embeddings: bool = False,
    tiling_window_params: Optional[Dict[str, Tuple[int, int]]] = None,
) -> str:
    """Grid search and inference for instance segmentation with the decoder (AIS); outputs under
    ``<experiment_folder>/instance_segmentation_with_decoder``.

    Args:
        checkpoint: The model checkpoint with the decoder state.
        model_type: The model type / name.
        experiment_folder: The folder for all outputs.
        val_image_paths: Images for the grid search.
        val_gt_paths: Their ground truth.
        test_image_paths: Images to segment with the best parameters.
        peft_kwargs: PEFT settings of the model.
        cache_embeddings: Cache the embeddings in ``<experiment_folder>/embeddings``.
        tiling_window_params: ``{"tile_shape": ..., "halo": ...}`` for tiled segmentation.

    Returns:
        The prediction folder.
    """
    from .. import instance_segmentation as segmentation
    from .instance_segmentation import default_grid_search_values_instance_segmentation_with_decoder

    tiled = _check_tiling_window_params(tiling_window_params)
    predictor, decoder = segmentation.get_predictor_and_decoder(
        model_type=model_type, checkpoint_path=checkpoint, peft_kwargs=peft_kwargs)
    segmenter_class = (segmentation.TiledInstanceSegmentationWithDecoder if tiled
                       else segmentation.InstanceSegmentationWithDecoder)
    return _run_automatic_segmentation(
        segmenter_class(predictor, decoder), "instance_segmentation_with_decoder",
        default_grid_search_values_instance_segmentation_with_decoder(), experiment_folder, val_image_paths,
        val_gt_paths, test_image_paths, cache_embeddings, tiling_window_params,
    )
