"""Offline sample data for napari's File > Open Sample menu (synthetic nuclei with their labels)."""
from typing import List


def sample_data_synthetic_nuclei_2d() -> List[tuple]:
    """A synthetic 2D nuclei image (512 x 512, seed 0) and its instance labels, as napari layer data.

    Returns:
        ``[(image, {"name": "synthetic_nuclei_2d"}), (labels, {"name": "synthetic_nuclei_2d_labels"}, "labels")]``.
    """
    from ..sample_data import synthetic_nuclei_2d

    image, labels = synthetic_nuclei_2d(seed=0)
    return [(image, {"name": "synthetic_nuclei_2d"}), (labels, {"name": "synthetic_nuclei_2d_labels"}, "labels")]


def sample_data_synthetic_nuclei_3d() -> List[tuple]:
    """A synthetic 3D nuclei volume (16 x 256 x 256, seed 0) and its instance labels, as napari layer data.

    Returns:
        ``[(volume, {"name": "synthetic_nuclei_3d"}), (labels, {"name": "synthetic_nuclei_3d_labels"}, "labels")]``.
    """
    from ..sample_data import synthetic_nuclei_3d

    volume, labels = synthetic_nuclei_3d(seed=0)
    return [(volume, {"name": "synthetic_nuclei_3d"}), (labels, {"name": "synthetic_nuclei_3d_labels"}, "labels")]
