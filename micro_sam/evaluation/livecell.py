"""Inference and evaluation on LIVECell (doi:10.1038/s41592-021-01249-6), by cell line.

:func:`get_livecell_data` downloads the data set and converts its COCO annotations into label images, in the
layout the other functions read (the layout torch_em uses, so an existing download can be reused)::

    <input_folder>/images/livecell_{train_val,test}_images/<image>.tif
    <input_folder>/annotations/livecell_{train_val,test}_images/<cell line>/<image>.tif
    <input_folder>/val.json, <input_folder>/test.json   (the COCO annotations)

The experiment functions write below ``experiment_folder``: ``embeddings/``, one folder per prompt setting or
method with the predictions, and ``results/`` with the scores (see ``micro_sam.evaluation``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import warnings
from glob import glob
from typing import List, Optional, Tuple, Union

import numpy as np

from .._lazy import lazy_attributes
from . import _datasets

__all__ = [
    "CELL_TYPES", "get_livecell_data", "livecell_inference", "run_livecell_amg", "run_livecell_evaluation",
    "run_livecell_inference", "run_livecell_instance_segmentation_with_decoder", "run_livecell_iterative_prompting",
    "run_livecell_precompute_embeddings",
]

# Names micro_sam 1.8 exposes here (imported there from other modules), resolved on first use.
__getattr__, __dir__ = lazy_attributes(globals(), {
    "SamPredictor": "segment_anything:SamPredictor",
    "AutomaticMaskGenerator": "micro_sam.instance_segmentation:AutomaticMaskGenerator",
    "InstanceSegmentationWithDecoder": "micro_sam.instance_segmentation:InstanceSegmentationWithDecoder",
    "get_predictor_and_decoder": "micro_sam.instance_segmentation:get_predictor_and_decoder",
    "get_sam_model": "micro_sam.util:get_sam_model",
    "precompute_all_embeddings": "micro_sam.evaluation.inference:precompute_all_embeddings",
})

CELL_TYPES = ["A172", "BT474", "BV2", "Huh7", "MCF7", "SHSY5Y", "SkBr3", "SKOV3"]
"""The eight cell lines of LIVECell (the prefix of every image name)."""

PathLike = Union[str, os.PathLike]
_SPLIT_FOLDERS = {"val": "livecell_train_val_images", "test": "livecell_test_images"}


# --- data --------------------------------------------------------------------------------------------------
def _polygon_mask(polygons, shape) -> np.ndarray:
    from skimage.draw import polygon

    mask = np.zeros(shape, dtype=bool)
    for flat in polygons:
        coords = np.asarray(flat, dtype="float64").reshape(-1, 2)  # COCO: x0, y0, x1, y1, ...
        rows, cols = polygon(coords[:, 1], coords[:, 0], shape=shape)
        mask[rows, cols] = True
    return mask


def _coco_to_label_images(annotation_file: str, split_folder: str, verbose: bool) -> None:
    """Write one label image per image of a COCO file: objects painted largest first, so small ones stay visible."""
    import imageio.v3 as imageio
    from tqdm import tqdm

    with open(annotation_file) as f:
        coco = json.load(f)
    by_image = {}
    for annotation in coco.get("annotations", []):
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    for image in tqdm(coco["images"], desc="LIVECell labels from the COCO annotations", disable=not verbose):
        name = image["file_name"]
        out = os.path.join(split_folder, name.split("_")[0], name)
        if os.path.exists(out):
            continue
        shape = (int(image["height"]), int(image["width"]))
        labels = np.zeros(shape, dtype="uint16")
        annotations = sorted(by_image.get(image["id"], []), key=lambda a: -float(a.get("area", 0)))
        for label, annotation in enumerate(annotations, 1):
            segmentation = annotation["segmentation"]
            if not isinstance(segmentation, list):
                raise ValueError(f"Only polygon annotations are supported; {name!r} has an RLE annotation.")
            labels[_polygon_mask(segmentation, shape)] = label
        ids = np.unique(labels)
        lookup = np.zeros(int(ids.max()) + 1, dtype="uint16")
        lookup[ids] = np.arange(len(ids))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = f"{out}.tmp.tif"
        imageio.imwrite(tmp, lookup[labels], compression="zlib")
        os.replace(tmp, out)


def get_livecell_data(input_folder: PathLike, download: bool = True, verbose: bool = True) -> str:
    """Download LIVECell (images, validation and test annotations) and write the label images.

    Args:
        input_folder: The folder for the data set; existing parts are reused.
        download: Download missing parts; otherwise a missing part is an error.
        verbose: Show progress.

    Returns:
        ``input_folder``.

    Raises:
        ValueError: The data is missing and ``download`` is False, or a download failed verification.
    """
    input_folder = os.fspath(input_folder)
    images_root = os.path.join(input_folder, "images")
    if not os.path.isdir(images_root):
        if not download:
            raise ValueError(f"LIVECell is not in {input_folder!r}; pass download=True to download it.")
        unpacked = _datasets.fetch("livecell_images", os.path.join(input_folder, "downloads"), verbose)
        shutil.move(os.path.join(unpacked, "images"), images_root)
    for split, folder in _SPLIT_FOLDERS.items():
        annotation_file = os.path.join(input_folder, f"{split}.json")
        if not os.path.exists(annotation_file):
            if not download:
                raise ValueError(f"{annotation_file!r} is missing; pass download=True to download it.")
            path = _datasets.fetch(f"livecell_{split}_annotations", os.path.join(input_folder, "downloads"), verbose)
            shutil.copyfile(path, annotation_file)
        _coco_to_label_images(annotation_file, os.path.join(input_folder, "annotations", folder), verbose)
    return input_folder


def _get_livecell_paths(input_folder: PathLike, split: str = "test",
                        n_val_per_cell_type: Optional[int] = None) -> Tuple[List[str], List[str]]:
    """Images and labels of a split ("val" or "test"), at most ``n_val_per_cell_type`` per cell line."""
    if split not in _SPLIT_FOLDERS:
        raise ValueError(f"split must be 'val' or 'test', got {split!r}.")
    input_folder = os.fspath(input_folder)
    image_dir = os.path.join(input_folder, "images", _SPLIT_FOLDERS[split])
    label_dir = os.path.join(input_folder, "annotations", _SPLIT_FOLDERS[split])
    if not (os.path.isdir(image_dir) and os.path.isdir(label_dir)):
        raise ValueError(f"LIVECell is missing or incomplete in {input_folder!r} (no {image_dir!r} or "
                         f"{label_dir!r}); download it with get_livecell_data.")
    if split == "test":
        names = [os.path.basename(p) for p in glob(os.path.join(image_dir, "*.tif"))]
    else:
        with open(os.path.join(input_folder, "val.json")) as f:
            names = [image["file_name"] for image in json.load(f)["images"]]
    counts = {cell_type: 0 for cell_type in CELL_TYPES}
    image_paths, label_paths = [], []
    for name in sorted(names):
        cell_type = name.split("_")[0]
        if cell_type not in counts:
            continue
        if n_val_per_cell_type is not None and counts[cell_type] >= n_val_per_cell_type:
            continue
        label_path = os.path.join(label_dir, cell_type, name)
        if not os.path.exists(label_path):
            raise ValueError(f"The label image {label_path!r} is missing; run get_livecell_data.")
        image_paths.append(os.path.join(image_dir, name))
        label_paths.append(label_path)
        counts[cell_type] += 1
    return image_paths, label_paths


# --- experiments -------------------------------------------------------------------------------------------
def _prompt_setting(use_points, use_boxes, n_positives, n_negatives) -> str:
    if not (use_points or use_boxes):
        raise ValueError("Use point prompts, box prompts or both (use_points / use_boxes).")
    if use_points and (n_positives is None or n_negatives is None):
        raise ValueError("Point prompts need n_positives and n_negatives.")
    if use_boxes and not use_points:
        return "box/p0-n0"
    return f"{'box' if use_boxes else 'points'}/p{n_positives}-n{n_negatives}"


def livecell_inference(
    checkpoint: Optional[PathLike],
    input_folder: PathLike,
    model_type: str,
    experiment_folder: PathLike,
    use_points: bool,
    use_boxes: bool,
    n_positives: Optional[int] = None,
    n_negatives: Optional[int] = None,
    prompt_folder: Optional[PathLike] = None,
    predictor=None,
) -> None:
    """Prompt-based segmentation of the LIVECell test set with one prompt setting.

    The predictions go to ``<experiment_folder>/<box or points>/p<n_positives>-n<n_negatives>/``, the prompts to
    ``prompt_folder`` (default ``<experiment_folder>/prompts``; pass another experiment's to reuse its prompts).

    Args:
        checkpoint: A checkpoint for ``model_type`` (or None for the registered model).
        input_folder: The LIVECell folder (see :func:`get_livecell_data`).
        model_type: The model.
        experiment_folder: The folder for everything this experiment writes.
        use_points: Prompt with points.
        use_boxes: Prompt with boxes.
        n_positives: Positive points per object (with ``use_points``).
        n_negatives: Negative points per object (with ``use_points``).
        prompt_folder: Where the prompts are stored / read from.
        predictor: A loaded predictor to use instead of loading ``model_type``.
    """
    from ..util import get_sam_model
    from . import inference

    setting = _prompt_setting(use_points, use_boxes, n_positives, n_negatives)
    image_paths, gt_paths = _get_livecell_paths(input_folder)
    if predictor is None:
        predictor = get_sam_model(model_type=model_type, checkpoint_path=checkpoint)
    experiment_folder = os.fspath(experiment_folder)
    prompt_folder = prompt_folder or os.path.join(experiment_folder, "prompts")
    os.makedirs(prompt_folder, exist_ok=True)
    inference.run_inference_with_prompts(
        predictor, image_paths, gt_paths, embedding_dir=os.path.join(experiment_folder, "embeddings"),
        prediction_dir=os.path.join(experiment_folder, setting), use_points=use_points, use_boxes=use_boxes,
        n_positives=n_positives or 0, n_negatives=n_negatives or 0, prompt_save_dir=prompt_folder,
    )


def run_livecell_precompute_embeddings(
    checkpoint: Optional[PathLike],
    input_folder: PathLike,
    model_type: str,
    experiment_folder: PathLike,
    n_val_per_cell_type: int = 25,
) -> None:
    """Compute the embeddings of the validation (``n_val_per_cell_type`` per cell line) and test images."""
    from ..util import get_sam_model
    from .inference import precompute_all_embeddings

    embedding_folder = os.path.join(os.fspath(experiment_folder), "embeddings")
    predictor = get_sam_model(model_type=model_type, checkpoint_path=checkpoint)
    val_images, _ = _get_livecell_paths(input_folder, "val", n_val_per_cell_type=n_val_per_cell_type)
    test_images, _ = _get_livecell_paths(input_folder, "test")
    precompute_all_embeddings(predictor, val_images + test_images, embedding_folder)


def run_livecell_iterative_prompting(
    checkpoint: Optional[PathLike],
    input_folder: PathLike,
    model_type: str,
    experiment_folder: PathLike,
    start_with_box: bool = False,
    use_masks: bool = False,
) -> str:
    """Iterative prompting on the LIVECell test set.

    Returns:
        The prediction folder, ``<experiment_folder>/start_with_box`` or ``start_with_point``.
    """
    from ..util import get_sam_model
    from .inference import run_inference_with_iterative_prompting

    experiment_folder = os.fspath(experiment_folder)
    predictor = get_sam_model(model_type=model_type, checkpoint_path=checkpoint)
    prediction_folder = os.path.join(experiment_folder, "start_with_box" if start_with_box else "start_with_point")
    image_paths, gt_paths = _get_livecell_paths(input_folder, "test")
    run_inference_with_iterative_prompting(
        predictor, image_paths, gt_paths, embedding_dir=os.path.join(experiment_folder, "embeddings"),
        prediction_dir=prediction_folder, start_with_box_prompt=start_with_box, use_masks=use_masks,
    )
    return prediction_folder


def _grid_search_and_inference(segmenter, prefix, grid_search_values, input_folder, experiment_folder,
                               verbose_gs, n_val_per_cell_type):
    from .instance_segmentation import run_instance_segmentation_grid_search_and_inference

    experiment_folder = os.fspath(experiment_folder)
    prediction_folder = os.path.join(experiment_folder, prefix, "inference")
    val_images, val_labels = _get_livecell_paths(input_folder, "val", n_val_per_cell_type=n_val_per_cell_type)
    test_images, _ = _get_livecell_paths(input_folder, "test")
    run_instance_segmentation_grid_search_and_inference(
        segmenter, grid_search_values, val_images, val_labels, test_images,
        embedding_dir=os.path.join(experiment_folder, "embeddings"), prediction_dir=prediction_folder,
        experiment_folder=experiment_folder, result_dir=os.path.join(experiment_folder, prefix, "grid_search"),
        verbose_gs=verbose_gs,
    )
    return prediction_folder


def run_livecell_amg(
    checkpoint: Optional[PathLike],
    input_folder: PathLike,
    model_type: str,
    experiment_folder: PathLike,
    iou_thresh_values: Optional[List[float]] = None,
    stability_score_values: Optional[List[float]] = None,
    verbose_gs: bool = False,
    n_val_per_cell_type: int = 25,
) -> str:
    """Grid search of automatic mask generation on validation images, then inference on the test set.

    Returns:
        The prediction folder ``<experiment_folder>/amg/inference``.
    """
    from ..instance_segmentation import AutomaticMaskGenerator
    from ..util import get_sam_model
    from .instance_segmentation import default_grid_search_values_amg

    segmenter = AutomaticMaskGenerator(get_sam_model(model_type=model_type, checkpoint_path=checkpoint))
    values = default_grid_search_values_amg(iou_thresh_values=iou_thresh_values,
                                            stability_score_values=stability_score_values)
    return _grid_search_and_inference(segmenter, "amg", values, input_folder, experiment_folder, verbose_gs,
                                      n_val_per_cell_type)


def run_livecell_instance_segmentation_with_decoder(
    checkpoint: Optional[PathLike],
    input_folder: PathLike,
    model_type: str,
    experiment_folder: PathLike,
    center_distance_threshold_values: Optional[List[float]] = None,
    boundary_distance_threshold_values: Optional[List[float]] = None,
    distance_smoothing_values: Optional[List[float]] = None,
    min_size_values: Optional[List[float]] = None,
    verbose_gs: bool = False,
    n_val_per_cell_type: int = 25,
) -> str:
    """Grid search of instance segmentation with the decoder (AIS) on validation images, then the test set.

    Returns:
        The prediction folder ``<experiment_folder>/instance_segmentation_with_decoder/inference``.
    """
    from ..instance_segmentation import InstanceSegmentationWithDecoder, get_predictor_and_decoder
    from .instance_segmentation import default_grid_search_values_instance_segmentation_with_decoder

    predictor, decoder = get_predictor_and_decoder(model_type=model_type, checkpoint_path=checkpoint)
    values = default_grid_search_values_instance_segmentation_with_decoder(
        center_distance_threshold_values=center_distance_threshold_values,
        boundary_distance_threshold_values=boundary_distance_threshold_values,
        distance_smoothing_values=distance_smoothing_values, min_size_values=min_size_values,
    )
    return _grid_search_and_inference(InstanceSegmentationWithDecoder(predictor, decoder),
                                      "instance_segmentation_with_decoder", values, input_folder, experiment_folder,
                                      verbose_gs, n_val_per_cell_type)


# --- command lines -----------------------------------------------------------------------------------------
def run_livecell_inference(argv: Optional[List[str]] = None) -> None:
    """Command line for the LIVECell experiments (embeddings, iterative prompting, AMG, AIS)."""
    parser = argparse.ArgumentParser(description="Run micro_sam's LIVECell experiments.")
    parser.add_argument("-c", "--ckpt", default=None, help="A model checkpoint (default: the registered model).")
    parser.add_argument("-i", "--input", required=True, help="The LIVECell folder (see get_livecell_data).")
    parser.add_argument("-e", "--experiment_folder", required=True, help="The folder for the experiment's outputs.")
    parser.add_argument("-m", "--model", required=True, help="The model name or architecture.")
    parser.add_argument("-p", "--precompute_embeddings", action="store_true")
    parser.add_argument("-ip", "--iterative_prompting", action="store_true")
    parser.add_argument("-amg", "--auto_mask_generation", action="store_true")
    parser.add_argument("-ais", "--auto_instance_segmentation", action="store_true")
    parser.add_argument("-b", "--start_with_box", action="store_true", help="Iterative prompting starts with a box.")
    parser.add_argument("--use_masks", action="store_true", help="Iterative prompting uses the previous logits.")
    parser.add_argument("--n_val_per_cell_type", default=25, type=int,
                        help="Validation images per cell line for the grid searches.")
    parser.add_argument("--download", action="store_true", help="Download LIVECell into --input first.")
    args = parser.parse_args(argv)
    try:
        if args.download:
            get_livecell_data(args.input)
        _get_livecell_paths(args.input, "test")  # fail early on missing data
    except ValueError as error:
        parser.error(str(error))
    if sum([args.iterative_prompting, args.auto_mask_generation, args.auto_instance_segmentation]) > 1:
        warnings.warn("Several experiments were selected; they run one after the other, which takes long.")
    common = (args.ckpt, args.input, args.model, args.experiment_folder)
    if args.precompute_embeddings:
        run_livecell_precompute_embeddings(*common, n_val_per_cell_type=args.n_val_per_cell_type)
    if args.iterative_prompting:
        run_livecell_iterative_prompting(*common, start_with_box=args.start_with_box, use_masks=args.use_masks)
    if args.auto_instance_segmentation:
        run_livecell_instance_segmentation_with_decoder(*common, n_val_per_cell_type=args.n_val_per_cell_type)
    if args.auto_mask_generation:
        run_livecell_amg(*common, n_val_per_cell_type=args.n_val_per_cell_type)


def run_livecell_evaluation(argv: Optional[List[str]] = None) -> None:
    """Command line: score the predictions of the LIVECell experiments in an experiment folder."""
    from . import evaluation

    parser = argparse.ArgumentParser(description="Evaluate micro_sam's LIVECell experiments.")
    parser.add_argument("-i", "--input", required=True, help="The LIVECell folder.")
    parser.add_argument("-e", "--experiment_folder", required=True, help="The folder with the predictions.")
    parser.add_argument("-f", "--force", action="store_true", help="Recompute stored results.")
    args = parser.parse_args(argv)
    try:
        _, gt_paths = _get_livecell_paths(args.input, "test")
    except ValueError as error:
        parser.error(str(error))
    experiment_folder = args.experiment_folder
    for root in ("amg/inference", "instance_segmentation_with_decoder/inference", "start_with_box",
                 "start_with_point"):
        prediction_root = os.path.join(experiment_folder, root)
        if not os.path.exists(prediction_root):
            print(f"No predictions in {prediction_root!r}: run that experiment first.")
            continue
        if root.startswith("start_with"):
            evaluation.run_evaluation_for_iterative_prompting(
                gt_paths, prediction_root, experiment_folder, start_with_box_prompt=root == "start_with_box",
                overwrite_results=args.force,
            )
            continue
        save_path = os.path.join(experiment_folder, "results", f"{root.split('/')[0]}.csv")
        if args.force and os.path.exists(save_path):
            os.remove(save_path)
        predictions = sorted(glob(os.path.join(prediction_root, "*")))
        print(evaluation.run_evaluation(gt_paths, predictions, save_path=save_path))
