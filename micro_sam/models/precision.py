"""Opt-in reduced precision for SAM's image encoder.

The default is float32 everywhere. A predictor switched to ``"bfloat16"`` or ``"float16"`` (see
:func:`set_precision`, or ``get_sam_model(..., precision=...)``) computes its image embeddings as follows:

- on GPUs (``cuda``, ``mps``) and on CPUs with native bfloat16 matrix instructions (AVX512-BF16 or AMX): the whole
  encoder runs under :func:`torch.autocast` with that dtype;
- on other CPUs, where bfloat16 linear layers and convolutions are emulated and slower than float32 ones (measured:
  1.6x slower for ``vit_t``, 2.5x for ``vit_b``'s window blocks), only the attention of the ViT encoders
  (``vit_b``/``vit_l``/``vit_h`` optimised by :func:`micro_sam.models.fast_attention.optimize_sam`) runs in bfloat16;
  ``vit_t`` then stays in float32.

Features are always returned as float32; the prompt encoder and mask decoder always run in float32.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import torch

__all__ = ["PRECISIONS", "cpu_has_native_bfloat16", "encoder_precision", "resolve_precision", "set_precision"]

#: Accepted precision names and their dtypes.
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX), as PyTorch detects them."""
    cpu = getattr(torch, "cpu", None)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(cpu, name, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:  # pragma: no cover - detection unavailable in this build
            pass
    return False


def resolve_precision(precision: Union[str, torch.dtype, None], device: Union[str, torch.device]) -> torch.dtype:
    """The encoder dtype for a precision name on a device.

    Args:
        precision: "float32", "bfloat16", "float16", the matching ``torch.dtype``, or None for float32.
        device: The device the model runs on ("cpu", "cuda", "cuda:N", "mps" or a ``torch.device``).

    Returns:
        The dtype.

    Raises:
        ValueError: for an unknown precision, float16 on a CPU, or bfloat16 on a GPU that does not support it.
    """
    if precision is None:
        return torch.float32
    if isinstance(precision, torch.dtype):
        names = {dtype: name for name, dtype in PRECISIONS.items()}
        if precision not in names:
            raise ValueError(f"Unsupported precision {precision}; choose one of {sorted(PRECISIONS)}.")
        precision = names[precision]
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"Unsupported precision {precision!r}; choose one of {sorted(PRECISIONS)}.")
    dtype = PRECISIONS[precision]
    device_type = torch.device(device).type
    if dtype == torch.float16 and device_type == "cpu":
        raise ValueError("precision='float16' is not supported on the CPU; use 'bfloat16' or 'float32'.")
    if dtype == torch.bfloat16 and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("This GPU does not support bfloat16; use precision='float16' or 'float32'.")
    return dtype


def set_precision(predictor, precision: Union[str, torch.dtype, None] = "float32"):
    """Choose the precision in which ``predictor``'s image embeddings are computed (in place).

    Affects :func:`micro_sam.util.precompute_image_embeddings` and everything built on it; the prompt encoder,
    the mask decoder and the stored features stay float32. See the module docstring for what runs in reduced
    precision on which hardware.

    Args:
        predictor: A segment_anything ``SamPredictor`` (e.g. from :func:`micro_sam.util.get_sam_model`).
        precision: "float32" (default, exact), "bfloat16" (CPU or GPU) or "float16" (GPU only).

    Returns:
        The same predictor, with ``_encoder_dtype`` set (None for float32).
    """
    dtype = resolve_precision(precision, predictor.device)
    predictor._encoder_dtype = None if dtype == torch.float32 else dtype
    return predictor


@contextlib.contextmanager
def encoder_precision(
    dtype: Optional[torch.dtype], device_type: str, autocast: Optional[bool] = None
) -> Iterator[None]:
    """Context in which to run the image encoder for the requested dtype.

    Args:
        dtype: The reduced dtype, or None / ``torch.float32`` for full precision (then nothing changes).
        device_type: "cpu", "cuda" or "mps".
        autocast: Force (True) or avoid (False) ``torch.autocast``; None decides by the hardware (see module
            docstring). Without autocast only the optimised ViT attention uses ``dtype``.
    """
    if dtype is None or dtype == torch.float32:
        yield
        return
    if autocast is None:
        autocast = device_type != "cpu" or cpu_has_native_bfloat16()
    if autocast:
        with torch.autocast(device_type=device_type, dtype=dtype):
            yield
    else:
        from .fast_attention import attention_dtype

        with attention_dtype(dtype):
            yield
