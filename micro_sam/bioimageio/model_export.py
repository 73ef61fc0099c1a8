"""Export a SAM model as a bioimage.io model package (a zip with rdf, weights, test tensors, cover, docs).

The package describes :class:`~micro_sam.bioimageio.predictor_adaptor.PredictorAdaptor` (imported from the
installed micro_sam, so the package holds no code) with ``pytorch_state_dict`` weights. A model with an
instance segmentation decoder takes only the image and returns the automatic instance segmentation; a model
without one takes the image and box / point / mask prompts (and optionally precomputed embeddings).
Before the package is moved to ``output_path`` it is validated and test-run with ``bioimageio.core``, offline.
Needs the ``export`` extra: ``pip install 'micro_sam[export]'``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np

from .._lazy import lazy_attributes

__all__ = ["export_sam_model"]

_lazy_getattr, _lazy_dir = lazy_attributes(globals(), {
    "PredictorAdaptor": "micro_sam.bioimageio.predictor_adaptor:PredictorAdaptor",
    "PointAndBoxPromptGenerator": "micro_sam.prompt_generators:PointAndBoxPromptGenerator",
    "create_sample_for_model": "bioimageio.core.digest_spec:create_sample_for_model",
    "save_bioimageio_package": "bioimageio.spec:save_bioimageio_package",
})

_DOI = "10.1038/s41592-024-02580-4"
_DESCRIPTION = "Segment Anything for Microscopy"


def _defaults() -> Dict[str, Any]:
    spec = _require_spec()
    return {
        "authors": [spec.Author(name="micro_sam contributors")],
        "description": _DESCRIPTION,
        "cite": [spec.CiteEntry(text="Archit et al. Segment Anything for Microscopy", doi=spec.Doi(_DOI))],
        "tags": ["segment-anything", "instance-segmentation"],
    }


def __getattr__(name: str):
    """``DEFAULTS`` (authors, description, cite, tags) and ``ARBITRARY_SIZE`` need bioimageio.spec."""
    if name == "DEFAULTS":
        return _defaults()
    if name == "ARBITRARY_SIZE":
        return _require_spec().ParameterizedSize(min=1, step=1)
    return _lazy_getattr(name)


def __dir__():
    return sorted(set(_lazy_dir()) | {"DEFAULTS", "ARBITRARY_SIZE"})


def _require_spec():
    try:
        import bioimageio.core  # noqa: F401 - checked here so that a missing core fails before any work
        import bioimageio.spec.model.v0_5 as spec
    except ImportError:
        raise ImportError("Exporting bioimage.io models needs bioimageio.core: pip install 'micro_sam[export]'.") \
            from None
    return spec


# --- inputs ------------------------------------------------------------------------------------------------
def _validate(image, label_image, output_path, overwrite):
    output_path = os.fspath(output_path)
    if not output_path.endswith(".zip"):
        raise ValueError(f"output_path must be a .zip file (a bioimage.io package), got {output_path!r}.")
    if os.path.exists(output_path) and not overwrite:
        raise ValueError(f"The export path {output_path!r} exists already; choose another one or pass "
                         "overwrite=True.")
    if not os.path.isdir(os.path.dirname(os.path.abspath(output_path))):
        raise ValueError(f"The folder of output_path {output_path!r} does not exist.")
    image, label_image = np.asarray(image), np.asarray(label_image)
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
        raise ValueError(f"image must be 2D (Y, X) or RGB (Y, X, 3), got shape {image.shape}.")
    if label_image.shape != image.shape[:2]:
        raise ValueError(f"label_image (shape {label_image.shape}) must have the image's shape {image.shape[:2]}.")
    if not (label_image != 0).any():
        raise ValueError("label_image has no objects; the test prompts are derived from its objects.")
    return image, label_image, output_path


def _validate_name(name) -> None:
    if not isinstance(name, str) or not 5 <= len(name.strip()) <= 128:
        raise ValueError(f"name must be a string of 5 to 128 characters (bioimage.io's rule), got {name!r}.")


def _load_weights(model_type, checkpoint_path):
    """(architecture, image size, flat adaptor state) for a registered model or a checkpoint file."""
    from .._sam_loading import get_sam_model
    from .predictor_adaptor import join_state

    predictor, sam, state = get_sam_model(model_type=model_type, checkpoint_path=checkpoint_path, device="cpu",
                                          return_sam=True, return_state=True)
    decoder_state = state.get("decoder_state") if isinstance(state, dict) else None
    sam_state = {k: v.detach().float().contiguous() for k, v in sam.state_dict().items()}
    return predictor.model_type, int(sam.image_encoder.img_size), join_state(sam_state, decoder_state)


def _test_prompts(label_image: np.ndarray, mask_size: int):
    """Box, point and mask prompts for (at most) the two largest objects, as the adaptor's input tensors."""
    from ..prompt_based_segmentation import _mask_to_logits
    from ..util import get_centers_and_bounding_boxes

    ids, counts = np.unique(label_image[label_image != 0], return_counts=True)
    ids = ids[np.argsort(-counts, kind="stable")][:2]
    relabeled = np.zeros(label_image.shape, dtype="int32")
    for new, old in enumerate(ids, 1):
        relabeled[label_image == old] = new
    centers, boxes = get_centers_and_bounding_boxes(relabeled)
    box_prompts = np.array([[boxes[i][1], boxes[i][0], boxes[i][3], boxes[i][2]] for i in (1, 2)[:len(ids)]])
    points, labels = [], []
    for i in (1, 2)[:len(ids)]:
        y0, x0, y1, x1 = boxes[i]
        outside = (max(x0 - 3, 0), max(y0 - 3, 0))  # just outside the object's box: background
        points.append([[centers[i][1], centers[i][0]], list(outside)])
        labels.append([1, 0])
    masks = np.stack([_mask_to_logits(relabeled == i, size=mask_size) for i in (1, 2)[:len(ids)]])
    return {
        "box_prompts": box_prompts[None].astype("int64"),
        "point_prompts": np.array(points, dtype="int64")[None],
        "point_labels": np.array(labels, dtype="int64")[None],
        "mask_prompts": masks[None].astype("float32"),
    }


