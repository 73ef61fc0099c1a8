"""Benchmark SAM models on public microscopy data sets (``micro_sam.benchmark_sam``).

For each data set: download it, cut crops with the most annotated objects (2D: 512 x 512; 3D: 32 x 512 x 512,
plus 2D crops of their slices), run automatic segmentation (AIS when the model has a decoder, else AMG; and
the mode asked for) and interactive segmentation (2D: iterative prompting from a box and from a point, with
and without the previous mask; 3D: one prompt per object projected through the volume), and store the
scores as csv files in ``<output_folder>/<data set>/results``.

Data sets in this package's registry (``micro_sam/_data/evaluation_datasets.tsv``: URL, SHA256, layout) are
downloaded by micro_sam itself and verified; the others through torch_em's download functions.
"""
from __future__ import annotations

import os
import shutil
import time
from glob import glob
from typing import List, Optional, Tuple, Union

import numpy as np

from .._lazy import lazy_attributes
from . import _datasets

__all__ = [
    "DATASET_CONTAINER_KEYS", "DATASET_RETURNS_FOLDER", "EM_2D_DATASETS", "EM_3D_DATASETS", "LM_2D_DATASETS",
    "LM_3D_DATASETS", "main", "run_benchmark_evaluations",
]

# Names micro_sam 1.8 exposes here (imported there from other modules), resolved on first use.
__getattr__, __dir__ = lazy_attributes(globals(), {
    "DEFAULT_SEGMENTATION_MODE_WITH_DECODER": "micro_sam.instance_segmentation:DEFAULT_SEGMENTATION_MODE_WITH_DECODER",
    "automatic_instance_segmentation": "micro_sam.automatic_segmentation:automatic_instance_segmentation",
    "get_predictor_and_segmenter": "micro_sam.automatic_segmentation:get_predictor_and_segmenter",
    "run_evaluation": "micro_sam.evaluation.evaluation:run_evaluation",
    "run_evaluation_for_iterative_prompting":
        "micro_sam.evaluation.evaluation:run_evaluation_for_iterative_prompting",
    "run_inference_with_iterative_prompting": "micro_sam.evaluation.inference:run_inference_with_iterative_prompting",
    "segment_slices_from_ground_truth":
        "micro_sam.evaluation.multi_dimensional_segmentation:segment_slices_from_ground_truth",
    "tqdm": "tqdm:tqdm",
})

LM_2D_DATASETS = [
    "livecell", "deepbacs", "tissuenet", "neurips_cellseg", "cellpose", "dynamicnuclearnet", "orgasegment", "yeaz",
    "arvidsson", "bitdepth_nucseg", "cellbindb", "covid_if", "deepseas", "hpa", "ifnuclei", "lizard", "organoidnet",
    "toiam", "vicar",
]
"""2D light microscopy data sets (the first eight are in the training domain of the light microscopy models)."""

LM_3D_DATASETS = ["plantseg_root", "plantseg_ovules", "gonuclear", "mouse_embryo", "cellseg3d"]
"""3D light microscopy data sets."""

EM_2D_DATASETS = ["mitolab_tem"]
"""2D electron microscopy data sets."""

EM_3D_DATASETS = [
    "lucchi", "mitolab", "uro_cell", "sponge_em", "vnc", "nuc_mm_mouse", "num_mm_zebrafish", "platynereis_cilia",
    "asem_mito",
]
"""3D electron microscopy data sets."""

DATASET_RETURNS_FOLDER = {"deepbacs": "*.tif", "mitolab_tem": "*.tiff"}
"""Data sets whose torch_em path function returns folders, and the file pattern inside them."""

DATASET_CONTAINER_KEYS = {
    "tissuenet": ["raw/rgb", "labels/cell"],
    "covid_if": ["raw/serum_IgG/s0", "labels/cells/s0"],
    "dynamicnuclearnet": ["raw", "labels"],
    "hpa": [["raw/protein", "raw/microtubules", "raw/er"], "labels"],
    "lizard": ["image", "labels/segmentation"],
    "plantseg_root": ["raw", "label"],
    "plantseg_ovules": ["raw", "label"],
    "gonuclear": ["raw/nuclei", "labels/nuclei"],
    "mouse_embryo": ["raw", "label"],
    "cellseg_3d": [None, None],
    "lucchi": ["raw", "labels"],
    "uro_cell": ["raw", "labels/mito"],
    "mitolab_3d": [None, None],
    "sponge_em": ["volumes/raw", "volumes/labels/instances"],
    "vnc": ["raw", "labels/mitochondria"],
}
"""Data sets stored in container files: [image key(s), label key]."""

