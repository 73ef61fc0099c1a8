"""Layers of the TinyViT (``vit_t``) encoder that carry its inference speed-ups.

* :class:`Attention`: window self-attention with a learned relative-position bias, computed by
  :func:`torch.nn.functional.scaled_dot_product_attention` with the bias as an additive ``attn_mask``.
* :class:`Conv2d_BN`: convolution + BatchNorm, run as one convolution with folded weights in eval mode.
* :class:`DerivedTensorCache`: keeps the expanded bias table and the folded weights between calls until a
  parameter changes (in-place update, ``load_state_dict``, optimizer step), moves or changes dtype.
* ``gelu_on_temporary``/``residual_add``: in-place variants used when autograd does not track the tensors.

Caches are only used when no gradient is needed, so training sees differentiable values.
"""
import functools
from typing import Callable, Hashable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "Conv2d_BN", "DerivedTensorCache", "DropPath", "relative_offset_index"]


class DerivedTensorCache:
    """Keeps a value computed from some source tensors until one of them changes.

    A source counts as changed when its device, dtype, shape, storage address or in-place version
    counter changes. The version counter catches ``load_state_dict``, optimizer steps and any other
    in-place update; the address catches ``.to(...)``/``.data = ...`` replacements. In-place writes through
    ``tensor.data`` bypass the version counter: call ``.eval()`` again afterwards (it clears the caches).
    The cache is bypassed (the value is recomputed, with autograd) whenever gradients are enabled and
    a source requires them, so training sees a differentiable value.
    """

    def __init__(self) -> None:
        self._entry: Optional[Tuple[Hashable, object]] = None  # (key, value), replaced as a whole

    def clear(self) -> None:
        """Drop the cached value."""
        self._entry = None

    def get(self, sources: Sequence[torch.Tensor], compute: Callable[[], object], extra_key: Hashable = None):
        """Return ``compute()``, reusing the previous result while ``sources`` are unchanged.

        Args:
            sources: The tensors ``compute`` reads.
            compute: Function without arguments returning the derived value.
            extra_key: Anything else the value depends on (e.g. the requested dtype).

        Returns:
            The (possibly cached) value of ``compute()``.
        """
        if torch.is_grad_enabled() and any(s.requires_grad for s in sources):
            self.clear()
            return compute()
        try:
            key = tuple((s.device, s.dtype, tuple(s.shape), s.data_ptr(), s._version) for s in sources)
        except RuntimeError:  # inference-mode tensors have no version counter
            return compute()
        key = (key, extra_key)
        entry = self._entry
        if entry is not None and entry[0] == key:
            return entry[1]
        # Build normal tensors even when called inside torch.inference_mode, so that the cached value can
        # be used later outside of it.
        with torch.inference_mode(False), torch.no_grad():
            value = compute()
        self._entry = (key, value)
        return value


class DropPath(nn.Module):
    """Stochastic depth: in training, zero the whole residual branch of a sample with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def drop_path_module(p: float) -> nn.Module:
    """``DropPath(p)``, or an identity for ``p == 0``."""
    return DropPath(p) if p > 0 else nn.Identity()


def gelu_on_temporary(act: nn.GELU, x: torch.Tensor) -> torch.Tensor:
    """Apply ``act`` to ``x``, a temporary nobody else holds; in place when autograd does not track ``x``.

    Allocating a new output costs more than the GELU itself for the large maps of the first stages.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return act(x)
    return torch.ops.aten.gelu_(x, approximate=act.approximate)


