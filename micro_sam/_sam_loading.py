"""Building a SamPredictor from the registry or from a checkpoint file; devices; exporting checkpoints."""
from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import Callable, Optional, Union

from . import _registry

_DEFAULT_MODEL = "vit_b_lm"


def get_device(device=None):
    """The torch device to use: the requested one, checked, or the best available (cuda, mps, cpu)."""
    import torch

    if device is None or device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available() and torch.backends.mps.is_built():
            return "mps"
        return "cpu"
    device_type = device if isinstance(device, str) else getattr(device, "type", None)
    if not isinstance(device_type, str):
        raise ValueError(f"device must be a string or torch.device, got {device!r}.")
    kind = device_type.split(":")[0].lower()
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"The requested device {device!r} is not available: PyTorch finds no CUDA GPU.")
    elif kind == "mps":
        if not (torch.backends.mps.is_available() and torch.backends.mps.is_built()):
            raise RuntimeError(f"The requested device {device!r} is not available: the MPS backend is missing.")
    elif kind != "cpu":
        raise RuntimeError(f"Unsupported device {device!r}; choose 'cpu', 'cuda' (or 'cuda:N') or 'mps'.")
    return device


def compute_hash(path, chunk_size: int = 1 << 22) -> str:
    """The ``xxh128:<hex>`` hash of a file, as stored in the registry and in embedding caches."""
    import xxhash

    hasher = xxhash.xxh128()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            hasher.update(chunk)
    return f"xxh128:{hasher.hexdigest()}"


def _resolve_files(model_type, checkpoint_path, decoder_path, progress_bar_factory):
    """Local paths of the checkpoint and the optional decoder, and the model hash."""
    if checkpoint_path is None:
        entry = _registry.get_entry(model_type)
        checkpoint_path = _registry.fetch(entry.name, progress_bar_factory=progress_bar_factory)
        model_hash = entry.known_hash
        decoder = _registry.decoder_entry(model_type)
        if decoder_path is None and decoder is not None:
            decoder_path = _registry.fetch(decoder.name)
    else:
        if not os.path.isfile(checkpoint_path):
            raise ValueError(f"The checkpoint file {os.fspath(checkpoint_path)!r} does not exist.")
        model_hash = compute_hash(checkpoint_path)
    if decoder_path is not None and not os.path.isfile(decoder_path):
        raise ValueError(f"The decoder file {os.fspath(decoder_path)!r} does not exist.")
    return os.fspath(checkpoint_path), model_hash, decoder_path


def get_sam_model(
    model_type: str = _DEFAULT_MODEL,
    device=None,
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    return_sam: bool = False,
    return_state: bool = False,
    peft_kwargs: Optional[dict] = None,
    flexible_load_checkpoint: bool = False,
    progress_bar_factory: Optional[Callable] = None,
    decoder_path: Optional[Union[str, os.PathLike]] = None,
    precision: str = "float32",
    **model_kwargs,
):
    """See :func:`micro_sam.util.get_sam_model`.

    ``precision`` ("float32", "bfloat16" or "float16") selects the opt-in reduced precision of the image encoder,
    see :mod:`micro_sam.models.precision`. The ViT encoders always get the faster, equivalent attention of
    :func:`micro_sam.models.fast_attention.optimize_sam`.
    """
    from . import _checkpoints, _segment_anything  # noqa: F401  (segment_anything without torchvision)

    sam_kwargs = _check_model_kwargs(model_kwargs)
    peft_kwargs = _check_peft_kwargs(peft_kwargs, model_type)
    from segment_anything import SamPredictor
    from .models.build_sam import sam_model_registry, skip_weight_init
    from .models.fast_attention import optimize_sam
    from .models.precision import resolve_precision, set_precision

    if not isinstance(model_type, str) or model_type[:5] not in _registry._ARCHITECTURES:
        raise ValueError(
            f"Invalid model_type {model_type!r}: it must start with one of {', '.join(_registry._ARCHITECTURES)}. "
            f"Registered models ({_registry.describe_model_names()}); the list is "
            "micro_sam.util.get_model_names()."
        )
    device = get_device(device)
    resolve_precision(precision, device)  # fail before loading anything
    checkpoint_path, model_hash, decoder_path = _resolve_files(
        model_type, checkpoint_path, decoder_path, progress_bar_factory
    )
    model_state, decoder_state, state = _checkpoints.split_checkpoint(
        _checkpoints.safe_load(checkpoint_path), checkpoint_path
    )
    architecture = _checkpoints.resolve_architecture(model_type, model_state, checkpoint_path)
    if "image_size" not in sam_kwargs:
        image_size = _checkpoints.image_size_of(state, architecture, checkpoint_path)
        if image_size != 1024:
            sam_kwargs["image_size"] = image_size
    # Every parameter is loaded below (strictly, unless flexible): skip the random initialisation.
    with contextlib.nullcontext() if flexible_load_checkpoint else skip_weight_init():
        sam = sam_model_registry[architecture](**sam_kwargs)
        if peft_kwargs:
            from .models.peft_sam import PEFT_Sam

            sam = PEFT_Sam(sam, **peft_kwargs).sam
    if flexible_load_checkpoint:
        _load_flexibly(sam, model_state, checkpoint_path)
    else:
        _load_strictly(sam, model_state, checkpoint_path, peft_kwargs)
    sam.to(device=device)
    sam.eval()
    optimize_sam(sam)

    predictor = SamPredictor(sam)
    set_precision(predictor, precision)
    predictor.model_type = architecture
    predictor.model_name = model_type
    predictor._hash = model_hash
    predictor.checkpoint_path = checkpoint_path

    if return_state:
        if decoder_path is not None:
            decoder_state = _checkpoints.safe_load(decoder_path)
        if decoder_state is not None:
            state["decoder_state"] = decoder_state
    if return_sam and return_state:
        return predictor, sam, state
    if return_sam:
        return predictor, sam
    if return_state:
        return predictor, state
    return predictor


