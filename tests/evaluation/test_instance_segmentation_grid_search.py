"""Grid search / inference for automatic instance segmentation, with a fake segmenter of known behaviour."""
import sys
import types

import imageio.v3 as imageio
import numpy as np
import pandas as pd
import pytest

from micro_sam.evaluation.instance_segmentation import (
    default_grid_search_values_amg,
    default_grid_search_values_instance_segmentation_with_decoder,
    evaluate_instance_segmentation_grid_search,
    run_instance_segmentation_grid_search,
    run_instance_segmentation_grid_search_and_inference,
    run_instance_segmentation_inference,
    save_grid_search_best_params,
)

RESULT_COLUMNS = ["image_name", "mSA", "SA50", "SA75", "Precision", "Recall", "F1"]
GRID = {"threshold": [0.3, 0.5, 0.7], "split": [False, True]}  # best: threshold 0.5, split False


def _labels(shift):
    labels = np.zeros((48, 48), "uint16")
    for i, (y, x) in enumerate([(2, 2), (2, 26), (26, 2), (26, 26)], start=1):
        labels[y + shift:y + shift + 16, x:x + 16] = i
    return labels


class FakeSegmenter:
    """The "image" is a label image; `generate` reproduces it exactly only for threshold 0.5 and split False.

    Other thresholds erode every object by 4 px per 0.1 distance from 0.5 (16x16 -> 8x8, IoU 0.25), and split=True
    cuts every object into a left and a right half (IoU 0.5 each).
    """

    def __init__(self, fail_after=None):
        self._predictor = object()
        self.fail_after = fail_after
        self.initialize_calls, self.generate_calls = [], []
        self._image = None

    def initialize(self, image, image_embeddings=None, i=None, verbose=False, **kwargs):
        self.initialize_calls.append({"image_embeddings": image_embeddings, **kwargs})
        self._image = image

    def generate(self, threshold=0.5, split=False, min_size=0):
        if self.fail_after is not None and len(self.generate_calls) >= self.fail_after:
            raise RuntimeError("interrupted")
        self.generate_calls.append((threshold, split, min_size))
        labels = self._image.astype("uint32")
        erosion = int(round(abs(threshold - 0.5) * 40))
        out = np.zeros_like(labels)
        for obj in np.unique(labels)[1:]:
            ys, xs = np.nonzero(labels == obj)
            y0, y1, x0, x1 = ys.min() + erosion, ys.max() + 1 - erosion, xs.min() + erosion, xs.max() + 1 - erosion
            out[y0:y1, x0:x1] = obj
            if split:
                xm = (x0 + x1) // 2
                out[y0:y1, xm:x1] = obj + 1000
        return out


@pytest.fixture
def dataset(tmp_path):
    image_paths, gt_paths = [], []
    for i in range(3):
        labels = _labels(shift=i)
        image_paths.append(str(tmp_path / "images" / f"img{i}.tif"))
        gt_paths.append(str(tmp_path / "labels" / f"img{i}.tif"))
        for path in (image_paths[-1], gt_paths[-1]):
            (tmp_path / path).parent.mkdir(exist_ok=True)
            imageio.imwrite(path, labels)
    return image_paths, gt_paths


def test_default_grid_search_values():
    amg = default_grid_search_values_amg()
    assert list(amg) == ["pred_iou_thresh", "stability_score_thresh"]
    assert amg["pred_iou_thresh"][0] == 0.6 and amg["pred_iou_thresh"][-1] == 0.925
    assert len(amg["pred_iou_thresh"]) == 14 and len(amg["stability_score_thresh"]) == 15
    ais = default_grid_search_values_instance_segmentation_with_decoder(min_size_values=[10])
    assert ais["center_distance_threshold"] == [0.3, 0.4, 0.5, 0.6, 0.7]
    assert ais["distance_smoothing"] == [1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2]
    assert ais["min_size"] == [10]


