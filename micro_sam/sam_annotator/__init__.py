"""The interactive annotation tools for napari: 2D, 3D, tracking, image series, the training UI and the object
classifier.

This is the only part of micro_sam that needs napari and a Qt binding (``pip install "micro_sam[gui]"``).
Start a tool from Python (:func:`annotator_2d`, :func:`annotator_3d`, :func:`annotator_tracking`,
:func:`image_series_annotator`, :func:`image_folder_annotator`), from the command line (``micro_sam.annotator_2d``,
``micro_sam.annotator_3d``, ``micro_sam.annotator_tracking``, ``micro_sam.image_series_annotator``) or from
napari's Plugins menu.
"""
try:
    import napari  # noqa: F401
    import qtpy  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"micro_sam.sam_annotator needs napari and a Qt binding ({error}); install them with "
        "pip install \"micro_sam[gui]\"."
    ) from None



def _import_torch_before_opengl() -> None:
    """Import torch's compiler stack (and with it triton) before napari creates an OpenGL context.

    With Mesa's OpenGL (software rendering, e.g. under Xvfb or on machines without a GPU driver) the process has
    Mesa's LLVM loaded, and importing triton afterwards crashes the process (segmentation fault). torch imports
    triton when torchvision (used by segment_anything) is imported. So torch / torchvision are imported here,
    while no OpenGL context exists; when napari already has one (the tools are opened from napari's plugin
    menu) and Mesa's LLVM is loaded, triton is marked as unavailable instead. The tools do not use triton.
    """
    import sys

    if "triton" in sys.modules or "torch._dynamo" in sys.modules:
        return
    try:
        with open("/proc/self/maps") as f:
            mesa_llvm_loaded = "libLLVM" in f.read()
    except OSError:  # not Linux
        mesa_llvm_loaded = False
    if mesa_llvm_loaded:
        sys.modules["triton"] = None  # torch then treats triton as not installed
    else:
        import torchvision  # noqa: F401 - imports torch._dynamo, which imports triton


_import_torch_before_opengl()

from .annotator_2d import annotator_2d  # noqa: E402
from .annotator_3d import annotator_3d  # noqa: E402
from .annotator_tracking import annotator_tracking  # noqa: E402
from .image_series_annotator import image_folder_annotator, image_series_annotator  # noqa: E402
from .object_classifier import image_series_object_classifier, object_classifier  # noqa: E402

__all__ = ["annotator_2d", "annotator_3d", "annotator_tracking", "image_folder_annotator", "image_series_annotator",
           "image_series_object_classifier", "object_classifier"]