_MODEL_KWARGS = ("num_multimask_outputs", "image_size")


def _check_model_kwargs(model_kwargs: dict) -> dict:
    unknown = sorted(set(model_kwargs) - set(_MODEL_KWARGS))
    if unknown:
        raise ValueError(f"Unknown SAM construction parameters {unknown}; supported: {', '.join(_MODEL_KWARGS)}.")
    return dict(model_kwargs)


def _check_peft_kwargs(peft_kwargs, model_type) -> Optional[dict]:
    """Checked ``peft_kwargs`` without ``quantize`` (inference runs unquantised, as in micro_sam), or None."""
    if peft_kwargs is None or (isinstance(peft_kwargs, dict) and not peft_kwargs):
        return None
    from .models.peft_sam import check_peft_kwargs

    peft_kwargs = check_peft_kwargs(peft_kwargs, model_type if isinstance(model_type, str) else None)
    peft_kwargs.pop("quantize", None)
    return peft_kwargs


def _peft_hint(model_state) -> str:
    from .models._peft_layout import infer_peft_kwargs

    guess = infer_peft_kwargs(model_state)
    if guess is None:
        return " The checkpoint holds no PEFT parameters: load it without peft_kwargs."
    return f" The checkpoint looks like a PEFT model trained with peft_kwargs={guess}."


def _load_strictly(sam, model_state, checkpoint_path, peft_kwargs) -> None:
    """Load all parameters; a mismatch that PEFT settings explain gets a hint on the settings to use."""
    from . import _checkpoints
    from .models._peft_layout import infer_peft_kwargs

    own = sam.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in model_state.items()
                  if k in own and own[k].shape != v.shape]
    if mismatched:
        raise _checkpoints.CheckpointError(
            f"The checkpoint {os.fspath(checkpoint_path)!r} does not match the model: {len(mismatched)} parameters "
            f"of another shape (checkpoint vs model), e.g. {', '.join(mismatched[:2])}. A model built with other "
            "num_multimask_outputs / image_size loads what fits with flexible_load_checkpoint=True."
        )
    try:
        _checkpoints.load_model_state(sam, model_state, checkpoint_path)
    except _checkpoints.CheckpointError as error:
        if peft_kwargs is None and infer_peft_kwargs(model_state) is None:
            raise
        raise _checkpoints.CheckpointError(f"{error}{_peft_hint(model_state)}") from None


