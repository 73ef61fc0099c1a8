"""Export SAM for model servers (the BioEngine, NVIDIA Triton) and ONNX runtimes (e.g. in the browser).

Each export writes one Triton model folder ``<output_root>/<name>/`` with ``config.pbtxt`` and ``1/model.*``:

- ``sam-<export_name>-encoder``: the image encoder, as TorchScript (``backend="pytorch"``, as micro_sam 1.8) or
  ONNX (``backend="onnx"``). The TorchScript encoder takes the normalised image padded to the square encoder
  input (SAM's ``preprocess``); the ONNX encoder takes the image resized so that its longest side is the
  encoder input size (values 0..255, any aspect ratio) and normalises and pads it itself.
- ``sam-<export_name>-decoder``: prompt encoder + mask decoder as ONNX, with the input / output names of
  segment_anything's ONNX export (``image_embeddings``, ``point_coords``, ``point_labels``, ``mask_input``,
  ``has_mask_input``, ``orig_im_size`` -> ``masks``, ``iou_predictions``, ``low_res_masks``): points are (x, y) in
  the resized encoder input (``ResizeLongestSide.apply_coords``), a box is two points with labels 2 and 3, and
  prompts without a box end with a padding point of label -1; ``masks`` are logits at ``orig_im_size``.

Every folder is written to a temporary name and renamed when complete; ONNX files are test-run with onnxruntime
first. Needs the ``export`` extra (onnx, onnxruntime): ``pip install 'micro_sam[export]'``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from typing import Optional, Union

from .._lazy import lazy_attributes
from ._onnx import SamDecoderForOnnx, SamEncoderForOnnx, check_opset, run_onnx

__all__ = ["export_bioengine_model", "export_image_encoder", "export_onnx_model"]

# Names micro_sam 1.8 exposes here, resolved on first use.
__getattr__, __dir__ = lazy_attributes(globals(), {
    "SamOnnxModel": "segment_anything.utils.onnx:SamOnnxModel",
    "get_sam_model": "micro_sam.util:get_sam_model",
})

try:
    import importlib.util as _importlib_util

    onnxruntime_exists = _importlib_util.find_spec("onnxruntime") is not None
except ValueError:  # pragma: no cover - a broken installation
    onnxruntime_exists = False

ENCODER_CONFIG = """name: "%s"
backend: "pytorch"
platform: "pytorch_libtorch"

max_batch_size : 1
input [
  {
    name: "input0__0"
    data_type: TYPE_FP32
    dims: [3, -1, -1]
  }
]
output [
  {
    name: "output0__0"
    data_type: TYPE_FP32
    dims: [256, 64, 64]
  }
]

parameters: {
  key: "INFERENCE_MODE"
  value: {
    string_value: "true"
  }
}"""
"""Triton configuration of the TorchScript encoder (``%`` name) of a model with SAM's 1024 input (64 x 64
embeddings); :func:`export_image_encoder` writes the grid size of the exported model."""

DECODER_CONFIG = """name: "%s"
backend: "onnxruntime"
platform: "onnxruntime_onnx"

parameters: {
  key: "INFERENCE_MODE"
  value: {
    string_value: "true"
  }
}

