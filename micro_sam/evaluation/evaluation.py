"""Evaluation of instance segmentation predictions against ground truth.

The predictions are typically produced by `micro_sam.evaluation.instance_segmentation` (automatic segmentation)
or by `micro_sam.evaluation.inference` (prompt-based segmentation). Scores are computed with
`micro_sam.evaluation.metrics`.
"""

import os
import re
from glob import glob
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import pandas as pd
import imageio.v3 as imageio
from skimage.measure import label as connected_components
from tqdm import tqdm

from ..util import load_image_data
from .metrics import mean_segmentation_accuracy, matching

__all__ = ["run_evaluation", "run_evaluation_for_iterative_prompting", "main"]

PathOrArray = Union[np.ndarray, os.PathLike, str]


def _natural_key(path: str):
    # Sort "iteration2" before "iteration10".
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", str(path))]


def _read(path_or_array: PathOrArray, what: str) -> np.ndarray:
    if isinstance(path_or_array, np.ndarray):
        return path_or_array
    if not os.path.isfile(path_or_array):
        raise FileNotFoundError(f"The {what} file '{path_or_array}' does not exist.")
    return imageio.imread(path_or_array)


def _evaluate_images(gt_paths, prediction_paths, verbose, thresholds) -> pd.DataFrame:
    """Compute the scores for every image pair; returns one row per image."""
    rows = []
    for gt_path, pred_path in tqdm(
        zip(gt_paths, prediction_paths), total=len(gt_paths), desc="Evaluate predictions", disable=not verbose
    ):
        gt = _read(gt_path, "ground-truth")
        if not isinstance(gt_path, np.ndarray):
            # Label images on disk may contain the same id for disconnected objects: split them
            # into connected components (same as the published micro_sam).
            gt = connected_components(gt)
        pred = _read(pred_path, "prediction")
        if gt.shape != pred.shape:
            name_gt = "array" if isinstance(gt_path, np.ndarray) else f"'{gt_path}'"
            name_pred = "array" if isinstance(pred_path, np.ndarray) else f"'{pred_path}'"
            raise ValueError(
                f"The prediction {name_pred} has shape {pred.shape}, "
                f"but the ground-truth {name_gt} has shape {gt.shape}."
            )

        msa, accuracies = mean_segmentation_accuracy(pred, gt, thresholds=thresholds, return_accuracies=True)
        stats = matching(pred, gt)
        row = {"mSA": msa}
        if thresholds is None:
            row["SA50"], row["SA75"] = accuracies[0], accuracies[5]
        row.update({"Precision": stats["precision"], "Recall": stats["recall"], "F1 Score": stats["f1"]})
        rows.append(row)
    return pd.DataFrame(rows)


def run_evaluation(
    gt_paths: List[PathOrArray],
    prediction_paths: List[PathOrArray],
    save_path: Optional[Union[os.PathLike, str]] = None,
    verbose: bool = True,
    thresholds: Optional[List[float]] = None,
) -> pd.DataFrame:
    """Evaluate instance segmentation predictions against the ground truth.

    Ground-truth images read from file are relabeled into connected components before the evaluation;
    ground truth passed as arrays is used as is. Predictions are never relabeled.

    Args:
        gt_paths: The ground-truth label images, as file paths or arrays.
        prediction_paths: The predicted label images, in the same order and with the same shapes as `gt_paths`.
        save_path: Optional csv file for the results. If it exists already, the results are loaded from it
            and nothing is computed.
        verbose: Whether to show a progress bar.
        thresholds: The IoU thresholds for the mean segmentation accuracy. By default 0.5, 0.55, ..., 0.95.

    Returns:
        A DataFrame with a single row containing the scores averaged over all images, with the columns
            "mSA", "SA50", "SA75" (only for the default thresholds), "Precision", "Recall" and "F1 Score"
            (precision, recall and F1 are computed at an IoU threshold of 0.5).

    Raises:
        ValueError: If the numbers of ground-truth and prediction images differ, no image is given,
            or a prediction does not have the shape of its ground truth.
        FileNotFoundError: If an input file does not exist.
    """
    if len(gt_paths) != len(prediction_paths):
        raise ValueError(
            f"The number of ground-truth images ({len(gt_paths)}) does not match "
            f"the number of predictions ({len(prediction_paths)})."
        )
    if save_path is not None and os.path.exists(save_path):
        return pd.read_csv(save_path)
    if len(gt_paths) == 0:
        raise ValueError("No images were given for the evaluation.")

    per_image = _evaluate_images(gt_paths, prediction_paths, verbose=verbose, thresholds=thresholds)
    results = per_image.mean(axis=0).to_frame().T.reset_index(drop=True)

    if save_path is not None:
        os.makedirs(Path(save_path).parent, exist_ok=True)
        results.to_csv(save_path, index=False)
    return results


