"""3D segmentation from ground-truth slices and its grid search, on a volume built so that the answer is known.

Two disks run through all 4 slices; each changes its radius half way (16 <-> 11 pixels), so the masks of the
slices where it changes overlap with IoU 121 / 256 = 0.47. Projecting from the middle slice follows the whole
object only with an IoU threshold below 0.47: the grid search must pick 0.3 over 0.7.
"""
import numpy as np
import pandas as pd
import pytest

from micro_sam.evaluation import multi_dimensional_segmentation as md


def _volume(rng, n=4, size=256):
    volume = rng.normal(30, 5, size=(n, size, size))
    gt = np.zeros((n, size, size), dtype="uint16")
    yy, xx = np.mgrid[:size, :size]
    for label, (cy, cx), radii in ((1, (80, 80), (16, 11)), (2, (170, 180), (11, 16))):
        for z in range(n):
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= (radii[0] if z < n // 2 else radii[1]) ** 2
            gt[z][mask] = label
            volume[z][mask] = rng.normal(190, 8, mask.sum())
    return np.clip(volume, 0, 255).astype("uint8"), gt


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from micro_sam.util import get_sam_model, precompute_image_embeddings

    volume, gt = _volume(np.random.default_rng(0))
    predictor = get_sam_model("vit_t_demo", device="cpu")
    embedding_path = tmp_path_factory.mktemp("md") / "embeddings.zarr"
    precompute_image_embeddings(predictor, volume, save_path=embedding_path, ndim=3, verbose=False)
    return volume, gt, predictor, embedding_path


def test_grid_search_finds_the_threshold_the_volume_was_built_for(setup, tmp_path, monkeypatch):
    volume, gt, predictor, embedding_path = setup
    best_path = md.run_multi_dimensional_segmentation_grid_search(
        volume, gt, "vit_t_demo", None, embedding_path, tmp_path, predictor=predictor, store_segmentation=True,
        grid_search_values={"iou_threshold": [0.3, 0.7], "projection": ["mask"]},
    )
    best = pd.read_csv(best_path, index_col=0)
    assert best["iou_threshold"][0] == 0.3 and best["projection"][0] == "mask"
    results = pd.read_csv(tmp_path / "all_grid_search_results.csv", index_col=0)
    low, high = results.set_index("iou_threshold").loc[[0.3, 0.7], "mSA"]
    assert best["mSA"][0] == low and low > 0.6 and high < 0.3  # following half an object fails at IoU 0.5
    predictions = sorted(p.name for p in (tmp_path / "predictions").iterdir())
    assert predictions == ["grid_search_result_00000.tif", "grid_search_result_00001.tif"]
    # with the results stored, the best parameters are read from them: nothing is segmented again
    monkeypatch.setattr(md, "_prepare", lambda *args: pytest.fail("segmented again"))
    assert md.run_multi_dimensional_segmentation_grid_search(
        volume, gt, "vit_t_demo", None, embedding_path, tmp_path,
        grid_search_values={"iou_threshold": [0.3, 0.7], "projection": ["mask"]},
    ) == best_path


def test_segment_slices_scores_and_min_size(setup, tmp_path, monkeypatch):
    volume, gt, predictor, embedding_path = setup
    save_path = tmp_path / "segmentation.tif"
    results, segmentation = md.segment_slices_from_ground_truth(
        volume, gt, "vit_t_demo", embedding_path=embedding_path, save_path=save_path, iou_threshold=0.3,
        return_segmentation=True, predictor=predictor,
    )
    assert results["SA50"] == 1.0 and results["mSA"] > 0.6
    assert set(np.unique(segmentation)) == {0, 1, 2}
    for label in (1, 2):  # each object is found in every slice
        assert all((segmentation[z] == label).any() for z in range(4))
    # the stored segmentation is scored without segmenting again, here with the Dice metrics
    monkeypatch.setattr(md, "_prepare", lambda *args: pytest.fail("segmented again"))
    dice = md.segment_slices_from_ground_truth(volume, gt, "vit_t_demo", save_path=save_path,
                                               evaluation_metric="dice")
    expected = 2 * ((segmentation > 0) & (gt > 0)).sum() / ((segmentation > 0).sum() + (gt > 0).sum())
    assert dice == {"Dice": pytest.approx(expected)} and expected > 0.85
    per_class = md.segment_slices_from_ground_truth(volume, gt, "vit_t_demo", save_path=save_path,
                                                    evaluation_metric="dice_per_class")["Dice"]
    assert per_class == pytest.approx(np.mean([
        2 * ((segmentation == i) & (gt == i)).sum() / ((segmentation == i).sum() + (gt == i).sum()) for i in (1, 2)
    ]))


@pytest.mark.slow
def test_min_size_skips_small_objects(setup, monkeypatch):
    volume, gt, predictor, embedding_path = setup
    # object 2 has radius 11 in its middle slice (z = 1): 373 pixels; object 1 has 797
    results, segmentation = md.segment_slices_from_ground_truth(
        volume, gt, "vit_t_demo", embedding_path=embedding_path, iou_threshold=0.3, min_size=500,
        return_segmentation=True, predictor=predictor,
    )
    assert set(np.unique(segmentation)) == {0, 1}
    assert results["SA50"] == 1.0  # scored against the ground truth without object 2


@pytest.mark.parametrize("kwargs, message", [
    ({"volume": np.zeros((8, 8))}, "must be 3D"),
    ({"ground_truth": np.zeros((2, 8, 9), "uint8")}, "must have the volume's shape"),
    ({"ground_truth": np.zeros((2, 8, 8), "uint8")}, "no objects"),
    ({"interactive_seg_mode": "scribble"}, "interactive_seg_mode"),
    ({"evaluation_metric": "iou"}, "evaluation_metric"),
])
def test_bad_input_fails_before_loading_a_model(kwargs, message, monkeypatch):
    monkeypatch.setattr(md, "_prepare", lambda *args: pytest.fail("loaded a model"))
    arguments = {"volume": np.zeros((2, 8, 8), "uint8"), "ground_truth": np.ones((2, 8, 8), "uint8"),
                 "model_type": "vit_t_demo"}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        md.segment_slices_from_ground_truth(**arguments)


def test_grid_values_defaults_and_validation(tmp_path):
    values = md.default_grid_search_values_multi_dimensional_segmentation()
    assert values["iou_threshold"] == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert values["projection"] == ["mask", "points", "box", "points_and_mask", "single_point"]
    assert values["box_extension"] == [round(0.025 * i, 3) for i in range(11)]
    assert md.default_grid_search_values_multi_dimensional_segmentation([0.4])["iou_threshold"] == [0.4]
    with pytest.raises(ValueError, match="grid_search_values"):
        md.run_multi_dimensional_segmentation_grid_search(
            np.zeros((2, 8, 8)), np.ones((2, 8, 8), "uint8"), "vit_t_demo", None, None, tmp_path,
            grid_search_values={"min_size": [1, 2]})
    assert not any(tmp_path.iterdir())
