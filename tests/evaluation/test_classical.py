"""micro_sam.evaluation.classical: the Otsu + distance-transform watershed baseline."""
import numpy as np
import pytest

from micro_sam.evaluation.classical import otsu_watershed_segmentation
from micro_sam.evaluation.metrics import mean_segmentation_accuracy


def _disks(centres, radius, shape=(80, 120)):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    labels = np.zeros(shape, dtype="uint32")
    for i, (cy, cx) in enumerate(centres, start=1):
        labels[((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2) & (labels == 0)] = i
    return labels


def test_separate_and_touching_disks_are_found():
    rng = np.random.default_rng(0)
    # two separate disks and a touching pair (centres 2 * radius - 2 apart)
    labels = _disks([(20, 20), (60, 25), (40, 70), (40, 98)], radius=15)
    image = (np.where(labels > 0, 200.0, 30.0) + rng.normal(0, 5, labels.shape)).astype("float32")
    segmentation = otsu_watershed_segmentation(image, smoothing=1.0, min_distance=5, distance_smoothing=1.0)
    assert segmentation.dtype == np.uint32 and segmentation.max() == 4
    assert mean_segmentation_accuracy(segmentation, labels) > 0.8
    # the same in 16 bit, scaled: the threshold follows the data
    scaled = otsu_watershed_segmentation((image * 100).astype("uint16"), smoothing=1.0, min_distance=5,
                                         distance_smoothing=1.0)
    np.testing.assert_array_equal(scaled, segmentation)
    # a large min_distance keeps the touching pair together
    assert otsu_watershed_segmentation(image, min_distance=40).max() == 3


def test_images_without_contrast_and_bad_input():
    assert otsu_watershed_segmentation(np.zeros((32, 32))).max() == 0
    assert otsu_watershed_segmentation(np.full((32, 32), 7, dtype="uint16")).max() == 0
    with pytest.raises(ValueError, match="2D"):
        otsu_watershed_segmentation(np.zeros((2, 32, 32)))
    with pytest.raises(ValueError, match="min_distance"):
        otsu_watershed_segmentation(np.zeros((32, 32)), min_distance=0)