instance_group {
  count: 1
  kind: KIND_CPU
}"""
"""Triton configuration of the ONNX models (``%`` name)."""

_BACKENDS = ("pytorch", "onnx")


def _target(output_root, name, overwrite) -> str:
    output_root = os.fspath(output_root)
    if os.path.exists(output_root) and not os.path.isdir(output_root):
        raise ValueError(f"output_root {output_root!r} exists and is not a folder.")
    target = os.path.join(output_root, name)
    if os.path.exists(target) and not overwrite:
        raise ValueError(f"The export path {target!r} exists already; choose another output_root or export_name, "
                         "or pass overwrite=True.")
    return target


def _write_folder(target: str, write) -> None:
    """Run ``write(folder)`` on a temporary folder next to ``target`` and move it to ``target`` when it succeeded."""
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    folder = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.")
    try:
        write(folder)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(folder, target)
    finally:
        if os.path.exists(folder):
            shutil.rmtree(folder)


def _load_sam(model_type, checkpoint_path):
    """A float32 CPU copy of the model with the plain segment_anything attention (exporters trace plain ops)."""
    from ..models.fast_attention import restore_sam
    from ..util import get_sam_model

    _, sam = get_sam_model(model_type=model_type, checkpoint_path=checkpoint_path, return_sam=True, device="cpu")
    return restore_sam(sam).float().eval()


def export_image_encoder(
    model_type: str,
    output_root: Union[str, os.PathLike],
    export_name: Optional[str] = None,
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    backend: str = "pytorch",
    opset: int = 17,
    overwrite: bool = False,
) -> str:
    """Export SAM's image encoder for a model server or an ONNX runtime.

    Args:
        model_type: A registered model name or, with ``checkpoint_path``, the architecture.
        output_root: The folder to write ``sam-<export_name>-encoder`` into.
        export_name: Name part of the folder; default ``model_type``.
        checkpoint_path: A checkpoint to export instead of the registered model.
        backend: "pytorch" (TorchScript, micro_sam 1.8's format) or "onnx".
        opset: The ONNX opset for ``backend="onnx"``.
        overwrite: Replace an existing export folder.

    Returns:
        The path of the exported model folder.

    Raises:
        ValueError: An existing export folder, an unknown backend, an opset out of range or one that
            onnxruntime cannot run.
        ImportError: onnx / onnxruntime are missing for ``backend="onnx"``.
    """
    import torch

    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}.")
    if backend == "onnx":
        check_opset(opset)
    name = f"sam-{export_name or model_type}-encoder"
    target = _target(output_root, name, overwrite)
    sam = _load_sam(model_type, checkpoint_path)
    size = int(sam.image_encoder.img_size)
    grid = size // 16

    def write(folder):
        weights = os.path.join(folder, "1")
        os.makedirs(weights)
        if backend == "pytorch":
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                # torch's own trace check compares graphs, which differ between calls for vit_t (folded and cached
                # conv + batch-norm weights and attention biases); compare the outputs on another input instead
                traced = torch.jit.trace(sam.image_encoder, torch.rand(1, 3, size, size), check_trace=False)
                check = torch.rand(1, 3, size, size)
                if not torch.allclose(traced(check), sam.image_encoder(check), atol=1e-4, rtol=1e-4):
                    raise RuntimeError("The traced image encoder does not reproduce the model's output.")
            traced.save(os.path.join(weights, "model.pt"))
            config = (ENCODER_CONFIG % name).replace("dims: [256, 64, 64]", f"dims: [256, {grid}, {grid}]")
        else:
            path = os.path.join(weights, "model.onnx")
            encoder = SamEncoderForOnnx(sam)
            example = torch.rand(1, 3, size, (3 * size) // 4) * 255
            _export_onnx(encoder, (example,), path, opset, ["image"], ["image_embeddings"],
                         {"image": {2: "height", 3: "width"}})
            run_onnx(path, {"image": example.numpy()}, opset)
            config = DECODER_CONFIG % name
        with open(os.path.join(folder, "config.pbtxt"), "w") as f:
            f.write(config)

    _write_folder(target, write)
    return target


def _export_onnx(module, args, path, opset, input_names, output_names, dynamic_axes):
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, path, export_params=True, opset_version=opset, do_constant_folding=True,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                          dynamo=False)


def export_onnx_model(
    model_type: str,
    output_root: Union[str, os.PathLike],
    opset: int = 17,
    export_name: Optional[str] = None,
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    return_single_mask: bool = True,
    gelu_approximate: bool = False,
    use_stability_score: bool = False,
    return_extra_metrics: bool = False,
    quantize_model: bool = False,
    overwrite: bool = False,
) -> str:
    """Export SAM's prompt encoder and mask decoder to ONNX (``sam-<export_name>-decoder/1/model.onnx``).

    Args:
        model_type: A registered model name or, with ``checkpoint_path``, the architecture.
        output_root: The folder to write the model folder into.
        opset: The ONNX opset (17 recommended).
        export_name: Name part of the folder; default ``model_type``.
        checkpoint_path: A checkpoint to export instead of the registered model.
        return_single_mask: Return one mask per prompt: SAM's single-mask output, except for a single
            positive point without a box, where the best of the three multimask outputs is returned (as
            :func:`micro_sam.prompt_based_segmentation.segment_from_points` does). False: all four outputs.
        gelu_approximate: Use the tanh approximation of GELU (for runtimes without an efficient exact GELU).
        use_stability_score: Return the stability score instead of the predicted IoU.
        return_extra_metrics: Also return the stability scores and the box areas of the masks.
        quantize_model: Also write ``model_quantized.onnx`` with 8-bit weights (onnxruntime's dynamic quantization).
        overwrite: Replace an existing export folder.

    Returns:
        The path of the exported model folder.

    Raises:
        ValueError: An existing export folder, an opset out of range or one that onnxruntime cannot run.
        ImportError: onnx / onnxruntime are missing.
    """
    import torch

    check_opset(opset)
    name = f"sam-{export_name or model_type}-decoder"
    target = _target(output_root, name, overwrite)
    sam = _load_sam(model_type, checkpoint_path)
    decoder = SamDecoderForOnnx(sam, return_single_mask=return_single_mask, use_stability_score=use_stability_score,
                                return_extra_metrics=return_extra_metrics)
    if gelu_approximate:
        for module in decoder.modules():
            if isinstance(module, torch.nn.GELU):
                module.approximate = "tanh"
    example = decoder.example_inputs()
    output_names = ["masks", "iou_predictions", "low_res_masks"]
    if return_extra_metrics:
        output_names = ["masks", "iou_predictions", "stability_scores", "areas", "low_res_masks"]

    def write(folder):
        weights = os.path.join(folder, "1")
        os.makedirs(weights)
        path = os.path.join(weights, "model.onnx")
        dynamic = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
        _export_onnx(decoder, tuple(example.values()), path, opset, list(example), output_names, dynamic)
        run_onnx(path, {k: v.numpy() for k, v in example.items()}, opset)
        if quantize_model:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = os.path.join(weights, "model_quantized.onnx")
            quantize_dynamic(model_input=path, model_output=quantized, per_channel=False, reduce_range=False,
                             weight_type=QuantType.QUInt8)
            run_onnx(quantized, {k: v.numpy() for k, v in example.items()}, opset)
        with open(os.path.join(folder, "config.pbtxt"), "w") as f:
            f.write(DECODER_CONFIG % name)

    _write_folder(target, write)
    return target


def export_bioengine_model(
    model_type: str,
    output_root: Union[str, os.PathLike],
    opset: int,
    export_name: Optional[str] = None,
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    return_single_mask: bool = True,
    gelu_approximate: bool = False,
    use_stability_score: bool = False,
    return_extra_metrics: bool = False,
    encoder_backend: str = "pytorch",
    overwrite: bool = False,
) -> None:
    """Export the image encoder (:func:`export_image_encoder`) and the ONNX decoder (:func:`export_onnx_model`).

    Both target folders are checked before anything is exported. Arguments as in those functions;
    ``encoder_backend`` is their ``backend``.
    """
    check_opset(opset)
    if encoder_backend not in _BACKENDS:
        raise ValueError(f"encoder_backend must be one of {_BACKENDS}, got {encoder_backend!r}.")
    name = export_name or model_type
    _target(output_root, f"sam-{name}-encoder", overwrite)
    _target(output_root, f"sam-{name}-decoder", overwrite)
    export_image_encoder(model_type, output_root, export_name, checkpoint_path, backend=encoder_backend,
                         opset=opset, overwrite=overwrite)
    export_onnx_model(model_type, output_root, opset=opset, export_name=export_name, checkpoint_path=checkpoint_path,
                      return_single_mask=return_single_mask, gelu_approximate=gelu_approximate,
                      use_stability_score=use_stability_score, return_extra_metrics=return_extra_metrics,
                      overwrite=overwrite)