def residual_add(branch: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``branch + x``, accumulated into ``branch`` (a temporary) when autograd does not track it.

    Under autograd the out-of-place sum is cheaper: ``branch`` is often a view of a linear layer's output,
    and in-place updates of views cost extra copies in the backward pass.
    """
    if torch.is_grad_enabled() and (branch.requires_grad or x.requires_grad):
        return branch + x
    return branch.add_(x)


def has_forward_hooks(*modules: nn.Module) -> bool:
    """Whether calling these modules would run forward (pre-)hooks, their own or global ones: a fast path that
    computes their function without calling them must then call them instead."""
    from torch.nn.modules import module as _module

    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def needs_autograd(module: nn.Module, *tensors: torch.Tensor) -> bool:
    """Whether autograd would track a computation with ``module``'s parameters on ``tensors``."""
    return torch.is_grad_enabled() and (
        any(t.requires_grad for t in tensors) or any(p.requires_grad for p in module.parameters())
    )


class Conv2d_BN(nn.Sequential):
    """Bias-free convolution ``c`` followed by BatchNorm ``bn``; folded into one convolution in eval mode.

    Args:
        in_chans: Input channels.
        out_chans: Output channels.
        kernel_size: Square kernel size.
        stride: Convolution stride.
        padding: Zero padding on each side.
        groups: Convolution groups (``groups == in_chans`` for a depthwise convolution).
        bn_weight_init: Initial BatchNorm scale.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False))
        bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)
        self._folded = DerivedTensorCache()

    def folded_weight_and_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of the single convolution equal to ``bn(c(x))`` with the running statistics."""
        c, bn = self.c, self.bn

        def fold():
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            return c.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale

        sources = (c.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        return self._folded.get(sources, fold)

    def train(self, mode: bool = True) -> "Conv2d_BN":
        self._folded.clear()
        return super().train(mode)

    def _apply(self, *args, **kwargs):  # .to(), .cuda(), .half(), ...: drop values of the old tensors
        self._folded.clear()
        return super()._apply(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the convolution; ``x`` of shape ``(B, C_in, H, W)``, any memory format."""
        if self.bn.training or self.bn.running_mean is None or self.bn.weight is None:
            return self.bn(self.c(x))
        weight, bias = self.folded_weight_and_bias()
        c = self.c
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)


def relative_offset_index(resolution: Tuple[int, int]) -> Tuple[torch.Tensor, int]:
    """Index of the absolute 2D offset between every pair of positions in a window.

    Positions are enumerated row-major (``p = row * width + col``). Offsets are numbered in order of
    first appearance when iterating over all ``(p1, p2)`` pairs row-major, which is the numbering the
    ``attention_biases`` tables of TinyViT checkpoints use.

    Args:
        resolution: The window size ``(height, width)``.

    Returns:
        A long tensor of shape ``(N, N)`` with ``N = height * width`` and the number of distinct offsets.
    """
    idxs, n_offsets = _relative_offset_index(tuple(int(r) for r in resolution))
    return torch.from_numpy(idxs.copy()), n_offsets


@functools.lru_cache(maxsize=None)
def _relative_offset_index(resolution: Tuple[int, int]) -> Tuple[np.ndarray, int]:
    rows, cols = np.divmod(np.arange(resolution[0] * resolution[1]), resolution[1])
    code = np.abs(rows[:, None] - rows[None, :]) * resolution[1] + np.abs(cols[:, None] - cols[None, :])
    codes, first = np.unique(code.ravel(), return_index=True)
    rank = np.empty(len(codes), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(codes))  # numbered by first appearance
    lookup = np.zeros(int(codes.max()) + 1, dtype=np.int64)
    lookup[codes] = rank
    idxs = lookup[code]
    idxs.setflags(write=False)
    return idxs, len(codes)


class Attention(nn.Module):
    """Multi-head self-attention over the tokens of one window, with pre-norm and a learned position bias.

    Args:
        dim: Token channels ``C``.
        key_dim: Channels per head of queries and keys.
        num_heads: Number of heads.
        attn_ratio: Channels per head of the values, as a multiple of ``key_dim``.
        resolution: The window size; the input must hold ``resolution[0] * resolution[1]`` tokens.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int = 8,
        attn_ratio: float = 4,
        resolution: Tuple[int, int] = (14, 14),
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim ** -0.5
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.attn_ratio = attn_ratio
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, self.dh + 2 * key_dim * num_heads)
        self.proj = nn.Linear(self.dh, dim)
        idxs, num_offsets = relative_offset_index(resolution)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, num_offsets))
        self.register_buffer("attention_bias_idxs", idxs, persistent=False)
        self._bias_cache = DerivedTensorCache()

    def attention_bias(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The additive attention bias of shape ``(1, num_heads, N, N)``, cached when no gradient is needed.

        The leading singleton axis lets ``scaled_dot_product_attention`` use its fused CPU kernel, which
        needs a 4D mask.
        """
        dtype = self.attention_biases.dtype if dtype is None else dtype

        def gather():
            return self.attention_biases[:, self.attention_bias_idxs].unsqueeze(0).to(dtype)

        if self.training:
            return gather()
        return self._bias_cache.get((self.attention_biases, self.attention_bias_idxs), gather, dtype)

    def train(self, mode: bool = True) -> "Attention":
        self._bias_cache.clear()
        return super().train(mode)

    def _apply(self, *args, **kwargs):  # .to(), .cuda(), .half(), ...: drop values of the old tensors
        self._bias_cache.clear()
        return super()._apply(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply attention to windows of tokens.

        Args:
            x: Tokens of shape ``(B, N, C)``, ``N`` tokens of a window in row-major order.

        Returns:
            Tensor of shape ``(B, N, C)``.
        """
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x))
        # The projection is laid out head by head, each head holding [query, key, value].
        qkv = qkv.view(b, n, self.num_heads, -1).transpose(1, 2)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.d], dim=3)
        bias = self.attention_bias(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dh))