def _run_adaptor(architecture, image_size, weight_path, inputs):
    import torch

    from .predictor_adaptor import PredictorAdaptor

    adaptor = PredictorAdaptor(architecture, image_size=image_size)
    adaptor.load_state_dict(torch.load(weight_path, map_location="cpu", weights_only=True))
    adaptor.eval()
    tensors = {name: torch.from_numpy(value) for name, value in inputs.items()}
    masks, scores, embeddings = adaptor(**tensors)
    return {"masks": masks.numpy(), "scores": scores.numpy(), "embeddings": embeddings.numpy()}, adaptor


# --- the package files -------------------------------------------------------------------------------------
def _write_cover(path, image, outputs):
    from ..visualization import save_overlay

    masks = outputs["masks"][0, :, 0]
    labels = np.zeros(masks.shape[1:], dtype="uint32")
    for i, mask in enumerate(masks, 1):
        labels[mask != 0] = i
    rgb = image if image.ndim == 3 else np.stack([image] * 3, axis=-1)
    # bioimage.io covers look best at an aspect ratio of 2:1: show the image next to its segmentation
    save_overlay(path, np.concatenate([rgb, rgb], axis=1), np.concatenate([np.zeros_like(labels), labels], axis=1))


def _write_documentation(path, documentation, name, with_decoder):
    if documentation is not None and os.path.isfile(documentation):
        Path(path).write_text(Path(documentation).read_text())
        return
    if documentation is not None:
        Path(path).write_text(documentation)
        return
    usage = ("Called with only the image it returns the automatic instance segmentation (one mask per object)."
             if with_decoder else
             "Called with the image and box, point or mask prompts it returns one mask per prompted object.")
    Path(path).write_text(
        f"# {name}\n\nSegment Anything for Microscopy (micro_sam, doi:{_DOI}).\n\n{usage}\n\n"
        "The architecture is `micro_sam.bioimageio.predictor_adaptor.PredictorAdaptor`; install `micro_sam` to "
        "run it.\n"
    )


