"""Evaluation inference with a stand-in predictor whose masks depend on the prompts in a known way.

The stand-in computes real (tiny) embeddings, but its decoder returns the ground-truth object at the prompt,
eroded by ``max(0, 4 - number of points)`` pixels: every added corrective point makes the mask better, and
from four points on it is exact. So iterative prompting must improve round by round and end at a perfect score.
"""
import os
import pickle

import imageio.v3 as imageio
import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion
from segment_anything import SamPredictor

from micro_sam.evaluation import inference as evaluation_inference
from micro_sam.evaluation.metrics import mean_segmentation_accuracy

from conftest import make_tiny_sam

EROSION = 4


class ErodingPredictor(SamPredictor):
    """SamPredictor with real embeddings; predict_torch returns the eroded ground-truth object at the prompt."""

    def __init__(self, groundtruths):
        super().__init__(make_tiny_sam())
        self.groundtruths = {gt.shape: gt for gt in groundtruths}  # the images have different shapes
        self.calls = []

    def predict_torch(self, point_coords, point_labels, boxes=None, mask_input=None, multimask_output=True,
                      return_logits=False):
        gt = self.groundtruths[tuple(self.original_size)]
        scale = max(self.original_size) / 1024
        n = len(boxes) if boxes is not None else len(point_coords)
        points = None if point_coords is None else (point_coords * scale).round().long().numpy()
        labels = None if point_labels is None else point_labels.numpy()
        self.calls.append({"shape": gt.shape, "points": points, "labels": labels,
                           "boxes": None if boxes is None else (boxes * scale).round().long().numpy(),
                           "mask_input": mask_input})
        logits = torch.full((n, 1) + gt.shape, -5.0)
        for k in range(n):
            if boxes is not None:
                x0, y0, x1, y1 = (boxes[k] * scale).tolist()
                y, x = int((y0 + y1) / 2), int((x0 + x1) / 2)
            else:
                x, y = points[k, 0]
            obj = gt == gt[y, x]
            n_points = 0 if labels is None else int((labels[k] != -1).sum())
            erosion = max(0, EROSION - n_points)
            if erosion:
                obj = binary_erosion(obj, iterations=erosion)
            logits[k, 0][torch.from_numpy(obj)] = 5.0
        scores = torch.full((n, 1), 0.9)
        if multimask_output:  # the best mask is the middle one, the others are empty
            logits = torch.cat([torch.full_like(logits, -5.0), logits, torch.full_like(logits, -5.0)], dim=1)
            scores = torch.tensor([[0.1, 0.9, 0.5]]).repeat(n, 1)
        return (logits if return_logits else logits > 0), scores, torch.zeros(n, logits.shape[1], 256, 256)


