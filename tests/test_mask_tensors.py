"""batched_mask_to_box and mask_to_rle_pytorch (micro_sam 1.8 names) against segment_anything's own versions."""
import numpy as np
import pytest
import torch
from segment_anything.utils import amg

from micro_sam.inference import batched_mask_to_box as from_inference
from micro_sam.instance_segmentation import batched_mask_to_box, mask_to_rle_pytorch


def _masks():
    masks = torch.zeros(2, 3, 20, 30, dtype=torch.bool)
    masks[0, 0, 2:5, 7:9] = True  # box x 7..8, y 2..4
    masks[0, 1, 0, 0] = True  # one pixel in the corner
    masks[1, 2, 10:20, 25:30] = True  # touches the bottom right border
    masks[1, 2, 3, 1] = True  # and a far away pixel: box spans both
    return masks  # masks[0, 2], masks[1, 0], masks[1, 1] are empty


def test_batched_mask_to_box_known_boxes_and_segment_anything_agree():
    masks = _masks()
    boxes = batched_mask_to_box(masks)
    assert boxes.shape == (2, 3, 4)
    assert boxes[0, 0].tolist() == [7, 2, 8, 4]
    assert boxes[0, 1].tolist() == [0, 0, 0, 0]
    assert boxes[1, 2].tolist() == [1, 3, 29, 19]
    assert boxes[0, 2].tolist() == boxes[1, 0].tolist() == [0, 0, 0, 0]
    assert torch.equal(boxes, amg.batched_mask_to_box(masks).to(boxes.dtype))
    assert from_inference is batched_mask_to_box
    assert batched_mask_to_box(masks[0, 0]).tolist() == [7, 2, 8, 4]  # a single (H, W) mask
    assert batched_mask_to_box(torch.zeros(0, 5, 5, dtype=torch.bool)).shape == (0, 4)


def test_batched_mask_to_box_rejects_non_boolean():
    with pytest.raises(ValueError, match="boolean"):
        batched_mask_to_box(_masks().float())


@pytest.mark.parametrize("implementation", ["default", "numpy", "numba", "bioimage_cpp"])
def test_mask_to_rle_matches_segment_anything_and_round_trips(implementation):
    masks = _masks()[:, :, :, :].flatten(0, 1)  # (6, 20, 30)
    rles = mask_to_rle_pytorch(masks, rle_implementation=implementation)
    assert rles == amg.mask_to_rle_pytorch(masks)
    for rle, mask in zip(rles, masks.numpy()):
        assert np.array_equal(amg.rle_to_mask(rle), mask)
    assert rles[0]["size"] == [20, 30]


def test_mask_to_rle_bad_input():
    with pytest.raises(ValueError, match="rle_implementation"):
        mask_to_rle_pytorch(_masks()[0], rle_implementation="fast")
    with pytest.raises(ValueError, match="B, H, W"):
        mask_to_rle_pytorch(_masks())
