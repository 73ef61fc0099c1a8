"""The stitching step with known answers: blocks that see the true objects must give back the true objects."""
import numpy as np
import pytest

from micro_sam import _tiling
from micro_sam.distributed._stitching import (
    block_faces, crop_block, match_face, merge_labels, stitch_blocks,
)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images are equal up to renaming the ids (0 stays background)."""
    if a.shape != b.shape or not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def discs(shape, centers_radii):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    labels = np.zeros(shape, dtype="uint32")
    for i, (cy, cx, r) in enumerate(centers_radii, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2] = i
    return labels


def block_views(truth, block_shape, halo, seed=0, view=None):
    """What a perfect segmenter sees in each block's outer region, with arbitrary ids per block."""
    rng = np.random.default_rng(seed)
    views = []
    for block in _tiling.iterate_tiles(truth.shape, block_shape, halo):
        labels = truth[block.outer] if view is None else view(block)
        ids = rng.permutation(np.arange(1, max(int(labels.max()), 1) + 1) * 7 + 1000)
        views.append(np.where(labels > 0, np.concatenate([[0], ids])[labels], 0))
    return views


@pytest.fixture
def mosaic():
    """Discs on block corners, faces and inside blocks (block 64 x 64), a bar over three blocks and two
    objects that touch exactly at a face."""
    shape = (150, 170)
    labels = discs(shape, [(64, 64, 10), (64, 20, 7), (20, 128, 9), (100, 100, 6), (128, 128, 12), (30, 30, 5),
                           (140, 60, 8)])
    labels[100:110, 5:160] = labels.max() + 1                  # crosses two faces along x
    labels[40:64, 150:165] = labels.max() + 1                  # ends at the face y = 64 ...
    labels[64:90, 150:165] = labels.max() + 1                  # ... where another object begins
    return labels


def test_stitch_recovers_true_objects_2d(mosaic):
    block_shape, halo = (64, 64), (8, 8)
    stitched = stitch_blocks(block_views(mosaic, block_shape, halo), mosaic.shape, block_shape, halo)
    assert stitched.dtype == np.uint32
    assert same_partition(stitched, mosaic)
    assert stitched.max() == mosaic.max() == 10                # ids are 1..N
    # The objects touching at the face stay two objects; the bar over three blocks is one.
    assert stitched[63, 155] != stitched[64, 155]
    assert len(np.unique(stitched[100:110, 5:160])) == 1


def test_stitch_recovers_true_objects_3d():
    shape, block_shape, halo = (40, 70, 60), (16, 32, 32), (4, 6, 6)
    zz, yy, xx = np.mgrid[:shape[0], :shape[1], :shape[2]]
    truth = np.zeros(shape, dtype="uint32")
    for i, (c, r) in enumerate([((16, 32, 32), 7), ((8, 10, 30), 5), ((30, 60, 10), 6), ((24, 40, 50), 4)], 1):
        truth[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r ** 2] = i
    truth[:, 50:54, 40:44] = 5                                  # a rod through all z blocks
    stitched = stitch_blocks(block_views(truth, block_shape, halo), shape, block_shape, halo)
    assert same_partition(stitched, truth)
    assert stitched.max() == 5


def test_stitch_keeps_every_pixel_of_its_owner(mosaic):
    """Blocks that disagree: each pixel takes the label of the block that owns it, none is lost or doubled."""
    block_shape, halo = (64, 64), (8, 8)

    def view(block):  # block 1 (top middle) misses everything; block 4 splits the disc at (64, 64) in two
        labels = mosaic[block.outer].copy()
        if block.tile_id == 1:
            labels[:] = 0
        if block.tile_id == 4:
            labels[(labels == 1) & (np.arange(labels.shape[1])[None] > 8)] = 77
        return labels

    views = block_views(mosaic, block_shape, halo, view=view)
    stitched = stitch_blocks(views, mosaic.shape, block_shape, halo)
    expected_foreground = np.zeros(mosaic.shape, bool)
    for block, labels in zip(_tiling.iterate_tiles(mosaic.shape, block_shape, halo), views):
        expected_foreground[block.inner] = labels[block.local] > 0
    np.testing.assert_array_equal(stitched > 0, expected_foreground)
    # The disc at the corner (64, 64): unlabelled in block 1; block 4 splits it at column 64 / 65: its part in
    # column 64 agrees with blocks 0 and 3 and joins them, columns 65.. stay one more object.
    disc, columns = mosaic == 1, np.arange(170)[None]
    assert not stitched[disc & (np.arange(150)[:, None] < 64) & (columns >= 64)].any()
    joined = np.unique(stitched[disc & (np.arange(150)[:, None] >= 64) & (columns <= 64) | disc & (columns < 64)])
    assert len(joined) == 1 and joined[0] != 0
    rest = np.unique(stitched[disc & (np.arange(150)[:, None] >= 64) & (columns > 64)])
    assert len(rest) == 1 and rest[0] not in (0, joined[0])