PathLike = Union[str, os.PathLike]
_CROP_2D, _CROP_3D = (512, 512), (32, 512, 512)
_RETAIN = ("data", "crops", "automatic", "interactive")
_METHODS = ("all", "automatic", "interactive")

# Data sets downloaded through torch_em: name -> (module, data function, its kwargs, paths function, its kwargs).
# Paths functions return (images, labels) or, for container data sets, the container files.
_TORCH_EM = {
    "livecell": ("light_microscopy.livecell", "get_livecell_data", {}, "get_livecell_paths", {"split": "test"}),
    "deepbacs": ("light_microscopy.deepbacs", "get_deepbacs_data", {"bac_type": "mixed"}, "get_deepbacs_paths",
                 {"split": "test", "bac_type": "mixed"}),
    "tissuenet": ("light_microscopy.tissuenet", "get_tissuenet_data", {"split": "test"}, "get_tissuenet_paths",
                  {"split": "test"}),
    "cellpose": ("light_microscopy.cellpose", "get_cellpose_data", {"split": "train", "choice": "cyto2"},
                 "get_cellpose_paths", {"split": "train", "choice": "cyto2"}),
    "dynamicnuclearnet": ("light_microscopy.dynamicnuclearnet", "get_dynamicnuclearnet_data", {"split": "test"},
                          "get_dynamicnuclearnet_paths", {"split": "test"}),
    "orgasegment": ("light_microscopy.orgasegment", "get_orgasegment_data", {"split": "eval"},
                    "get_orgasegment_paths", {"split": "eval"}),
    "yeaz": ("light_microscopy.yeaz", "get_yeaz_data", {"choice": "bf"}, "get_yeaz_paths",
             {"choice": "bf", "split": "test"}),
    "arvidsson": ("light_microscopy.arvidsson", "get_arvidsson_data", {"split": "test"}, "get_arvidsson_paths",
                  {"split": "test"}),
    "bitdepth_nucseg": ("light_microscopy.bitdepth_nucseg", "get_bitdepth_nucseg_data", {},
                        "get_bitdepth_nucseg_paths", {"magnification": "20x"}),
    "deepseas": ("light_microscopy.deepseas", "get_deepseas_data", {"split": "test"}, "get_deepseas_paths",
                 {"split": "test"}),
    "lizard": ("histopathology.lizard", "get_lizard_data", {"split": "test"}, "get_lizard_paths", {"split": "test"}),
    "toiam": ("light_microscopy.toiam", "get_toiam_data", {}, "get_toiam_paths", {}),
    "vicar": ("light_microscopy.vicar", "get_vicar_data", {}, "get_vicar_paths", {}),
    "plantseg_root": ("light_microscopy.plantseg", "get_plantseg_data", {"split": "test", "name": "root"},
                      "get_plantseg_paths", {"name": "root", "split": "test"}),
    "plantseg_ovules": ("light_microscopy.plantseg", "get_plantseg_data", {"split": "test", "name": "ovules"},
                        "get_plantseg_paths", {"name": "ovules", "split": "test"}),
    "gonuclear": ("light_microscopy.gonuclear", "get_gonuclear_data", {}, "get_gonuclear_paths", {}),
    "mouse_embryo": ("light_microscopy.mouse_embryo", "get_mouse_embryo_data", {}, "get_mouse_embryo_paths",
                     {"name": "nuclei", "split": "val"}),
    "lucchi": ("electron_microscopy.lucchi", "get_lucchi_data", {"split": "test"}, "get_lucchi_paths",
               {"split": "test"}),
    "uro_cell": ("electron_microscopy.uro_cell", "get_uro_cell_data", {}, "get_uro_cell_paths", {"target": "mito"}),
    "vnc": ("electron_microscopy.vnc", "get_vnc_data", {}, "get_vnc_mito_paths", {}),
    "sponge_em": ("electron_microscopy.sponge_em", "get_sponge_em_data", {}, "get_sponge_em_paths",
                  {"sample_ids": None}),
}


