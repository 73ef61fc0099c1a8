"""The modules traced for the ONNX export, the opset checks and a test run with onnxruntime."""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MIN_OPSET = 14  # scaled_dot_product_attention needs opset 14
MAX_OPSET = 20  # the TorchScript-based exporter (torch.onnx.export(..., dynamo=False)) stops here


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ImportError("The ONNX export needs onnx and onnxruntime: pip install 'micro_sam[export]'.") from None
    return onnx, onnxruntime


def probe_runtime(opset: int) -> None:
    """Check that onnxruntime can run models of this opset (with a one-node model, before any real export).

    Raises:
        ValueError: If onnxruntime refuses the opset.
    """
    onnx, onnxruntime = _require_onnx()
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [value],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", int(opset))])
    model.ir_version = min(model.ir_version, 8)
    try:
        onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ValueError(f"onnxruntime {onnxruntime.__version__} cannot run ONNX opset {opset} "
                         f"({str(error).splitlines()[0][:200]}); choose a lower opset.") from None


def check_opset(opset: int) -> int:
    """Validate an opset for the export: an integer in [MIN_OPSET, MAX_OPSET] that onnxruntime can run.

    Raises:
        ValueError: Otherwise, naming the valid range.
        ImportError: onnx / onnxruntime are missing.
    """
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)):
        raise ValueError(f"opset must be an integer, got {opset!r}.")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be between {MIN_OPSET} and {MAX_OPSET} (the range the ONNX exporter of "
                         f"torch {torch.__version__} supports for SAM), got {opset}.")
    probe_runtime(int(opset))
    return int(opset)


def run_onnx(path: str, inputs: Dict[str, np.ndarray], opset: int):
    """Load and run an exported model with onnxruntime on the CPU.

    Raises:
        ValueError: If onnxruntime cannot load or run it.
    """
    _, onnxruntime = _require_onnx()
    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return session.run(None, inputs)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"onnxruntime {onnxruntime.__version__} cannot run the exported model (opset {opset}): "
                         f"{str(error).splitlines()[0][:300]}") from None


class SamEncoderForOnnx(nn.Module):
    """Normalise, pad and encode an image resized to the encoder's input size (longest side).

    Input ``image``: (1, 3, h, w) float32, values 0..255, ``max(h, w)`` = encoder input size.
    Output ``image_embeddings``: (1, 256, G, G).
    """

    def __init__(self, sam) -> None:
        super().__init__()
        self.sam = sam
        self.size = int(sam.image_encoder.img_size)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, h, w) resized image, values 0..255 -> (1, 256, G, G) embeddings."""
        x = (image - self.sam.pixel_mean) / self.sam.pixel_std
        h, w = x.shape[-2:]
        x = F.pad(x, (0, self.size - w, 0, self.size - h))
        return self.sam.image_encoder(x)


class SamDecoderForOnnx(nn.Module):
    """SAM's prompt encoder and mask decoder with segment_anything's ONNX interface (see bioengine_export).

    Unlike segment_anything's ``SamOnnxModel``, the crop of the padded mask to the image is computed from the
    ``orig_im_size`` input at run time, so the exported model is right for every image size and aspect ratio.
    """

    def __init__(self, sam, return_single_mask: bool = True, use_stability_score: bool = False,
                 return_extra_metrics: bool = False) -> None:
        super().__init__()
        self.sam = sam
        self.size = int(sam.image_encoder.img_size)
        self.return_single_mask = return_single_mask
        self.use_stability_score = use_stability_score
        self.return_extra_metrics = return_extra_metrics
        self.stability_offset = 1.0

    def example_inputs(self) -> Dict[str, torch.Tensor]:
        """Inputs to trace the export with."""
        grid = self.sam.prompt_encoder.image_embedding_size
        return {
            "image_embeddings": torch.randn(1, self.sam.prompt_encoder.embed_dim, *grid),
            "point_coords": torch.randint(0, self.size, (1, 3, 2)).float(),
            "point_labels": torch.tensor([[1.0, 0.0, -1.0]]),
            "mask_input": torch.randn(1, 1, 4 * grid[0], 4 * grid[1]),
            "has_mask_input": torch.tensor([1.0]),
            "orig_im_size": torch.tensor([300.0, 500.0]),
        }

    def _point_embeddings(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        encoder = self.sam.prompt_encoder
        embedding = encoder.pe_layer._pe_encoding((coords + 0.5) / self.size)
        labels = labels.unsqueeze(-1)
        embedding = torch.where(labels == -1, encoder.not_a_point_embed.weight, embedding)
        for i, point_embedding in enumerate(encoder.point_embeddings):
            embedding = embedding + point_embedding.weight * (labels == i)
        return embedding

    def _mask_embeddings(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        encoder = self.sam.prompt_encoder
        no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask_input * encoder.mask_downscaling(mask_input) + (1 - has_mask_input) * no_mask

    def _to_image(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        masks = F.interpolate(masks, (self.size, self.size), mode="bilinear", align_corners=False)
        size = orig_im_size.to(torch.float32)
        resized = torch.floor(size * (self.size / size.max()) + 0.5).to(torch.int64)
        masks = masks.index_select(2, torch.arange(resized[0])).index_select(3, torch.arange(resized[1]))
        original = orig_im_size.to(torch.int64)
        return F.interpolate(masks, (original[0], original[1]), mode="bilinear", align_corners=False)

    @staticmethod
    def _single_mask_index(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, 1) output to keep: SAM's single-mask output (0), or for one positive point without a box, which is
        ambiguous, the best of the three multimask outputs."""
        real = ((labels == 0) | (labels == 1)).sum(dim=1)
        positive = (labels == 1).sum(dim=1)
        box = ((labels == 2) | (labels == 3)).sum(dim=1)
        ambiguous = (real == 1) & (positive == 1) & (box == 0)
        best = torch.argmax(scores[:, 1:], dim=1) + 1
        return torch.where(ambiguous, best, torch.zeros_like(best))[:, None]

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input, orig_im_size):
        """See the module docstring of :mod:`micro_sam.bioimageio.bioengine_export` for the inputs / outputs."""
        sparse = self._point_embeddings(point_coords, point_labels)
        dense = self._mask_embeddings(mask_input, has_mask_input)
        low_res, scores = self.sam.mask_decoder.predict_masks(
            image_embeddings=image_embeddings, image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
        )
        threshold = self.sam.mask_threshold
        stability = ((low_res > threshold + self.stability_offset).sum((-1, -2)).float()
                     / (low_res > threshold - self.stability_offset).sum((-1, -2)).float().clamp_min(1.0))
        if self.use_stability_score:
            scores = stability
        if self.return_single_mask:
            index = self._single_mask_index(scores, point_labels)
            low_res = torch.gather(low_res, 1, index[:, :, None, None].expand(-1, 1, *low_res.shape[2:]))
            scores, stability = torch.gather(scores, 1, index), torch.gather(stability, 1, index)
        masks = self._to_image(low_res, orig_im_size)
        if self.return_extra_metrics:
            areas = (masks > threshold).sum((-1, -2)).float()
            return masks, scores, stability, areas, low_res
        return masks, scores, low_res
