"""Model export: bioimage.io model packages (:func:`export_sam_model`) and the image encoder / prompt decoder
for model servers and ONNX runtimes (:mod:`micro_sam.bioimageio.bioengine_export`).

The export dependencies (bioimageio.core, onnx, onnxruntime) are optional: ``pip install 'micro_sam[export]'``.
"""
from .bioengine_export import export_bioengine_model, export_image_encoder, export_onnx_model
from .model_export import export_sam_model

__all__ = ["export_bioengine_model", "export_image_encoder", "export_onnx_model", "export_sam_model"]