def _disks(shape, centers, radius):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    gt = np.zeros(shape, dtype="uint16")
    for k, (y, x) in enumerate(centers):
        gt[(yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2] = 2 * k + 3  # non-consecutive ids are relabelled
    return gt


@pytest.fixture
def data(tmp_path):
    gts = [_disks((64, 72), [(16, 16), (40, 50), (48, 16)], 9), _disks((70, 64), [(20, 30), (50, 40)], 11)]
    image_paths, gt_paths = [], []
    for k, gt in enumerate(gts):
        image_paths.append(str(tmp_path / f"image{k}.tif"))
        gt_paths.append(str(tmp_path / f"gt{k}.tif"))
        imageio.imwrite(image_paths[-1], (np.random.default_rng(k).random(gt.shape) * 255).astype("uint8"))
        imageio.imwrite(gt_paths[-1], gt)
    return image_paths, gt_paths, gts


def _scores(prediction_dir, gts, n_iterations):
    scores = []
    for k in range(n_iterations):
        folder = os.path.join(prediction_dir, f"iteration{k:02}")
        scores.append([mean_segmentation_accuracy(imageio.imread(os.path.join(folder, f"image{i}.tif")), gt)
                       for i, gt in enumerate(gts)])
    return np.array(scores)


@pytest.mark.parametrize("start_with_box_prompt", [True, False])
def test_iterative_prompting_improves(tmp_path, data, start_with_box_prompt):
    image_paths, gt_paths, gts = data
    predictor = ErodingPredictor(gts)
    prediction_dir = tmp_path / "predictions"
    np.random.seed(0)
    evaluation_inference.run_inference_with_iterative_prompting(
        predictor, image_paths, gt_paths, embedding_dir=None, prediction_dir=prediction_dir,
        start_with_box_prompt=start_with_box_prompt, n_iterations=4, batch_size=2,
    )
    scores = _scores(prediction_dir, gts, 4)
    assert (np.diff(scores, axis=0) >= 0).all()  # improves or holds, per image
    assert scores[0].max() < 1 and (scores[-1] == 1).all()  # imperfect start, exact at the end

    # each iteration adds one positive point in the missed object pixels and one negative point outside
    calls = [c for c in predictor.calls if c["shape"] == gts[0].shape]
    n_start = 0 if start_with_box_prompt else 1
    assert [c["points"].shape[1] if c["points"] is not None else 0 for c in calls[::2]] == \
        [n_start, n_start + 2, n_start + 4, n_start + 6]
    final = np.concatenate([c["points"] for c in calls[-2:]])
    final_labels = np.concatenate([c["labels"] for c in calls[-2:]])
    gt = gts[0]
    for points, labels in zip(final, final_labels):
        values = gt[points[:, 1], points[:, 0]]
        target = values[0]  # the first point is positive: the start point, or the first corrective point
        assert (values[labels == 1] == target).all() and (values[labels == 0] != target).all()
    if start_with_box_prompt:
        assert all(c["boxes"] is not None for c in calls)


def test_iterative_prompting_resumes(tmp_path, data, monkeypatch):
    image_paths, gt_paths, gts = data
    prediction_dir = tmp_path / "predictions"
    write = evaluation_inference._write_prediction
    written = []

    def interrupted_write(path, labels):  # stop after the first iteration of the second image
        if len(written) == 4:
            raise KeyboardInterrupt
        written.append(path)
        write(path, labels)

    monkeypatch.setattr(evaluation_inference, "_write_prediction", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        evaluation_inference.run_inference_with_iterative_prompting(
            ErodingPredictor(gts), image_paths, gt_paths, tmp_path / "embeddings", prediction_dir,
            start_with_box_prompt=True, n_iterations=3)
    assert len(written) == 4  # image0: 3 iterations, image1: iteration 0
    monkeypatch.setattr(evaluation_inference, "_write_prediction", write)

    predictor = ErodingPredictor(gts)
    evaluation_inference.run_inference_with_iterative_prompting(
        predictor, image_paths, gt_paths, tmp_path / "embeddings", prediction_dir, start_with_box_prompt=True,
        n_iterations=3)
    # only image1's iterations 1 and 2 were run, continuing with the saved prompts (2, then 4 points)
    assert [c["shape"] for c in predictor.calls] == [gts[1].shape] * 2
    assert [c["points"].shape[1] for c in predictor.calls] == [2, 4]
    assert (_scores(prediction_dir, gts, 3)[-1] == 1).all()
    assert os.listdir(prediction_dir / ".iterative_prompting_state") == []

    # everything saved: nothing runs
    predictor = ErodingPredictor(gts)
    evaluation_inference.run_inference_with_iterative_prompting(
        predictor, image_paths, gt_paths, tmp_path / "embeddings", prediction_dir, n_iterations=3)
    assert predictor.calls == []


def test_iterative_prompting_with_masks(tmp_path, data):
    image_paths, gt_paths, gts = data
    predictor = ErodingPredictor(gts)
    evaluation_inference.run_inference_with_iterative_prompting(
        predictor, image_paths[:1], gt_paths[:1], None, tmp_path / "predictions", n_iterations=2, use_masks=True)
    assert predictor.calls[0]["mask_input"] is None and predictor.calls[1]["mask_input"].shape == (3, 1, 256, 256)


def test_inference_with_prompts_and_prompt_cache(tmp_path, data):
    image_paths, gt_paths, gts = data
    prompt_dir = tmp_path / "prompts"
    np.random.seed(0)
    evaluation_inference.precompute_all_prompts(gt_paths, prompt_dir, [
        {"use_points": True, "use_boxes": False, "n_positives": 2, "n_negatives": 1},
        {"use_points": False, "use_boxes": True, "n_positives": 0, "n_negatives": 0},
    ])
    with open(prompt_dir / "points-p2-n1.pkl", "rb") as f:
        cached_points = pickle.load(f)
    with open(prompt_dir / "boxes.pkl", "rb") as f:
        cached_boxes = pickle.load(f)
    assert sorted(cached_points) == ["gt0.tif", "gt1.tif"]
    points, labels = cached_points["gt0.tif"]
    assert points.shape == (3, 3, 2) and labels.tolist() == [[1, 1, 0]] * 3
    assert cached_boxes["gt1.tif"].tolist() == [[19, 9, 42, 32], [29, 39, 52, 62]]  # XYXY of the disks

    # points + boxes: the cached prompts are used; 3 points -> erosion 1
    predictor = ErodingPredictor(gts)
    evaluation_inference.run_inference_with_prompts(
        predictor, image_paths, gt_paths, None, tmp_path / "pred", use_points=True, use_boxes=True, n_positives=2,
        n_negatives=1, prompt_save_dir=prompt_dir)
    np.testing.assert_array_equal(predictor.calls[0]["points"], points)
    for k, gt in enumerate(gts):
        prediction = imageio.imread(tmp_path / "pred" / f"image{k}.tif")
        expected = np.zeros(gt.shape, bool)
        for seg_id in np.unique(gt)[1:]:
            expected |= binary_erosion(gt == seg_id, iterations=1)
        np.testing.assert_array_equal(prediction > 0, expected)
        assert len(np.unique(prediction)) == len(np.unique(gt))

    # existing predictions are skipped
    predictor = ErodingPredictor(gts)
    evaluation_inference.run_inference_with_prompts(
        predictor, image_paths, gt_paths, None, tmp_path / "pred", use_points=True, use_boxes=True, n_positives=2,
        n_negatives=1, prompt_save_dir=prompt_dir)
    assert predictor.calls == []

    # a single point uses the best multimask output
    predictor = ErodingPredictor(gts)
    evaluation_inference.run_inference_with_prompts(
        predictor, image_paths, gt_paths, None, tmp_path / "single", use_points=True, use_boxes=False,
        n_positives=1, n_negatives=0, prompt_save_dir=prompt_dir)
    assert os.path.exists(prompt_dir / "points-p1-n0.pkl")
    prediction = imageio.imread(tmp_path / "single" / "image1.tif")
    assert len(np.unique(prediction)) == 3  # both objects, eroded by 3 pixels


def test_precompute_all_embeddings(tmp_path, data):
    image_paths, _, gts = data
    evaluation_inference.precompute_all_embeddings(ErodingPredictor(gts), image_paths[:1], tmp_path / "emb")
    assert os.path.isdir(tmp_path / "emb" / "image0.zarr")


def test_bad_arguments(tmp_path, data):
    image_paths, gt_paths, gts = data
    with pytest.raises(ValueError, match="as many ground-truth"):
        evaluation_inference.run_inference_with_prompts(ErodingPredictor(gts), image_paths, gt_paths[:1], None,
                                                        tmp_path, True, False, 1, 0)
    with pytest.raises(ValueError, match="point prompts, box prompts"):
        evaluation_inference.run_inference_with_prompts(ErodingPredictor(gts), image_paths, gt_paths, None,
                                                        tmp_path, False, False, 1, 0)
    with pytest.raises(ValueError, match="n_iterations"):
        evaluation_inference.run_inference_with_iterative_prompting(ErodingPredictor(gts), image_paths, gt_paths,
                                                                    None, tmp_path, n_iterations=0)


# --- automatic segmentation glue (run_amg, run_apg, run_instance_segmentation_with_decoder) -----------------
class _Segmenter:
    def __init__(self, *args):
        self.args = args


@pytest.fixture
def automatic(monkeypatch):
    """Stand-in segmenter classes and model loading; records the grid search call."""
    import micro_sam.instance_segmentation as segmentation
    from micro_sam import util
    from micro_sam.evaluation import instance_segmentation

    names = ["AutomaticMaskGenerator", "TiledAutomaticMaskGenerator", "InstanceSegmentationWithDecoder",
             "TiledInstanceSegmentationWithDecoder", "AutomaticPromptGenerator"]
    for name in names:
        monkeypatch.setattr(segmentation, name, type(name, (_Segmenter,), {}), raising=False)
    monkeypatch.setattr(segmentation, "get_predictor_and_decoder", lambda **kwargs: ("predictor", "decoder"))
    monkeypatch.setattr(util, "get_sam_model", lambda **kwargs: "predictor")
    calls = []
    monkeypatch.setattr(instance_segmentation, "run_instance_segmentation_grid_search_and_inference",
                        lambda **kwargs: calls.append(kwargs))
    return calls


def test_automatic_segmentation_glue(tmp_path, automatic):
    folder = evaluation_inference.run_amg(None, "vit_t", tmp_path, ["v.tif"], ["g.tif"], ["t.tif"],
                                          iou_thresh_values=[0.8], cache_embeddings=True)
    assert folder == os.path.join(tmp_path, "amg", "inference") and os.path.isdir(folder)
    call = automatic[-1]
    assert type(call["segmenter"]).__name__ == "AutomaticMaskGenerator" and call["segmenter"].args == ("predictor",)
    assert call["grid_search_values"]["pred_iou_thresh"] == [0.8]
    assert call["embedding_dir"] == os.path.join(tmp_path, "embeddings")
    assert call["result_dir"] == os.path.join(tmp_path, "amg", "grid_search")

    tiling = {"tile_shape": (256, 256), "halo": (32, 32)}
    evaluation_inference.run_instance_segmentation_with_decoder(None, "vit_t", tmp_path, [], [], [],
                                                                tiling_window_params=tiling)
    call = automatic[-1]
    assert type(call["segmenter"]).__name__ == "TiledInstanceSegmentationWithDecoder"
    assert call["segmenter"].args == ("predictor", "decoder") and call["tiling_window_params"] == tiling
    assert call["embedding_dir"] is None and "center_distance_threshold" in call["grid_search_values"]

    folder = evaluation_inference.run_apg(None, "vit_t", tmp_path, [], [], [])
    assert folder.endswith(os.path.join("apg", "inference"))
    assert type(automatic[-1]["segmenter"]).__name__ == "AutomaticPromptGenerator"
    with pytest.raises(ValueError, match="tile_shape"):
        evaluation_inference.run_amg(None, "vit_t", tmp_path, [], [], [], tiling_window_params={"halo": (8, 8)})
