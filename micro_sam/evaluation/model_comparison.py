"""Qualitative, side-by-side comparison of two (or three) Segment Anything models.

The comparison has two steps:

1. :func:`generate_data_for_model_comparison` runs the models on the same prompts, derived from the ground truth
   of samples drawn from a data loader, and writes one HDF5 file ``sample_<i>.h5`` per sample into
   ``output_folder``. Layout of such a file:

   - ``image``: the input image, (H, W) or (H, W, 3).
   - one group per ground-truth object, named by its (sequentially relabelled) id, with

     - attributes ``point_coords`` ((P, 2), (y, x) order), ``point_labels`` ((P,), 1 = positive) and
       ``box`` ((4,), [y0, x0, y1, x1], end exclusive),
     - datasets ``gt_mask`` (bool, (H, W)), ``points/mask1``, ``points/mask2``, ``box/mask1``, ``box/mask2``
       (uint8, (H, W)) and ``points/mask3``, ``box/mask3`` when a third model is compared.

2. :func:`model_comparison` scores each object's predictions against the ground truth (IoU) and plots, per
   sample and prompt type, the objects where one model is most ahead of the other, as PNG files.
"""

import os
from glob import glob
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from .._lazy import lazy_attributes

_PREFIXES = ("points", "box")


#
# Running the models
#


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _split_batch(x, y) -> List[tuple]:
    """Split a loader batch into (image, labels) pairs; a batch of size one (or unbatched data) gives one pair."""
    x, y = _to_numpy(x), _to_numpy(y)
    if x.ndim >= 3 and y.ndim >= 3 and x.shape[0] == y.shape[0] and x.shape[0] > 1:
        return [(x[b], y[b]) for b in range(x.shape[0])]
    return [(x, y)]


def _prepare_sample(x: np.ndarray, y: np.ndarray):
    from skimage.segmentation import relabel_sequential

    image = np.squeeze(x)
    if image.ndim == 3 and image.shape[0] == 3:
        image = image.transpose((1, 2, 0))
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
        raise ValueError(f"Expected a 2D grey-value or RGB image from the loader, got an array of shape {x.shape}.")
    labels = np.squeeze(y)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"The labels (shape {y.shape}) do not match the image (shape {image.shape[:2]}).")
    labels = relabel_sequential(labels.astype("int64"))[0]
    return image, labels


def _prompts_for_objects(labels: np.ndarray, prompt_generator):
    """Prompts for all objects: ids, points ((y, x)), point labels, boxes ([y0, x0, y1, x1])."""
    from .. import util

    ids = np.unique(labels)[1:]
    centers, bboxes = util.get_centers_and_bounding_boxes(labels)
    masks = util.segmentation_to_one_hot(labels, ids)
    coords, point_labels, boxes, _ = prompt_generator(
        segmentation=masks,
        bbox_coordinates=[bboxes[i] for i in ids],
        center_coordinates=[centers[i] for i in ids],
    )
    # The generator uses SAM's (x, y) convention; the segment_from_* functions take (y, x).
    coords = _to_numpy(coords)[:, :, ::-1]
    boxes = _to_numpy(boxes)[:, [1, 0, 3, 2]]
    return ids, coords, _to_numpy(point_labels), boxes


def _predict_models_with_loader(loader, n_samples: int, prompt_generator, predictors: Sequence,
                                output_folder: Union[str, os.PathLike]) -> None:
    import h5py

    from .. import util
    from ..prompt_based_segmentation import segment_from_box, segment_from_points

    os.makedirs(output_folder, exist_ok=True)
    sample_id = 0
    for x, y in loader:
        for raw_image, raw_labels in _split_batch(x, y):
            if sample_id >= n_samples:
                return
            image, labels = _prepare_sample(raw_image, raw_labels)
            embeddings = [util.precompute_image_embeddings(p, image, ndim=2, verbose=False) for p in predictors]

            out_path = os.path.join(output_folder, f"sample_{sample_id}.h5")
            with h5py.File(out_path, "w") as f:
                f.create_dataset("image", data=image, compression="gzip")
                if labels.max() == 0:
                    sample_id += 1
                    continue
                ids, coords, point_labels, boxes = _prompts_for_objects(labels, prompt_generator)
                for idx, gt_id in enumerate(ids):
                    g = f.create_group(str(int(gt_id)))
                    g.attrs["point_coords"] = coords[idx]
                    g.attrs["point_labels"] = point_labels[idx]
                    g.attrs["box"] = boxes[idx]
                    g.create_dataset("gt_mask", data=labels == gt_id, compression="gzip")
                    for model_id, (predictor, emb) in enumerate(zip(predictors, embeddings), start=1):
                        util.set_precomputed(predictor, emb)
                        box_mask = segment_from_box(predictor, boxes[idx]).squeeze()
                        point_mask = segment_from_points(predictor, coords[idx], point_labels[idx]).squeeze()
                        g.create_dataset(f"box/mask{model_id}", data=box_mask.astype("uint8"), compression="gzip")
                        g.create_dataset(f"points/mask{model_id}", data=point_mask.astype("uint8"),
                                         compression="gzip")
            sample_id += 1


