"""Builders for the SAM models by encoder name (``vit_h``, ``vit_l``, ``vit_b``, ``vit_t``).

Every builder has the signature ``fn(checkpoint=None, num_multimask_outputs=3, image_size=1024) ->
segment_anything.modeling.Sam`` (micro_sam 1.8's). Without a checkpoint the model has random weights, ready for
``load_state_dict``; with a checkpoint path the state dict stored there is loaded (on CPU, ``weights_only=True``,
strict). ``build_sam`` is ``build_sam_vit_h``, as in segment_anything.

``num_multimask_outputs`` sets the number of masks the decoder predicts with ``multimask_output=True`` (3 for
SAM; the number of classes for semantic segmentation, see :mod:`micro_sam.models.sam_3d_wrapper`); it changes
the shapes of the mask tokens, output hypernetworks and IoU head.

``image_size`` is the side of the square encoder input (default 1024, SAM's). vit_t's parameters do not depend
on it (TinyViT's attention biases belong to the windows, the prompt encoder's positional encoding is
continuous), so the same state dict runs at another size; a model trained at 512 must be built at 512 to see
objects at the scale it was trained on. Checkpoints record a non-default vit_t size as ``"image_size"``. The ViT
encoders' absolute position embedding and the relative position tables of their global-attention blocks have
sizes that depend on it: 1024 weights are resized to the new grid when loaded with
``get_sam_model(..., image_size=..., flexible_load_checkpoint=True)``.
"""
import contextlib
import numbers
import os
import threading
from typing import Callable, Dict, Iterator, Optional, Union

import torch

from .. import _segment_anything  # noqa: F401  (imports segment_anything without torchvision)
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from .tiny_vit import TinyViT

__all__ = [
    "sam_model_registry", "build_sam", "build_sam_vit_h", "build_sam_vit_l", "build_sam_vit_b", "build_sam_vit_t",
    "check_image_size", "resize_position_tables", "skip_weight_init",
]

PathLike = Union[str, os.PathLike]


_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
    "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)
_SKIP_INIT_LOCK = threading.RLock()


@contextlib.contextmanager
def skip_weight_init() -> Iterator[None]:
    """Build modules without initialising their weights (``torch.nn.init`` functions do nothing), in this thread.

    For models whose every parameter is loaded from a checkpoint right after construction: random initialisation
    of vit_b's 90M parameters takes about a second on a 2-core CPU (vit_h several), and the result is
    overwritten. Load such models strictly, so that no parameter keeps the uninitialised memory. Other threads
    see the normal functions; builds within this context are serialised.
    """
    import torch.nn.init as init

    with _SKIP_INIT_LOCK:
        owner = threading.get_ident()
        originals = {name: getattr(init, name) for name in _INIT_FUNCTIONS if hasattr(init, name)}

        def skipping(original):
            def maybe_init(tensor, *args, **kwargs):
                if threading.get_ident() == owner:
                    return tensor
                return original(tensor, *args, **kwargs)
            return maybe_init

        for name, original in originals.items():
            setattr(init, name, skipping(original))
        try:
            yield
        finally:
            for name, original in originals.items():
                setattr(init, name, original)


def _load_checkpoint(build: Callable[[], Sam], checkpoint: Optional[PathLike]) -> Sam:
    if checkpoint is None:
        return build()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    with skip_weight_init():
        sam = build()
    sam.load_state_dict(state, strict=True)
    return sam


def check_image_size(image_size) -> int:
    """``image_size`` as int; ValueError unless it is an integer multiple of 64 of at least 256."""
    integral = isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool)
    if not integral or image_size < 256 or image_size % 64:
        raise ValueError(f"image_size must be a multiple of 64 of at least 256 (SAM: 1024), got {image_size!r}.")
    return int(image_size)


def _check_vit_image_size(image_size) -> int:
    integral = isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool)
    if not integral or image_size < 64 or image_size % 16:
        raise ValueError(f"image_size must be a multiple of 16 (the ViT patch size) of at least 64 (SAM: 1024), "
                         f"got {image_size!r}.")
    return int(image_size)


def _check_num_multimask_outputs(num_multimask_outputs) -> int:
    integral = isinstance(num_multimask_outputs, numbers.Integral) and not isinstance(num_multimask_outputs, bool)
    if not integral or num_multimask_outputs < 1:
        raise ValueError(f"num_multimask_outputs must be a positive integer (SAM: 3), got {num_multimask_outputs!r}.")
    return int(num_multimask_outputs)


