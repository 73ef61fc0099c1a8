import os

import h5py
import imageio.v3 as imageio
import numpy as np
import pytest
import torch

from micro_sam import util
from micro_sam.evaluation import model_comparison as mc
from micro_sam.prompt_based_segmentation import segment_from_box, segment_from_points
from micro_sam.sample_data import synthetic_nuclei_2d

from conftest import make_tiny_predictor

SEEDS = (0, 1)
N_OBJECTS = 2


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image, labels = self.pairs[index]
        return image[None].astype("float32"), labels[None].astype("int64")


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    pairs = [synthetic_nuclei_2d(shape=(128, 128), n_objects=N_OBJECTS, seed=s) for s in SEEDS]
    predictors = {"tiny0": make_tiny_predictor(seed=0), "tiny1": make_tiny_predictor(seed=1)}
    calls = []

    def fake_get_sam_model(model_type, checkpoint_path=None, peft_kwargs=None, **kwargs):
        calls.append((model_type, checkpoint_path))
        return predictors[model_type]

    out = tmp_path_factory.mktemp("comparison")
    loader = torch.utils.data.DataLoader(_Pairs(pairs + pairs), batch_size=1)  # more samples than requested
    mp = pytest.MonkeyPatch()
    mp.setattr(util, "get_sam_model", fake_get_sam_model)
    try:
        mc.generate_data_for_model_comparison(loader, out, "tiny0", "tiny1", n_samples=len(SEEDS))
    finally:
        mp.undo()
    return out, pairs, predictors, calls


def test_files_layout_and_prompts(comparison):
    out, pairs, _, calls = comparison
    assert calls == [("tiny0", None), ("tiny1", None)]
    assert sorted(os.listdir(out)) == [f"sample_{i}.h5" for i in range(len(SEEDS))]
    for i, (image, labels) in enumerate(pairs):
        centers, boxes = util.get_centers_and_bounding_boxes(labels)
        with h5py.File(out / f"sample_{i}.h5", "r") as f:
            np.testing.assert_array_equal(f["image"][:], image.astype("float32"))
            ids = sorted(int(k) for k in f if k != "image")
            assert ids == list(range(1, N_OBJECTS + 1))
            for gt_id in ids:
                g = f[str(gt_id)]
                np.testing.assert_array_equal(g["gt_mask"][:], labels == gt_id)
                np.testing.assert_array_equal(g.attrs["point_coords"], [centers[gt_id]])
                np.testing.assert_array_equal(g.attrs["point_labels"], [1])
                np.testing.assert_array_equal(g.attrs["box"], boxes[gt_id])
                assert set(g["box"]) == set(g["points"]) == {"mask1", "mask2"}
                assert g["box/mask1"].dtype == np.uint8 and g["box/mask1"].shape == labels.shape


def test_saved_masks_equal_direct_predictions(comparison):
    out, pairs, predictors, _ = comparison
    differ = False
    for i in range(1):  # the first sample only, to keep the test short (~1 s per decoder call here)
        with h5py.File(out / f"sample_{i}.h5", "r") as f:
            for model_id, name in ((1, "tiny0"), (2, "tiny1")):
                predictor = predictors[name]
                emb = util.precompute_image_embeddings(predictor, f["image"][:], ndim=2, verbose=False)
                for key, g in f.items():
                    if key == "image":
                        continue
                    box_mask = segment_from_box(predictor, g.attrs["box"], image_embeddings=emb)[0]
                    point_mask = segment_from_points(
                        predictor, g.attrs["point_coords"], g.attrs["point_labels"], image_embeddings=emb
                    )[0]
                    np.testing.assert_array_equal(g[f"box/mask{model_id}"][:], box_mask)
                    np.testing.assert_array_equal(g[f"points/mask{model_id}"][:], point_mask)
                    differ |= not np.array_equal(g["box/mask1"][:], g["box/mask2"][:])
    assert differ  # two different models were compared