def generate_data_for_model_comparison(
    loader,
    output_folder: Union[str, os.PathLike],
    model_type1: str,
    model_type2: str,
    n_samples: int,
    model_type3: Optional[str] = None,
    checkpoint1: Optional[Union[str, os.PathLike]] = None,
    checkpoint2: Optional[Union[str, os.PathLike]] = None,
    checkpoint3: Optional[Union[str, os.PathLike]] = None,
    peft_kwargs1: Optional[Dict[str, Any]] = None,
    peft_kwargs2: Optional[Dict[str, Any]] = None,
    peft_kwargs3: Optional[Dict[str, Any]] = None,
) -> None:
    """Run two or three models on the same ground-truth prompts and save the results for :func:`model_comparison`.

    Every object of a sample gets one positive point (the object pixel farthest from its boundary) and its
    bounding box as prompts; each model segments each object once per prompt type. Existing
    ``sample_<i>.h5`` files in ``output_folder`` are overwritten. The file layout is described in the
    module docstring.

    Args:
        loader: Iterable (e.g. a torch DataLoader) of (image, labels) pairs: image (H, W), (1, H, W),
            (3, H, W) or (H, W, 3) with optional leading batch axes, labels an instance segmentation of the
            same spatial shape.
        output_folder: Where the ``sample_<i>.h5`` files are written.
        model_type1: Model type of the first model, as for :func:`micro_sam.util.get_sam_model`.
        model_type2: Model type of the second model.
        n_samples: The number of samples to take from the loader (at least 1).
        model_type3: Optional model type of a third model.
        checkpoint1: Optional checkpoint of the first model.
        checkpoint2: Optional checkpoint of the second model.
        checkpoint3: Optional checkpoint of the third model.
        peft_kwargs1: Optional PEFT settings of the first model.
        peft_kwargs2: Optional PEFT settings of the second model.
        peft_kwargs3: Optional PEFT settings of the third model.
    """
    from .. import util
    from ..prompt_generators import PointAndBoxPromptGenerator

    if int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
    prompt_generator = PointAndBoxPromptGenerator(
        n_positive_points=1, n_negative_points=0, dilation_strength=3,
        get_point_prompts=True, get_box_prompts=True,
    )
    settings = [(model_type1, checkpoint1, peft_kwargs1), (model_type2, checkpoint2, peft_kwargs2)]
    if model_type3 is not None:
        settings.append((model_type3, checkpoint3, peft_kwargs3))
    predictors = [
        util.get_sam_model(model_type=model_type, checkpoint_path=checkpoint, peft_kwargs=peft_kwargs)
        for model_type, checkpoint, peft_kwargs in settings
    ]
    _predict_models_with_loader(loader, int(n_samples), prompt_generator, predictors, output_folder)


#
# Scoring and plotting
#


def _score_objects(f, prefix: str, min_size: int):
    """Per-object IoU of model 1 and 2 for one prompt type, as a DataFrame with advantage columns."""
    import pandas as pd

    from .. import util

    rows = []
    for name, group in f.items():
        if name == "image":
            continue
        gt_mask = group["gt_mask"][:]
        if gt_mask.sum() < min_size:
            continue
        rows.append({
            "gt_id": name,
            "score1": util.compute_iou(gt_mask, group[f"{prefix}/mask1"][:]),
            "score2": util.compute_iou(gt_mask, group[f"{prefix}/mask2"][:]),
        })
    result = pd.DataFrame(rows, columns=["gt_id", "score1", "score2"])
    result["advantage1"] = result["score1"] - result["score2"]
    result["advantage2"] = result["score2"] - result["score1"]
    return result


def _select_objects(scores, advantage_column: str, n_images: int) -> List[str]:
    """The ids of the ``n_images`` objects with the largest advantage (ties keep file order)."""
    ordered = scores.sort_values(advantage_column, ascending=False, kind="stable")
    return list(ordered["gt_id"].iloc[:n_images])


def _to_uint8_rgb(image: np.ndarray, enhance: bool) -> np.ndarray:
    image = image.astype("float64")
    low = image.min(axis=(0, 1), keepdims=True)
    high = image.max(axis=(0, 1), keepdims=True)
    image = (image - low) / np.maximum(high - low, 1e-6)
    if enhance:
        from skimage import exposure

        image = exposure.equalize_adapthist(image)
    image = np.clip(np.round(image * 255), 0, 255).astype("uint8")
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image


