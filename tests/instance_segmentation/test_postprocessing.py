import numpy as np
import pytest

from micro_sam.instance_segmentation.postprocessing import (
    gaussian_smoothing, label_components, relabel_sequential, remove_small_regions, segmentation_to_masks,
    size_filter, watershed_from_center_and_boundary_distances,
)

from ._targets import decoder_targets


def _matched_ious(seg, labels):
    """IoU of each ground truth object with its best matching segment, and whether the matching is one-to-one."""
    ious, partners = [], []
    for k in np.unique(labels)[1:]:
        ids, counts = np.unique(seg[labels == k], return_counts=True)
        best = ids[np.argmax(counts)]
        inter = counts.max()
        ious.append(inter / np.logical_or(labels == k, seg == best).sum() if best else 0.0)
        partners.append(best)
    return np.array(ious), len(set(partners)) == len(partners)


def _same_partition(a, b):
    """Label images equal up to renumbering."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1])) and \
        np.array_equal(a == 0, b == 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_watershed_recovers_labels_from_exact_targets(seed):
    from micro_sam.sample_data import synthetic_cells_2d, synthetic_nuclei_2d

    for generator in (synthetic_nuclei_2d, synthetic_cells_2d):
        _, labels = generator(shape=(192, 224), seed=seed)
        foreground, center, boundary = decoder_targets(labels)
        seg = watershed_from_center_and_boundary_distances(center, boundary, foreground)
        assert seg.dtype == np.uint32 and seg.shape == labels.shape
        assert seg.max() == len(np.unique(labels)) - 1
        np.testing.assert_array_equal(seg > 0, labels > 0)
        ious, one_to_one = _matched_ious(seg, labels)
        # Only a few pixels on the interfaces of touching objects may switch sides (smoothed maps).
        assert one_to_one and ious.min() > 0.97, ious.min()


def test_watershed_touching_objects_and_thresholds():
    labels = np.zeros((40, 60), dtype="uint32")
    labels[5:35, 5:30] = 1
    labels[5:35, 30:55] = 2  # touching
    foreground, center, boundary = decoder_targets(labels)
    seg = watershed_from_center_and_boundary_distances(center, boundary, foreground)
    assert _same_partition(seg, labels)
    # A foreground threshold above every probability gives no objects, not an error.
    empty = watershed_from_center_and_boundary_distances(center, boundary, foreground, foreground_threshold=1.0)
    assert empty.shape == labels.shape and empty.max() == 0
    # min_size removes objects smaller than it and relabels the rest.
    labels[1:3, 1:3] = 3
    foreground, center, boundary = decoder_targets(labels)
    seg = watershed_from_center_and_boundary_distances(center, boundary, foreground, distance_smoothing=0,
                                                       min_size=10)
    assert seg.max() == 2 and seg[2, 2] == 0
    with pytest.raises(ValueError, match="same shape"):
        watershed_from_center_and_boundary_distances(center[:10], boundary, foreground)


def test_watershed_does_not_modify_inputs():
    labels = np.zeros((30, 30), dtype="uint32")
    labels[5:20, 5:20] = 1
    maps = decoder_targets(labels)
    copies = [m.copy() for m in maps]
    watershed_from_center_and_boundary_distances(maps[1], maps[2], maps[0])
    for m, c in zip(maps, copies):
        np.testing.assert_array_equal(m, c)


def test_gaussian_smoothing_mirror_border():
    image = np.zeros((11, 11), dtype="float32")
    image[5, 5] = 1.0
    out = gaussian_smoothing(image, 1.0)
    assert out.dtype == np.float32
    assert out.sum() == pytest.approx(1.0, abs=1e-3)  # mass is kept away from the border
    assert out[5, 5] == pytest.approx(out.max())
    np.testing.assert_allclose(out, out.T, atol=1e-7)
    # A constant image stays constant (mirrored border).
    np.testing.assert_allclose(gaussian_smoothing(np.full((7, 9), 3.0), 1.6), 3.0, rtol=1e-6)
    np.testing.assert_array_equal(gaussian_smoothing(image, 0), image)


def test_label_relabel_and_size_filter():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours
    mask[4:6, 4:6] = True
    labels, n = label_components(mask)
    assert n == 2 and labels[0, 0] == labels[1, 1] == 1 and labels[5, 5] == 2
    _, n4 = label_components(mask, connectivity=1)
    assert n4 == 3
    np.testing.assert_array_equal(relabel_sequential(np.array([[0, 7], [7, 3]])), [[0, 2], [2, 1]])
    seg = np.array([[1, 1, 0], [2, 0, 3], [3, 3, 3]])
    np.testing.assert_array_equal(size_filter(seg, 2), [[1, 1, 0], [0, 0, 2], [2, 2, 2]])
    np.testing.assert_array_equal(size_filter(seg, 0), seg)


def test_remove_small_regions():
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:12, 2:12] = True
    mask[5, 5] = False           # a one pixel hole
    mask[15:17, 15:17] = True    # a 4 pixel island
    filled, changed = remove_small_regions(mask, 3, mode="holes")
    assert changed and filled[5, 5] and filled.sum() == mask.sum() + 1
    cleaned, changed = remove_small_regions(mask, 5, mode="islands")
    assert changed and not cleaned[15:17, 15:17].any() and cleaned[2:12, 2:12].sum() == 99
    same, changed = remove_small_regions(mask, 1, mode="islands")
    assert not changed and np.array_equal(same, mask)
    # When every island is small, the largest one is kept.
    largest, _ = remove_small_regions(mask, 1000, mode="islands")
    assert largest.sum() == 99
    with pytest.raises(ValueError, match="mode"):
        remove_small_regions(mask, 3, mode="both")


def test_segmentation_to_masks():
    seg = np.zeros((10, 12), dtype="uint32")
    seg[2:5, 3:9] = 4
    records = segmentation_to_masks(seg)
    assert len(records) == 1
    r = records[0]
    assert r["seg_id"] == 4 and r["area"] == 18 and r["bbox"] == [3, 2, 6, 3] and r["crop_box"] == [0, 0, 12, 10]
    np.testing.assert_array_equal(r["segmentation"], seg == 4)
    assert segmentation_to_masks(np.zeros((5, 5), dtype="uint32")) == []