def test_plots_written(comparison, tmp_path):
    out, _, _, _ = comparison
    plots = tmp_path / "plots"
    mc.model_comparison(out, n_images_per_sample=2, min_size=1, plot_folder=plots)
    for prefix in ("points", "box"):
        for advantage in ("advantage1", "advantage2"):
            folder = plots / prefix / advantage
            names = sorted(os.listdir(folder))
            assert names == sorted(f"sample_{i}_{r}.png" for i in range(len(SEEDS)) for r in range(2))
            for name in names:
                im = imageio.imread(folder / name)
                assert im.ndim == 3 and im.shape[0] > 0 and im.shape[1] > im.shape[0]  # two panels side by side


def test_min_size_skips_everything(comparison, tmp_path):
    out, _, _, _ = comparison
    mc.model_comparison(out, n_images_per_sample=1, min_size=128 * 128 + 1, plot_folder=tmp_path / "p",
                        enhance_image=False)
    assert not (tmp_path / "p").exists()


def _write_sample(path, with_model3=False):
    gt = np.zeros((3, 32, 32), dtype=bool)
    gt[0, 2:10, 2:10] = gt[1, 12:20, 12:20] = gt[2, 22:30, 22:30] = True
    perfect, empty = gt.astype("uint8"), np.zeros((32, 32), "uint8")
    mask1 = [perfect[0], empty, perfect[2]]  # model 1 is right on objects 1 and 3
    mask2 = [empty, perfect[1], perfect[2]]  # model 2 only on objects 2 and 3
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=np.random.default_rng(0).random((32, 32)))
        for k in range(3):
            g = f.create_group(str(k + 1))
            g.attrs["point_coords"] = np.array([[5 + 10 * k, 5 + 10 * k]])
            g.attrs["point_labels"] = np.array([1])
            g.attrs["box"] = np.array([2 + 10 * k, 2 + 10 * k, 10 + 10 * k, 10 + 10 * k])
            g.create_dataset("gt_mask", data=gt[k])
            for prefix in ("points", "box"):
                g.create_dataset(f"{prefix}/mask1", data=mask1[k])
                g.create_dataset(f"{prefix}/mask2", data=mask2[k])
                if with_model3:
                    g.create_dataset(f"{prefix}/mask3", data=perfect[k])


def test_selection_ranks_by_advantage(tmp_path):
    _write_sample(tmp_path / "sample_0.h5")
    with h5py.File(tmp_path / "sample_0.h5", "r") as f:
        scores = mc._score_objects(f, "box", min_size=1)
        assert mc._select_objects(scores, "advantage1", 1) == ["1"]
        assert mc._select_objects(scores, "advantage2", 1) == ["2"]
        assert mc._select_objects(scores, "advantage1", 5) == ["1", "3", "2"]
        assert len(mc._score_objects(f, "box", min_size=65)) == 0


def test_three_models_and_bad_input(tmp_path):
    _write_sample(tmp_path / "sample_0.h5", with_model3=True)
    mc.model_comparison(tmp_path, 1, 1, plot_folder=tmp_path / "plots", have_model3=True, point_radius=2,
                        outline_dilation=1)
    im = imageio.imread(tmp_path / "plots" / "points" / "advantage1" / "sample_0_0.png")
    assert im.shape[1] > 2 * im.shape[0]  # three panels

    other = tmp_path / "two_models"
    other.mkdir()
    _write_sample(other / "sample_0.h5")
    with pytest.raises(ValueError, match="third model"):
        mc.model_comparison(other, 1, 1, plot_folder=tmp_path / "x", have_model3=True)
    with pytest.raises(ValueError, match="n_images_per_sample"):
        mc.model_comparison(other, 0, 1, plot_folder=tmp_path / "x")
    with pytest.raises(ValueError, match="not a directory"):
        mc.model_comparison(tmp_path / "missing", 1, 1)
    with pytest.raises(ValueError, match="n_samples"):
        mc.generate_data_for_model_comparison([], tmp_path, "a", "b", n_samples=0)


def test_napari_missing_raises(tmp_path):
    try:
        import napari  # noqa: F401
        pytest.skip("napari is installed")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="napari"):
        mc.model_comparison_with_napari(tmp_path)