def test_grid_search_finds_best_parameters(dataset, tmp_path):
    image_paths, gt_paths = dataset
    segmenter = FakeSegmenter()
    result_dir = tmp_path / "gs"
    run_instance_segmentation_grid_search(
        segmenter, GRID, image_paths, gt_paths, result_dir, embedding_dir=None,
        fixed_generate_kwargs={"min_size": 5},
    )
    # One initialize per image, one generate per image and combination, fixed kwargs passed through.
    assert len(segmenter.initialize_calls) == 3 and all(c["image_embeddings"] is None
                                                        for c in segmenter.initialize_calls)
    assert len(segmenter.generate_calls) == 3 * 6 and {c[2] for c in segmenter.generate_calls} == {5}

    assert sorted(p.name for p in result_dir.iterdir()) == ["img0.csv", "img1.csv", "img2.csv"]
    table = pd.read_csv(result_dir / "img1.csv")
    assert list(table.columns) == RESULT_COLUMNS + ["threshold", "split"]
    assert len(table) == 6 and set(table["image_name"]) == {"img1"}
    best_row = table[(table["threshold"] == 0.5) & (~table["split"])].iloc[0]
    assert best_row["mSA"] == 1.0 and best_row["F1"] == 1.0
    split_row = table[(table["threshold"] == 0.5) & table["split"]].iloc[0]
    # Halves of 16x16 objects: IoU 0.5 -> 4 TP, 4 FP at 0.5, nothing above.
    assert split_row["SA50"] == 0.5 and split_row["mSA"] == pytest.approx(0.05) and split_row["Precision"] == 0.5
    eroded = table[(table["threshold"] == 0.3) & (~table["split"])].iloc[0]
    assert eroded["mSA"] == 0.0  # 8x8 inside 16x16: IoU 0.25

    best_kwargs, best_msa = evaluate_instance_segmentation_grid_search(result_dir, ["threshold", "split"])
    assert best_kwargs == {"threshold": 0.5, "split": False} and best_msa == 1.0
    assert type(best_kwargs["split"]) is bool and type(best_kwargs["threshold"]) is float
    kwargs, score = evaluate_instance_segmentation_grid_search(result_dir, ["threshold", "split"], criterion="SA50")
    assert score == 1.0 and kwargs == {"threshold": 0.5, "split": False}


def test_grid_search_is_resumable(dataset, tmp_path):
    image_paths, gt_paths = dataset
    result_dir = tmp_path / "gs"

    # Interrupted during the second image, after 6 + 2 combinations.
    crashing = FakeSegmenter(fail_after=8)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_instance_segmentation_grid_search(crashing, GRID, image_paths, gt_paths, result_dir, None)
    assert len(pd.read_csv(result_dir / "img0.csv")) == 6 and len(pd.read_csv(result_dir / "img1.csv")) == 2

    # Resuming computes exactly the missing 4 + 6 combinations and never touches the finished image.
    segmenter = FakeSegmenter()
    run_instance_segmentation_grid_search(segmenter, GRID, image_paths, gt_paths, result_dir, None)
    assert len(segmenter.initialize_calls) == 2 and len(segmenter.generate_calls) == 10
    for name in ("img0", "img1", "img2"):
        table = pd.read_csv(result_dir / f"{name}.csv")
        assert len(table) == 6 and len(table[["threshold", "split"]].drop_duplicates()) == 6

    # A finished search: nothing is initialized or generated again.
    again = FakeSegmenter()
    run_instance_segmentation_grid_search(again, GRID, image_paths, gt_paths, result_dir, None)
    assert again.initialize_calls == [] and again.generate_calls == []

    # Extending the grid only computes the new combinations.
    extended = {"threshold": [0.3, 0.5, 0.7, 0.6], "split": [False, True]}
    more = FakeSegmenter()
    run_instance_segmentation_grid_search(more, extended, image_paths, gt_paths, result_dir, None)
    assert sorted(set(more.generate_calls)) == [(0.6, False, 0), (0.6, True, 0)]
    assert len(more.generate_calls) == 3 * 2
    best_kwargs, best_msa = evaluate_instance_segmentation_grid_search(result_dir, ["threshold", "split"])
    assert best_kwargs == {"threshold": 0.5, "split": False} and best_msa == 1.0


