"""Network architectures: SAM builders by encoder name and the TinyViT (``vit_t``) encoder."""
from .build_sam import build_sam_vit_b, build_sam_vit_h, build_sam_vit_l, build_sam_vit_t, sam_model_registry
from .tiny_vit import TinyViT

__all__ = [
    "sam_model_registry", "TinyViT", "build_sam_vit_h", "build_sam_vit_l", "build_sam_vit_b", "build_sam_vit_t",
]
