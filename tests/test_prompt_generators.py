"""Prompt generators on constructed masks whose prompts are known."""
import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation

from micro_sam.prompt_generators import IterativePromptGenerator, PointAndBoxPromptGenerator
from micro_sam.util import get_centers_and_bounding_boxes, segmentation_to_one_hot


@pytest.fixture
def segmentation():
    seg = np.zeros((64, 80), dtype="int64")
    yy, xx = np.mgrid[:64, :80]
    seg[(yy - 20) ** 2 + (xx - 17) ** 2 < 81] = 1  # a disk: the corners of its box are free for negatives
    seg[40:60, 50:56] = 2  # an L-shape
    seg[54:60, 50:75] = 2
    seg[5:9, 60:64] = 3  # a square: its dilation fills its grown box, negatives come from anywhere
    return seg


def _objects(segmentation):
    ids = np.array([1, 2, 3])
    centers, boxes = get_centers_and_bounding_boxes(segmentation)
    masks = segmentation_to_one_hot(segmentation, ids)
    return masks, [boxes[i] for i in ids], [centers[i] for i in ids]


def test_points_and_boxes(segmentation):
    masks, boxes, centers = _objects(segmentation)
    np.random.seed(0)
    generator = PointAndBoxPromptGenerator(3, 4, dilation_strength=2, get_box_prompts=True)
    coords, labels, box_prompts, mask_prompts = generator(masks, boxes, centers)

    assert coords.shape == (3, 7, 2) and coords.dtype == torch.int64
    assert labels.tolist() == [[1, 1, 1, 0, 0, 0, 0]] * 3
    assert mask_prompts is None
    # boxes are the objects' bounding boxes, as XYXY
    assert box_prompts.tolist() == [[9, 12, 26, 29], [50, 40, 75, 60], [60, 5, 64, 9]]

    for k, seg_id in enumerate([1, 2, 3]):
        obj = segmentation == seg_id
        xy = coords[k].numpy()
        ys, xs = xy[:, 1], xy[:, 0]
        positive, negative = labels[k].numpy() == 1, labels[k].numpy() == 0
        assert obj[ys[positive], xs[positive]].all()
        assert (ys[0], xs[0]) == tuple(int(c) for c in centers[k])  # the centre is the first positive point
        # negatives: in the box grown by 2 pixels, but outside the object dilated by 2 pixels
        dilated = binary_dilation(obj, np.ones((3, 3)), iterations=2)
        if seg_id != 3:
            assert not dilated[ys[negative], xs[negative]].any()
        assert not obj[ys[negative], xs[negative]].any()
        y0, x0, y1, x1 = boxes[k]
        in_grown_box = (ys[negative] >= y0 - 2) & (ys[negative] < y1 + 2) & (xs[negative] >= x0 - 2) & \
            (xs[negative] < x1 + 2)
        assert in_grown_box.all() == (seg_id != 3)
        assert len({tuple(p) for p in xy[negative].tolist()}) == 4  # drawn without replacement


def test_seeded_and_without_centers(segmentation):
    masks, boxes, _ = _objects(segmentation)
    generator = PointAndBoxPromptGenerator(2, 2, dilation_strength=3)
    np.random.seed(42)
    first = generator(masks.numpy(), boxes)  # numpy masks work as well
    np.random.seed(42)
    second = generator(masks, boxes)
    torch.testing.assert_close(first[0], second[0])
    assert first[2] is None
    xy = first[0].numpy()
    for k, seg_id in enumerate([1, 2, 3]):
        assert (segmentation[xy[k, :2, 1], xy[k, :2, 0]] == seg_id).all()


def test_ring_too_small_uses_background():
    seg = np.zeros((20, 20), dtype="int64")
    seg[2:18, 2:18] = 1  # the box grown by 1 leaves a ring of 1 pixel, covered by the dilated object
    masks = segmentation_to_one_hot(seg, np.array([1]))
    np.random.seed(0)
    coords, labels, _, _ = PointAndBoxPromptGenerator(1, 5, dilation_strength=1)(masks, [(2, 2, 18, 18)])
    xy = coords[0].numpy()
    assert labels[0].tolist() == [1, 0, 0, 0, 0, 0]
    assert (seg[xy[1:, 1], xy[1:, 0]] == 0).all()
    assert len({tuple(p) for p in xy[1:].tolist()}) == 5  # drawn without replacement


