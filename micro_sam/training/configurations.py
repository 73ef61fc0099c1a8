"""Tested training settings per hardware resource, and selection of the closest one for this machine.

The table below is the project's specification of which settings were tested on which hardware:

=============================  ========  ==========  ==========  ============================  =========
Resource                       Capacity  Model type  Batch size  Finetuned parts               Objects
=============================  ========  ==========  ==========  ============================  =========
CPU                            32 GB     vit_b       1           all                           10
CPU                            64 GB     vit_b       1           all                           15
GPU (NVIDIA GTX 1080Ti)        8 GB      vit_b       1           mask decoder, prompt encoder  10
GPU (NVIDIA Quadro RTX5000)    16 GB     vit_b       1           all                           10
GPU (Tesla V100)               32 GB     vit_b       1           all                           10
GPU (NVIDIA A100)              80 GB     vit_t       2           all                           50
GPU (NVIDIA A100)              80 GB     vit_b       2           all                           40
GPU (NVIDIA A100)              80 GB     vit_l       2           all                           30
GPU (NVIDIA A100)              80 GB     vit_h       2           all                           25
=============================  ========  ==========  ==========  ============================  =========

"Objects" is the number of objects per batch used for the interactive-segmentation loss; "finetuned parts"
translates to the list of *frozen* parts: ``[]`` for all, ``["image_encoder"]`` for mask decoder + prompt encoder.

This module is light: torch is only imported to look at the GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

__all__ = [
    "HARDWARE_TABLE", "RESOURCES", "RESOURCE_ALIASES", "CONFIGURATIONS", "TrainingSetting",
    "get_training_configuration", "find_best_configuration", "resolve_resource",
]


@dataclass(frozen=True)
class TrainingSetting:
    """One row of the hardware table.

    Attributes:
        resource: Canonical resource name (see :data:`RESOURCES`).
        device: "cpu" or "gpu".
        description: Human readable name of the hardware.
        capacity_gb: System RAM (CPU) or GPU memory in GB.
        model_type: The SAM architecture tested with these settings.
        batch_size: Images per batch.
        freeze: The frozen model parts.
        n_objects_per_batch: Objects per image used for the interactive-segmentation loss.
    """

    resource: str
    device: str
    description: str
    capacity_gb: int
    model_type: str
    batch_size: int
    freeze: Tuple[str, ...]
    n_objects_per_batch: int

    def as_dict(self) -> dict:
        """The training settings: ``model_type``, ``batch_size``, ``n_objects_per_batch``, ``freeze`` (a new list)."""
        return {
            "model_type": self.model_type,
            "batch_size": self.batch_size,
            "n_objects_per_batch": self.n_objects_per_batch,
            "freeze": list(self.freeze),
        }


_ALL: Tuple[str, ...] = ()
_DECODERS_ONLY: Tuple[str, ...] = ("image_encoder",)

HARDWARE_TABLE: Tuple[TrainingSetting, ...] = (
    TrainingSetting("CPU_32GB", "cpu", "CPU", 32, "vit_b", 1, _ALL, 10),
    TrainingSetting("CPU_64GB", "cpu", "CPU", 64, "vit_b", 1, _ALL, 15),
    TrainingSetting("GTX1080Ti", "gpu", "GPU (NVIDIA GTX 1080Ti)", 8, "vit_b", 1, _DECODERS_ONLY, 10),
    TrainingSetting("RTX5000", "gpu", "GPU (NVIDIA Quadro RTX5000)", 16, "vit_b", 1, _ALL, 10),
    TrainingSetting("V100", "gpu", "GPU (Tesla V100)", 32, "vit_b", 1, _ALL, 10),
    TrainingSetting("A100", "gpu", "GPU (NVIDIA A100)", 80, "vit_t", 2, _ALL, 50),
    TrainingSetting("A100", "gpu", "GPU (NVIDIA A100)", 80, "vit_b", 2, _ALL, 40),
    TrainingSetting("A100", "gpu", "GPU (NVIDIA A100)", 80, "vit_l", 2, _ALL, 30),
    TrainingSetting("A100", "gpu", "GPU (NVIDIA A100)", 80, "vit_h", 2, _ALL, 25),
)
"""The hardware table, one :class:`TrainingSetting` per row."""

RESOURCES: Tuple[str, ...] = tuple(dict.fromkeys(row.resource for row in HARDWARE_TABLE))
"""Canonical resource names, in table order."""

RESOURCE_ALIASES: Dict[str, str] = {"CPU": "CPU_32GB", "gtx1080": "GTX1080Ti", "rtx5000": "RTX5000"}
"""Other accepted names (micro_sam's configuration names) and the canonical resource they stand for."""

_DEFAULT_MODEL_TYPE = "vit_b"

# micro_sam's configuration name for each resource (the canonical name where micro_sam has none).
_MICRO_SAM_NAMES = {"CPU_32GB": "CPU", "CPU_64GB": "CPU_64GB", "GTX1080Ti": "gtx1080", "RTX5000": "rtx5000",
                    "V100": "V100", "A100": "A100"}

# Substrings of GPU names (lower case) that identify a tested GPU.
_GPU_NAME_PATTERNS = (("1080", "GTX1080Ti"), ("rtx 5000", "RTX5000"), ("rtx5000", "RTX5000"),
                      ("v100", "V100"), ("a100", "A100"))


def resolve_resource(resource: str) -> str:
    """The canonical name for a resource name or alias (case-insensitive).

    Raises:
        ValueError: For an unknown name; the message lists the tested resources.
    """
    if isinstance(resource, str):
        lookup = {name.lower(): name for name in RESOURCES}
        lookup.update({alias.lower(): name for alias, name in RESOURCE_ALIASES.items()})
        canonical = lookup.get(resource.strip().lower())
        if canonical is not None:
            return canonical
    aliases = ", ".join(f"{alias!r} (= {name})" for alias, name in RESOURCE_ALIASES.items())
    raise ValueError(
        f"Unknown training resource {resource!r}. Tested resources: {', '.join(map(repr, RESOURCES))}; "
        f"aliases: {aliases}."
    )


def _rows(resource: str) -> List[TrainingSetting]:
    return [row for row in HARDWARE_TABLE if row.resource == resource]


def get_training_configuration(resource: str, model_type: Optional[str] = None) -> dict:
    """The tested training settings for a hardware resource.

    Args:
        resource: One of :data:`RESOURCES` ("CPU_32GB", "CPU_64GB", "GTX1080Ti", "RTX5000", "V100", "A100") or an
            alias ("CPU", "gtx1080", "rtx5000"); case-insensitive.
        model_type: The SAM architecture ("vit_t", "vit_b", "vit_l", "vit_h"); a model name with a suffix such as
            "vit_b_lm" selects the row of its architecture. Default: the resource's vit_b row.

    Returns:
        ``{"model_type", "batch_size", "n_objects_per_batch", "freeze"}``; ``freeze`` lists the frozen parts
        (``[]``: everything is finetuned). ``model_type`` is the row's architecture.

    Raises:
        ValueError: For an unknown resource, or a model type that was not tested on it (the message lists the
            tested model types).
    """
    canonical = resolve_resource(resource)
    rows = _rows(canonical)
    if model_type is None:
        architecture = _DEFAULT_MODEL_TYPE
    elif isinstance(model_type, str):
        architecture = model_type[:5]
    else:
        raise ValueError(f"model_type must be a string such as 'vit_b', got {model_type!r}.")
    for row in rows:
        if row.model_type == architecture:
            return row.as_dict()
    tested = ", ".join(row.model_type for row in rows)
    raise ValueError(
        f"model_type {model_type!r} was not tested on the resource {canonical!r}; tested model types: {tested}."
    )


def _build_configurations() -> Dict[str, dict]:
    configurations = {}
    for resource in RESOURCES:
        configurations[_MICRO_SAM_NAMES[resource]] = get_training_configuration(resource)
    return configurations


CONFIGURATIONS: Dict[str, dict] = _build_configurations()
"""micro_sam's configuration names ("CPU", "CPU_64GB", "gtx1080", "rtx5000", "V100", "A100") -> the settings of
the resource's vit_b row (``model_type``, ``batch_size``, ``n_objects_per_batch``, ``freeze``)."""


#
# Closest match for this machine
#

def _gpu_info() -> Optional[Tuple[str, float]]:
    """(name, total memory in GB) of the first CUDA GPU, or None without one."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(0)
    return str(properties.name), float(properties.total_memory) / 1e9


def _system_memory_gb() -> Optional[float]:
    """Total system RAM in GB, or None when it cannot be determined."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX systems
        return None


def _closest_by_memory(device: str, memory_gb: float) -> str:
    """The resource of this device kind with the largest capacity that fits into memory_gb (else the smallest).

    Capacities are nominal (an "8 GB" GPU reports about 8.6e9 bytes, a "32 GB" machine a bit less than 32e9), so
    10 % slack is allowed.
    """
    candidates = sorted({(row.capacity_gb, row.resource) for row in HARDWARE_TABLE if row.device == device})
    fitting = [resource for capacity, resource in candidates if capacity <= memory_gb * 1.1]
    return fitting[-1] if fitting else candidates[0][1]


def find_best_configuration(use_micro_sam_names: bool = True) -> str:
    """Choose the tested resource closest to the machine this runs on.

    With a CUDA GPU: a GPU whose name contains a tested model ("1080", "RTX 5000", "V100", "A100") gets that row;
    otherwise the GPU row with the largest memory that the GPU has (an H100 with 80 GB -> A100, 24 GB -> RTX5000).
    A GPU with less than the smallest tested memory (8 GB) is not used: the CPU rows apply. Without a usable GPU
    the CPU row for the system RAM (64 GB or more -> CPU_64GB, else CPU_32GB).

    Args:
        use_micro_sam_names: Return micro_sam's configuration name (the key in :data:`CONFIGURATIONS`, e.g. "CPU",
            "rtx5000") instead of the canonical resource name ("CPU_32GB", "RTX5000").

    Returns:
        The configuration name.
    """
    resource = None
    gpu = _gpu_info()
    if gpu is not None:
        name, memory_gb = gpu
        lowered = name.lower()
        for pattern, candidate in _GPU_NAME_PATTERNS:
            if pattern in lowered:
                resource = candidate
                break
        if resource is None:
            smallest_gpu = min(row.capacity_gb for row in HARDWARE_TABLE if row.device == "gpu")
            if memory_gb * 1.1 >= smallest_gpu:
                resource = _closest_by_memory("gpu", memory_gb)
    if resource is None:
        ram = _system_memory_gb()
        resource = _closest_by_memory("cpu", ram if ram is not None else 0.0)
    return _MICRO_SAM_NAMES[resource] if use_micro_sam_names else resource
