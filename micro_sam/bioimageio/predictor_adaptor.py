"""SAM as one ``torch.nn.Module`` with tensor inputs and outputs: the architecture of exported bioimage.io models.

bioimage.io tools build the model with ``PredictorAdaptor(**kwargs)``, load the weights with
``load_state_dict`` and call ``forward`` with the tensors named in the model description.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from segment_anything import SamPredictor
from torch import nn

from micro_sam.models.build_sam import sam_model_registry, skip_weight_init

_SAM_PREFIX = "sam."
_DECODER_PREFIX = "decoder."


def split_state(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Split an adaptor state dict into the SAM state and the decoder state (empty without decoder).

    A plain SAM state dict (no ``sam.`` prefixes) is returned as the SAM state.
    """
    if not any(key.startswith(_SAM_PREFIX) for key in state):
        return dict(state), {}
    sam_state = {k[len(_SAM_PREFIX):]: v for k, v in state.items() if k.startswith(_SAM_PREFIX)}
    decoder_state = {k[len(_DECODER_PREFIX):]: v for k, v in state.items() if k.startswith(_DECODER_PREFIX)}
    unknown = [k for k in state if not k.startswith((_SAM_PREFIX, _DECODER_PREFIX))]
    if unknown:
        raise ValueError(f"Unexpected parameters {unknown[:3]} in the state: keys must start with 'sam.' or "
                         "'decoder.'.")
    return sam_state, decoder_state


