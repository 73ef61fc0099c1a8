"""Batched inference: equal to one-by-one SamPredictor.predict, and known answers from a box-painting stub."""
import numpy as np
import pytest
import torch
from segment_anything.utils.amg import calculate_stability_score
from segment_anything.utils.transforms import ResizeLongestSide

from micro_sam import inference, util
from micro_sam import prompt_based_segmentation as pbs

from conftest import make_tiny_predictor

SHAPE = (150, 250)


def _fake_embeddings(shape, seed=0):
    rng = np.random.default_rng(seed)
    return {"features": rng.standard_normal((1, 256, 64, 64)).astype("float32"),
            "input_size": ResizeLongestSide.get_preprocess_shape(shape[0], shape[1], 1024), "original_size": shape}


@pytest.fixture(scope="module")
def predictor():
    predictor = make_tiny_predictor(seed=1)
    util.set_precomputed(predictor, _fake_embeddings(SHAPE))
    return predictor


BOXES = np.array([[10, 10, 60, 50], [100, 20, 200, 140], [30, 80, 90, 149], [150, 5, 240, 60], [0, 0, 250, 150]])


def _assert_same_mask(mask, reference_logits, tolerance=1e-4):
    """Equal masks, except where the reference logit is within float noise of the threshold 0."""
    mask = mask.cpu().numpy() if torch.is_tensor(mask) else mask
    differ = mask != (reference_logits > 0)
    assert (np.abs(reference_logits[differ]) < tolerance).all()
    assert differ.mean() < 1e-3


