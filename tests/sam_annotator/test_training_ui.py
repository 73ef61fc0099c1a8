"""The training UI: settings from the widget, training in the background with progress, the exported model."""
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from micro_sam.sam_annotator.training_ui import TrainingWidget

from ._helpers import wait_for


def _write_dataset(folder, images, labels):
    for kind, arrays in (("images", images), ("labels", labels)):
        (folder / kind).mkdir(parents=True)
        for i, array in enumerate(arrays):
            tifffile.imwrite(folder / kind / f"{i}.tif", array)
    return folder / "images", folder / "labels"


def _widget(raw, labels, save_root, **values):
    widget = TrainingWidget()
    widget.raw_path.value, widget.label_path.value = str(raw), str(labels)
    widget.raw_key.value = widget.label_key.value = "*.tif"
    widget.save_root.value = str(save_root)
    widget.device.value = "cpu"
    for name, value in values.items():
        getattr(widget, name).value = value
    return widget


@pytest.fixture
def small_training_models(monkeypatch):
    """Make the training build the small test SAM and a narrow UNETR (as the training tests do)."""
    import micro_sam.instance_segmentation
    from micro_sam.training import TrainableSAM
    from micro_sam.training import training as training_module
    from training._helpers import small_sam, small_unetr

    def trainable_sam(model_type="vit_b", device=None, checkpoint_path=None, freeze=None, return_state=False,
                      **kwargs):
        model = TrainableSAM(small_sam(seed=0, dim=64)).train()
        return (model, {}) if return_state else model

    monkeypatch.setattr(training_module, "get_trainable_sam_model", trainable_sam)
    monkeypatch.setattr(micro_sam.instance_segmentation, "get_unetr",
                        lambda image_encoder, decoder_state=None, device=None, **kwargs: small_unetr(image_encoder))


@pytest.fixture
def one_torch_thread():
    """Tiny models train much faster single-threaded on a shared CPU (see tests/training/conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_widget_trains_and_exports(tmp_path, small_training_models, one_torch_thread, monkeypatch):
    """The widget's settings reach train_sam; the best checkpoint is exported (the small test SAM is not a
    registered architecture, so the export is recorded here; the slow test below loads a real export)."""
    from micro_sam import util
    from micro_sam.training import training as training_module
    from training._helpers import disk_images

    images, labels = disk_images(3, shape=(160, 160), n_objects=12, radius=(6, 9), seed=0)
    raw, label_folder = _write_dataset(tmp_path / "data", images, labels)
    calls, exports = [], []
    original = training_module.train_sam
    monkeypatch.setattr(training_module, "train_sam", lambda **kwargs: (calls.append(kwargs), original(**kwargs))[1])
    monkeypatch.setattr(util, "export_custom_sam_model",
                        lambda *args, **kwargs: (exports.append((args, kwargs)), Path(kwargs["save_path"]).touch()))
    widget = _widget(raw, label_folder, tmp_path / "run", configuration="gtx1080", model_type="vit_b",
                     patch_shape=(160, 160), n_iterations=2, model_name="small")
    assert widget() is not None
    wait_for(widget, timeout_s=600)
    # the hardware table's settings for the configuration were used, with the widget's values
    (kwargs,) = calls
    assert kwargs["n_iterations"] == 2 and kwargs["freeze"] == ["image_encoder"]
    assert kwargs["n_objects_per_batch"] == 10 and kwargs["model_type"] == "vit_b"
    assert kwargs["save_root"] == str(tmp_path / "run")
    exported = tmp_path / "run" / "small.pt"
    assert widget.exported_path == str(exported) and exported.exists()
    best = tmp_path / "run" / "checkpoints" / "small" / "best.pt"
    assert torch.load(best, weights_only=True)["iteration"] == 2
    assert exports == [((str(best),), {"model_type": "vit_b", "save_path": str(exported),
                                       "with_segmentation_decoder": True})]


def test_training_widget_reports_bad_settings(tmp_path, notifications):
    widget = _widget(tmp_path / "missing", tmp_path / "missing_labels", tmp_path)
    assert widget() is None
    raw, labels = _write_dataset(tmp_path / "data", [np.zeros((32, 32), "uint8")], [np.zeros((32, 32), "uint32")])
    widget = _widget(raw, labels, tmp_path, model_name="a/b")
    assert widget() is None
    widget = _widget(raw, labels, tmp_path, output_path=str(tmp_path / "model.txt"))
    assert widget() is None
    messages = [text for _, text in notifications()]
    for part in ("images and the labels is missing", "model name must be", "must end with .pt"):
        assert any(part in text for text in messages), (part, messages)
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.slow
def test_training_widget_exports_a_model_the_annotators_load(tmp_path, one_torch_thread):
    """Two iterations of vit_t_demo (with its decoder) on a tiny data set; the export loads as a model."""
    from micro_sam.sam_annotator._state import AnnotatorState
    from micro_sam.sample_data import synthetic_nuclei_2d

    data = [synthetic_nuclei_2d((256, 256), seed=seed) for seed in range(2)]
    raw, labels = _write_dataset(tmp_path / "data", [d[0] for d in data], [d[1] for d in data])
    val_raw, val_labels = _write_dataset(tmp_path / "val", [data[0][0]], [data[0][1]])
    widget = _widget(raw, labels, tmp_path / "run", model_type="vit_t_demo", patch_shape=(256, 256),
                     n_iterations=2, model_name="demo_finetuned")
    widget.raw_path_val.value, widget.label_path_val.value = str(val_raw), str(val_labels)
    assert widget() is not None
    wait_for(widget, timeout_s=3000)
    assert widget.exported_path is not None
    state = AnnotatorState()
    state.load_model("vit_t", checkpoint_path=widget.exported_path, device="cpu")
    assert state.decoder is not None
    best = torch.load(tmp_path / "run" / "checkpoints" / "demo_finetuned" / "best.pt", weights_only=True)
    trained = best["model_state"]["sam.mask_decoder.iou_token.weight"]
    assert torch.equal(state.predictor.model.mask_decoder.iou_token.weight, trained)
    state.compute_embeddings(data[1][0], verbose=False)  # the exported model runs in the tools