def test_grid_search_reads_micro_sam_result_files(tmp_path):
    # Result files as written by the published micro_sam (same layout): best mean over the two images is 0.5 / 50.
    rows = []
    for image, scores in (("a", [0.2, 0.9, 0.4]), ("b", [0.6, 0.5, 0.3])):
        for (thresh, min_size), score in zip([(0.5, 50), (0.5, 100), (0.6, 50)], scores):
            rows.append({"image_name": image, "mSA": score, "SA50": 0, "SA75": 0, "Precision": 0, "Recall": 0,
                         "F1": 0, "center_distance_threshold": thresh, "min_size": min_size})
    table = pd.DataFrame(rows)
    for image in ("a", "b"):
        table[table["image_name"] == image].to_csv(tmp_path / f"{image}.csv", index=False)
    best_kwargs, best_msa = evaluate_instance_segmentation_grid_search(
        tmp_path, ["center_distance_threshold", "min_size"]
    )
    assert best_kwargs == {"center_distance_threshold": 0.5, "min_size": 100} and best_msa == pytest.approx(0.7)
    assert type(best_kwargs["min_size"]) is int


def test_grid_search_errors(dataset, tmp_path):
    image_paths, gt_paths = dataset
    segmenter = FakeSegmenter()
    with pytest.raises(ValueError, match="threshold"):
        run_instance_segmentation_grid_search(
            segmenter, GRID, image_paths, gt_paths, tmp_path / "gs", None, fixed_generate_kwargs={"threshold": 0.5}
        )
    with pytest.raises(ValueError, match=r"\(3\).*\(2\)"):
        run_instance_segmentation_grid_search(segmenter, GRID, image_paths, gt_paths[:2], tmp_path / "gs", None)
    with pytest.raises(FileNotFoundError, match="missing.tif"):
        run_instance_segmentation_grid_search(
            segmenter, GRID, image_paths[:1], [str(tmp_path / "missing.tif")], tmp_path / "gs", None
        )
    with pytest.raises(ValueError, match="no values"):
        run_instance_segmentation_grid_search(
            segmenter, {"threshold": []}, image_paths, gt_paths, tmp_path / "gs2", None
        )
    with pytest.raises(FileNotFoundError, match="csv"):
        evaluate_instance_segmentation_grid_search(tmp_path / "empty_dir", ["threshold"])
    run_instance_segmentation_grid_search(segmenter, GRID, image_paths[:1], gt_paths[:1], tmp_path / "gs3", None)
    with pytest.raises(ValueError, match="nope"):
        evaluate_instance_segmentation_grid_search(tmp_path / "gs3", ["nope"])


def test_grid_search_shape_mismatch_names_image(dataset, tmp_path):
    image_paths, gt_paths = dataset
    imageio.imwrite(gt_paths[0], np.zeros((40, 48), "uint16"))
    with pytest.raises(ValueError, match=r"img0\.tif.*\(48, 48\).*\(40, 48\)"):
        run_instance_segmentation_grid_search(FakeSegmenter(), GRID, image_paths, gt_paths, tmp_path / "gs", None)


def test_grid_search_with_rois_and_zarr_keys(tmp_path):
    import zarr
    labels = _labels(shift=0)
    container = str(tmp_path / "data.zarr")
    group = zarr.open_group(container, mode="w")
    group.create_array("raw", data=labels)
    group.create_array("labels", data=labels)
    roi = (slice(0, 24), slice(0, 48))  # the top two objects
    segmenter = FakeSegmenter()
    run_instance_segmentation_grid_search(
        segmenter, GRID, [container], [container], tmp_path / "gs", None,
        image_key="raw", gt_key="labels", rois=[roi],
    )
    assert segmenter._image.shape == (24, 48)
    best_kwargs, best_msa = evaluate_instance_segmentation_grid_search(tmp_path / "gs", ["threshold", "split"])
    assert best_kwargs == {"threshold": 0.5, "split": False} and best_msa == 1.0