def test_only_boxes_and_bad_settings(segmentation):
    masks, boxes, _ = _objects(segmentation)
    coords, labels, box_prompts, _ = PointAndBoxPromptGenerator(0, 0, 0, get_point_prompts=False,
                                                                get_box_prompts=True)(masks, boxes)
    assert coords is None and labels is None and box_prompts.shape == (3, 4)
    with pytest.raises(ValueError, match="point prompts, box prompts"):
        PointAndBoxPromptGenerator(1, 0, 0, get_point_prompts=False, get_box_prompts=False)
    with pytest.raises(ValueError, match="n_negative_points"):
        PointAndBoxPromptGenerator(1, -1, 0)
    with pytest.raises(ValueError, match="bounding boxes"):
        PointAndBoxPromptGenerator(1, 0, 0)(masks, boxes[:2])


def test_iterative_points_in_error_regions():
    truth = torch.zeros(2, 1, 32, 40)
    truth[0, 0, 5:20, 5:20] = 1
    truth[1, 0, 10:30, 20:35] = 1
    prediction = torch.zeros_like(truth)
    prediction[0, 0, 5:20, 5:12] = 1  # misses the right part of object 0 ...
    prediction[0, 0, 0:3, 30:40] = 1  # ... and predicts a false positive far away
    prediction[1] = truth[1]  # object 1 is predicted perfectly

    np.random.seed(0)
    coords, labels, boxes, masks = IterativePromptGenerator()(truth, prediction)
    assert coords.shape == (2, 2, 2) and coords.dtype == torch.int64
    assert labels.tolist() == [[1, 0], [1, 0]] and boxes is None and masks is None
    (px, py), (nx, ny) = coords[0].tolist()
    assert 5 <= py < 20 and 12 <= px < 20  # false negative region
    assert 0 <= ny < 3 and 30 <= nx < 40  # false positive region
    # perfect prediction: positive inside the object, negative in the ring of 3 pixels around its box
    (px, py), (nx, ny) = coords[1].tolist()
    assert truth[1, 0, py, px] == 1
    assert truth[1, 0, ny, nx] == 0 and 7 <= ny < 33 and 17 <= nx < 38


def test_iterative_uniform_and_seeded():
    truth = torch.zeros(1, 1, 10, 10)
    truth[0, 0, 2:8, 2:8] = 1
    prediction = torch.zeros_like(truth)
    prediction[0, 0, 2:8, 2:5] = 1
    np.random.seed(1)
    seen = {tuple(IterativePromptGenerator()(truth, prediction)[0][0, 0].tolist()) for _ in range(300)}
    assert seen == {(x, y) for y in range(2, 8) for x in range(5, 8)}  # every false negative pixel can be drawn
    np.random.seed(3)
    first = IterativePromptGenerator()(truth, prediction)[0]
    np.random.seed(3)
    torch.testing.assert_close(IterativePromptGenerator()(truth, prediction)[0], first)


def test_iterative_3d_and_errors():
    truth = torch.zeros(1, 1, 4, 10, 12)
    truth[0, 0, 1:3, 2:5, 3:9] = 1
    prediction = torch.zeros_like(truth)
    prediction[0, 0, 0, 0, 0] = 1
    coords, labels, _, _ = IterativePromptGenerator()(truth, prediction)
    assert coords.shape == (1, 2, 3)
    x, y, z = coords[0, 0].tolist()
    assert truth[0, 0, z, y, x] == 1
    assert coords[0, 1].tolist() == [0, 0, 0]  # the only false positive
    with pytest.raises(ValueError, match="same shape"):
        IterativePromptGenerator()(truth, prediction[:, :, :2])
    with pytest.raises(ValueError, match="at least one pixel"):
        IterativePromptGenerator()(torch.zeros_like(truth), prediction)