def _write_environment(path):
    import torch

    Path(path).write_text(
        "name: micro_sam\nchannels:\n  - conda-forge\ndependencies:\n  - python>=3.11\n"
        f"  - pytorch>={torch.__version__.split('+')[0]}\n  - pip\n  - pip:\n    - micro_sam\n"
    )


def _tensor_descriptions(spec, paths, outputs, with_decoder, image_shape, grid):
    arbitrary = spec.ParameterizedSize(min=1, step=1)
    y_size = spec.ParameterizedSize(min=image_shape[0], step=1) if with_decoder else arbitrary
    x_size = spec.ParameterizedSize(min=image_shape[1], step=1) if with_decoder else arbitrary
    index = spec.IndexInputAxis
    inputs = [spec.InputTensorDescr(
        id=spec.TensorId("image"),
        axes=[spec.BatchAxis(size=1), spec.ChannelAxis(channel_names=[spec.Identifier(c) for c in "RGB"]),
              spec.SpaceInputAxis(id=spec.AxisId("y"), size=y_size),
              spec.SpaceInputAxis(id=spec.AxisId("x"), size=x_size)],
        test_tensor=spec.FileDescr(source=paths["image"]), data=spec.IntervalOrRatioDataDescr(type="uint8"),
    )]
    if not with_decoder:
        obj = index(id=spec.AxisId("object"), size=arbitrary)
        point = index(id=spec.AxisId("point"), size=arbitrary)
        prompt_inputs = {
            "box_prompts": ([spec.BatchAxis(size=1), obj, spec.ChannelAxis(
                channel_names=[spec.Identifier(c) for c in ("x0", "y0", "x1", "y1")])], "int64"),
            "point_prompts": ([spec.BatchAxis(size=1), obj, point, spec.ChannelAxis(
                channel_names=[spec.Identifier(c) for c in "xy"])], "int64"),
            "point_labels": ([spec.BatchAxis(size=1), obj, point], "int64"),
            "mask_prompts": ([spec.BatchAxis(size=1), obj, spec.ChannelAxis(channel_names=[spec.Identifier("mask")]),
                              spec.SpaceInputAxis(id=spec.AxisId("y"), size=4 * grid),
                              spec.SpaceInputAxis(id=spec.AxisId("x"), size=4 * grid)], "float32"),
            "embeddings": ([spec.BatchAxis(size=1), spec.ChannelAxis(
                channel_names=[spec.Identifier(f"c{i}") for i in range(256)]),
                spec.SpaceInputAxis(id=spec.AxisId("y"), size=grid),
                spec.SpaceInputAxis(id=spec.AxisId("x"), size=grid)], "float32"),
        }
        for name, (axes, dtype) in prompt_inputs.items():
            inputs.append(spec.InputTensorDescr(
                id=spec.TensorId(name), optional=True, axes=axes, test_tensor=spec.FileDescr(source=paths[name]),
                data=spec.IntervalOrRatioDataDescr(type=dtype),
            ))
    objects = spec.IndexOutputAxis(id=spec.AxisId("object"), size=spec.DataDependentSize())
    outputs_descr = [
        spec.OutputTensorDescr(
            id=spec.TensorId("masks"),
            axes=[spec.BatchAxis(size=1), objects, spec.ChannelAxis(channel_names=[spec.Identifier("mask")]),
                  spec.SpaceOutputAxis(id=spec.AxisId("y"), size=spec.SizeReference(
                      tensor_id=spec.TensorId("image"), axis_id=spec.AxisId("y"))),
                  spec.SpaceOutputAxis(id=spec.AxisId("x"), size=spec.SizeReference(
                      tensor_id=spec.TensorId("image"), axis_id=spec.AxisId("x")))],
            data=spec.IntervalOrRatioDataDescr(type="uint8"), test_tensor=spec.FileDescr(source=paths["masks"]),
        ),
        spec.OutputTensorDescr(
            id=spec.TensorId("scores"),
            axes=[spec.BatchAxis(size=1), objects, spec.ChannelAxis(channel_names=[spec.Identifier("iou")])],
            data=spec.IntervalOrRatioDataDescr(type="float32"), test_tensor=spec.FileDescr(source=paths["scores"]),
        ),
        spec.OutputTensorDescr(
            id=spec.TensorId("embeddings"),
            axes=[spec.BatchAxis(size=1), spec.ChannelAxis(
                channel_names=[spec.Identifier(f"c{i}") for i in range(256)]),
                spec.SpaceOutputAxis(id=spec.AxisId("y"), size=grid),
                spec.SpaceOutputAxis(id=spec.AxisId("x"), size=grid)],
            data=spec.IntervalOrRatioDataDescr(type="float32"),
            test_tensor=spec.FileDescr(source=paths["embeddings"]),
        ),
    ]
    assert set(outputs) == {"masks", "scores", "embeddings"}
    return inputs, outputs_descr


