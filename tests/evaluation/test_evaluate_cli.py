"""The micro_sam.evaluate command (micro_sam.evaluation.evaluation.main) on label images with known scores."""
import h5py
import imageio.v3 as imageio
import numpy as np
import pandas as pd
import pytest

from micro_sam.evaluation.evaluation import main


def _labels():
    gt = np.zeros((32, 32), dtype="uint16")
    gt[2:10, 2:10] = 1
    gt[15:25, 15:30] = 2
    return gt


@pytest.fixture
def folders(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    gt = _labels()
    half = gt.copy()
    half[half == 2] = 0  # one of two objects found: TP 1, FN 1
    # names sort naturally: image2 before image10
    for name, pred in (("image2", gt), ("image10", half)):
        imageio.imwrite(gt_dir / f"{name}.tif", gt)
        imageio.imwrite(pred_dir / f"{name}.tif", pred)
    return gt_dir, pred_dir


def test_evaluate_folders_known_scores(folders, tmp_path, capsys):
    gt_dir, pred_dir = folders
    out = tmp_path / "scores"
    assert main(["--labels", str(gt_dir), "--label_key", "*.tif", "--predictions", str(pred_dir),
                 "--prediction_key", "*.tif", "-o", str(out)]) == 0
    results = pd.read_csv(out / "results.csv")
    # image2: perfect (1.0 everywhere); image10: mSA = 1 / (1 + 1) = 0.5, precision 1, recall 0.5, F1 2/3
    assert results["mSA"][0] == pytest.approx(0.75)
    assert results["SA50"][0] == pytest.approx(0.75)
    assert results["Precision"][0] == pytest.approx(1.0)
    assert results["Recall"][0] == pytest.approx(0.75)
    assert results["F1 Score"][0] == pytest.approx((1 + 2 / 3) / 2)
    printed = capsys.readouterr().out
    assert "mSA" in printed and "results.csv" in printed


def test_evaluate_container_files_and_csv_path(tmp_path):
    gt = _labels()
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["gt"] = gt
        f["pred"] = np.where(gt == 1, 5, 0)  # only the first object, under another id
    csv = tmp_path / "out.csv"
    assert main(["--labels", str(tmp_path / "data.h5"), "--label_key", "gt", "--predictions",
                 str(tmp_path / "data.h5"), "--prediction_key", "pred", "-o", str(csv), "--threshold", "0.5"]) == 0
    results = pd.read_csv(csv)
    assert results["mSA"][0] == pytest.approx(0.5) and results["Recall"][0] == pytest.approx(0.5)
    assert "SA50" not in results  # only with the default thresholds


@pytest.mark.parametrize("argv, message", [
    (["--labels", "{gt}", "--predictions", "{pred}"], "pass --label_key with a file pattern"),
    (["--labels", "{gt}/image2.tif", "--predictions", "{pred}/image2.tif", "{pred}/image10.tif"],
     "Found 1 label image(s) but 2 prediction(s)"),
    (["--labels", "{gt}/missing.tif", "--predictions", "{pred}/image2.tif"], "does not exist"),
    (["--labels", "{gt}", "--label_key", "*.png", "--predictions", "{pred}/image2.tif"], "No label files match"),
    (["--labels", "{gt}/image2.tif", "--predictions", "{pred}/image2.tif", "--threshold", "1.5"], "(0, 1]"),
])
def test_evaluate_bad_input_is_one_line_error(folders, capsys, argv, message):
    gt_dir, pred_dir = folders
    argv = [a.format(gt=gt_dir, pred=pred_dir) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[-1] and err[-1].startswith("micro_sam.evaluate: error:")
