"""run_evaluation / run_evaluation_for_iterative_prompting on label images written to tmp_path."""
import os

import imageio.v3 as imageio
import numpy as np
import pandas as pd
import pytest

from micro_sam.evaluation import run_evaluation, run_evaluation_for_iterative_prompting

COLUMNS = ["mSA", "SA50", "SA75", "Precision", "Recall", "F1 Score"]


def _square(labels, top_left, value, size=10):
    labels[top_left[0]:top_left[0] + size, top_left[1]:top_left[1] + size] = value
    return labels


def _gt():
    labels = np.zeros((40, 40), "uint16")
    _square(labels, (2, 2), 1)
    return _square(labels, (20, 20), 2)


def _shifted():
    # Both squares shifted down by 2 px: IoU 80 / 120 = 2/3 each -> SA 1 up to 0.65, 0 above; mSA 0.4.
    labels = np.zeros((40, 40), "uint16")
    _square(labels, (4, 2), 1)
    return _square(labels, (22, 20), 2)


def _write(path, data):
    imageio.imwrite(path, data)
    return str(path)


@pytest.fixture
def files(tmp_path):
    gt_paths = [_write(tmp_path / f"gt{i}.tif", _gt()) for i in range(2)]
    pred_paths = [_write(tmp_path / "pred0.tif", _gt()), _write(tmp_path / "pred1.tif", _shifted())]
    return gt_paths, pred_paths


def test_run_evaluation_averages_over_images(files, tmp_path):
    gt_paths, pred_paths = files
    save_path = tmp_path / "out" / "results.csv"
    result = run_evaluation(gt_paths, pred_paths, save_path=save_path, verbose=False)
    assert list(result.columns) == COLUMNS and len(result) == 1
    row = result.iloc[0]
    # Image 0 is perfect, image 1 has mSA 0.4, SA75 0, and precision / recall / F1 1 (IoU 2/3 >= 0.5).
    assert row["mSA"] == pytest.approx(0.7)
    assert row["SA50"] == 1.0 and row["SA75"] == 0.5
    assert row["Precision"] == row["Recall"] == row["F1 Score"] == 1.0

    # The csv is written and reused: a second call does not look at the predictions.
    saved = pd.read_csv(save_path)
    pd.testing.assert_frame_equal(saved, result)
    os.remove(pred_paths[1])
    pd.testing.assert_frame_equal(run_evaluation(gt_paths, pred_paths, save_path=save_path, verbose=False), saved)


def test_run_evaluation_with_arrays_and_custom_thresholds():
    result = run_evaluation([_gt()], [_shifted()], verbose=False, thresholds=[0.6, 0.7])
    assert list(result.columns) == ["mSA", "Precision", "Recall", "F1 Score"]
    assert result["mSA"].iloc[0] == 0.5


def test_ground_truth_from_file_is_split_into_connected_components(tmp_path):
    # The ground truth on disk uses one id for two separate squares; the prediction has two objects.
    gt = (_gt() > 0).astype("uint8")
    gt_path = _write(tmp_path / "gt.tif", gt)
    pred_path = _write(tmp_path / "pred.tif", _gt())
    assert run_evaluation([gt_path], [pred_path], verbose=False)["mSA"].iloc[0] == 1.0
    # As an array it is used as is: one ground-truth object of 200 px vs. two of 100 px -> IoU 0.5 at best.
    assert run_evaluation([gt], [pred_path], verbose=False)["SA50"].iloc[0] == pytest.approx(1 / 2)