def _prompt_parts(image_size: int, num_multimask_outputs: int):
    """SAM's prompt encoder and mask decoder for a square input of ``image_size`` (embedding grid / 16)."""
    grid = image_size // 16
    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                   input_image_size=(image_size, image_size), mask_in_chans=16)
    mask_decoder = MaskDecoder(
        num_multimask_outputs=num_multimask_outputs,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def _build_vit(embed_dim: int, depth: int, num_heads: int, global_attn_indexes, image_size: int,
               num_multimask_outputs: int) -> Sam:
    """segment_anything's SAM with a ViT encoder (same modules and parameter names), in eval mode."""
    from functools import partial

    encoder = ImageEncoderViT(
        depth=depth, embed_dim=embed_dim, img_size=image_size, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=num_heads, patch_size=16, qkv_bias=True,
        use_rel_pos=True, global_attn_indexes=global_attn_indexes, window_size=14, out_chans=256,
    )
    prompt_encoder, mask_decoder = _prompt_parts(image_size, num_multimask_outputs)
    sam = Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder,
              pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return sam.eval()


_VIT_SETTINGS = {  # embed_dim, depth, num_heads, global attention blocks
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
}


def _vit_builder(name: str):
    embed_dim, depth, num_heads, global_attn_indexes = _VIT_SETTINGS[name]

    def build(checkpoint: Optional[PathLike] = None, num_multimask_outputs: int = 3, image_size: int = 1024) -> Sam:
        n_outputs = _check_num_multimask_outputs(num_multimask_outputs)
        size = _check_vit_image_size(image_size)
        return _load_checkpoint(
            lambda: _build_vit(embed_dim, depth, num_heads, global_attn_indexes, size, n_outputs), checkpoint
        )

    return build


_BUILDER_DOC = """SAM with the {name} image encoder (segment_anything's architecture{extra}).

    Args:
        checkpoint: Optional path to a state dict of the full model to load (strictly).
        num_multimask_outputs: Masks predicted with ``multimask_output=True`` (SAM: 3).
        image_size: Side of the square encoder input, a multiple of 16 (SAM: 1024); the image embedding is
            ``(B, 256, image_size / 16, image_size / 16)``.

    Returns:
        The model, in eval mode.

    Raises:
        ValueError: An invalid ``num_multimask_outputs`` or ``image_size``.
    """


def build_sam_vit_h(checkpoint: Optional[PathLike] = None, num_multimask_outputs: int = 3,
                    image_size: int = 1024) -> Sam:
    return _vit_builder("vit_h")(checkpoint, num_multimask_outputs, image_size)


def build_sam_vit_l(checkpoint: Optional[PathLike] = None, num_multimask_outputs: int = 3,
                    image_size: int = 1024) -> Sam:
    return _vit_builder("vit_l")(checkpoint, num_multimask_outputs, image_size)


def build_sam_vit_b(checkpoint: Optional[PathLike] = None, num_multimask_outputs: int = 3,
                    image_size: int = 1024) -> Sam:
    return _vit_builder("vit_b")(checkpoint, num_multimask_outputs, image_size)


build_sam_vit_h.__doc__ = _BUILDER_DOC.format(name="ViT-H", extra="; 32 blocks")
build_sam_vit_l.__doc__ = _BUILDER_DOC.format(name="ViT-L", extra="; 24 blocks")
build_sam_vit_b.__doc__ = _BUILDER_DOC.format(name="ViT-B", extra="; 12 blocks")
build_sam = build_sam_vit_h


def _build_vit_t(image_size: int, num_multimask_outputs: int = 3) -> Sam:
    encoder = TinyViT(
        img_size=image_size,
        in_chans=3,
        num_classes=1000,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )
    prompt_encoder, mask_decoder = _prompt_parts(image_size, num_multimask_outputs)
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam


def build_sam_vit_t(checkpoint: Optional[PathLike] = None, image_size: int = 1024,
                    num_multimask_outputs: int = 3) -> Sam:
    """SAM with the TinyViT image encoder of MobileSAM (``vit_t``), for square inputs of ``image_size``.

    With the default size 1024 the image embedding has shape ``(B, 256, 64, 64)``, in general
    ``(B, 256, image_size / 16, image_size / 16)``; prompt encoder and mask decoder are SAM's.

    Args:
        checkpoint: Optional path to a state dict of the full model to load.
        image_size: Side length of the encoder input, a multiple of 64 of at least 256 (1024 for MobileSAM).
        num_multimask_outputs: Masks predicted with ``multimask_output=True`` (SAM: 3).

    Returns:
        The model, in training mode as built by ``torch.nn.Module``.
    """
    image_size = check_image_size(image_size)
    n_outputs = _check_num_multimask_outputs(num_multimask_outputs)
    return _load_checkpoint(lambda: _build_vit_t(image_size, n_outputs), checkpoint)


#: Model builders by encoder name; ``"default"`` is ``vit_h`` as in segment_anything.
sam_model_registry: Dict[str, Callable[..., Sam]] = {
    "default": build_sam_vit_h,
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
    "vit_t": build_sam_vit_t,
}


def resize_position_tables(state: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Resize a ViT checkpoint's position tables to the grid of a model built for another ``image_size``.

    ``image_encoder.pos_embed`` (1, H, W, C) is resized bicubically to the model's grid, and the relative
    position tables ``rel_pos_h`` / ``rel_pos_w`` (2 S - 1, C) of the global-attention blocks linearly to the
    model's length (segment_anything's attention interpolates them the same way when the sizes differ).

    Args:
        state: The checkpoint's state dict.
        own: The model's state dict (for the target shapes).

    Returns:
        A new dict with the resized tables; other entries are the same objects.
    """
    import torch.nn.functional as F

    resized = dict(state)
    for key, value in state.items():
        target = own.get(key)
        if target is None or target.shape == value.shape or not torch.is_floating_point(value):
            continue
        if key.endswith("pos_embed") and value.ndim == 4 and value.shape[-1] == target.shape[-1]:
            grid = F.interpolate(value.permute(0, 3, 1, 2).float(), size=tuple(target.shape[1:3]), mode="bicubic",
                                 align_corners=False)
            resized[key] = grid.permute(0, 2, 3, 1).to(value.dtype).contiguous()
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and value.ndim == 2 and value.shape[1] == target.shape[1]:
            table = F.interpolate(value.t()[None].float(), size=target.shape[0], mode="linear", align_corners=False)
            resized[key] = table[0].t().to(value.dtype).contiguous()
    return resized