def _build_description(spec, name, paths, outputs, with_decoder, image_shape, architecture, image_size,
                       kwargs):
    import torch

    grid = image_size // 16
    inputs, outputs_descr = _tensor_descriptions(spec, paths, outputs, with_decoder, image_shape, grid)
    weights = spec.WeightsDescr(pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
        source=paths["weights"],
        architecture=spec.ArchitectureFromLibraryDescr(
            import_from="micro_sam.bioimageio.predictor_adaptor", callable=spec.Identifier("PredictorAdaptor"),
            kwargs={"model_type": architecture, "image_size": image_size},
        ),
        pytorch_version=spec.Version(torch.__version__.split("+")[0]),
        dependencies=spec.FileDescr(source=paths["environment"]),
    ))
    defaults = _defaults()
    extra = {key: kwargs[key] for key in ("id", "id_emoji", "uploader", "version") if key in kwargs}
    return spec.ModelDescr(
        name=name,
        description=kwargs.get("description", defaults["description"]),
        authors=kwargs.get("authors", defaults["authors"]),
        cite=kwargs.get("cite", defaults["cite"]),
        tags=kwargs.get("tags", defaults["tags"]),
        license=spec.LicenseId(kwargs.get("license", "CC-BY-4.0")),
        documentation=spec.FileDescr(source=paths["documentation"]),
        covers=[spec.FileDescr(source=Path(cover)) for cover in paths["covers"]],
        inputs=inputs,
        outputs=outputs_descr,
        weights=weights,
        config=spec.Config(bioimageio=spec.BioimageioConfig(reproducibility_tolerance=[
            # embeddings differ in the last bits between CPU kernels; masks and scores must match
            spec.ReproducibilityTolerance(mismatched_elements_per_million=1000,
                                          output_ids=[spec.TensorId("embeddings")]),
        ])),
        **extra,
    )


def _test_package(package: str) -> None:
    """Validate and test-run a package with bioimageio.core, without network access (no remote io checks)."""
    from bioimageio.core import test_model
    from bioimageio.spec import settings

    previous = settings.perform_io_checks
    settings.perform_io_checks = False  # remote files are not fetched; local files are still checked
    try:
        summary = test_model(package, devices=["cpu"])
    finally:
        settings.perform_io_checks = previous
    if summary.status != "passed":
        failed = [f"{detail.name}: {[str(e.msg) for e in detail.errors]}" for detail in summary.details
                  if detail.status == "failed"]
        raise RuntimeError("The exported model did not pass the bioimage.io tests: " + "; ".join(failed))