def test_crop_block_renumbers_and_skirts():
    shape, block_shape, halo = (12, 12), (6, 6), (2, 2)
    block = _tiling.get_tile(0, shape, block_shape, halo)      # inner [0, 6)^2, outer [0, 8)^2
    outer = np.zeros((8, 8), dtype="int64")
    outer[1:3, 1:3] = 50                                       # inside
    outer[4:8, 2:4] = 9                                        # crosses the lower face (y = 6)
    outer[7, 7] = 3                                            # only in the halo corner: not an object here
    part = crop_block(outer, block, shape, halo)
    assert part.n_objects == 2
    assert set(part.skirts) == {(0, 1), (1, 1)}                # no neighbours above / left of block 0
    assert part.inner[1, 1] == 2 and part.inner[4, 2] == 1    # ids in the order of the original ids (9 < 50)
    np.testing.assert_array_equal(part.skirts[(0, 1)], np.where(outer[6:8, :6] == 9, 1, 0))
    assert not part.skirts[(1, 1)].any()                       # the halo corner is no skirt
    with pytest.raises(ValueError, match="outer region"):
        crop_block(outer[:7], block, shape, halo)


def test_match_face_by_overlap():
    lower_inner = np.array([[1, 1, 0, 2, 2]])
    upper_skirt = np.array([[5, 5, 0, 0, 6]])                  # the upper block's view of the lower strip
    lower_skirt = np.array([[1, 1, 1, 0, 0]])
    upper_inner = np.array([[5, 5, 0, 6, 6]])
    # (1, 5): overlap 2 + 2 = 4, sizes 2 + 3 = 5 and 2 + 2 = 4 -> IoU 4 / 5. (2, 6): overlap 1, sizes 2 and 3 -> 1/4.
    np.testing.assert_array_equal(match_face(lower_inner, lower_skirt, upper_inner, upper_skirt), [[1, 5]])
    np.testing.assert_array_equal(match_face(lower_inner, lower_skirt, upper_inner, upper_skirt, 0.25),
                                  [[1, 5], [2, 6]])
    with pytest.raises(ValueError, match="iou_threshold"):
        match_face(lower_inner, lower_skirt, upper_inner, upper_skirt, 0)
    with pytest.raises(ValueError, match="equal shapes"):
        match_face(lower_inner, lower_skirt[:, :3], upper_inner, upper_skirt)


def test_merge_labels_components():
    # Block 0: 2 objects, block 1: 3, block 2: 1. 0:2 ~ 1:1 ~ 2:1 (a chain), 1:3 alone.
    luts = merge_labels([2, 3, 1], [(0, 1, np.array([[2, 1]])), (1, 2, np.array([[1, 1]]))])
    np.testing.assert_array_equal(luts[0], [0, 1, 2])
    np.testing.assert_array_equal(luts[1], [0, 2, 3, 4])
    np.testing.assert_array_equal(luts[2], [0, 2])
    assert [lut.dtype for lut in luts] == [np.uint32] * 3
    np.testing.assert_array_equal(merge_labels([0, 0], [])[1], [0])
    with pytest.raises(ValueError, match="outside"):
        merge_labels([2, 3], [(0, 1, np.array([[3, 1]]))])


def test_block_faces():
    # A 2 x 3 grid: 3 faces along y, 2 * 2 along x.
    faces = block_faces((20, 30), (10, 10))
    assert sorted(faces) == [(0, 1, 1), (0, 3, 0), (1, 2, 1), (1, 4, 0), (2, 5, 0), (3, 4, 1), (4, 5, 1)]