# --- data --------------------------------------------------------------------------------------------------
def supported_datasets() -> List[str]:
    """The data sets :func:`run_benchmark_evaluations` can download: the registry's and torch_em's."""
    registry = [name for name in _datasets.load_registry() if not name.startswith("livecell_")]
    return sorted(set(registry) | set(_TORCH_EM))


def _torch_em_call(name: str, which: int, path: str):
    import importlib

    module_name, data_fn, data_kwargs, paths_fn, paths_kwargs = _TORCH_EM[name]
    module = importlib.import_module(f"torch_em.data.datasets.{module_name}")
    if which == 0:
        return getattr(module, data_fn)(path=path, download=True, **data_kwargs)
    return getattr(module, paths_fn)(path=path, **paths_kwargs)


def _download(name: str, path: str, verbose: bool) -> Tuple[List, List]:
    """Download a data set into ``path`` (once) and return its (images, labels) paths."""
    if name in _datasets.load_registry():
        root = _datasets.fetch(name, path, verbose=verbose)
        return _datasets.dataset_paths(name, root)
    _torch_em_call(name, 0, path)
    found = _torch_em_call(name, 1, path)
    if isinstance(found, tuple) and len(found) == 2:
        images, labels = found
        if name in DATASET_RETURNS_FOLDER:
            images = glob(os.path.join(images, DATASET_RETURNS_FOLDER[name]))
            labels = glob(os.path.join(labels, DATASET_RETURNS_FOLDER[name]))
        return sorted(images, key=_datasets.natural_key), sorted(labels, key=_datasets.natural_key)
    files = sorted([found] if isinstance(found, str) else found, key=_datasets.natural_key)
    return files, files


def _keys(name: str):
    if name in _datasets.load_registry():
        return _datasets.keys(name)
    image_key, label_key = DATASET_CONTAINER_KEYS.get(name, [None, None])
    return image_key, label_key


def _load(path, key):
    from ..util import load_image_data

    if isinstance(key, list):  # several channels stored under separate keys
        return np.stack([np.asarray(load_image_data(path, k)) for k in key], axis=-1)
    return np.asarray(load_image_data(path, key))


def _crops(image: np.ndarray, labels: np.ndarray, crop_shape, max_crops: int):
    """Up to ``max_crops`` crops of ``crop_shape`` (a grid over the image) with the most objects, most first.

    Crops smaller than ``crop_shape`` (at the border) are used only when the image itself is smaller.
    """
    ndim = len(crop_shape)
    shape = labels.shape[:ndim]
    full_size_possible = all(s >= c for s, c in zip(shape, crop_shape))
    candidates = []
    for start in np.ndindex(*[int(np.ceil(s / c)) for s, c in zip(shape, crop_shape)]):
        box = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(start, crop_shape, shape))
        if full_size_possible and any(b.stop - b.start != c for b, c in zip(box, crop_shape)):
            continue
        n_objects = len(np.unique(labels[box])) - int((labels[box] == 0).any())
        if n_objects > 0:
            candidates.append((-n_objects, len(candidates), box))
    return [(image[box], labels[box]) for _, _, box in sorted(candidates)[:max_crops]]


