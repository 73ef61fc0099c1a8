"""Parameter-efficient finetuning (PEFT) of SAM's image encoder: LoRA, FacT, SSF, AdaptFormer, selective methods.

:class:`PEFT_Sam` freezes the image encoder and attaches a PEFT module to each chosen transformer block; the
prompt encoder and mask decoder stay trainable. Class names, arguments and parameter names are those of
micro_sam 1.8, so checkpoints move both ways: a LoRA model trained with micro_sam loads here with the same
``peft_kwargs`` and the reverse (``scripts/check_reference_peft_compat.py`` checks it against micro_sam).

============================  =================================================================  ============
``peft_module``               what trains in each chosen block                                    needs rank
============================  =================================================================  ============
:class:`LoRASurgery`          low-rank updates ``B A`` of the query and value projections          yes
                              (``update_matrices``: any of "q", "k", "v", "mlp")
:class:`FacTSurgery`          factorised updates ``V S_q U``, ``V S_v U`` of query and value       yes
:class:`SSFSurgery`           a scale and shift after each linear layer and norm of the block      no
:class:`AdaptFormer`          a bottleneck adapter parallel to the MLP                             no
:class:`AttentionSurgery`     the attention parameters                                             no
:class:`BiasSurgery`          the biases                                                           no
:class:`LayerNormSurgery`     the layer norms                                                      no
:class:`ClassicalSurgery`     all parameters of the block                                          no
============================  =================================================================  ============

Supported encoders: segment_anything's ViT (``vit_b``/``vit_l``/``vit_h``: 12/24/32 blocks, as in micro_sam)
and, beyond micro_sam (which refuses ``vit_t``), the TinyViT of ``vit_t``: its 10 attention blocks (stages 2-4)
take the same modules (see :mod:`micro_sam.models._peft_layout`).

Differences from micro_sam, all in how new parameters start (checkpoints and outputs for given weights agree):
FacT's output factor ``FacTv`` and SSF's scales/shifts start at zero / one / zero, so that a new PEFT model
computes exactly the pretrained model (micro_sam draws them at random, which perturbs the pretrained model
before the first step). AdaptFormer on the ViT keeps micro_sam's function, which adds the MLP's (normalised)
input to its output once more; on TinyViT, which micro_sam does not support, the adapter is a plain parallel
branch. As in micro_sam, SSF leaves the patch embedding unchanged.

The fast inference paths stay correct with wrapped layers: a wrapped ``qkv`` is called by the fused attention
(LoRA, FacT and the selective methods keep the fast ViT block); wrapped MLPs, projections or norms make
:class:`~micro_sam.models.fast_attention.FastBlock` run segment_anything's block forward.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Type, Union

import torch
from torch import nn

from ._peft_layout import mlp_parts, qkv_layout, quantize_linear_layers, transformer_blocks

__all__ = [
    "AdaptFormer", "AttentionLoRA", "AttentionSurgery", "BiasSurgery", "ClassicalSurgery", "FacTSurgery",
    "LayerNormSurgery", "LoRASurgery", "MLPLoRA", "PEFT_Sam", "PEFT_MODULES", "SSFSurgery", "ScaleShiftLayer",
    "SelectiveSurgery", "check_peft_kwargs", "get_peft_module",
]

_LORA_MATRICES = ("q", "k", "v", "mlp")


def _check_rank(rank, what: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"{what} needs a positive integer rank, got rank={rank!r}.")
    return rank


def _zero_init_low_rank(down: nn.Linear, up: nn.Linear) -> None:
    """LoRA's initialisation: ``down`` like a linear layer (Kaiming uniform), ``up`` zero, so ``up(down(x)) = 0``."""
    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
    nn.init.zeros_(up.weight)


