"""Deterministic weights and inputs for comparing network implementations (used by tests and fixtures).

Values come from a counter-based integer hash (splitmix64) seeded by a CRC32 of the state-dict key, so
they are the same on every platform and for every torch/numpy version. This module depends only on
numpy, torch and the standard library, so fixture scripts can load it by file path in another
environment.
"""
import zlib
from typing import Tuple

import numpy as np
import torch
from torch import nn

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def hash_uniform(n: int, seed: int) -> np.ndarray:
    """``n`` float64 values in ``[0, 1)`` from the splitmix64 sequence started at ``seed``."""
    with np.errstate(over="ignore"):
        z = (np.arange(1, n + 1, dtype=np.uint64) + np.uint64(seed)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2 ** 53)


def _centered(n: int, seed: int, std: float) -> np.ndarray:
    # uniform in [-a, a) has standard deviation a / sqrt(3)
    return (2.0 * hash_uniform(n, seed) - 1.0) * (std * np.sqrt(3.0))


def deterministic_value(key: str, shape: Tuple[int, ...]) -> np.ndarray:
    """The value assigned to the floating point state-dict entry ``key`` of the given shape.

    Weights with two or more dimensions get standard deviation ``1/sqrt(fan_in)``; 1D scales
    (``*.weight``) are ``1 + small``, shifts and statistics small, ``running_var`` in ``[0.5, 1.5)``
    and ``attention_biases`` have standard deviation 0.5.
    """
    n = int(np.prod(shape)) if len(shape) else 1
    seed = zlib.crc32(key.encode("utf-8"))
    if key.endswith("running_var"):
        values = 0.5 + hash_uniform(n, seed)
    elif key.endswith("attention_biases"):
        values = _centered(n, seed, 0.5)
    elif len(shape) >= 2:
        values = _centered(n, seed, 1.0 / np.sqrt(np.prod(shape[1:])))
    elif key.endswith("weight"):
        values = 1.0 + _centered(n, seed, 0.1)
    else:
        values = _centered(n, seed, 0.1)
    return values.reshape(shape)


@torch.no_grad()
def deterministic_fill_(module: nn.Module) -> nn.Module:
    """Overwrite every floating point entry of ``module.state_dict()`` in place with deterministic values.

    Integer entries (e.g. ``num_batches_tracked``) and non-persistent buffers are left as they are.
    Call ``.eval()``/``.train()`` afterwards for implementations that derive buffers when switching mode.

    Returns:
        The same module.
    """
    for key, tensor in module.state_dict().items():
        if tensor.is_floating_point():
            value = deterministic_value(key, tuple(tensor.shape))
            tensor.copy_(torch.from_numpy(value).to(tensor.dtype))
    return module


def deterministic_image(shape: Tuple[int, ...] = (1, 3, 1024, 1024), seed: int = 1234) -> torch.Tensor:
    """A float32 tensor of the given shape with values in ``[-2, 2)``, like a normalized image."""
    n = int(np.prod(shape))
    return torch.from_numpy((4.0 * hash_uniform(n, seed) - 2.0).astype(np.float32).reshape(shape))