# --- public function ---------------------------------------------------------------------------------------
def export_sam_model(
    image: np.ndarray,
    label_image: np.ndarray,
    model_type: str,
    name: str,
    output_path: Union[str, os.PathLike],
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    overwrite: bool = False,
    **kwargs,
) -> None:
    """Export a SAM model (with its instance segmentation decoder, if it has one) as a bioimage.io package.

    The test tensors are computed on ``image``: with a decoder, the automatic instance segmentation; without,
    the masks for box + point + mask prompts derived from the two largest objects of ``label_image``. The
    package is validated and test-run with bioimageio.core before it is written (offline; nothing is written
    when a check fails).

    Args:
        image: (Y, X) or (Y, X, 3) test image (uint8 or any dtype; normalised to uint8 like everywhere in micro_sam).
        label_image: (Y, X) label image of ``image``; the prompts of the test data come from its objects.
        model_type: A registered model name or, with ``checkpoint_path``, the architecture.
        name: The model name in the package.
        output_path: The package file to write (``.zip``); must not exist unless ``overwrite``.
        checkpoint_path: A checkpoint to export instead of the registered model.
        overwrite: Replace an existing ``output_path``.
        kwargs: Optional description fields: ``description``, ``authors`` / ``cite`` (bioimageio.spec objects),
            ``tags``, ``license``, ``documentation`` (Markdown text or a file), ``covers`` (image files), ``id``,
            ``id_emoji``, ``uploader``, ``version``.

    Raises:
        ValueError: An existing ``output_path`` or one that is not a .zip, images of the wrong shape, a label
            image without objects.
        ImportError: bioimageio.core is not installed.
        RuntimeError: The package fails its bioimage.io test.
    """
    from .._image import to_image

    image, label_image, output_path = _validate(image, label_image, output_path, overwrite)
    _validate_name(name)
    spec = _require_spec()
    architecture, image_size, state = _load_weights(model_type, checkpoint_path)
    with_decoder = any(key.startswith("decoder.") for key in state)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(output_path))) as folder:
        import torch

        paths: Dict[str, Any] = {"weights": Path(folder, "weights.pt")}
        torch.save(state, paths["weights"])
        image_uint8 = to_image(image)
        inputs = {"image": image_uint8.transpose(2, 0, 1)[None].copy()}
        if not with_decoder:
            inputs.update(_test_prompts(label_image, 4 * (image_size // 16)))
        outputs, _ = _run_adaptor(architecture, image_size, paths["weights"], inputs)
        if outputs["masks"].shape[1] == 0:
            raise ValueError("The model finds no object in the test image, so its test would not check anything; "
                             "export with an image that contains objects it segments.")
        if not with_decoder:
            inputs["embeddings"] = outputs["embeddings"]
        for key, value in {**inputs, **outputs}.items():
            paths[key] = Path(folder, f"{key}.npy")
            np.save(paths[key], value)
        covers = kwargs.get("covers")
        if covers is None:
            covers = [os.path.join(folder, "cover.png")]
            _write_cover(covers[0], image_uint8, outputs)
        elif not all(os.path.isfile(cover) for cover in covers):
            raise ValueError(f"covers must be existing image files, got {covers}.")
        paths["covers"] = covers
        paths["documentation"] = Path(folder, "README.md")
        _write_documentation(paths["documentation"], kwargs.get("documentation"), name, with_decoder)
        paths["environment"] = Path(folder, "environment.yaml")
        _write_environment(paths["environment"])
        description = _build_description(spec, name, paths, outputs, with_decoder, label_image.shape,
                                         architecture, image_size, kwargs)
        from bioimageio.spec import save_bioimageio_package

        package = os.path.join(folder, "package.zip")
        save_bioimageio_package(description, output_path=Path(package))
        _test_package(package)
        os.replace(package, output_path)