def run_evaluation_for_iterative_prompting(
    gt_paths: List[Union[os.PathLike, str]],
    prediction_root: Union[os.PathLike, str],
    experiment_folder: Union[os.PathLike, str],
    start_with_box_prompt: bool = False,
    overwrite_results: bool = False,
    use_masks: bool = False,
) -> pd.DataFrame:
    """Evaluate the predictions of iterative prompting, one result row per iteration.

    The predictions are expected in the subfolders `iteration00`, `iteration01`, ... of `prediction_root`
    (as written by `micro_sam.evaluation.inference.run_inference_with_iterative_prompting`); the files in each
    subfolder, sorted by name, are matched to `gt_paths` in the given order.
    The results are stored as csv in `<experiment_folder>/results/iterative_prompting_{with,without}_mask/`,
    in the file `iterative_prompts_start_box.csv` or `iterative_prompts_start_point.csv`.

    Args:
        gt_paths: The ground-truth label images.
        prediction_root: The folder with the per-iteration prediction folders.
        experiment_folder: The folder where the experiment results are stored.
        start_with_box_prompt: Whether the iterative prompting started with a box prompt (sets the file name).
        overwrite_results: Whether to recompute and overwrite existing results.
        use_masks: Whether the iterative prompting used the mask logits of the previous iteration
            (sets the folder name).

    Returns:
        A DataFrame with one row per iteration and the columns of `run_evaluation`. If the results exist already
            (and `overwrite_results` is not set) they are loaded from the csv file instead.

    Raises:
        FileNotFoundError: If `prediction_root` does not exist.
        ValueError: If it contains no iteration folders, or see `run_evaluation`.
    """
    if not os.path.isdir(prediction_root):
        raise FileNotFoundError(f"The prediction folder '{prediction_root}' does not exist.")

    result_folder = os.path.join(
        experiment_folder, "results", "iterative_prompting_" + ("with" if use_masks else "without") + "_mask"
    )
    csv_name = "iterative_prompts_start_box.csv" if start_with_box_prompt else "iterative_prompts_start_point.csv"
    csv_path = os.path.join(result_folder, csv_name)

    if os.path.exists(csv_path):
        if overwrite_results:
            os.remove(csv_path)
        else:
            print(f"The results of iterative prompting are already stored at '{csv_path}'.")
            return pd.read_csv(csv_path, index_col=0)

    iteration_folders = sorted(
        (p for p in glob(os.path.join(prediction_root, "iteration*")) if os.path.isdir(p)), key=_natural_key
    )
    if not iteration_folders:
        raise ValueError(f"No 'iteration*' folders were found in '{prediction_root}'.")

    results = []
    for folder in iteration_folders:
        print("Evaluating", os.path.basename(folder))
        pred_paths = sorted(glob(os.path.join(folder, "*")))
        results.append(run_evaluation(gt_paths=gt_paths, prediction_paths=pred_paths, save_path=None))
    results = pd.concat(results, ignore_index=True)

    os.makedirs(result_folder, exist_ok=True)
    results.to_csv(csv_path)
    return results