def _load_flexibly(sam, model_state, checkpoint_path) -> None:
    """Load the parameters that fit (position tables resized to another input size); warn about the rest.

    The weights of a plain checkpoint go into the layers that PEFT modules wrap (``qkv.weight`` ->
    ``qkv.qkv_proj.weight``), so that a PEFT model built for training starts from the pretrained weights.
    """
    import warnings

    from .models._peft_layout import unwrapped_key
    from .models.build_sam import resize_position_tables

    own = sam.state_dict()
    model_state = dict(model_state)
    for key in own:
        plain = unwrapped_key(key)
        if key not in model_state and plain != key and plain in model_state:
            model_state[key] = model_state[plain]
    model_state = resize_position_tables(model_state, own)
    fitting = {k: v for k, v in model_state.items() if k in own and own[k].shape == v.shape}
    mismatched = sorted(k for k in model_state if k in own and own[k].shape != model_state[k].shape)
    if mismatched:
        warnings.warn(
            f"{len(mismatched)} parameters of {os.fspath(checkpoint_path)!r} do not fit the model and keep their "
            f"initial values: {', '.join(mismatched[:5])}{' ...' if len(mismatched) > 5 else ''}."
        )
    sam.load_state_dict(fitting, strict=False)


def export_custom_sam_model(
    checkpoint_path: Union[str, os.PathLike],
    model_type: str,
    save_path: Union[str, os.PathLike],
    with_segmentation_decoder: bool = False,
    prefix: str = "sam.",
) -> None:
    """See :func:`micro_sam.util.export_custom_sam_model`."""
    from . import _checkpoints

    obj = _checkpoints.safe_load(checkpoint_path)
    model_state, decoder_state, state = _checkpoints.split_checkpoint(obj, os.fspath(checkpoint_path))
    if prefix != "sam.":
        model_state = _checkpoints._strip_prefix(model_state, prefix)
    architecture = _checkpoints.resolve_architecture(model_type, model_state, os.fspath(checkpoint_path))
    image_size = _checkpoints.image_size_of(state, architecture, os.fspath(checkpoint_path))
    if with_segmentation_decoder:
        if decoder_state is None:
            raise RuntimeError(f"The checkpoint {os.fspath(checkpoint_path)!r} has no 'decoder_state' to export.")
        to_save = {"model_state": model_state, "decoder_state": decoder_state}
    elif image_size != 1024:
        to_save = {"model_state": model_state}
    else:
        to_save = model_state
    if image_size != 1024:  # a model for another input size keeps that size (see models.build_sam)
        to_save["image_size"] = image_size
    _save_atomically(to_save, save_path)


def export_custom_qlora_model(
    checkpoint_path: Optional[Union[str, os.PathLike]],
    finetuned_path: Union[str, os.PathLike],
    model_type: str,
    save_path: Union[str, os.PathLike],
) -> None:
    """See :func:`micro_sam.util.export_custom_qlora_model`."""
    from . import _checkpoints
    from .models._peft_layout import infer_peft_kwargs
    from .models.peft_sam import PEFT_Sam

    finetuned_path = os.fspath(finetuned_path)
    model_state, decoder_state, state = _checkpoints.split_checkpoint(_checkpoints.safe_load(finetuned_path),
                                                                      finetuned_path)
    peft_kwargs = infer_peft_kwargs(model_state)
    if peft_kwargs is None or peft_kwargs.get("peft_module") != "LoRASurgery":
        raise ValueError(f"{finetuned_path!r} holds no LoRA parameters ('...qkv.w_a_linear_q.weight', ...); it is not "
                         "a (Q)LoRA checkpoint.")
    _, sam = get_sam_model(model_type=model_type, checkpoint_path=checkpoint_path, device="cpu", return_sam=True)
    template = PEFT_Sam(sam, **peft_kwargs).sam.state_dict()
    exported = OrderedDict()
    for key, base_value in template.items():
        value = model_state.get(key)
        # Quantized weights are stored in bitsandbytes' packed format (another shape / dtype): take the base
        # model's; everything else (LoRA matrices, trained prompt encoder and mask decoder) from the finetuned model.
        usable = value is not None and value.shape == base_value.shape and value.dtype == base_value.dtype
        exported[key] = value if usable else base_value
    to_save = {"model_state": exported}
    if decoder_state is not None:
        to_save["decoder_state"] = decoder_state
    image_size = int(sam.image_encoder.img_size)
    if image_size != 1024:
        to_save["image_size"] = image_size
    _save_atomically(to_save, save_path)
    print(f"Exported the LoRA model with peft_kwargs={peft_kwargs} to {os.fspath(save_path)}.")


def _save_atomically(obj, save_path) -> None:
    import torch

    save_path = os.fspath(save_path)
    tmp_path = f"{save_path}.tmp-{os.getpid()}"
    try:
        torch.save(obj, tmp_path)
        os.replace(tmp_path, save_path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