def join_state(sam_state: Mapping[str, torch.Tensor],
               decoder_state: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """The flat state dict (``sam.*`` and ``decoder.*`` tensors only) that :class:`PredictorAdaptor` loads."""
    state = {f"{_SAM_PREFIX}{k}": v for k, v in sam_state.items()}
    state.update({f"{_DECODER_PREFIX}{k}": v for k, v in (decoder_state or {}).items()})
    return state


class PredictorAdaptor(nn.Module):
    """SAM's prompt-based segmentation (and, with a decoder, automatic instance segmentation) on tensors.

    The parameters are left uninitialised: load weights with :meth:`load_state_dict` before using it.

    Args:
        model_type: The architecture: "vit_t", "vit_b", "vit_l" or "vit_h" (a name with a suffix such as
            "vit_b_lm" selects its architecture).
        image_size: The encoder input size the model was trained for (1024 for SAM; the bundled ``vit_t_demo``
            uses 640).
    """

    def __init__(self, model_type: str, image_size: int = 1024) -> None:
        super().__init__()
        architecture = model_type[:5]
        if architecture not in ("vit_t", "vit_b", "vit_l", "vit_h"):
            raise ValueError(f"model_type must start with vit_t, vit_b, vit_l or vit_h, got {model_type!r}.")
        builder = sam_model_registry[architecture]
        # The weights are always loaded next (bioimage.io tools call load_state_dict strictly): skip the random
        # initialisation, which takes longer than the rest of the construction.
        with skip_weight_init():
            self.sam_model = builder(image_size=image_size) if image_size != 1024 else builder()
        self.sam_model.eval()  # inference only: batch norms (vit_t) use their stored statistics
        self.sam = SamPredictor(self.sam_model)
        self.decoder = None  # set by load_state_dict when the weights hold an instance segmentation decoder
        self._cache_key = None

    def load_state_dict(self, state: Mapping[str, torch.Tensor], **kwargs):
        """Load SAM weights (``sam.*``, or a plain SAM state dict) and an optional decoder (``decoder.*``).

        Args:
            state: The state dict (see :func:`join_state`).
            kwargs: ``strict`` / ``assign`` for ``torch.nn.Module.load_state_dict`` of the SAM part.

        Returns:
            The ``load_state_dict`` result of the SAM part (missing and unexpected keys).
        """
        sam_state, decoder_state = split_state(state)
        result = self.sam_model.load_state_dict(sam_state, **kwargs)
        if decoder_state:
            from micro_sam.instance_segmentation import get_decoder

            device = next(self.sam_model.parameters()).device
            self.decoder = get_decoder(self.sam_model.image_encoder, decoder_state, device=device)
        return result

    def _set_image(self, image: torch.Tensor, embeddings: Optional[torch.Tensor]) -> None:
        # preprocess like micro_sam (SamPredictor.set_image on the uint8 image), so that embeddings and masks
        # are the ones micro_sam computes
        array = image[0].detach().cpu().numpy().transpose(1, 2, 0)
        array = np.clip(np.round(array), 0, 255).astype("uint8") if array.dtype != np.uint8 else array
        self._image = array  # AIS judges the image itself (an image without signal has no objects)
        if embeddings is not None:
            self.sam.reset_image()
            self.sam.features = embeddings.to(next(self.sam_model.parameters()).device, torch.float32)
            self.sam.original_size = array.shape[:2]
            self.sam.input_size = self.sam.transform.get_preprocess_shape(*array.shape[:2],
                                                                          self.sam.transform.target_length)
            self.sam.is_image_set = True
            self._cache_key = None
            return
        key = (array.shape, hash(array.tobytes()))
        if key != self._cache_key or not self.sam.is_image_set:
            self.sam.set_image(np.ascontiguousarray(array))
            self._cache_key = key

    def _instance_segmentation(self) -> Tuple[torch.Tensor, torch.Tensor]:
        from micro_sam.instance_segmentation import InstanceSegmentationWithDecoder

        segmenter = InstanceSegmentationWithDecoder(self.sam, self.decoder)
        embeddings = {"features": self.sam.features, "input_size": tuple(self.sam.input_size),
                      "original_size": tuple(self.sam.original_size)}
        segmenter.initialize(self._image, image_embeddings=embeddings)
        segmentation = np.asarray(segmenter.generate(output_mode="instance_segmentation"))
        ids = np.unique(segmentation)
        ids = ids[ids != 0]
        masks = torch.from_numpy((segmentation[None] == ids[:, None, None]).astype("uint8"))
        return masks[None, :, None], torch.ones((1, len(ids), 1), dtype=torch.float32)

    @torch.no_grad()
    def forward(
        self,
        image: torch.Tensor,
        box_prompts: Optional[torch.Tensor] = None,
        point_prompts: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        mask_prompts: Optional[torch.Tensor] = None,
        embeddings: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Segment one object per prompt (or, without prompts and with a decoder, all objects).

        Args:
            image: (1, 3, H, W) image, values in [0, 255].
            box_prompts: (1, N, 4) boxes as XYXY ``[x0, y0, x1, y1]`` in image pixels.
            point_prompts: (1, N, P, 2) points as (x, y) in image pixels.
            point_labels: (1, N, P) labels, 1 foreground, 0 background.
            mask_prompts: (1, N, 1, M, M) mask logits, M = 4 x the embedding grid (256 for SAM's 1024 input).
            embeddings: (1, 256, G, G) precomputed image embeddings of ``image``; computed when None.

        Returns:
            masks (1, N, 1, H, W) uint8; scores (1, N, 1) predicted IoU (1 for automatic instances);
            embeddings (1, 256, G, G).

        Raises:
            ValueError: For a batch size other than 1, points without labels, or no prompt without a decoder.
        """
        if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
            raise ValueError(f"image must have shape (1, 3, H, W), got {tuple(image.shape)}.")
        self._set_image(image, embeddings)
        if box_prompts is None and point_prompts is None and mask_prompts is None:
            if self.decoder is None:
                raise ValueError("This model has no instance segmentation decoder: pass at least one prompt "
                                 "(box_prompts, point_prompts or mask_prompts).")
            masks, scores = self._instance_segmentation()
            return masks, scores, self.sam.get_image_embedding()
        if (point_prompts is None) != (point_labels is None):
            raise ValueError("point_prompts and point_labels must be given together.")
        device = self.sam.device
        boxes = coords = labels = mask_input = None
        if box_prompts is not None:
            boxes = self.sam.transform.apply_boxes_torch(box_prompts[0].float(), self.sam.original_size).to(device)
        if point_prompts is not None:
            coords = self.sam.transform.apply_coords_torch(point_prompts[0].float(), self.sam.original_size)
            coords, labels = coords.to(device), point_labels[0].to(device)
        if mask_prompts is not None:
            mask_input = mask_prompts[0].float().to(device)
        masks, scores, _ = self.sam.predict_torch(coords, labels, boxes=boxes, mask_input=mask_input,
                                                  multimask_output=False)
        return masks[None].to(torch.uint8), scores[None], self.sam.get_image_embedding()