def _square_crop(fg_mask: np.ndarray):
    coords = np.nonzero(fg_mask)
    crop = []
    starts = [int(c.min()) for c in coords]
    stops = [int(c.max()) + 1 for c in coords]
    side = max(b - a for a, b in zip(starts, stops))
    for start, stop, size in zip(starts, stops, fg_mask.shape):
        pad = (side - (stop - start)) // 2
        crop.append(slice(max(start - pad, 0), min(stop + pad, size)))
    return tuple(crop)


def _draw_panel(image, mask, gt, prefix, attrs, offset, point_radius, outline_dilation) -> np.ndarray:
    import skimage.draw as draw
    from scipy.ndimage import binary_dilation
    from skimage.segmentation import find_boundaries

    # Prediction in red (blended), ground-truth outline in yellow, prompts in cyan (negative points magenta).
    panel = image.astype("float64")
    panel[mask > 0] = 0.6 * panel[mask > 0] + 0.4 * np.array([255.0, 0.0, 0.0])
    panel = panel.astype("uint8")
    outline = find_boundaries(gt)
    if outline_dilation > 0:
        outline = binary_dilation(outline, iterations=outline_dilation)
    panel[outline] = [255, 255, 0]

    shape = panel.shape[:2]
    if prefix == "box":
        y0, x0, y1, x1 = (np.asarray(attrs["box"]) - np.concatenate([offset, offset])).tolist()
        rr, cc = draw.rectangle_perimeter((y0, x0), end=(y1 - 1, x1 - 1), shape=shape)
        box_outline = np.zeros(shape, dtype=bool)
        box_outline[rr, cc] = True
        if outline_dilation > 0:
            box_outline = binary_dilation(box_outline, iterations=outline_dilation)
        panel[box_outline] = [0, 255, 255]
    else:
        for point, label in zip(np.asarray(attrs["point_coords"]) - offset, np.asarray(attrs["point_labels"])):
            rr, cc = draw.disk(tuple(point), point_radius, shape=shape)
            panel[rr, cc] = [0, 255, 255] if label == 1 else [255, 0, 255]
    return panel


def _object_panels(f, gt_id, prefix, n_models, point_radius, outline_dilation, enhance_image) -> List[np.ndarray]:
    """RGB panels (model 1, model 3 if present, model 2) of a square crop around the object."""
    from scipy.ndimage import binary_dilation

    g = f[gt_id]
    gt = g["gt_mask"][:].astype(bool)
    masks = {m: g[f"{prefix}/mask{m}"][:] for m in range(1, n_models + 1)}
    fg_mask = gt | (masks[1] > 0) | (masks[2] > 0)
    if prefix == "box":  # leave room for the box outline
        fg_mask = binary_dilation(fg_mask, iterations=5)
    crop = _square_crop(fg_mask)
    offset = np.array([c.start for c in crop])
    image = _to_uint8_rgb(f["image"][crop], enhance_image)
    order = [1, 3, 2] if n_models == 3 else [1, 2]
    return [
        _draw_panel(image, masks[m][crop], gt[crop], prefix, g.attrs, offset, point_radius, outline_dilation)
        for m in order
    ]


def _save_row(panels: List[np.ndarray], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3 * len(panels), 3))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        ax.imshow(panel)
        ax.axis("off")
    fig.subplots_adjust(wspace=0.05, hspace=0)
    fig.savefig(path, bbox_inches="tight")


def _show_rows(rows: List[List[np.ndarray]]) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(rows[0]), squeeze=False)
    for axis_row, panels in zip(axes, rows):
        for ax, panel in zip(axis_row, panels):
            ax.imshow(panel)
            ax.axis("off")
    plt.show()
    plt.close(fig)


def _compare_models(path, n_images_per_sample, min_size, plot_folder, point_radius, outline_dilation,
                    have_model3, enhance_image) -> None:
    import h5py

    sample_name = Path(path).stem
    n_models = 3 if have_model3 else 2
    with h5py.File(path, "r") as f:
        for prefix in _PREFIXES:
            scores = _score_objects(f, prefix, min_size)
            if have_model3 and len(scores) and f"{prefix}/mask3" not in f[scores["gt_id"].iloc[0]]:
                raise ValueError(f"have_model3=True, but {path} holds no results of a third model.")
            for advantage in ("advantage1", "advantage2"):
                selected = _select_objects(scores, advantage, n_images_per_sample)
                if not selected:
                    continue
                rows = [_object_panels(f, gt_id, prefix, n_models, point_radius, outline_dilation, enhance_image)
                        for gt_id in selected]
                if plot_folder is None:
                    _show_rows(rows)
                    continue
                folder = os.path.join(plot_folder, prefix, advantage)
                os.makedirs(folder, exist_ok=True)
                for i, panels in enumerate(rows):
                    _save_row(panels, os.path.join(folder, f"{sample_name}_{i}.png"))