class AttentionLoRA(nn.Module):
    """LoRA on an attention block's ``qkv`` projection: ``qkv(x) + [B_q A_q x | B_k A_k x | B_v A_v x]``.

    Each chosen matrix gets ``w_a_linear_<m>`` (C -> rank) and ``w_b_linear_<m>`` (rank -> width of <m>); the
    second starts at zero, so the output equals the wrapped projection's until training changes it.

    Args:
        rank: The rank of the update.
        block: The ``qkv`` linear layer to wrap (``in_features`` C).
        update_matrices: Which of "q", "k", "v" to update.
        layout: How the output splits into q, k and v (default: ``[q | k | v]`` of width C each, the ViT layout;
            :class:`LoRASurgery` passes TinyViT's per-head layout).

    Raises:
        ValueError: A non-positive rank or an unknown matrix name.
    """

    def __init__(self, rank: int, block: nn.Module, update_matrices: Sequence[str] = ("q", "v"), layout=None):
        super().__init__()
        _check_rank(rank, "AttentionLoRA")
        unknown = sorted(set(update_matrices) - {"q", "k", "v"})
        if unknown:
            raise ValueError(f"Unknown attention matrices {unknown}; choose from 'q', 'k', 'v'.")
        self.qkv_proj = block
        self.dim = block.in_features
        self.alpha = 1
        self.rank = rank
        if layout is None:
            width = _out_width(block) // 3
            from ._peft_layout import QKVLayout

            layout = QKVLayout(1, width, width, width)
        self._layout = layout
        widths = {"q": layout.q, "k": layout.k, "v": layout.v}
        for name in ("q", "v", "k"):  # micro_sam's registration order (state-dict key order)
            if name in update_matrices:
                setattr(self, f"w_a_linear_{name}", nn.Linear(self.dim, rank, bias=False))
                setattr(self, f"w_b_linear_{name}", nn.Linear(rank, widths[name] * layout.groups, bias=False))
        self.reset_parameters()

    @property
    def update_matrices(self) -> List[str]:
        """The updated matrices, in q, k, v order."""
        return [m for m in ("q", "k", "v") if hasattr(self, f"w_a_linear_{m}")]

    def reset_parameters(self) -> None:
        """Start the update at zero (A Kaiming uniform, B zero)."""
        for name in self.update_matrices:
            _zero_init_low_rank(getattr(self, f"w_a_linear_{name}"), getattr(self, f"w_b_linear_{name}"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (..., C) -> the updated projection (..., width of q + k + v)."""
        qkv = self.qkv_proj(x)
        deltas = {m: getattr(self, f"w_b_linear_{m}")(getattr(self, f"w_a_linear_{m}")(x)) for m in self.update_matrices}
        if self.alpha != 1:
            deltas = {m: d * self.alpha for m, d in deltas.items()}
        return self._layout.add_(qkv, deltas)


def _out_width(layer: nn.Module) -> int:
    width = getattr(layer, "out_features", None)
    if not isinstance(width, int):
        raise ValueError(f"Expected a linear layer with out_features, got {type(layer).__name__}.")
    return width


class MLPLoRA(nn.Module):
    """LoRA on both linear layers of a transformer block's MLP.

    ``h = act(lin1(x) + B_1 A_1 x)``, ``out = lin2(h) + B_2 A_2 h`` (TinyViT's MLP normalises ``x`` first).

    Args:
        rank: The rank of the updates.
        mlp_layer: The MLP to wrap (segment_anything's ``MLPBlock`` or TinyViT's ``Mlp``).

    Raises:
        ValueError: A non-positive rank or an MLP of another layout.
    """

    def __init__(self, rank: int, mlp_layer: nn.Module):
        super().__init__()
        _check_rank(rank, "MLPLoRA")
        first, second, _, _ = mlp_parts(mlp_layer)
        self.mlp_layer = mlp_layer
        self.rank = rank
        self.w_a_linear_1 = nn.Linear(first.in_features, rank, bias=False)
        self.w_b_linear_1 = nn.Linear(rank, first.out_features, bias=False)
        self.w_a_linear_2 = nn.Linear(second.in_features, rank, bias=False)
        self.w_b_linear_2 = nn.Linear(rank, second.out_features, bias=False)
        self.activation = mlp_layer.act
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Start both updates at zero."""
        _zero_init_low_rank(self.w_a_linear_1, self.w_b_linear_1)
        _zero_init_low_rank(self.w_a_linear_2, self.w_b_linear_2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (..., C) -> (..., C)."""
        first, second, norm, drop = mlp_parts(self.mlp_layer)
        if norm is not None:
            x = norm(x)
        hidden = self.activation(first(x) + self.w_b_linear_1(self.w_a_linear_1(x)))
        if drop is not None:
            hidden = drop(hidden)
        out = second(hidden) + self.w_b_linear_2(self.w_a_linear_2(hidden))
        return out if drop is None else drop(out)


class LoRASurgery(nn.Module):
    """Low-rank adaptation of a transformer block: wraps ``block.attn.qkv`` in :class:`AttentionLoRA` and, with
    "mlp" in ``update_matrices``, ``block.mlp`` in :class:`MLPLoRA` (in place).

    Args:
        rank: The rank of the updates.
        block: The transformer block.
        update_matrices: Any of "q", "k", "v" (attention) and "mlp"; default query and value, as LoRA recommends.

    Raises:
        ValueError: A non-positive rank or an unknown matrix name (the message lists the valid ones).
    """

    def __init__(self, rank: int, block: nn.Module, update_matrices: Sequence[str] = ("q", "v")):
        super().__init__()
        _check_rank(rank, "LoRASurgery")
        if isinstance(update_matrices, str):
            update_matrices = [update_matrices]
        unknown = sorted(set(update_matrices) - set(_LORA_MATRICES))
        if unknown:
            raise ValueError(f"Unknown update_matrices {unknown}; choose from {list(_LORA_MATRICES)}.")
        self.block = block
        attention = [m for m in update_matrices if m != "mlp"]
        block.attn.qkv = AttentionLoRA(rank, block.attn.qkv, attention, layout=qkv_layout(block.attn, block.attn.qkv))
        if "mlp" in update_matrices:
            block.mlp = MLPLoRA(rank, block.mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity: the work happens in the wrapped layers."""
        return x


class FacTSurgery(nn.Module):
    """FacT (factor-tuning) on a block's ``qkv``: ``q += V dropout(S_q U x)``, ``v += V dropout(S_v U x)``.

    ``U`` (``FacTu``, C -> rank) and ``V`` (``FacTv``, rank -> C) are shared by query and value, ``S_q``/``S_v``
    (``q_FacTs``/``v_FacTs``) are rank x rank. The module replaces ``block.attn.qkv``. ``FacTv`` starts at zero
    (the model starts as the pretrained one; micro_sam initialises it at random).

    Args:
        rank: The rank of the factorisation.
        block: The transformer block.
        dropout: Dropout on the rank-dimensional codes in training (None: no dropout).

    Raises:
        ValueError: A non-positive rank.
    """

    def __init__(self, rank: int, block: nn.Module, dropout: Optional[float] = 0.1):
        super().__init__()
        _check_rank(rank, "FacTSurgery")
        self.qkv_proj = block.attn.qkv
        self.dim = self.qkv_proj.in_features
        self._layout = qkv_layout(block.attn, self.qkv_proj)
        if self._layout.q != self._layout.v:
            raise ValueError("FacT needs query and value projections of the same width.")
        self.q_FacTs = nn.Linear(rank, rank, bias=False)
        self.v_FacTs = nn.Linear(rank, rank, bias=False)
        self.dropout = dropout
        if dropout is not None:
            self.dp_q = nn.Dropout(dropout)
            self.dp_v = nn.Dropout(dropout)
        self.FacTu = nn.Linear(self.dim, rank, bias=False)
        self.FacTv = nn.Linear(rank, self._layout.q * self._layout.groups, bias=False)
        nn.init.zeros_(self.FacTv.weight)
        block.attn.qkv = self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (..., C) -> the updated projection (..., width of q + k + v)."""
        qkv = self.qkv_proj(x)
        code = self.FacTu(x)
        new_q, new_v = self.q_FacTs(code), self.v_FacTs(code)
        if self.dropout is not None:
            new_q, new_v = self.dp_q(new_q), self.dp_v(new_v)
        return self._layout.add_(qkv, {"q": self.FacTv(new_q), "v": self.FacTv(new_v)})


class ScaleShiftLayer(nn.Module):
    """``layer(x) * scale + shift`` with a learned scale and shift per channel (SSF).

    The channels are the last axis of the output, or axis 1 for (B, C, H, W) maps. They start at scale 1 and
    shift 0 (the wrapped layer's output; micro_sam draws them around these values).

    Args:
        layer: The layer to wrap.
        dim: Its number of output channels.
    """

    def __init__(self, layer: nn.Module, dim: int):
        super().__init__()
        self.layer = layer
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer, then scale and shift its channels."""
        x = self.layer(x)
        dim = self.scale.shape[0]
        if x.shape[-1] == dim:
            return x * self.scale + self.shift
        if x.ndim == 4 and x.shape[1] == dim:
            return x * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)
        raise ValueError(f"The output of shape {tuple(x.shape)} has no axis of the {dim} scaled channels.")


class SSFSurgery(nn.Module):
    """SSF (scaling and shifting features): wraps every linear layer and norm of a transformer block in a
    :class:`ScaleShiftLayer` (in place). Other modules (e.g. the patch embedding) are left unchanged, as in
    micro_sam.

    Args:
        rank: Not used; accepted so that all PEFT modules share the signature.
        block: The transformer block (or another module, which is left as it is).
    """

    def __init__(self, rank: Optional[int], block: nn.Module):
        super().__init__()
        self.block = block
        if not hasattr(block, "attn"):
            return
        attn, mlp = block.attn, block.mlp
        attn.qkv = ScaleShiftLayer(attn.qkv, attn.qkv.out_features)
        attn.proj = ScaleShiftLayer(attn.proj, attn.proj.out_features)
        if hasattr(mlp, "lin1"):
            mlp.lin1 = ScaleShiftLayer(mlp.lin1, mlp.lin1.out_features)
            mlp.lin2 = ScaleShiftLayer(mlp.lin2, mlp.lin2.out_features)
        else:  # TinyViT
            mlp.fc1 = ScaleShiftLayer(mlp.fc1, mlp.fc1.out_features)
            mlp.fc2 = ScaleShiftLayer(mlp.fc2, mlp.fc2.out_features)
        if hasattr(block, "norm1"):
            block.norm1 = ScaleShiftLayer(block.norm1, block.norm1.normalized_shape[0])
            block.norm2 = ScaleShiftLayer(block.norm2, block.norm2.normalized_shape[0])
        else:  # TinyViT: the norms sit in the attention and the MLP
            attn.norm = ScaleShiftLayer(attn.norm, attn.norm.normalized_shape[0])
            mlp.norm = ScaleShiftLayer(mlp.norm, mlp.norm.normalized_shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity: the work happens in the wrapped layers."""
        return x


class AdaptFormer(nn.Module):
    """AdaptFormer: a bottleneck adapter ``alpha * up(relu(down(x)))`` parallel to a block's MLP (replaces
    ``block.mlp``; ``up`` starts at zero).

    On the ViT the module returns ``mlp(x) + x + adapter(x)`` for the MLP input ``x = norm2(tokens)``, as
    micro_sam does (so that its checkpoints compute the same); on TinyViT ``mlp(x) + adapter(norm(x))``.

    Args:
        rank: Not used; accepted so that all PEFT modules share the signature.
        block: The transformer block.
        alpha: "learnable_scalar" for a learned factor (starts at 1), or a fixed number.
        dropout: Dropout between the projections in training (None: no dropout).
        projection_size: The bottleneck width.
    """

    def __init__(self, rank: Optional[int], block: nn.Module, alpha: Union[str, float] = "learnable_scalar",
                 dropout: Optional[float] = None, projection_size: int = 64):
        super().__init__()
        if isinstance(projection_size, bool) or not isinstance(projection_size, int) or projection_size <= 0:
            raise ValueError(f"projection_size must be a positive integer, got {projection_size!r}.")
        if alpha == "learnable_scalar":
            self.alpha = nn.Parameter(torch.ones(1))
        elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            self.alpha = float(alpha)
        else:
            raise ValueError(f"alpha must be 'learnable_scalar' or a number, got {alpha!r}.")
        self.mlp_proj = block.mlp
        first, _, norm, _ = mlp_parts(block.mlp)
        self._norm_inside = norm is not None
        self.n_embd = first.in_features
        self.projection_size = projection_size
        self.dropout = dropout
        self.down_proj = nn.Linear(self.n_embd, projection_size)
        self.non_linear_func = nn.ReLU()
        self.up_proj = nn.Linear(projection_size, self.n_embd)
        if dropout is not None:
            self.dropout_layer = nn.Dropout(dropout)
        nn.init.kaiming_uniform_(self.down_proj.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.bias)
        block.mlp = self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (..., C) -> (..., C)."""
        mlp_output = self.mlp_proj(x)
        adapter_input = self.mlp_proj.norm(x) if self._norm_inside else x
        hidden = self.non_linear_func(self.down_proj(adapter_input))
        if self.dropout is not None:
            hidden = self.dropout_layer(hidden)
        up = self.up_proj(hidden) * self.alpha
        return mlp_output + up if self._norm_inside else up + x + mlp_output


class SelectiveSurgery(nn.Module):
    """Base of the selective methods: make some of a block's (frozen) parameters trainable again.

    Args:
        block: The transformer block.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def allow_gradient_update_for_parameters(
        self,
        prefix: Optional[List[str]] = None,
        suffix: Optional[List[str]] = None,
        infix: Optional[List[str]] = None,
    ) -> None:
        """Set ``requires_grad`` for the block parameters whose names (relative to the block) match.

        Args:
            prefix: Names starting with one of these.
            suffix: Names ending with one of these.
            infix: Names containing one of these.
        """
        for name, parameter in self.block.named_parameters():
            if (prefix is not None and name.startswith(tuple(prefix))) \
                    or (suffix is not None and name.endswith(tuple(suffix))) \
                    or (infix is not None and any(part in name for part in infix)):
                parameter.requires_grad = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity: the block itself is unchanged."""
        return x


class AttentionSurgery(SelectiveSurgery):
    """Train the attention parameters of a block (``attn.*``: qkv, projection, relative positions / biases)."""

    def __init__(self, block: nn.Module):
        super().__init__(block=block)
        self.allow_gradient_update_for_parameters(prefix=["attn"])


class BiasSurgery(SelectiveSurgery):
    """Train the biases of a block."""

    def __init__(self, block: nn.Module):
        super().__init__(block=block)
        self.allow_gradient_update_for_parameters(suffix=["bias"])


class LayerNormSurgery(SelectiveSurgery):
    """Train the layer norms of a block (ViT: ``norm1``, ``norm2``; TinyViT: ``attn.norm``, ``mlp.norm``)."""

    def __init__(self, block: nn.Module):
        super().__init__(block=block)
        norms = [f"{name}." for name, module in block.named_modules() if isinstance(module, nn.LayerNorm)]
        self.allow_gradient_update_for_parameters(prefix=norms)


class ClassicalSurgery(SelectiveSurgery):
    """Train all parameters of a block (classical finetuning of chosen blocks, e.g. the last one)."""

    def __init__(self, block: nn.Module):
        super().__init__(block=block)
        for parameter in block.parameters():
            parameter.requires_grad = True


PEFT_MODULES: Dict[str, Type[nn.Module]] = {
    cls.__name__: cls for cls in (LoRASurgery, FacTSurgery, SSFSurgery, AdaptFormer, AttentionSurgery, BiasSurgery,
                                  LayerNormSurgery, ClassicalSurgery)
}
"""The PEFT modules :class:`PEFT_Sam` accepts, by class name."""

_ALIASES = {"lora": "LoRASurgery", "fact": "FacTSurgery", "ssf": "SSFSurgery", "adaptformer": "AdaptFormer",
            "attention": "AttentionSurgery", "bias": "BiasSurgery", "layernorm": "LayerNormSurgery",
            "classical": "ClassicalSurgery"}
_NEEDS_RANK = (LoRASurgery, FacTSurgery)


def get_peft_module(peft_module: Union[str, Type[nn.Module]]) -> Type[nn.Module]:
    """The PEFT module class for a class or a name ("LoRASurgery" or "lora", "FacTSurgery" or "fact", ...).

    Raises:
        ValueError: For anything else; the message lists the valid names.
    """
    if isinstance(peft_module, type) and issubclass(peft_module, tuple(PEFT_MODULES.values()) + (SelectiveSurgery,)):
        return peft_module
    if isinstance(peft_module, str):
        name = _ALIASES.get(peft_module.lower(), peft_module)
        if name in PEFT_MODULES:
            return PEFT_MODULES[name]
    names = ", ".join(f"{short!r} ({full})" for short, full in _ALIASES.items())
    raise ValueError(f"Unknown PEFT module {peft_module!r}; valid: {names}, or the class itself.")


class PEFT_Sam(nn.Module):
    """Wrap SAM's image encoder for parameter-efficient finetuning (in place).

    Freezes all image-encoder parameters, then attaches ``peft_module`` to each chosen transformer block (new
    PEFT parameters are trainable; the selective methods unfreeze their parameters). ``PEFT_Sam(sam, ...).sam``
    is the wrapped model (what :func:`micro_sam.util.get_sam_model` and the trainers use); its state dict has
    micro_sam's key names, e.g. ``image_encoder.blocks.0.attn.qkv.qkv_proj.weight`` and
    ``image_encoder.blocks.0.attn.qkv.w_a_linear_q.weight`` for LoRA.

    Args:
        model: The SAM model (``segment_anything.modeling.Sam``; ViT or TinyViT encoder); modified in place.
        rank: The rank for LoRA and FacT (ignored by the other methods).
        peft_module: The PEFT module class, or its name ("lora", "fact", "ssf", "adaptformer", "attention",
            "bias", "layernorm", "classical", or the class name).
        attention_layers_to_update: Indices of the blocks to adapt (vit_b: 0-11, vit_l: 0-23, vit_h: 0-31, vit_t:
            0-9); None (or empty) adapts all.
        quantize: Quantize the encoder's linear layers to 4 bit (QLoRA); needs bitsandbytes and a CUDA GPU.
        module_kwargs: Further arguments of the PEFT module (e.g. ``update_matrices`` for LoRA, ``dropout`` for
            FacT, ``alpha``/``projection_size`` for AdaptFormer).

    Raises:
        ValueError: An unknown PEFT module, a missing or non-positive rank for LoRA / FacT, block indices out of
            range, or arguments the module does not take; all before the model is changed.
        ModuleNotFoundError / RuntimeError: ``quantize`` without bitsandbytes or without a CUDA GPU.
    """

    def __init__(
        self,
        model: nn.Module,
        rank: Optional[int] = None,
        peft_module: Union[str, Type[nn.Module]] = LoRASurgery,
        attention_layers_to_update: Optional[List[int]] = None,
        quantize: bool = False,
        **module_kwargs,
    ):
        super().__init__()
        blocks = transformer_blocks(model.image_encoder)
        peft_module, layers = _validate(peft_module, rank, attention_layers_to_update, module_kwargs, len(blocks))

        if quantize:
            quantize_linear_layers(model.image_encoder)
        for parameter in model.image_encoder.parameters():
            parameter.requires_grad = False

        self.peft_layers = layers
        self.peft_module = peft_module
        peft_blocks = []
        if issubclass(peft_module, SSFSurgery):  # micro_sam's first entry (the patch embedding stays unchanged)
            peft_blocks.append(peft_module(rank=rank, block=model.image_encoder.patch_embed))
        for index, block in enumerate(blocks):
            if index not in layers:
                continue
            if issubclass(peft_module, SelectiveSurgery):
                peft_blocks.append(peft_module(block=block))
            else:
                peft_blocks.append(peft_module(rank=rank, block=block, **module_kwargs))
        self.peft_blocks = nn.ModuleList(peft_blocks)
        self.sam = model

    def forward(self, batched_input: List[dict], multimask_output: bool) -> List[dict]:
        """``Sam.forward`` of the wrapped model."""
        return self.sam(batched_input, multimask_output)


#: Transformer blocks per encoder (the valid ``attention_layers_to_update`` are 0 to n - 1).
N_BLOCKS = {"vit_t": 10, "vit_b": 12, "vit_l": 24, "vit_h": 32}


def check_peft_kwargs(peft_kwargs: dict, model_type: Optional[str] = None) -> dict:
    """Check PEFT settings before a model is loaded (the same checks as :class:`PEFT_Sam`).

    Args:
        peft_kwargs: Arguments of :class:`PEFT_Sam` (without the model).
        model_type: The model they are meant for ("vit_b", "vit_b_lm", ...); its block count bounds
            ``attention_layers_to_update``. None skips that check.

    Returns:
        A copy of ``peft_kwargs`` with ``peft_module`` as a class.

    Raises:
        ValueError: An unknown PEFT module or argument, a missing or non-positive rank for LoRA / FacT, block
            indices out of range; the message says what is valid.
    """
    if not isinstance(peft_kwargs, dict):
        raise ValueError(f"peft_kwargs must be a dict of PEFT_Sam arguments, got {peft_kwargs!r}.")
    kwargs = dict(peft_kwargs)
    if "model" in kwargs:
        raise ValueError("peft_kwargs must not contain the model: they are the other arguments of PEFT_Sam.")
    module_kwargs = {k: v for k, v in kwargs.items()
                     if k not in ("rank", "peft_module", "attention_layers_to_update", "quantize")}
    n_blocks = N_BLOCKS.get(model_type[:5]) if isinstance(model_type, str) else None
    kwargs["peft_module"], _ = _validate(kwargs.get("peft_module", LoRASurgery), kwargs.get("rank"),
                                         kwargs.get("attention_layers_to_update"), module_kwargs, n_blocks)
    return kwargs


def _validate(peft_module, rank, attention_layers_to_update, module_kwargs: dict, n_blocks: Optional[int]):
    """(PEFT module class, block indices to adapt); ValueError for invalid settings. ``n_blocks`` None: the
    indices are only checked to be non-negative integers (and None is returned for them)."""
    peft_module = get_peft_module(peft_module)
    if issubclass(peft_module, _NEEDS_RANK):
        _check_rank(rank, peft_module.__name__)
    layers = None if n_blocks is None else list(range(n_blocks))
    if attention_layers_to_update:
        if isinstance(attention_layers_to_update, int):
            attention_layers_to_update = [attention_layers_to_update]
        chosen = list(attention_layers_to_update)
        limit = n_blocks if n_blocks is not None else float("inf")
        bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < limit]
        if bad:
            valid = "non-negative integers" if n_blocks is None else \
                f"0-{n_blocks - 1} (this encoder has {n_blocks} transformer blocks)"
            raise ValueError(f"attention_layers_to_update {bad} out of range; valid indices: {valid}.")
        layers = chosen
    if issubclass(peft_module, SelectiveSurgery) and module_kwargs:
        raise ValueError(f"{peft_module.__name__} takes no further arguments, got {sorted(module_kwargs)}.")
    _check_module_kwargs(peft_module, module_kwargs)
    return peft_module, layers


def _check_module_kwargs(peft_module: Type[nn.Module], module_kwargs: dict) -> None:
    import inspect

    accepted = set(inspect.signature(peft_module.__init__).parameters) - {"self", "rank", "block"}
    unknown = sorted(set(module_kwargs) - accepted)
    if unknown:
        raise ValueError(f"{peft_module.__name__} does not take {unknown}; its options: {sorted(accepted) or 'none'}.")
    if issubclass(peft_module, LoRASurgery) and "update_matrices" in module_kwargs:
        matrices = module_kwargs["update_matrices"]
        matrices = [matrices] if isinstance(matrices, str) else list(matrices)
        unknown = sorted(set(matrices) - set(_LORA_MATRICES))
        if unknown or not matrices:
            raise ValueError(f"Unknown update_matrices {unknown or matrices}; choose from {list(_LORA_MATRICES)}.")
