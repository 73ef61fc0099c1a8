"""Import segment_anything without importing torchvision: import this module before ``segment_anything``.

segment_anything imports four torchvision functions when it is imported (``batched_nms`` and ``box_area`` for
its automatic mask generator, ``resize`` and ``to_pil_image`` for ``ResizeLongestSide.apply_image``). Importing
torchvision costs 1.5 to 3 s (it loads ``torchvision.ops`` and ``torch._dynamo``), more than a third of the
start-up of a command line run, and micro_sam's inference uses none of the four: images are resized by
:func:`resize_longest_side` (the same PIL resize) and AMG imports torchvision's NMS where it runs.

So the first import of segment_anything here sees stand-ins for these four names, which import torchvision on
their first call and then call the real function: behaviour is unchanged, only the import is deferred. The
stand-in modules are removed from ``sys.modules`` right after, so a later ``import torchvision`` anywhere gets the
real package. If torchvision or segment_anything is already imported, nothing special happens.
"""
import importlib
import sys
import types

import numpy as np

_DEFERRED = {
    "torchvision.ops.boxes": ("batched_nms", "box_area"),
    "torchvision.transforms.functional": ("resize", "to_pil_image"),
}


def _deferred(module: str, name: str):
    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"``{module}.{name}``, imported on the first call (see micro_sam._segment_anything)."
    return call


def _import_without_torchvision() -> None:
    if "segment_anything" in sys.modules or "torchvision" in sys.modules:
        importlib.import_module("segment_anything")
        return
    stand_ins = {}
    for module, names in _DEFERRED.items():
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            stand_ins.setdefault(name, types.ModuleType(name))
        for name in names:
            setattr(stand_ins[module], name, _deferred(module, name))
    try:
        sys.modules.update(stand_ins)
        importlib.import_module("segment_anything")
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


def resize_longest_side(image: np.ndarray, target_length: int) -> np.ndarray:
    """Resize a uint8 (H, W, 3) image so that its longer side is ``target_length``, as SAM's transform does.

    The same computation as segment_anything's ``ResizeLongestSide.apply_image`` (torchvision's resize of a PIL
    image: PIL's bilinear resize to the size of ``get_preprocess_shape``), without importing torchvision.
    """
    from PIL import Image

    from segment_anything.utils.transforms import ResizeLongestSide

    height, width = ResizeLongestSide.get_preprocess_shape(image.shape[0], image.shape[1], target_length)
    return np.array(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))  # (writable)


_import_without_torchvision()