def test_run_evaluation_errors(files, tmp_path):
    gt_paths, pred_paths = files
    with pytest.raises(ValueError, match=r"\(2\).*\(1\)"):
        run_evaluation(gt_paths, pred_paths[:1], verbose=False)
    with pytest.raises(ValueError, match="No images"):
        run_evaluation([], [], verbose=False)

    missing = str(tmp_path / "missing.tif")
    with pytest.raises(FileNotFoundError, match="missing.tif"):
        run_evaluation(gt_paths[:1], [missing], verbose=False)

    wrong_shape = _write(tmp_path / "small.tif", np.zeros((20, 40), "uint16"))
    with pytest.raises(ValueError, match=r"small\.tif.*\(20, 40\).*\(40, 40\)"):
        run_evaluation(gt_paths[:1], [wrong_shape], verbose=False)


def test_run_evaluation_for_iterative_prompting(tmp_path):
    gt_paths = [_write(tmp_path / f"gt{i}.tif", _gt()) for i in range(2)]
    root = tmp_path / "predictions"
    # 11 iterations, so that a plain string sort would put iteration10 before iteration02.
    n_iterations = 11
    for it in range(n_iterations):
        folder = root / f"iteration{it:02}"
        folder.mkdir(parents=True)
        pred = _gt() if it % 2 == 0 else _shifted()
        for i in range(2):
            _write(folder / f"image{i}.tif", pred)

    experiment = tmp_path / "experiment"
    result = run_evaluation_for_iterative_prompting(gt_paths, root, experiment, start_with_box_prompt=True)
    assert list(result.columns) == COLUMNS and len(result) == n_iterations
    np.testing.assert_allclose(result["mSA"], [1.0 if it % 2 == 0 else 0.4 for it in range(n_iterations)])

    csv_path = experiment / "results" / "iterative_prompting_without_mask" / "iterative_prompts_start_box.csv"
    assert csv_path.exists()

    # Existing results are loaded, unless they are to be overwritten.
    for folder in root.iterdir():
        for path in folder.iterdir():
            imageio.imwrite(path, _gt())
    loaded = run_evaluation_for_iterative_prompting(gt_paths, root, experiment, start_with_box_prompt=True)
    pd.testing.assert_frame_equal(loaded, result)
    rerun = run_evaluation_for_iterative_prompting(
        gt_paths, root, experiment, start_with_box_prompt=True, overwrite_results=True
    )
    np.testing.assert_allclose(rerun["mSA"], 1.0)

    masks = run_evaluation_for_iterative_prompting(gt_paths, root, experiment, use_masks=True)
    assert len(masks) == n_iterations
    assert (experiment / "results" / "iterative_prompting_with_mask" / "iterative_prompts_start_point.csv").exists()


def test_iterative_prompting_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_evaluation_for_iterative_prompting([], tmp_path / "nowhere", tmp_path / "exp")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="iteration"):
        run_evaluation_for_iterative_prompting([], tmp_path / "empty", tmp_path / "exp")


def test_experiment_settings():
    from micro_sam.evaluation import (
        default_experiment_settings, full_experiment_settings, get_experiment_setting_name,
    )
    names = [get_experiment_setting_name(s) for s in default_experiment_settings()]
    assert names == ["points/p1-n0", "points/p2-n4", "points/p4-n8", "box/p0-n0"]

    full = full_experiment_settings()
    assert len(full) == 5 * 6 and all(s["use_points"] and not s["use_boxes"] for s in full)
    assert full[0] == {"use_points": True, "use_boxes": False, "n_positives": 1, "n_negatives": 0}
    with_boxes = full_experiment_settings(use_boxes=True, positive_range=[0, 1], negative_range=[0, 2])
    assert [get_experiment_setting_name(s) for s in with_boxes] == [
        "box/p0-n0", "points/p0-n2", "points/p1-n0", "points/p1-n2"
    ]
    assert all(s["use_boxes"] for s in with_boxes)

    with pytest.raises(ValueError, match="neither"):
        get_experiment_setting_name({"use_points": False, "use_boxes": False, "n_positives": 1, "n_negatives": 0})
    with pytest.raises(ValueError, match="n_negatives"):
        get_experiment_setting_name({"use_points": True, "use_boxes": False, "n_positives": 1})