def test_embeddings_are_cached_per_image(dataset, tmp_path, monkeypatch):
    image_paths, gt_paths = dataset
    calls = []

    def precompute_image_embeddings(predictor, input_, save_path=None, ndim=None, verbose=True, **kwargs):
        calls.append((predictor, save_path, ndim, kwargs))
        return {"features": "fake", "save_path": save_path}

    fake_util = types.ModuleType("micro_sam.util")
    fake_util.precompute_image_embeddings = precompute_image_embeddings
    monkeypatch.setitem(sys.modules, "micro_sam.util", fake_util)

    segmenter = FakeSegmenter()
    embedding_dir = tmp_path / "embeddings"
    run_instance_segmentation_grid_search(
        segmenter, GRID, image_paths, gt_paths, tmp_path / "gs", embedding_dir,
        tiling_window_params={"tile_shape": (32, 32), "halo": (8, 8)},
    )
    assert [c[1] for c in calls] == [str(embedding_dir / f"img{i}.zarr") for i in range(3)]
    assert all(c[0] is segmenter._predictor and c[2] == 2 for c in calls)
    assert all(c[3] == {"tile_shape": (32, 32), "halo": (8, 8)} for c in calls)
    assert [c["image_embeddings"]["save_path"] for c in segmenter.initialize_calls] == [c[1] for c in calls]
    assert all(c["tile_shape"] == (32, 32) for c in segmenter.initialize_calls)


def test_inference_writes_and_skips_predictions(dataset, tmp_path):
    image_paths, _ = dataset
    prediction_dir = tmp_path / "predictions"
    segmenter = FakeSegmenter()
    run_instance_segmentation_inference(segmenter, image_paths, None, prediction_dir, generate_kwargs={"split": True})
    assert sorted(p.name for p in prediction_dir.iterdir()) == ["img0.tif", "img1.tif", "img2.tif"]
    prediction = imageio.imread(prediction_dir / "img1.tif")
    reference = FakeSegmenter()
    reference.initialize(_labels(shift=1))
    np.testing.assert_array_equal(prediction, reference.generate(split=True))
    assert len(np.unique(prediction)) == 1 + 8  # 4 objects split in halves
    assert segmenter.generate_calls == [(0.5, True, 0)] * 3

    again = FakeSegmenter()
    run_instance_segmentation_inference(again, image_paths, None, prediction_dir)
    assert again.initialize_calls == [] and again.generate_calls == []


def test_grid_search_and_inference(dataset, tmp_path):
    image_paths, gt_paths = dataset
    segmenter = FakeSegmenter()
    fixed = {"min_size": 3}
    experiment = tmp_path / "experiment"
    run_instance_segmentation_grid_search_and_inference(
        segmenter, GRID, image_paths[:2], gt_paths[:2], image_paths[2:], None,
        prediction_dir=tmp_path / "predictions", experiment_folder=experiment, result_dir=tmp_path / "gs",
        fixed_generate_kwargs=fixed, verbose_gs=False,
    )
    assert fixed == {"min_size": 3}  # not modified
    assert segmenter.generate_calls[-1] == (0.5, False, 3)
    prediction = imageio.imread(tmp_path / "predictions" / "img2.tif")
    np.testing.assert_array_equal(prediction, _labels(shift=2))

    params = pd.read_csv(experiment / "results" / "grid_search_params_instance_segmentation_with_decoder.csv")
    assert params["best_msa"].iloc[0] == 1.0 and params["threshold"].iloc[0] == 0.5


def test_save_best_params_file_name(tmp_path):
    save_grid_search_best_params({"pred_iou_thresh": 0.8, "stability_score_thresh": 0.9}, 0.6, tmp_path)
    table = pd.read_csv(tmp_path / "results" / "grid_search_params_amg.csv", index_col=0)
    assert list(table.columns) == ["best_msa", "pred_iou_thresh", "stability_score_thresh"]
    assert table.iloc[0].tolist() == [0.6, 0.8, 0.9]
