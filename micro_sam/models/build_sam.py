"""Builders for the SAM models by encoder name (``vit_h``, ``vit_l``, ``vit_b``, ``vit_t``).

Every builder has the signature ``fn(checkpoint=None) -> segment_anything.modeling.Sam``. Without a
checkpoint the model has random weights, ready for ``load_state_dict``; with a checkpoint path the state
dict stored there is loaded (on CPU, ``weights_only=True``, strict).

``build_sam_vit_t`` also takes ``image_size`` (default 1024, SAM's input size). Its parameters do not depend on
the input size (TinyViT's attention biases belong to the windows, the prompt encoder's positional encoding is
continuous), so the same state dict runs at another size; a model trained at 512 must be built at 512 to see
objects at the scale it was trained on. Checkpoints record a non-default size as ``"image_size"``.
"""
import contextlib
import numbers
import os
import threading
from typing import Callable, Dict, Iterator, Optional, Union

import torch

from .. import _segment_anything  # noqa: F401  (imports segment_anything without torchvision)
from segment_anything.build_sam import build_sam_vit_b as _sa_vit_b
from segment_anything.build_sam import build_sam_vit_h as _sa_vit_h
from segment_anything.build_sam import build_sam_vit_l as _sa_vit_l
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from .tiny_vit import TinyViT

__all__ = [
    "sam_model_registry", "build_sam_vit_h", "build_sam_vit_l", "build_sam_vit_b", "build_sam_vit_t",
    "check_image_size", "skip_weight_init",
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


def build_sam_vit_h(checkpoint: Optional[PathLike] = None) -> Sam:
    """SAM with the ViT-H image encoder (segment_anything's architecture)."""
    return _load_checkpoint(lambda: _sa_vit_h(None), checkpoint)


def build_sam_vit_l(checkpoint: Optional[PathLike] = None) -> Sam:
    """SAM with the ViT-L image encoder (segment_anything's architecture)."""
    return _load_checkpoint(lambda: _sa_vit_l(None), checkpoint)


def build_sam_vit_b(checkpoint: Optional[PathLike] = None) -> Sam:
    """SAM with the ViT-B image encoder (segment_anything's architecture)."""
    return _load_checkpoint(lambda: _sa_vit_b(None), checkpoint)


def _build_vit_t(image_size: int) -> Sam:
    prompt_embed_dim = 256
    embedding_size = image_size // 16
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
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_embed_dim, mlp_dim=2048, num_heads=8),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam


def build_sam_vit_t(checkpoint: Optional[PathLike] = None, image_size: int = 1024) -> Sam:
    """SAM with the TinyViT image encoder of MobileSAM (``vit_t``), for square inputs of ``image_size``.

    With the default size 1024 the image embedding has shape ``(B, 256, 64, 64)``, in general
    ``(B, 256, image_size / 16, image_size / 16)``; prompt encoder and mask decoder are SAM's.

    Args:
        checkpoint: Optional path to a state dict of the full model to load.
        image_size: Side length of the encoder input, a multiple of 64 of at least 256 (1024 for MobileSAM).

    Returns:
        The model, in training mode as built by ``torch.nn.Module``.
    """
    image_size = check_image_size(image_size)
    return _load_checkpoint(lambda: _build_vit_t(image_size), checkpoint)


#: Model builders by encoder name; ``"default"`` is ``vit_h`` as in segment_anything.
sam_model_registry: Dict[str, Callable[..., Sam]] = {
    "default": build_sam_vit_h,
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
    "vit_t": build_sam_vit_t,
}