def _extract_crops(name: str, path: str, images: List, labels: List, crops_per_input: int, verbose: bool) -> int:
    """Write the crops of a data set to ``<path>/roi_<ndim>d/{inputs,labels}``; returns the data dimension."""
    import imageio.v3 as imageio
    from skimage.measure import label as connected_components
    from tqdm import tqdm

    ndim = 3 if name in LM_3D_DATASETS + EM_3D_DATASETS else 2
    targets = [(ndim, _CROP_3D if ndim == 3 else _CROP_2D)] + ([(2, _CROP_2D)] if ndim == 3 else [])
    folders = {d: (os.path.join(path, f"roi_{d}d", "inputs"), os.path.join(path, f"roi_{d}d", "labels"))
               for d, _ in targets}
    if all(os.path.isdir(f) for pair in folders.values() for f in pair):
        return ndim
    staging = {d: (f"{a}.tmp", f"{b}.tmp") for d, (a, b) in folders.items()}
    for pair in staging.values():
        for folder in pair:
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
    image_key, label_key = _keys(name)
    counter = {d: 0 for d, _ in targets}
    for image_path, label_path in tqdm(list(zip(images, labels)), desc=f"Crops of {name}", disable=not verbose):
        image, gt = _load(image_path, image_key), _load(label_path, label_key)
        if image.ndim == gt.ndim + 1 and image.shape[0] == 3:  # channels first -> last
            image = np.moveaxis(image, 0, -1)
        gt = connected_components(gt)
        pieces = {ndim: _crops(image, gt, targets[0][1], crops_per_input)}
        if ndim == 3:
            pieces[2] = [crop for z in range(gt.shape[0]) for crop in _crops(image[z], gt[z], _CROP_2D,
                                                                                crops_per_input)]
        for d, crops in pieces.items():
            for crop_image, crop_labels in crops:
                counter[d] += 1
                file_name = f"{name}_{counter[d]:05}.tif"
                imageio.imwrite(os.path.join(staging[d][0], file_name), crop_image, compression="zlib")
                imageio.imwrite(os.path.join(staging[d][1], file_name), crop_labels.astype("uint32"),
                                compression="zlib")
    for d in folders:
        for tmp, final in zip(staging[d], folders[d]):
            os.replace(tmp, final)
    return ndim


def _crop_paths(path: str, ndim: int) -> Tuple[List[str], List[str]]:
    images = sorted(glob(os.path.join(path, f"roi_{ndim}d", "inputs", "*.tif")), key=_datasets.natural_key)
    labels = sorted(glob(os.path.join(path, f"roi_{ndim}d", "labels", "*.tif")), key=_datasets.natural_key)
    return images, labels


# --- evaluation --------------------------------------------------------------------------------------------
def _automatic(images, labels, model_type, checkpoint_path, device, output_folder, ndim, mode, verbose):
    from ..automatic_segmentation import automatic_instance_segmentation, get_predictor_and_segmenter
    from ..instance_segmentation import DEFAULT_SEGMENTATION_MODE_WITH_DECODER
    from ..util import get_sam_model
    from .evaluation import run_evaluation

    predictor, state = get_sam_model(model_type=model_type, checkpoint_path=checkpoint_path, device=device,
                                     return_state=True)
    if mode is None:
        mode = DEFAULT_SEGMENTATION_MODE_WITH_DECODER if state.get("decoder_state") is not None else "amg"
    result_path = os.path.join(output_folder, "results", f"{mode}_{ndim}d.csv")
    if os.path.exists(result_path):
        return
    predictor, segmenter = get_predictor_and_segmenter(model_type=model_type, checkpoint=checkpoint_path,
                                                       device=device, segmentation_mode=mode, predictor=predictor,
                                                       state=state)
    prediction_dir = os.path.join(output_folder, f"{mode}_{ndim}d", "inference")
    os.makedirs(prediction_dir, exist_ok=True)
    predictions = []
    for image_path in images:
        out = os.path.join(prediction_dir, os.path.basename(image_path))
        if not os.path.exists(out):
            automatic_instance_segmentation(predictor, segmenter, image_path, output_path=out, ndim=ndim,
                                            verbose=False)
        predictions.append(out)
    run_evaluation(labels, predictions, save_path=result_path, verbose=verbose)


