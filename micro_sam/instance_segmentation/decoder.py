"""The UNETR decoder for automatic instance segmentation (AIS) on top of a SAM image encoder.

The network is torch_em's ``UNETR`` (without skip connections) whose encoder is SAM's image encoder. It
predicts three maps per pixel, all in [0, 1]: foreground probability, distance to the object centre and
distance to the object boundary (both normalised per object). The decoder state stored in micro_sam's model
files (``decoder_state``) holds all UNETR parameters except the encoder's, under torch_em's parameter names.

:class:`DecoderAdapter` runs only the decoder part, on precomputed image embeddings, so that the encoder is
never run twice for an image.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..models.lean_unetr import maybe_decode
from ..models.unetr_decoder import UNETRDecoder, embed_dim_of, uses_conv_transpose

__all__ = ["DecoderAdapter", "get_unetr", "get_decoder", "get_predictor_and_decoder"]

# The UNETR sub-modules that make up the decoder (everything except "encoder").
_DECODER_MODULES = (
    "base", "out_conv", "deconv_out", "decoder_head", "final_activation",
    "decoder", "deconv1", "deconv2", "deconv3", "deconv4",
)


def _uses_conv_transpose(decoder_state: Mapping[str, torch.Tensor]) -> bool:
    # torch_em wraps transposed-convolution upsamplers as `<sampler>.block.*`; the default
    # (interpolation + convolution) upsampler stores its weights as `<sampler>.conv.*`.
    return uses_conv_transpose(decoder_state)


def _load_decoder_state(unetr: torch.nn.Module, decoder_state: Mapping[str, torch.Tensor],
                        flexible_load_checkpoint: bool) -> None:
    full_state = unetr.state_dict()
    missing, mismatched = [], []
    for name, value in full_state.items():
        if name.startswith("encoder."):
            continue
        if name not in decoder_state:
            missing.append(name)
            continue
        new_value = decoder_state[name]
        if tuple(new_value.shape) != tuple(value.shape):
            mismatched.append(f"{name} (expected {tuple(value.shape)}, got {tuple(new_value.shape)})")
            continue
        full_state[name] = new_value

    if (missing or mismatched) and not flexible_load_checkpoint:
        problems = []
        if missing:
            problems.append(f"missing parameters: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if mismatched:
            problems.append(f"shape mismatches: {mismatched[:5]}{' ...' if len(mismatched) > 5 else ''}")
        raise RuntimeError(
            "The decoder state does not match the UNETR decoder for this image encoder: " + "; ".join(problems)
            + ". Was the decoder trained for a different SAM model? Pass flexible_load_checkpoint=True to "
            "re-initialise the parameters that do not match."
        )
    for name in missing:
        warnings.warn(f"Parameter '{name}' is not in the decoder state; it keeps its random initialisation.")
    for name in mismatched:
        warnings.warn(f"Parameter {name} has a different shape in the decoder state; it is re-initialised.")
    unetr.load_state_dict(full_state)


def get_unetr(
    image_encoder: torch.nn.Module,
    decoder_state: Optional[Mapping[str, torch.Tensor]] = None,
    device: Optional[Union[str, torch.device]] = None,
    out_channels: int = 3,
    flexible_load_checkpoint: bool = False,
    final_activation: Optional[str] = "Sigmoid",
) -> torch.nn.Module:
    """Build the UNETR for automatic instance segmentation around a SAM image encoder.

    Args:
        image_encoder: The SAM image encoder (``sam.image_encoder``); it is shared, not copied.
        decoder_state: The decoder parameters (all UNETR parameters except ``encoder.*``), e.g. the
            ``decoder_state`` of a micro_sam model file. None leaves the decoder randomly initialised.
            Whether the upsamplers are transposed convolutions is read from its parameter names.
        device: The device; None picks the best available one.
        out_channels: Number of output maps (3: foreground, centre distance, boundary distance).
        flexible_load_checkpoint: Re-initialise (with a warning) the parameters missing from ``decoder_state``
            or of another shape, instead of raising.
        final_activation: Name of the ``torch.nn`` activation applied to the output, or None.

    Returns:
        The ``torch_em.model.UNETR`` on ``device``, mapping (B, 3, H, W) images in [0, 255] to
        (B, out_channels, H, W) maps.

    Raises:
        RuntimeError: ``decoder_state`` does not fit the decoder for this encoder (and not flexible).
    """
    from torch_em.model import UNETR

    from ..util import get_device

    device = get_device(device)
    use_conv_transpose = False if decoder_state is None else _uses_conv_transpose(decoder_state)
    unetr = UNETR(
        backbone="sam",
        encoder=image_encoder,
        out_channels=out_channels,
        use_sam_stats=True,
        final_activation=final_activation,
        use_skip_connection=False,
        resize_input=True,
        use_conv_transpose=use_conv_transpose,
    )
    if decoder_state is not None:
        _load_decoder_state(unetr, decoder_state, flexible_load_checkpoint)
    return unetr.to(device)


@contextmanager
def _batch_statistics(module: torch.nn.Module):
    """Let the batch-norm layers of ``module`` normalise with the statistics of the current batch.

    The running statistics stored in the module are neither used nor updated.
    """
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in norms]
    try:
        for m in norms:
            m.training, m.track_running_stats = True, False
        yield
    finally:
        for m, (training, track) in zip(norms, saved):
            m.training, m.track_running_stats = training, track


class DecoderAdapter(torch.nn.Module):
    """The decoder part of a UNETR, applied to precomputed SAM image embeddings.

    Its ``state_dict`` has the same parameter names as the UNETR's decoder state (no ``encoder.*``).

    The published micro_sam applies its decoders with the batch-norm layers in training mode, i.e. each
    prediction is normalised with the statistics of its own batch. With ``use_batch_statistics=True`` (default)
    this adapter does the same, so the published decoders give the same maps as in micro_sam, but without
    changing the stored running statistics. Inputs are therefore predicted one image at a time by the
    segmenters, so that results do not depend on the batch size.

    Args:
        unetr: A UNETR from :func:`get_unetr` (built without skip connections), or its decoder alone, a
            :class:`micro_sam.models.unetr_decoder.UNETRDecoder` (what :func:`get_decoder` builds).
        use_batch_statistics: Normalise with per-batch statistics (micro_sam's behaviour) instead of the
            stored running statistics.
    """

    def __init__(self, unetr: torch.nn.Module, use_batch_statistics: bool = True) -> None:
        super().__init__()
        self.use_batch_statistics = use_batch_statistics
        if getattr(unetr, "use_skip_connection", False):
            raise ValueError("DecoderAdapter needs a UNETR built with use_skip_connection=False.")
        for name in _DECODER_MODULES:
            setattr(self, name, getattr(unetr, name))
        encoder = getattr(unetr, "encoder", None)  # (a UNETRDecoder has none: it records the size)
        self.encoder_img_size = int(unetr.encoder_img_size if encoder is None else encoder.img_size)
        self.embed_dim = int(unetr.embed_dim)

    def _decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        lean = maybe_decode(self, embeddings)  # the same maps with less memory; None: not applicable
        if lean is not None:
            return lean
        # Upsample the embeddings step by step; these feed the decoder's levels from coarse to fine.
        z9 = self.deconv1(embeddings)
        z6 = self.deconv2(z9)
        z3 = self.deconv3(z6)
        z0 = self.deconv4(z3)
        x = self.decoder(self.base(embeddings), encoder_inputs=[z9, z6, z3])
        x = self.decoder_head(torch.cat([self.deconv_out(x), z0], dim=1))
        x = self.out_conv(x)
        return x if self.final_activation is None else self.final_activation(x)

    def _resize(self, maps: torch.Tensor, input_shape: Tuple[int, int],
                original_shape: Tuple[int, int]) -> torch.Tensor:
        # Maps cover the padded square encoder input; crop the image part and resize it to the original size.
        size = self.encoder_img_size
        maps = F.interpolate(maps, (size, size), mode="bilinear", align_corners=False)
        maps = maps[..., :int(input_shape[0]), :int(input_shape[1])]
        return F.interpolate(maps, tuple(int(s) for s in original_shape), mode="bilinear", align_corners=False)

    def forward(self, input_: torch.Tensor, input_shape: Tuple[int, int],
                original_shape: Tuple[int, int]) -> torch.Tensor:
        """Predict the output maps from image embeddings.

        Args:
            input_: (B, 256, 64, 64) image embeddings.
            input_shape: (h, w) of the resized image inside the padded encoder input (``input_size``).
            original_shape: (H, W) of the original image (``original_size``).

        Returns:
            (B, out_channels, H, W) maps.
        """
        if input_.ndim != 4 or input_.shape[1] != self.embed_dim:
            raise ValueError(
                f"Expected image embeddings of shape (B, {self.embed_dim}, h, w), got {tuple(input_.shape)}."
            )
        if self.use_batch_statistics:
            with _batch_statistics(self):
                maps = self._decode(input_)
        else:
            maps = self._decode(input_)
        return self._resize(maps, input_shape, original_shape)


def get_decoder(
    image_encoder: torch.nn.Module,
    decoder_state: Mapping[str, torch.Tensor],
    device: Optional[Union[str, torch.device]] = None,
) -> DecoderAdapter:
    """Build the instance segmentation decoder (applied to precomputed embeddings).

    Args:
        image_encoder: The SAM image encoder the decoder was trained with.
        decoder_state: The decoder parameters (a micro_sam model file's ``decoder_state``).
        device: The device; None picks the best available one.

    Returns:
        The :class:`DecoderAdapter`, in eval mode.

    Raises:
        RuntimeError: The decoder state does not fit this encoder.
    """
    from ..util import get_device

    # The decoder alone, built without torch_em (see micro_sam.models.unetr_decoder): the same parameters and maps
    # as get_unetr's, without importing torch_em's training code.
    network = UNETRDecoder(embed_dim=embed_dim_of(image_encoder), encoder_img_size=int(image_encoder.img_size),
                           use_conv_transpose=uses_conv_transpose(decoder_state))
    _load_decoder_state(network, decoder_state, flexible_load_checkpoint=False)
    return DecoderAdapter(network.to(get_device(device))).eval()


def get_predictor_and_decoder(
    model_type: str,
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    device: Optional[Union[str, torch.device]] = None,
    peft_kwargs: Optional[Dict] = None,
):
    """Load a SAM predictor together with its instance segmentation decoder.

    Args:
        model_type: A registered model name with a decoder (e.g. "vit_b_lm"), or the architecture of
            ``checkpoint_path``.
        checkpoint_path: A checkpoint holding both the SAM weights and a ``decoder_state``.
        device: The device; None picks the best available one.
        peft_kwargs: PEFT settings of the model (see :func:`micro_sam.util.get_sam_model`).

    Returns:
        The ``SamPredictor`` and the :class:`DecoderAdapter`.

    Raises:
        ValueError: The model or checkpoint has no decoder state.
    """
    from ..util import get_device, get_sam_model

    device = get_device(device)
    predictor, state = get_sam_model(
        model_type=model_type, checkpoint_path=checkpoint_path, device=device, return_state=True,
        peft_kwargs=peft_kwargs,
    )
    if not isinstance(state, Mapping) or state.get("decoder_state") is None:
        source = f"checkpoint '{os.fspath(checkpoint_path)}'" if checkpoint_path is not None \
            else f"model '{model_type}'"
        raise ValueError(
            f"The {source} has no instance segmentation decoder ('decoder_state'); use a model with a decoder "
            "(e.g. 'vit_b_lm') or automatic mask generation (AMG) instead."
        )
    decoder = get_decoder(predictor.model.image_encoder, state["decoder_state"], device)
    return predictor, decoder
