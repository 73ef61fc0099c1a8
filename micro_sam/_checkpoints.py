"""Safe loading of SAM checkpoints and detection of their format and architecture.

A checkpoint is data, never code. Files are read with torch's ``weights_only`` unpickler, which only builds
tensors and plain containers. Trainer checkpoints written by torch_em/micro_sam can also hold pickled
references to classes of the training code (in their ``init`` metadata); such references are replaced by
inert placeholders, and only for classes of the packages that write those checkpoints. A reference to
anything else (``os.system``, ``builtins.eval``, ...) means the file is refused before anything runs.

Supported formats:
- a plain SAM state dict (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``);
- a torch_em trainer checkpoint: ``{"model_state": {"sam.image_encoder...": ...}, "decoder_state": ..., ...}``;
- an exported model: ``{"model_state": <plain state dict>, "decoder_state": <decoder state dict>}``.
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

import torch

# Packages whose classes may appear in the metadata of trainer checkpoints. Their references are
# replaced by placeholders; the classes are never imported or called.
_PLACEHOLDER_PREFIXES = ("torch_em.", "micro_sam.", "segment_anything.", "mobile_sam.", "torch.optim.",
                         "torch.nn.modules.", "torch.nn.", "torch.utils.data.", "numpy.random.")
_EMBED_DIM_TO_ARCH = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or is not a SAM checkpoint."""


def _numpy_safe_globals():
    import numpy as np

    safe = [np.dtype, np.ndarray]
    try:
        from numpy.core.multiarray import _reconstruct, scalar  # numpy < 2 names
    except ImportError:  # pragma: no cover
        _reconstruct = scalar = None
    try:
        from numpy._core.multiarray import _reconstruct as _reconstruct2, scalar as scalar2
    except ImportError:  # pragma: no cover
        _reconstruct2 = scalar2 = None
    safe += [f for f in (_reconstruct, scalar, _reconstruct2, scalar2) if f is not None]
    safe += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "uint8", "bool")]
    return safe


def _placeholder(qualified_name: str):
    """An inert stand-in for a class that a trainer checkpoint refers to; it accepts and ignores state."""

    class _Placeholder:
        __qualname__ = qualified_name

        def __init__(self, *args, **kwargs):
            pass

        def __setstate__(self, state):
            pass

        def __call__(self, *args, **kwargs):
            return _Placeholder()

        def __repr__(self):
            return f"<placeholder for {qualified_name}>"

    return _Placeholder


def safe_load(path: str | os.PathLike) -> Any:
    """Load a checkpoint file without executing code from it.

    Raises:
        ValueError: if the file does not exist.
        CheckpointError: if it is truncated, not a torch file, or refers to code outside the allowed packages.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"The checkpoint file {path!r} does not exist.")
    safe = _numpy_safe_globals()
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first_error:  # noqa: BLE001 - re-raised with a clear message below
        import pickle

        if not isinstance(first_error, pickle.UnpicklingError) or "GLOBAL" not in str(first_error).upper():
            raise CheckpointError(
                f"Could not read the checkpoint {path!r}: the file is truncated, corrupted or not a PyTorch "
                f"checkpoint ({type(first_error).__name__}: {str(first_error).splitlines()[0]})."
            ) from None
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"Could not read the checkpoint {path!r}: {error}") from None
    already_safe = {f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', '')}" for g in safe}
    names = [n for n in names if n not in already_safe]
    refused = [n for n in names if not n.startswith(_PLACEHOLDER_PREFIXES)]
    if refused:
        raise CheckpointError(
            f"Refusing to load {path!r}: it refers to {', '.join(sorted(refused))}, which would run code when "
            "unpickled. A checkpoint must only contain weights (tensors, dicts, numbers, strings). Nothing "
            "from the file was executed."
        )
    stubs = [(_placeholder(n), n) for n in names]
    try:
        with torch.serialization.safe_globals(safe + stubs):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"Could not read the checkpoint {path!r}: {str(error).splitlines()[0]}") from None


def _strip_prefix(state: Dict[str, Any], prefix: str) -> "OrderedDict[str, Any]":
    return OrderedDict((k[len(prefix):] if k.startswith(prefix) else k, v) for k, v in state.items())


def split_checkpoint(obj: Any, path: str = "") -> Tuple["OrderedDict[str, torch.Tensor]", Optional[dict], dict]:
    """Split a loaded checkpoint into (SAM state dict, decoder state or None, full state).

    Raises:
        CheckpointError: if no SAM weights are found.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"The checkpoint {path!r} holds a {type(obj).__name__}, not a state dict.")
    if "model_state" in obj:
        model_state, state = obj["model_state"], obj
    elif "model" in obj and isinstance(obj["model"], dict) and any(
        k.startswith(("image_encoder.", "sam.")) for k in obj["model"]
    ):
        model_state, state = obj["model"], obj
    else:
        model_state, state = obj, {"model_state": obj}
    model_state = _strip_prefix(model_state, "sam.")
    if not any(k.startswith("image_encoder.") for k in model_state):
        raise CheckpointError(
            f"The checkpoint {path!r} holds no SAM weights (no 'image_encoder.*' parameters); found keys like "
            f"{list(model_state)[:3]}."
        )
    return model_state, state.get("decoder_state"), state