def _interactive(images, labels, model_type, checkpoint_path, device, output_folder, ndim, verbose):
    import imageio.v3 as imageio
    import pandas as pd

    from ..util import get_sam_model
    from .evaluation import run_evaluation_for_iterative_prompting
    from .inference import run_inference_with_iterative_prompting
    from .multi_dimensional_segmentation import segment_slices_from_ground_truth

    predictor = get_sam_model(model_type=model_type, checkpoint_path=checkpoint_path, device=device)
    for prompt in ("box", "points"):
        if ndim == 2:
            for use_masks in (False, True):
                root = os.path.join(output_folder, "interactive_segmentation_2d", f"start_with_{prompt}",
                                    f"iterative_prompting_{'with' if use_masks else 'without'}_masks")
                run_inference_with_iterative_prompting(predictor, images, labels, embedding_dir=None,
                                                       prediction_dir=root, start_with_box_prompt=prompt == "box",
                                                       use_masks=use_masks)
                run_evaluation_for_iterative_prompting(labels, root, output_folder,
                                                       start_with_box_prompt=prompt == "box", use_masks=use_masks)
            continue
        save_path = os.path.join(output_folder, "results", f"interactive_segmentation_3d_with_{prompt}.csv")
        if os.path.exists(save_path):
            continue
        prediction_dir = os.path.join(output_folder, "interactive_segmentation_3d", prompt)
        os.makedirs(prediction_dir, exist_ok=True)
        rows = [segment_slices_from_ground_truth(
            imageio.imread(image_path), imageio.imread(label_path), model_type, checkpoint_path,
            save_path=os.path.join(prediction_dir, os.path.basename(image_path)), device=device,
            interactive_seg_mode=prompt, min_size=10, predictor=predictor, verbose=verbose,
        ) for image_path, label_path in zip(images, labels)]
        pd.DataFrame(rows).mean().to_frame().T.to_csv(save_path, index=False)


def _clear(retain, data_path, output_folder):
    keep = set(retain or [])
    remove = []
    if "data" not in keep:
        remove += [p for p in glob(os.path.join(data_path, "*")) if not os.path.basename(p).startswith("roi_")]
    if "crops" not in keep:
        remove += glob(os.path.join(data_path, "roi_*"))
    if "automatic" not in keep:
        remove += glob(os.path.join(output_folder, "amg_*")) + glob(os.path.join(output_folder, "ais_*")) + glob(
            os.path.join(output_folder, "apg_*"))
    if "interactive" not in keep:
        remove += glob(os.path.join(output_folder, "interactive_segmentation_*"))
    for path in remove:
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _validate(dataset_choice, evaluation_methods, retain, output_folder) -> List[str]:
    names = supported_datasets() if dataset_choice is None else (
        [dataset_choice] if isinstance(dataset_choice, str) else list(dataset_choice))
    unknown = [name for name in names if name not in supported_datasets()]
    if unknown:
        raise ValueError(f"Unknown or unsupported data set(s) {unknown}; supported: {', '.join(supported_datasets())}.")
    if evaluation_methods not in _METHODS:
        raise ValueError(f"evaluation_methods must be one of {_METHODS}, got {evaluation_methods!r}.")
    if retain is not None and not set(retain) <= set(_RETAIN):
        raise ValueError(f"retain may contain {_RETAIN}, got {retain}.")
    if output_folder is None:
        raise ValueError("output_folder is required: the results are stored there.")
    return names


