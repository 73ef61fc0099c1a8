"""Where the PEFT modules of :mod:`micro_sam.models.peft_sam` attach in the two encoder families.

Two layouts of transformer blocks are supported:

- segment_anything's ViT (``vit_b``, ``vit_l``, ``vit_h``): ``encoder.blocks``; each block has ``norm1``,
  ``attn`` (``qkv`` projecting C -> 3C laid out as ``[q | k | v]``, ``proj``), ``norm2`` and ``mlp``
  (``lin1``, ``act``, ``lin2``); the block computes ``x + attn(norm1(x))`` and ``x + mlp(norm2(x))``;
- TinyViT (``vit_t``): the blocks of the attention stages ``encoder.layers[1:]`` (2 + 6 + 2 = 10 for vit_t);
  each has ``attn`` (``norm``, ``qkv`` laid out head by head as ``[q_h | k_h | v_h]``, ``proj``) and ``mlp``
  (``norm``, ``fc1``, ``act``, ``fc2``); the norms sit inside ``attn`` and ``mlp``.

The functions here hide these differences: which blocks there are, how the query / key / value parts of the
``qkv`` output are laid out, and which linear layers and norm make up an MLP.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = [
    "QKVLayout", "transformer_blocks", "qkv_layout", "mlp_parts", "infer_peft_kwargs", "quantize_linear_layers",
    "unwrapped_key",
]


def transformer_blocks(encoder: nn.Module) -> List[nn.Module]:
    """The transformer blocks of an image encoder that PEFT modules attach to, in the order they run.

    Args:
        encoder: ``sam.image_encoder``: segment_anything's ``ImageEncoderViT`` or the TinyViT of ``vit_t``.

    Returns:
        ViT: ``encoder.blocks`` (12 for vit_b, 24 for vit_l, 32 for vit_h); TinyViT: the attention blocks of its
        stages (10 for vit_t). ``attention_layers_to_update`` indexes this list.

    Raises:
        ValueError: The encoder has neither layout.
    """
    blocks = getattr(encoder, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return list(blocks)
    layers = getattr(encoder, "layers", None)
    if isinstance(layers, nn.ModuleList):
        found = [block for layer in layers for block in getattr(layer, "blocks", ()) if hasattr(block, "attn")]
        if found:
            return found
    raise ValueError(
        f"Cannot apply PEFT to a {type(encoder).__name__}: expected segment_anything's ViT encoder (with 'blocks') "
        "or the TinyViT encoder of vit_t (with 'layers')."
    )


@dataclass(frozen=True)
class QKVLayout:
    """How a ``qkv`` projection's output is split: ``groups`` consecutive groups, each ``[q | k | v]`` of the
    given widths. segment_anything's ViT has one group of width C each; TinyViT one group per head."""

    groups: int
    q: int
    k: int
    v: int

    def offsets(self) -> Dict[str, Tuple[int, int]]:
        """(start, width) of q, k and v within a group."""
        return {"q": (0, self.q), "k": (self.q, self.k), "v": (self.q + self.k, self.v)}

    def add_(self, qkv: torch.Tensor, deltas: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Add ``deltas[name]`` (..., groups * width) to the ``name`` part of ``qkv`` (..., groups * (q + k + v)),
        in place; returns ``qkv``."""
        qkv = qkv.contiguous()  # a no-op for a linear layer's output; the view below must alias qkv
        grouped = qkv.view(*qkv.shape[:-1], self.groups, self.q + self.k + self.v)
        offsets = self.offsets()
        for name, delta in deltas.items():
            start, width = offsets[name]
            grouped[..., start:start + width] += delta.view(*delta.shape[:-1], self.groups, width)
        return qkv


def qkv_layout(attn: nn.Module, qkv: nn.Module) -> QKVLayout:
    """The layout of ``attn.qkv`` (passed separately: it may already be wrapped) for the two encoder families."""
    out_features = _out_features(qkv)
    key_dim, num_heads = getattr(attn, "key_dim", None), getattr(attn, "num_heads", None)
    if isinstance(key_dim, int) and hasattr(attn, "d") and isinstance(num_heads, int):  # TinyViT
        return QKVLayout(num_heads, key_dim, key_dim, int(attn.d))
    if out_features % 3:
        raise ValueError(f"Cannot split a qkv projection with {out_features} outputs into query, key and value.")
    width = out_features // 3
    return QKVLayout(1, width, width, width)


def _out_features(layer: nn.Module) -> int:
    for candidate in (layer, getattr(layer, "qkv_proj", None), getattr(layer, "layer", None)):
        if candidate is not None and isinstance(getattr(candidate, "out_features", None), int):
            return candidate.out_features
    raise ValueError(f"Cannot find the output width of {type(layer).__name__}.")


def mlp_parts(mlp: nn.Module) -> Tuple[nn.Module, nn.Module, Optional[nn.Module], Optional[nn.Module]]:
    """(first linear, second linear, inner norm or None, dropout or None) of a ViT or TinyViT MLP."""
    if hasattr(mlp, "lin1") and hasattr(mlp, "lin2"):
        return mlp.lin1, mlp.lin2, None, None
    if hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):
        return mlp.fc1, mlp.fc2, getattr(mlp, "norm", None), getattr(mlp, "drop", None)
    raise ValueError(f"Cannot apply PEFT to the MLP {type(mlp).__name__}: expected 'lin1'/'lin2' or 'fc1'/'fc2'.")


# The attributes under which PEFT modules hold the layers they wrap (AttentionLoRA / FacT, MLPLoRA, AdaptFormer,
# ScaleShiftLayer).
_WRAPPED = re.compile(r"\.(?:qkv_proj|mlp_layer|mlp_proj|layer)(?=\.)")


def unwrapped_key(key: str) -> str:
    """The name a parameter of a PEFT-wrapped model has in the unwrapped model, e.g.
    ``...attn.qkv.qkv_proj.weight`` -> ``...attn.qkv.weight`` (unchanged for names outside wrapped layers)."""
    return _WRAPPED.sub("", key)


_BLOCK_KEY = re.compile(r"^(?:sam\.)?image_encoder\.(?:blocks\.(\d+)|layers\.(\d+)\.blocks\.(\d+))\.(.*)$")


def infer_peft_kwargs(model_state: Dict[str, torch.Tensor]) -> Optional[dict]:
    """Guess the ``peft_kwargs`` a checkpoint was trained with from its parameter names (for error messages and
    for reading QLoRA checkpoints).

    Recognises LoRA (``qkv.w_a_linear_q`` ..., ``mlp.w_a_linear_1``), FacT (``qkv.FacTu``), SSF
    (``qkv.scale``) and AdaptFormer (``mlp.down_proj``); the selective methods leave no trace in the names.

    Args:
        model_state: A SAM state dict (keys may carry the ``sam.`` prefix).

    Returns:
        ``{"peft_module": <name>, "rank": ..., "attention_layers_to_update": [...], ...}`` or None when the
        names show no PEFT module. Block indices are those of :func:`transformer_blocks` for ViT checkpoints;
        for TinyViT they are counted over ``layers.1`` onwards.
    """
    per_block: Dict[Tuple[int, ...], set] = {}
    rank = None
    for key, value in model_state.items():
        match = _BLOCK_KEY.match(key)
        if match is None:
            continue
        index = (int(match.group(1)),) if match.group(1) is not None else (int(match.group(2)), int(match.group(3)))
        rest = match.group(4)
        found = per_block.setdefault(index, set())
        lora = re.match(r"attn\.qkv\.w_a_linear_([qkv])\.weight$", rest)
        if lora:
            found.add(lora.group(1))
            rank = int(value.shape[0])
        elif re.match(r"mlp\.w_a_linear_1\.weight$", rest):
            found.add("mlp")
            rank = int(value.shape[0])
        elif rest == "attn.qkv.FacTu.weight":
            found.add("fact")
            rank = int(value.shape[0])
        elif rest == "attn.qkv.scale":
            found.add("ssf")
        elif rest == "mlp.down_proj.weight":
            found.add("adaptformer")
            rank = int(value.shape[0])  # the projection size
    ordered = sorted(per_block)
    position = {index: i for i, index in enumerate(i for i in ordered if len(i) == 1 or i[0] >= 1)}
    touched = {position[i]: kinds for i, kinds in per_block.items() if kinds and i in position}
    if not touched:
        return None
    kinds = set().union(*touched.values())
    layers = sorted(touched)
    all_layers = len(position) == len(layers)
    kwargs: dict = {}
    if kinds & {"q", "k", "v", "mlp"}:
        kwargs = {"peft_module": "LoRASurgery", "rank": rank,
                  "update_matrices": [m for m in ("q", "k", "v", "mlp") if m in kinds]}
    elif "fact" in kinds:
        kwargs = {"peft_module": "FacTSurgery", "rank": rank}
    elif "ssf" in kinds:
        kwargs = {"peft_module": "SSFSurgery"}
    elif "adaptformer" in kinds:
        kwargs = {"peft_module": "AdaptFormer", "projection_size": rank}
        if not any(k.endswith("mlp.alpha") for k in model_state):
            kwargs["alpha"] = 1.0  # a fixed factor (its value is not stored)
    if not all_layers:
        kwargs["attention_layers_to_update"] = layers
    return kwargs


def quantize_linear_layers(encoder: nn.Module) -> None:
    """Replace every linear layer of ``encoder`` by a bitsandbytes 4-bit layer (QLoRA), in place; CUDA only.

    Raises:
        ModuleNotFoundError: bitsandbytes is not installed.
        RuntimeError: No CUDA GPU.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ModuleNotFoundError(
            "quantize=True needs the 'bitsandbytes' package (pip install bitsandbytes) and a CUDA GPU."
        ) from None
    if not torch.cuda.is_available():
        raise RuntimeError("quantize=True (4-bit QLoRA) needs a CUDA GPU; bitsandbytes does not quantize on this device.")
    for name, module in list(encoder.named_modules()):
        if type(module) is not nn.Linear:
            continue
        *path, leaf = name.split(".")
        parent = encoder
        for part in path:
            parent = getattr(parent, part)
        quantized = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None)
        quantized.weight = bnb.nn.Params4bit(data=module.weight.data, requires_grad=False)
        if module.bias is not None:
            quantized.bias = nn.Parameter(module.bias.data)
        setattr(parent, leaf, quantized)