def _collect_inputs(paths: List[str], key: Optional[str], what: str) -> List[PathOrArray]:
    """Files (or, with ``key`` for a container file, arrays) from file paths and folders + glob patterns."""
    inputs = []
    for path in paths:
        if os.path.isfile(path):
            inputs.append(path if key is None else load_image_data(path, key=key))
        elif os.path.isdir(path):
            if key is None:
                raise ValueError(f"{path!r} is a folder: pass --{what}_key with a file pattern such as '*.tif'.")
            matches = sorted(glob(os.path.join(path, key)), key=_natural_key)
            if not matches:
                raise ValueError(f"No {what} files match the pattern {key!r} in {path!r}.")
            inputs.extend(matches)
        else:
            raise ValueError(f"The {what} path {path!r} does not exist.")
    return inputs


def _csv_path(output_path: Optional[str]) -> Optional[str]:
    """The csv file for the results: the path itself when it ends in .csv, else ``<folder>/results.csv``."""
    if output_path is None:
        return None
    if output_path.endswith(".csv"):
        return output_path
    return os.path.join(output_path, "results.csv")


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point ``micro_sam.evaluate``: score predicted label images against ground truth.

    Prints the mean segmentation accuracy (mSA, SA50, SA75), precision, recall and F1 averaged over the images
    and optionally stores them as csv. Label and prediction files are matched in (natural) sort order. Invalid
    inputs give one line on stderr and exit code 2.
    """
    from .. import _cli

    return _cli.run_main(_main, argv, prog="micro_sam.evaluate")


def _main(argv: Optional[List[str]] = None) -> int:
    from .. import _cli

    parser = _cli.ArgumentParser(
        prog="micro_sam.evaluate",
        description="Evaluate instance segmentations (label images) against ground-truth labels.",
    )
    parser.add_argument("--labels", required=True, nargs="+",
                        help="Ground-truth label files, or folders (then --label_key is a file pattern).")
    parser.add_argument("--predictions", required=True, nargs="+",
                        help="Predicted label files, or folders (then --prediction_key is a file pattern).")
    parser.add_argument("--label_key", default=None,
                        help="File pattern inside label folders (e.g. '*.tif'), or the dataset key inside a "
                             "zarr / n5 / hdf5 label file.")
    parser.add_argument("--prediction_key", default=None,
                        help="File pattern inside prediction folders, or the dataset key inside a container file.")
    parser.add_argument("-o", "--output_path", default=None,
                        help="Where to store the scores: a .csv file, or a folder for 'results.csv'. Existing "
                             "results there are loaded instead of recomputed.")
    parser.add_argument("--threshold", default=None, type=float, nargs="+",
                        help="IoU threshold(s) for the segmentation accuracy; default 0.5, 0.55, ..., 0.95.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Show a progress bar.")
    args = parser.parse_args(argv)

    try:
        labels = _collect_inputs(args.labels, args.label_key, "label")
        predictions = _collect_inputs(args.predictions, args.prediction_key, "prediction")
        if len(labels) != len(predictions):
            raise ValueError(f"Found {len(labels)} label image(s) but {len(predictions)} prediction(s); "
                             "they are matched one to one in sorted order.")
        if args.threshold is not None and not all(0.0 < t <= 1.0 for t in args.threshold):
            raise ValueError(f"--threshold values must lie in (0, 1], got {args.threshold}.")
        save_path = _csv_path(args.output_path)
        if save_path is not None and os.path.exists(save_path):
            print(f"Loading the existing results from {save_path!r} (delete the file to recompute).")
        results = run_evaluation(labels, predictions, save_path=save_path, verbose=args.verbose,
                                 thresholds=args.threshold)
    except (ValueError, FileNotFoundError) as error:
        raise _cli.UsageError(str(error)) from None
    print(results.to_string(index=False))
    if save_path is not None:
        print(f"Results stored in {os.path.abspath(save_path)!r}.")
    return 0
