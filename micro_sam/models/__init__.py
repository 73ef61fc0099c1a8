"""Network architectures: SAM builders by encoder name, the TinyViT (``vit_t``) encoder and PEFT wrappers.

The names are imported on first use, so that submodules which need only torch (e.g.
:mod:`micro_sam.models.fast_mask_decoder`) do not import segment_anything.
"""
import importlib

__all__ = [
    "sam_model_registry", "TinyViT", "build_sam", "build_sam_vit_h", "build_sam_vit_l", "build_sam_vit_b",
    "build_sam_vit_t", "PEFT_Sam",
]

_SOURCES = {"TinyViT": ".tiny_vit", "PEFT_Sam": ".peft_sam"}


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES.get(name, ".build_sam"), __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