def test_batched_boxes_equal_one_by_one(predictor):
    records = inference.batched_inference(predictor, None, batch_size=3, boxes=BOXES,
                                          return_instance_segmentation=False)
    assert len(records) == len(BOXES)
    for k, box in enumerate(BOXES):
        logits, scores, low_res = predictor.predict(box=box, multimask_output=False, return_logits=True)
        record = records[k]
        _assert_same_mask(record["segmentation"], logits[0])
        assert record["segmentation"].shape == SHAPE and record["segmentation"].dtype == torch.bool
        np.testing.assert_allclose(record["predicted_iou"], scores[0], atol=1e-5)
        np.testing.assert_allclose(record["logits"].numpy(), low_res, atol=1e-4)
        assert record["logits"].shape == (1, 256, 256)
        assert record["seg_id"] == k + 1
        mask = record["segmentation"].numpy()
        assert record["area"] == mask.sum()
        ys, xs = np.where(mask)
        assert record["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        expected_stability = calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0)[0].item()
        np.testing.assert_allclose(record["stability_score"], expected_stability, atol=1e-3)


def test_batch_size_does_not_matter(predictor):
    one = inference.batched_inference(predictor, None, batch_size=1, boxes=BOXES, return_instance_segmentation=False)
    all_ = inference.batched_inference(predictor, None, batch_size=8, boxes=BOXES, return_instance_segmentation=False)
    for a, b in zip(one, all_):
        low_res = a["logits"].numpy()[0]
        assert (a["segmentation"] != b["segmentation"]).float().mean() < 1e-3
        np.testing.assert_allclose(low_res, b["logits"].numpy()[0], atol=1e-4)


def test_points_multimasking_and_prompt_based_agree(predictor):
    points = np.array([[[30, 40]], [[200, 100]], [[120, 75]]], dtype=float)  # (x, y)
    labels = np.ones((3, 1))
    records = inference.batched_inference(predictor, None, batch_size=2, points=points, point_labels=labels,
                                          multimasking=True, return_instance_segmentation=False)
    embeddings = _fake_embeddings(SHAPE)
    for k in range(3):
        logits, scores, _ = predictor.predict(point_coords=points[k], point_labels=labels[k], multimask_output=True,
                                              return_logits=True)
        _assert_same_mask(records[k]["segmentation"], logits[np.argmax(scores)])
        # the same prompt through prompt_based_segmentation, (y, x) there
        mask = pbs.segment_from_points(predictor, points[k][:, ::-1], labels[k].astype(int), embeddings)
        _assert_same_mask(mask[0], logits[np.argmax(scores)])

    # without the reduction: three records per prompt
    records = inference.batched_inference(predictor, None, batch_size=2, points=points, point_labels=labels,
                                          multimasking=True, reduce_multimasking=False,
                                          return_instance_segmentation=False)
    assert len(records) == 9


def test_boxes_points_and_logits(predictor):
    points, labels = np.array([[35, 30], [150, 80]], dtype=float), np.array([1, 0])
    first = inference.batched_inference(predictor, None, batch_size=2, boxes=BOXES[:2], points=points,
                                        point_labels=labels, return_instance_segmentation=False)
    logits_masks = torch.stack([r["logits"] for r in first])
    second = inference.batched_inference(predictor, None, batch_size=2, boxes=BOXES[:2], points=points,
                                         point_labels=labels, logits_masks=logits_masks,
                                         return_instance_segmentation=False)
    for k in range(2):
        logits, _, _ = predictor.predict(box=BOXES[k], point_coords=points[k:k + 1], point_labels=labels[k:k + 1],
                                         mask_input=first[k]["logits"].numpy(), multimask_output=False,
                                         return_logits=True)
        _assert_same_mask(second[k]["segmentation"], logits[0])


# --- known answers from a stub whose masks are its boxes ------------------------------------------------------
class BoxPainter:
    """A stand-in predictor: the logits are +4 inside each prompt's box and -4 outside (one mask per prompt)."""

    def __init__(self, shape):
        self.original_size, self.input_size = shape, ResizeLongestSide.get_preprocess_shape(*shape, 1024)
        self.transform, self.device, self.is_image_set = ResizeLongestSide(1024), torch.device("cpu"), True
        self.model = type("Model", (), {"mask_threshold": 0.0})()
        self.batch_sizes = []

    def predict_torch(self, point_coords, point_labels, boxes=None, mask_input=None, multimask_output=True,
                      return_logits=False):
        self.batch_sizes.append(len(boxes))
        scale = max(self.original_size) / 1024
        logits = torch.full((len(boxes), 1) + tuple(self.original_size), -4.0)
        for k, (x0, y0, x1, y1) in enumerate((boxes * scale).round().long().tolist()):
            logits[k, 0, y0:y1, x0:x1] = 4.0
        scores = torch.linspace(0.5, 0.9, len(boxes))[:, None]
        return logits, scores, torch.zeros(len(boxes), 1, 256, 256)


def test_post_processing_known_answers():
    stub = BoxPainter((100, 120))
    boxes = np.array([[10, 20, 40, 60], [50, 50, 110, 90], [0, 0, 5, 5]])
    records = inference.batched_inference(stub, None, batch_size=2, boxes=boxes, return_instance_segmentation=False,
                                          segmentation_ids=[7, 8, 9])
    assert stub.batch_sizes == [2, 1]  # one predictor call per batch
    assert [r["area"] for r in records] == [30 * 40, 60 * 40, 25]
    assert [r["bbox"] for r in records] == [[10, 20, 29, 39], [50, 50, 59, 39], [0, 0, 4, 4]]
    assert [r["stability_score"] for r in records] == [1.0, 1.0, 1.0]
    assert [r["seg_id"] for r in records] == [7, 8, 9]

    segmentation = inference.batched_inference(stub, None, batch_size=2, boxes=boxes)
    expected = np.zeros((100, 120), dtype="uint32")
    expected[0:5, 0:5] = 1  # connected components, numbered in raster order
    expected[20:60, 10:40] = 2
    expected[50:90, 50:110] = 3
    np.testing.assert_array_equal(segmentation, expected)


def test_local_otsu_threshold_naive():
    """The integral image implementation equals the per-pixel definition."""
    torch.manual_seed(0)
    logits = torch.randn(2, 12, 14) * 3
    logits[1, 3:8, 4:10] += 6
    window, n_bins = 5, 8
    result = inference._local_otsu_threshold(logits, window_size=window, num_bins=n_bins)

    for m in range(2):
        x = logits[m].double().numpy()
        low, value_range = x.min(), max(x.max() - x.min(), 1e-6)
        bins = np.clip(((x - low) / value_range * (n_bins - 1)).astype(int), 0, n_bins - 1)
        padded = np.pad(bins, window // 2)  # padding is value 0, i.e. bin 0
        best = -np.inf
        for y in range(x.shape[0]):
            for x_ in range(x.shape[1]):
                p = np.bincount(padded[y:y + window, x_:x_ + window].ravel(), minlength=n_bins) / window ** 2
                omega, mu = np.cumsum(p), np.cumsum(p * np.arange(n_bins))
                mu1 = mu / np.maximum(omega, 1e-6)
                mu2 = (mu[-1] - mu) / np.maximum(1 - omega, 1e-6)
                t_bin = np.argmax(omega * (1 - omega) * (mu1 - mu2) ** 2)
                best = max(best, max(low + t_bin / (n_bins - 1) * value_range, 0.0))
        np.testing.assert_allclose(result[m].item(), best, rtol=1e-5)


def test_local_otsu_threshold_matches_micro_sam():
    """Values computed with micro_sam 1.8.14's implementation for this input."""
    torch.manual_seed(0)
    x = torch.randn(3, 1, 40, 48) * 3
    x[1] = x[1] + 2
    x[2, 0, 10:20, 10:30] += 8
    np.testing.assert_allclose(inference._local_otsu_threshold(x[:, 0]).flatten().tolist(),
                               [0.0, 1.7039728164672852, 2.2877111434936523], rtol=1e-5)
    np.testing.assert_allclose(inference._local_otsu_threshold(x[:, 0], 7, 8).flatten().tolist(),
                               [0.0, 2.0464067459106445, 4.829021453857422], rtol=1e-5)


def test_auto_threshold(predictor):
    records = inference.batched_inference(predictor, None, batch_size=5, boxes=BOXES, mask_threshold="auto",
                                          return_instance_segmentation=False, return_highres_logits=True)
    for record in records:
        assert record["logits"].shape == (1,) + SHAPE
    # each mask is its high resolution logits above its own threshold (>= 0): a subset of the default masks
    default = inference.batched_inference(predictor, None, batch_size=5, boxes=BOXES,
                                          return_instance_segmentation=False)
    for record, plain in zip(records, default):
        assert not (record["segmentation"] & ~plain["segmentation"]).any()


# --- tiled ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiled():
    predictor = make_tiny_predictor(seed=2)
    image = (np.random.default_rng(1).random((160, 200)) * 255).astype("uint8")
    embeddings = util.precompute_image_embeddings(predictor, image, tile_shape=(80, 100), halo=(16, 20),
                                                  verbose=False)
    return predictor, image, embeddings


def test_tiled_equals_prompt_based(tiled):
    predictor, image, embeddings = tiled
    boxes = np.array([[10, 10, 60, 50], [130, 100, 190, 150], [20, 110, 90, 150]])  # XYXY, tiles 0, 3, 2
    records = inference.batched_tiled_inference(predictor, None, batch_size=2, image_embeddings=embeddings,
                                                boxes=boxes, return_instance_segmentation=False)
    assert len(records) == 3
    by_box = {tuple(r["global_bbox"][:2]): r for r in records}
    for box in boxes:
        expected = pbs.segment_from_box(predictor, box[[1, 0, 3, 2]], embeddings)[0]
        ys, xs = np.where(expected)
        record = by_box[(xs.min(), ys.min())]
        x, y, w, h = record["global_bbox"]
        assert [w, h] == [xs.max() - xs.min(), ys.max() - ys.min()]
        lx, ly, _, _ = record["bbox"]
        local = record["segmentation"].numpy()[ly:ly + h + 1, lx:lx + w + 1]
        np.testing.assert_array_equal(local, expected[y:y + h + 1, x:x + w + 1])

    segmentation = inference.batched_tiled_inference(predictor, None, batch_size=2, image_embeddings=embeddings,
                                                     boxes=boxes)
    assert segmentation.shape == image.shape and segmentation.max() >= 3

    memory_optimized = inference.batched_tiled_inference(predictor, None, batch_size=2, image_embeddings=embeddings,
                                                         boxes=boxes, optimize_memory=True, min_size=0)
    assert memory_optimized.shape == image.shape and memory_optimized.max() >= 1


def test_stitch_known_answer():
    shape, tile_shape, halo = (20, 20), (10, 20), (2, 0)  # two tiles; outer blocks rows 0:12 and 8:20
    first = np.zeros((12, 20), "uint32")
    first[2:11, 2:8] = 1
    second = np.zeros((12, 20), "uint32")
    second[0:3, 2:8] = 2  # rows 8:11: the same object as 1, seen from the other tile -> dropped
    second[5:10, 10:15] = 3
    second[0:4, 12:16] = 4  # rows 8:12: where the first tile has no object -> kept
    result = inference._stitch([(0, first), (1, second)], shape, tile_shape, halo)
    expected = np.zeros(shape, "uint32")
    expected[2:11, 2:8] = 1
    expected[13:18, 10:15] = 2  # ids relabelled consecutively
    expected[8:12, 12:16] = 3
    np.testing.assert_array_equal(result, expected)


# --- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({}, "Pass box prompts"),
    ({"points": np.zeros((2, 1, 2))}, "together"),
    ({"boxes": np.zeros((2, 3))}, "shape \\(N, 4\\)"),
    ({"boxes": np.array([[10, 10, 5, 20]])}, "max < min"),
    ({"points": np.zeros((2, 1, 2)), "point_labels": np.ones((3, 1))}, "point_labels must have shape"),
    ({"points": np.zeros((2, 1, 2)), "point_labels": np.full((2, 1), 3)}, "point_labels must be 1, 0"),
    ({"points": np.zeros((2, 1, 2)), "point_labels": np.ones((2, 1)), "boxes": np.zeros((3, 4))}, "must match"),
    ({"points": np.array([[[300.0, 10.0]]]), "point_labels": np.ones((1, 1))}, "outside the image"),
    ({"boxes": BOXES, "segmentation_ids": [1, 2]}, "segmentation_ids"),
    ({"boxes": BOXES, "logits_masks": torch.zeros(2, 1, 256, 256)}, "logits_masks"),
    ({"boxes": BOXES, "mask_threshold": "otsu"}, "mask_threshold"),
    ({"boxes": BOXES, "batch_size": 0}, "batch_size"),
])
def test_bad_input(predictor, kwargs, match):
    kwargs = {"batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        inference.batched_inference(predictor, None, **kwargs)