def model_comparison(
    output_folder: Union[str, os.PathLike],
    n_images_per_sample: int,
    min_size: int,
    plot_folder: Optional[Union[str, os.PathLike]] = None,
    point_radius: int = 4,
    outline_dilation: int = 0,
    have_model3: bool = False,
    enhance_image: bool = True,
) -> None:
    """Plot the objects where the compared models differ most, side by side.

    For each sample file written by :func:`generate_data_for_model_comparison` and each prompt type
    ("points", "box"), objects are scored by the IoU of each model's mask with the ground truth. The
    ``n_images_per_sample`` objects where model 1 is most ahead of model 2 (``advantage1``) and vice versa
    (``advantage2``) are plotted: one row per object with panels model 1 | (model 3) | model 2, each a square
    crop with the prediction in red, the ground-truth outline in yellow and the prompt in cyan. The rows are
    saved as ``<plot_folder>/<points|box>/<advantage1|advantage2>/sample_<i>_<rank>.png``.

    Args:
        output_folder: The folder with the files from :func:`generate_data_for_model_comparison`.
        n_images_per_sample: The number of objects plotted per sample, prompt type and direction (at least 1).
        min_size: Objects with fewer ground-truth pixels are skipped.
        plot_folder: Where the PNG files go; None shows the plots with matplotlib instead.
        point_radius: Radius in pixels of the drawn point prompts.
        outline_dilation: Dilation in pixels of the ground-truth and box outlines.
        have_model3: Also plot the third model's masks (between model 1 and model 2).
        enhance_image: Apply adaptive histogram equalisation (CLAHE) to the image crops.
    """
    if not os.path.isdir(output_folder):
        raise ValueError(f"output_folder {output_folder!r} is not a directory; create it with "
                         "generate_data_for_model_comparison.")
    if int(n_images_per_sample) != n_images_per_sample or n_images_per_sample < 1:
        raise ValueError(f"n_images_per_sample must be a positive integer, got {n_images_per_sample!r}.")
    if point_radius < 0 or outline_dilation < 0:
        raise ValueError(f"point_radius ({point_radius}) and outline_dilation ({outline_dilation}) must be >= 0.")
    for path in sorted(glob(os.path.join(output_folder, "*.h5"))):
        _compare_models(path, int(n_images_per_sample), min_size, plot_folder, point_radius, outline_dilation,
                        have_model3, enhance_image)


def model_comparison_with_napari(output_folder: Union[str, os.PathLike], show_points: bool = True) -> None:
    """Browse the comparison results object by object in napari (one viewer per object).

    Args:
        output_folder: The folder with the files from :func:`generate_data_for_model_comparison`.
        show_points: Show the results of the point prompts; False shows those of the box prompts.

    Raises:
        RuntimeError: If napari is not installed.
    """
    try:
        import napari
    except ImportError as error:
        raise RuntimeError("model_comparison_with_napari needs napari; install it (e.g. `pip install napari`) "
                           "or use model_comparison to save the comparison as images.") from error
    import h5py

    prefix = "points" if show_points else "box"
    for path in sorted(glob(os.path.join(output_folder, "*.h5"))):
        with h5py.File(path, "r") as f:
            image = f["image"][:]
            for name, g in f.items():
                if name == "image":
                    continue
                viewer = napari.Viewer()
                viewer.add_image(image)
                viewer.add_labels(g["gt_mask"][:].astype("uint8"), name="ground truth")
                viewer.add_labels(g[f"{prefix}/mask1"][:], name="model 1")
                viewer.add_labels(g[f"{prefix}/mask2"][:], name="model 2")
                if show_points:
                    viewer.add_points(g.attrs["point_coords"], size=12, face_color="transparent")
                else:
                    y0, x0, y1, x1 = g.attrs["box"]
                    viewer.add_shapes(np.array([[y0, x0], [y1, x1]]), shape_type="rectangle",
                                      face_color="transparent", edge_color="green")
                napari.run()


# Names micro_sam 1.8 exposes here (imported there from other modules), resolved on first use.
__getattr__, __dir__ = lazy_attributes(globals(), {
    "PointAndBoxPromptGenerator": "micro_sam.prompt_generators:PointAndBoxPromptGenerator",
    "segment_from_box": "micro_sam.prompt_based_segmentation:segment_from_box",
    "segment_from_points": "micro_sam.prompt_based_segmentation:segment_from_points",
    "binary_dilation": "scipy.ndimage:binary_dilation",
    "find_boundaries": "skimage.segmentation:find_boundaries",
    "tqdm": "tqdm:tqdm",
})
