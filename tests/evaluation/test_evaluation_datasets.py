"""LIVECell and the benchmark data sets: downloads from a local server (registry, hashes, unpacking), the label
images made from COCO polygons, the crops with the most objects, and the command lines."""
import hashlib
import io
import json
import os
import zipfile

import h5py
import imageio.v3 as imageio
import numpy as np
import pandas as pd
import pooch
import pytest

from micro_sam.evaluation import _datasets, benchmark_datasets, livecell
from _local_server import serve_directory


def _sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _rectangle(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _write_livecell(served):
    """images.zip with two test and two validation images, and the COCO files of both splits."""
    names = {"test": ["A172_t1.tif", "BT474_t2.tif"], "val": ["A172_v1.tif", "A172_v2.tif"]}
    folders = {"test": "livecell_test_images", "val": "livecell_train_val_images"}
    with zipfile.ZipFile(served / "images.zip", "w") as archive:
        for split, files in names.items():
            for i, name in enumerate(files):
                buffer = io.BytesIO()
                imageio.imwrite(buffer, np.full((20, 30), 10 * i, "uint8"), extension=".tif")
                archive.writestr(f"images/{folders[split]}/{name}", buffer.getvalue())
    for split, files in names.items():
        coco = {"images": [{"id": i, "file_name": n, "height": 20, "width": 30} for i, n in enumerate(files)],
                "annotations": [
                    # a large object and a small one inside it: the small one stays visible
                    {"id": 1, "image_id": 0, "area": 200.0, "segmentation": _rectangle(2, 2, 20, 12)},
                    {"id": 2, "image_id": 0, "area": 12.0, "segmentation": _rectangle(4, 4, 6, 7)},
                    {"id": 3, "image_id": 1, "area": 35.0, "segmentation": _rectangle(3, 2, 9, 6)},
                ]}
        (served / f"{split}.json").write_text(json.dumps(coco))


@pytest.fixture
def livecell_server(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    _write_livecell(served)
    monkeypatch.setattr(pooch.get_logger(), "disabled", True)
    with serve_directory(served) as (url, requests):
        entries = {
            "livecell_images": _datasets.DatasetEntry("livecell_images", 2, f"{url}/images.zip", "", "zip"),
            "livecell_val_annotations": _datasets.DatasetEntry("livecell_val_annotations", 2, f"{url}/val.json",
                                                               _sha256(served / "val.json"), "file"),
            "livecell_test_annotations": _datasets.DatasetEntry("livecell_test_annotations", 2, f"{url}/test.json",
                                                                _sha256(served / "test.json"), "file"),
        }
        monkeypatch.setattr(_datasets, "load_registry", lambda: entries)
        yield requests, entries


def test_livecell_download_and_labels_from_coco(livecell_server, tmp_path):
    requests, _ = livecell_server
    folder = tmp_path / "livecell"
    with pytest.warns(UserWarning, match="cannot be verified"):  # LIVECell publishes no hashes
        livecell.get_livecell_data(folder, verbose=False)
    assert sorted(requests) == ["/images.zip", "/test.json", "/val.json"]
    labels = imageio.imread(folder / "annotations" / "livecell_test_images" / "A172" / "A172_t1.tif")
    expected = np.zeros((20, 30), "uint16")
    expected[2:13, 2:21] = 1  # rows y0..y1 and columns x0..x1 of the polygon, inclusive
    expected[4:8, 4:7] = 2
    assert np.array_equal(labels, expected)
    small = imageio.imread(folder / "annotations" / "livecell_test_images" / "BT474" / "BT474_t2.tif")
    assert small.sum() == 35

    images, gts = livecell._get_livecell_paths(folder, "test")
    assert [os.path.basename(p) for p in images] == ["A172_t1.tif", "BT474_t2.tif"]
    assert [os.path.relpath(p, folder) for p in gts] == [
        "annotations/livecell_test_images/A172/A172_t1.tif", "annotations/livecell_test_images/BT474/BT474_t2.tif"]
    images, _ = livecell._get_livecell_paths(folder, "val", n_val_per_cell_type=1)
    assert [os.path.basename(p) for p in images] == ["A172_v1.tif"]

    livecell.get_livecell_data(folder, verbose=False)  # complete: nothing is downloaded again
    assert len(requests) == 3


def test_livecell_bad_hash_and_missing_data(livecell_server, tmp_path):
    _, entries = livecell_server
    entries["livecell_val_annotations"] = entries["livecell_val_annotations"].__class__(
        **{**entries["livecell_val_annotations"].__dict__, "sha256": "0" * 64})
    folder = tmp_path / "livecell"
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="failed verification"):
        livecell.get_livecell_data(folder, verbose=False)
    assert not (folder / "val.json").exists() and not (folder / "downloads" / "livecell_val_annotations.json").exists()
    with pytest.raises(ValueError, match="download=True"):
        livecell.get_livecell_data(tmp_path / "other", download=False)
    with pytest.raises(ValueError, match="get_livecell_data"):
        livecell._get_livecell_paths(tmp_path / "other", "test")


def test_livecell_evaluation_command_scores_predictions(livecell_server, tmp_path):
    folder = tmp_path / "livecell"
    with pytest.warns(UserWarning):
        livecell.get_livecell_data(folder, verbose=False)
    experiment = tmp_path / "experiment"
    inference = experiment / "amg" / "inference"
    inference.mkdir(parents=True)
    _, gts = livecell._get_livecell_paths(folder, "test")
    for gt in gts:  # perfect predictions, except that the small object of the first image is missed
        labels = imageio.imread(gt)
        if "A172" in gt:
            labels[labels == 2] = 1
        imageio.imwrite(inference / os.path.basename(gt), labels)
    livecell.run_livecell_evaluation(["-i", str(folder), "-e", str(experiment)])
    results = pd.read_csv(experiment / "results" / "amg.csv")
    # image 1: the large object is matched (IoU 197 / 209), the small one missed: recall 1/2; image 2: perfect
    assert results["Recall"][0] == pytest.approx((0.5 + 1.0) / 2)
    assert results["Precision"][0] == pytest.approx(1.0)


def _write_container_dataset(served):
    """A zip of two hdf5 files, each 1100 x 600 with objects; the lower half (rows 512..1023) has more of them."""
    with zipfile.ZipFile(served / "data.zip", "w") as archive:
        for index in range(2):
            buffer = io.BytesIO()
            raw = np.full((1100, 600), 50 + index, "uint8")
            labels = np.zeros((1100, 600), "uint16")
            labels[10:20, 10:20] = 1  # upper crop: one object
            for k in range(3):  # lower crop: three objects
                labels[600 + 50 * k:620 + 50 * k, 100:130] = 2 + k
            with h5py.File(buffer, "w") as f:
                f["raw/image"], f["labels/cells"] = raw, labels
            archive.writestr(f"sample_{index}.h5", buffer.getvalue())


def test_benchmark_download_and_crops_with_most_objects(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    _write_container_dataset(served)
    monkeypatch.setattr(pooch.get_logger(), "disabled", True)
    with serve_directory(served) as (url, requests):
        entry = _datasets.DatasetEntry("fake_if", 2, f"{url}/data.zip", _sha256(served / "data.zip"), "zip",
                                       "*.h5", "*.h5", "raw/image", "labels/cells")
        monkeypatch.setattr(_datasets, "load_registry", lambda: {"fake_if": entry})
        images, labels = benchmark_datasets._download("fake_if", str(tmp_path / "data"), verbose=False)
        assert requests == ["/data.zip"]
    assert [os.path.basename(p) for p in images] == ["sample_0.h5", "sample_1.h5"] and images == labels
    ndim = benchmark_datasets._extract_crops("fake_if", str(tmp_path / "data"), images, labels, crops_per_input=1,
                                             verbose=False)
    assert ndim == 2
    crop_images, crop_labels = benchmark_datasets._crop_paths(str(tmp_path / "data"), 2)
    assert [os.path.basename(p) for p in crop_images] == ["fake_if_00001.tif", "fake_if_00002.tif"]
    crop = imageio.imread(crop_labels[0])
    assert crop.shape == (512, 512) and len(np.unique(crop)) == 4  # the lower crop, with three objects
    assert np.array_equal(imageio.imread(crop_images[1]), np.full((512, 512), 51, "uint8"))
    assert sorted(os.listdir(tmp_path / "data" / "roi_2d")) == ["inputs", "labels"]  # no staging folders left


def test_benchmark_rejects_unknown_choices_before_downloading(tmp_path, capsys):
    assert benchmark_datasets.main(["-i", str(tmp_path), "-o", str(tmp_path / "out"), "-d", "not_a_dataset"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("micro_sam.benchmark_sam: error:")
    err = err[0]
    assert "not_a_dataset" in err and "covid_if" in err
    with pytest.raises(ValueError, match="retain"):
        benchmark_datasets.run_benchmark_evaluations(tmp_path, "covid_if", output_folder=tmp_path, retain=["models"])
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # imports all of torch_em's data set modules
def test_torch_em_download_table_matches_torch_em():
    """Every torch_em function the benchmark calls exists and accepts the arguments it is called with."""
    import importlib
    import inspect

    for name, (module, data_fn, data_kwargs, paths_fn, paths_kwargs) in benchmark_datasets._TORCH_EM.items():
        mod = importlib.import_module(f"torch_em.data.datasets.{module}")
        inspect.signature(getattr(mod, data_fn)).bind(path="x", download=True, **data_kwargs)
        inspect.signature(getattr(mod, paths_fn)).bind(path="x", **paths_kwargs)
    assert set(benchmark_datasets.supported_datasets()) >= {"covid_if", "organoidnet", "ifnuclei", "livecell"}


@pytest.mark.slow
def test_benchmark_end_to_end_automatic_on_synthetic_nuclei(tmp_path, monkeypatch):
    from micro_sam.sample_data import synthetic_nuclei_2d

    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "data.zip", "w") as archive:
        for seed in range(2):
            image, labels = synthetic_nuclei_2d(seed=seed)
            buffer = io.BytesIO()
            with h5py.File(buffer, "w") as f:
                f["raw/image"], f["labels/cells"] = image, labels
            archive.writestr(f"sample_{seed}.h5", buffer.getvalue())
    monkeypatch.setattr(pooch.get_logger(), "disabled", True)
    with serve_directory(served) as (url, _):
        entry = _datasets.DatasetEntry("fake_nuclei", 2, f"{url}/data.zip", _sha256(served / "data.zip"), "zip",
                                       "*.h5", "*.h5", "raw/image", "labels/cells")
        monkeypatch.setattr(_datasets, "load_registry", lambda: {"fake_nuclei": entry})
        benchmark_datasets.run_benchmark_evaluations(tmp_path / "data", "fake_nuclei", model_type="vit_t_demo",
                                                     output_folder=tmp_path / "out", evaluation_methods="automatic",
                                                     device="cpu", verbose=False)
    results = pd.read_csv(tmp_path / "out" / "fake_nuclei" / "results" / "ais_2d.csv")
    assert results["mSA"][0] > 0.5  # the bundled model segments the synthetic nuclei
    assert not (tmp_path / "data" / "fake_nuclei" / "roi_2d").exists()  # crops removed (retain=None)