def run_benchmark_evaluations(
    input_folder: PathLike,
    dataset_choice: Optional[Union[str, List[str]]],
    model_type: str = "vit_b_lm",
    output_folder: Optional[PathLike] = None,
    checkpoint_path: Optional[PathLike] = None,
    segmentation_mode: Optional[str] = None,
    retain: Optional[List[str]] = None,
    evaluation_methods: str = "all",
    ignore_warnings: bool = False,
    device: Optional[str] = None,
    crops_per_input: int = 10,
    verbose: bool = True,
) -> None:
    """Benchmark a model on one or more data sets (see the module docstring for what is run and stored).

    Args:
        input_folder: Folder for the data: ``<input_folder>/<data set>`` (downloads and crops).
        dataset_choice: A data set name, a list of names, or None for all supported data sets.
        model_type: The model.
        output_folder: Folder for the results: ``<output_folder>/<data set>/results/*.csv``.
        checkpoint_path: A checkpoint for ``model_type``.
        segmentation_mode: An automatic segmentation mode ("amg", "ais", "apg") to run in addition to the
            model's default (AIS with a decoder, else AMG).
        retain: What to keep after the run besides the results: any of "data", "crops", "automatic",
            "interactive" (predictions); default nothing.
        evaluation_methods: "all", "automatic" or "interactive".
        ignore_warnings: Silence warnings during the run.
        device: The device for the model.
        crops_per_input: Crops cut from each image / volume.
        verbose: Show progress.

    Raises:
        ValueError: Unknown data sets, methods or retain entries (before anything is downloaded).
    """
    import warnings

    names = _validate(dataset_choice, evaluation_methods, retain, output_folder)
    start = time.time()
    with warnings.catch_warnings():
        if ignore_warnings:
            warnings.simplefilter("ignore")
        for name in names:
            data_path = os.path.join(os.fspath(input_folder), name)
            dataset_output = os.path.join(os.fspath(output_folder), name)
            os.makedirs(os.path.join(dataset_output, "results"), exist_ok=True)
            images, labels = _download(name, data_path, verbose)
            ndim = _extract_crops(name, data_path, images, labels, crops_per_input, verbose)
            for d in sorted({ndim, 2}, reverse=True):
                crop_images, crop_labels = _crop_paths(data_path, d)
                kwargs = dict(model_type=model_type, checkpoint_path=checkpoint_path, device=device,
                              output_folder=dataset_output, ndim=d)
                if evaluation_methods != "interactive":
                    _automatic(crop_images, crop_labels, mode=None, verbose=verbose, **kwargs)
                    if segmentation_mode is not None:
                        _automatic(crop_images, crop_labels, mode=segmentation_mode, verbose=verbose, **kwargs)
                if evaluation_methods != "automatic":
                    _interactive(crop_images, crop_labels, verbose=verbose, **kwargs)
            _clear(retain, data_path, dataset_output)
    minutes, seconds = divmod(int(time.time() - start), 60)
    if verbose:
        print(f"Benchmark finished in {minutes // 60}h {minutes % 60}m {seconds}s.")


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point ``micro_sam.benchmark_sam``: invalid choices give one line on stderr and exit
    code 2 before anything is downloaded; failures one line and exit code 1."""
    from .. import _cli

    return _cli.run_main(_main, argv, prog="micro_sam.benchmark_sam")


def _main(argv: Optional[List[str]] = None) -> int:
    from .. import _cli
    from ..util import get_model_names

    parser = _cli.ArgumentParser(prog="micro_sam.benchmark_sam",
                                     description="Benchmark Segment Anything models on microscopy data sets.")
    parser.add_argument("-i", "--input_folder", required=True, help="Folder for the (downloaded) data sets.")
    parser.add_argument("-m", "--model_type", default="vit_b_lm",
                        help=f"The model, one of {', '.join(get_model_names())} (default vit_b_lm).")
    parser.add_argument("-c", "--checkpoint_path", default=None, help="A checkpoint for the model type.")
    parser.add_argument("-d", "--dataset_choice", nargs="*", default=None,
                        help=f"Data sets (default all): {', '.join(supported_datasets())}.")
    parser.add_argument("-o", "--output_folder", required=True, help="Folder for the results (csv files).")
    parser.add_argument("--segmentation_mode", default=None, choices=["amg", "ais", "apg"],
                        help="An automatic segmentation mode to run besides the model's default.")
    parser.add_argument("--retain", nargs="*", default=None, choices=list(_RETAIN),
                        help="Keep these besides the results: data, crops, automatic, interactive.")
    parser.add_argument("--evaluate", default="all", choices=list(_METHODS), help="Which evaluations to run.")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available).")
    parser.add_argument("--quiet", action="store_true", help="No progress output.")
    args = parser.parse_args(argv)
    try:
        _validate(args.dataset_choice or None, args.evaluate, args.retain, args.output_folder)
    except ValueError as error:
        raise _cli.UsageError(str(error)) from None
    run_benchmark_evaluations(
        args.input_folder, args.dataset_choice or None, model_type=args.model_type,
        output_folder=args.output_folder, checkpoint_path=args.checkpoint_path,
        segmentation_mode=args.segmentation_mode, retain=args.retain, evaluation_methods=args.evaluate,
        ignore_warnings=True, device=args.device, verbose=not args.quiet,
    )
    return 0