def image_size_of(state: dict, architecture: str, path: str = "") -> int:
    """The encoder input size a checkpoint was made for: its ``"image_size"`` entry, else SAM's 1024.

    Raises:
        CheckpointError: For an invalid size, or a size other than 1024 for an architecture other than vit_t.
    """
    from .models.build_sam import check_image_size

    size = state.get("image_size", 1024) if isinstance(state, dict) else 1024
    if torch.is_tensor(size):
        size = size.item()
    try:
        size = check_image_size(size)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"The checkpoint {path!r} has an invalid image_size {size!r}: {error}") from None
    if size != 1024 and architecture != "vit_t":
        raise CheckpointError(
            f"The checkpoint {path!r} is a {architecture} model for image_size {size}; only vit_t models can be "
            "built for another input size than 1024."
        )
    return size


def infer_architecture(model_state: Dict[str, torch.Tensor]) -> str:
    """The SAM architecture ("vit_t", "vit_b", "vit_l" or "vit_h") that a state dict belongs to."""
    if any(k.startswith(("image_encoder.layers.", "image_encoder.patch_embed.seq.")) for k in model_state):
        return "vit_t"
    weight = model_state.get("image_encoder.patch_embed.proj.weight")
    if weight is not None and int(weight.shape[0]) in _EMBED_DIM_TO_ARCH:
        return _EMBED_DIM_TO_ARCH[int(weight.shape[0])]
    raise CheckpointError("Could not infer the SAM architecture from the checkpoint's image encoder weights.")


def resolve_architecture(model_type: str, model_state: Dict[str, torch.Tensor], path: str = "") -> str:
    """The architecture to build: inferred from the weights; warns when ``model_type`` says otherwise."""
    inferred = infer_architecture(model_state)
    requested = model_type[:5]
    if requested != inferred:
        warnings.warn(
            f"The checkpoint {path!r} holds a {inferred} model, but model_type {model_type!r} asks for "
            f"{requested}; building a {inferred} model from the weights."
        )
    return inferred


def load_model_state(sam: torch.nn.Module, model_state: Dict[str, torch.Tensor], path: str = "") -> None:
    """Load the weights into a SAM, with an error that lists mismatching keys."""
    result = sam.load_state_dict(model_state, strict=False)
    missing = [k for k in result.missing_keys]
    unexpected = [k for k in result.unexpected_keys]
    if missing or unexpected:
        raise CheckpointError(
            f"The checkpoint {path!r} does not match the model: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})."
        )
